//! Task events published to containerd.

use containerd_shim::{
    protos::{events::task::TaskExit, protobuf::MessageDyn, topics},
    Context,
};

use super::{process::Process, rpc::timestamp, Service};

impl Service {
    pub(super) async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "cannot publish the event");
        }
    }

    pub(super) async fn publish_exit(&self, p: &Process) {
        let Some(exit) = p.exited() else { return };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: p.container_id.clone(),
                id: p.event_id().to_string(),
                pid: p.sandbox.pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
    }
}
