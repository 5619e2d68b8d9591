//! A task's resource use, from the agent, as the cgroup v1 metrics containerd expects.

use coffer_agent::api::proto::StatsContainerRequest;
use containerd_shim::protos::{
    cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat},
    protobuf::{well_known_types::any::Any, Message},
};

use super::{
    rpc::{bounded, QUICK_CALL},
    Service,
};
use crate::ShimError;

impl Service {
    pub(super) async fn stats_of(&self, id: &str) -> Result<Any, ShimError> {
        let t = self.task(id).await?;
        let mut metrics = Metrics::new();
        if !t.is_sandbox {
            let mut c = t.sandbox().client.clone();
            let s = bounded(
                &format!("stats of container {id}"),
                QUICK_CALL,
                c.stats_container(StatsContainerRequest {
                    container_id: id.into(),
                }),
            )
            .await?;
            metrics.memory = Some(MemoryStat {
                usage: Some(MemoryEntry {
                    usage: s.memory_bytes,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into();
            metrics.cpu = Some(CPUStat {
                usage: Some(CPUUsage {
                    total: s.cpu_usage_ns,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into();
            metrics.pids = Some(PidsStat {
                current: s.pids.into(),
                ..Default::default()
            })
            .into();
        }
        let mut any = Any::new();
        // containerd resolves the type by its protobuf name.
        any.type_url = "io.containerd.cgroups.v1.Metrics".into();
        any.value = metrics
            .write_to_bytes()
            .map_err(|e| ShimError::Agent(e.to_string()))?;
        Ok(any)
    }
}
