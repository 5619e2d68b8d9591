//! Tasks: containers, and the pod's sandbox container (which is the sandbox itself), created,
//! started, killed and deleted on the agent and the keeper.

use std::{path::Path, sync::Arc};

use coffer_agent::api::proto::{
    BlockDevice, CreateContainerRequest, RemoveContainerRequest, SignalProcessRequest,
    StartContainerRequest,
};
use containerd_shim::{
    api,
    protos::{
        events::task::{TaskCreate, TaskDelete, TaskStart},
        topics,
    },
};

use super::{
    process::{Process, TaskEntry},
    rpc::{bounded, timestamp, CREATE_CALL, QUICK_CALL},
    spec::{read_spec, Device, Spec},
    Service,
};
use crate::{
    annotations::{self, Role},
    config::SandboxKind,
    sandbox::{self, Sandbox},
    ShimError,
};

/// The image reference as the agent takes it.
fn agent_image(reference: &str) -> String {
    if reference.contains("://") {
        reference.to_string()
    } else {
        format!("docker://{reference}")
    }
}

impl Service {
    /// The initdata of a sandbox: the annotation's, else the configured default.
    fn initdata(&self, spec: &Spec) -> Result<String, ShimError> {
        if let Some(text) = annotations::initdata(&spec.annotations)? {
            return Ok(text);
        }
        match &self.config()?.default_initdata {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ShimError::Config(format!("default_initdata {}: {e}", p.display()))),
            None => Err(ShimError::Refused(format!(
                "the pod has no initdata ({}) and the node sets no default_initdata",
                annotations::INITDATA
            ))),
        }
    }

    pub(super) async fn create_task(&self, req: api::CreateTaskRequest) -> Result<u32, ShimError> {
        let config = self.config()?.clone();
        if self.inner.tasks.lock().await.contains_key(&req.id) {
            return Err(ShimError::Invalid(format!("task {} exists", req.id)));
        }
        let spec = read_spec(Path::new(&req.bundle))?;
        annotations::refuse_overrides(&spec.annotations)?;
        let role = annotations::role(&spec.annotations)?;
        let (sandbox, image, is_sandbox, owns_sandbox) = match role {
            Role::Sandbox => {
                let initdata = self.initdata(&spec)?;
                let name = sandbox::name_for(&req.id);
                // The pod's resolver, where containerd binds one into the sandbox.
                let resolv = spec
                    .mounts
                    .iter()
                    .find(|m| m.destination == "/etc/resolv.conf" && !m.source.is_empty())
                    .map(|m| Path::new(&m.source));
                let net = sandbox::PodNet {
                    netns: spec.netns.as_deref(),
                    resolv_conf: resolv,
                };
                let sb = Arc::new(Sandbox::launch(&config, &name, &initdata, net).await?);
                self.inner
                    .sandboxes
                    .lock()
                    .await
                    .insert(req.id.clone(), sb.clone());
                (sb, None, true, false)
            }
            Role::PodContainer { sandbox_id, image } => {
                let sb = self
                    .inner
                    .sandboxes
                    .lock()
                    .await
                    .get(&sandbox_id)
                    .cloned()
                    .ok_or_else(|| {
                        ShimError::NotFound(format!(
                            "pod sandbox {sandbox_id} is not served by this shim"
                        ))
                    })?;
                (sb, Some(image), false, false)
            }
            Role::Standalone => {
                let image = crate::containerd::image_of(
                    &self.inner.containerd,
                    &self.inner.namespace,
                    &req.id,
                )
                .await?;
                let initdata = self.initdata(&spec)?;
                let name = sandbox::name_for(&req.id);
                let sb = Arc::new(
                    Sandbox::launch(&config, &name, &initdata, sandbox::PodNet::default()).await?,
                );
                (sb, Some(image), false, true)
            }
        };
        let mut mounts = spec.mounts.clone();
        super::volumes::mark_subpaths(&mut mounts);
        super::volumes::mark_memory_media(&mut mounts);
        if let Some(image) = &image {
            let block_devices = match block_devices(&sandbox, config.sandbox, &spec).await {
                Ok(b) => b,
                Err(e) => {
                    if owns_sandbox {
                        sandbox.destroy().await;
                    }
                    return Err(e);
                }
            };
            if let Err(e) = super::volumes::sync(&sandbox, &mounts).await {
                if owns_sandbox {
                    sandbox.destroy().await;
                }
                return Err(e);
            }
            let mut c = sandbox.client.clone();
            let created = bounded(
                &format!("creating container {}", req.id),
                CREATE_CALL,
                c.create_container(CreateContainerRequest {
                    container_id: req.id.clone(),
                    image: agent_image(image),
                    args: spec.args.clone(),
                    env: spec.env.clone(),
                    working_dir: spec.cwd.clone(),
                    read_only_rootfs: spec.readonly_rootfs,
                    tty: req.terminal,
                    stdin: !req.stdin.is_empty(),
                    memory_limit_bytes: spec.memory_limit,
                    mounts: mounts.clone(),
                    user: spec.user.clone(),
                    capabilities: spec.capabilities.clone(),
                    privileged: spec.privileged,
                    annotations: spec.cri_annotations(),
                    block_devices,
                }),
            )
            .await;
            if let Err(e) = created {
                if owns_sandbox {
                    sandbox.destroy().await;
                }
                return Err(e);
            }
        }
        let termination_log = spec
            .mounts
            .iter()
            .find(|m| coffer_agent::container::is_termination_log(&m.source))
            .map(|m| std::path::PathBuf::from(&m.source));
        let entry = Arc::new(TaskEntry {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            is_sandbox,
            owns_sandbox,
            init: Arc::new(Process::new(
                &req.id,
                "",
                sandbox.clone(),
                Vec::new(),
                Vec::new(),
                [&req.stdin, &req.stdout, &req.stderr],
                req.terminal,
            )),
            execs: Default::default(),
            kill_signal: Default::default(),
        });
        if let Some(log) = termination_log {
            let _ = entry.init.termination_log.set(log);
        }
        self.inner
            .tasks
            .lock()
            .await
            .insert(req.id.clone(), entry.clone());
        // Every task ends when its sandbox does; unasked, that is a crash (VM or agent gone).
        let me = self.clone();
        tokio::spawn(async move {
            entry.sandbox().wait_gone().await;
            let asked = entry.kill_signal.load(std::sync::atomic::Ordering::SeqCst);
            let status = if asked > 0 { 128 + asked } else { 255 };
            if entry.init.record_exit(status) {
                if asked == 0 {
                    tracing::warn!(task = %entry.id, sandbox = %entry.sandbox().name, "the sandbox ended");
                }
                me.publish_exit(&entry.init).await;
            }
        });
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                pid: sandbox.pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(sandbox.pid)
    }

    pub(super) async fn start_task(&self, id: &str) -> Result<u32, ShimError> {
        let t = self.task(id).await?;
        if t.is_sandbox {
            t.init.mark_started();
        } else {
            let mut c = t.sandbox().client.clone();
            bounded(
                &format!("starting container {id}"),
                QUICK_CALL,
                c.start_container(StartContainerRequest {
                    container_id: id.into(),
                }),
            )
            .await?;
            t.init.mark_started();
            let me = self.clone();
            let t2 = t.clone();
            tokio::spawn(async move { me.follow(t2.init.clone()).await });
        }
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: id.into(),
                pid: t.sandbox().pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(t.sandbox().pid)
    }

    pub(super) async fn kill_task(&self, req: api::KillRequest) -> Result<(), ShimError> {
        let t = self.task(&req.id).await?;
        let p = t.process(&req.exec_id)?;
        tracing::debug!(task = %req.id, exec = %req.exec_id, signal = req.signal, sandbox = t.is_sandbox, "kill");
        if p.exited().is_some() {
            return Err(ShimError::NotFound(format!(
                "task {}: process already finished",
                p.event_id()
            )));
        }
        if t.is_sandbox {
            // The sandbox's "process" is the sandbox: any signal ends it. This answers once the
            // teardown has begun, as a runc shim answers once the signal is sent; the exit is
            // recorded and published when the keeper is gone (the watcher in `create_task`,
            // with this signal). containerd deletes the task and shuts the shim down as soon as
            // it sees that exit, so publishing it before this answer could cut the answer off.
            t.kill_signal
                .store(req.signal.max(1), std::sync::atomic::Ordering::SeqCst);
            t.sandbox().stop().await;
            return Ok(());
        }
        if !p.is_started() {
            // Never started: nothing runs; it ends here.
            if p.record_exit(128 + req.signal) {
                self.publish_exit(&p).await;
            }
            return Ok(());
        }
        let mut c = t.sandbox().client.clone();
        bounded(
            &format!("signalling {}", p.event_id()),
            QUICK_CALL,
            c.signal_process(SignalProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
            }),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn delete_task(&self, id: &str) -> Result<api::DeleteResponse, ShimError> {
        let t = self.task(id).await?;
        tracing::debug!(task = %id, sandbox = t.is_sandbox, "delete");
        if t.is_sandbox {
            t.sandbox().destroy().await;
            self.inner.sandboxes.lock().await.remove(id);
        } else {
            if t.sandbox().alive() {
                let mut c = t.sandbox().client.clone();
                let _ = bounded(
                    &format!("removing container {id}"),
                    QUICK_CALL,
                    c.remove_container(RemoveContainerRequest {
                        container_id: id.into(),
                    }),
                )
                .await;
            }
            if t.owns_sandbox {
                t.sandbox().destroy().await;
            }
        }
        t.init.record_exit(255);
        self.inner.tasks.lock().await.remove(id);
        let exit = t.init.exited().expect("recorded above");
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.into(),
                id: id.into(),
                pid: t.sandbox().pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid: t.sandbox().pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }
}

/// The spec's device nodes that the sandbox takes: the block devices (a claim's
/// `volumeDevices`) of a pod VM, which plugs them in and encrypts them. Anything else is
/// refused, naming it: the node's devices are not the sandbox's. A privileged container's spec
/// lists every node device; it gets the guest's own instead (as the policy allowed privileged),
/// so none is taken.
fn block_volumes(kind: SandboxKind, spec: &Spec) -> Result<Vec<&Device>, ShimError> {
    if spec.privileged {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for d in &spec.devices {
        if d.kind != "b" {
            return Err(ShimError::Refused(format!(
                "device {} ({} {}:{}): a confidential sandbox gets none of the node's devices; only block volumes (volumeDevices), which a pod VM encrypts",
                d.path, d.kind, d.major, d.minor
            )));
        }
        if kind != SandboxKind::Vm {
            return Err(ShimError::Refused(format!(
                "block volume {} ({}:{}): block volumes need a pod VM on this node (shim.toml sandbox = \"vm\"), which encrypts them; a process sandbox would give the container the node's plaintext device, and a peer pod's VM runs elsewhere",
                d.path, d.major, d.minor
            )));
        }
        out.push(d);
    }
    Ok(out)
}

/// Plugs the spec's block volumes ([`block_volumes`]) into the pod VM; what the agent is told
/// of them.
async fn block_devices(
    sandbox: &Sandbox,
    kind: SandboxKind,
    spec: &Spec,
) -> Result<Vec<BlockDevice>, ShimError> {
    let mut out = Vec::new();
    for d in block_volumes(kind, spec)? {
        let serial = sandbox.attach_block(d.major, d.minor).await?;
        out.push(BlockDevice {
            container_path: d.path.clone(),
            serial,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_get_the_registry_transport() {
        assert_eq!(
            agent_image("r.example:5000/app:v1"),
            "docker://r.example:5000/app:v1"
        );
        assert_eq!(agent_image("docker://r/app:v1"), "docker://r/app:v1");
    }

    fn spec_with(devices: serde_json::Value, privileged: bool) -> Spec {
        let d = tempfile::tempdir().unwrap();
        let caps = if privileged {
            vec!["CAP_SYS_ADMIN"]
        } else {
            vec![]
        };
        std::fs::write(
            d.path().join("config.json"),
            serde_json::json!({
                "process": {"args": ["/app"], "capabilities": {"bounding": caps}},
                "linux": {"devices": devices},
            })
            .to_string(),
        )
        .unwrap();
        read_spec(d.path()).unwrap()
    }

    #[test]
    fn block_volumes_go_to_pod_vms_and_every_other_device_is_refused() {
        // What containerd's CRI writes for a claim's volumeDevices entry.
        let block = serde_json::json!([{"path": "/dev/xvda", "type": "b", "major": 7, "minor": 3, "fileMode": 432}]);
        let s = spec_with(block.clone(), false);
        let taken = block_volumes(SandboxKind::Vm, &s).unwrap();
        assert_eq!(
            taken
                .iter()
                .map(|d| (d.path.as_str(), d.major, d.minor))
                .collect::<Vec<_>>(),
            [("/dev/xvda", 7, 3)]
        );
        let e = block_volumes(SandboxKind::Process, &s)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/xvda") && e.contains("need a pod VM"),
            "{e}"
        );
        let chr = spec_with(
            serde_json::json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]),
            false,
        );
        let e = block_volumes(SandboxKind::Vm, &chr)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/fuse (c 10:229)"), "{e}");
        // A privileged container's list is the node's every device: none is plugged in.
        let all = serde_json::json!([block[0].clone(), {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]);
        assert!(block_volumes(SandboxKind::Vm, &spec_with(all, true))
            .unwrap()
            .is_empty());
        assert!(block_volumes(
            SandboxKind::Process,
            &spec_with(serde_json::json!([]), false)
        )
        .unwrap()
        .is_empty());
    }
}
