//! Execs: recorded at containerd's `Exec`, run by the agent at their `Start` (as the pod's policy
//! allows), forgotten at their `Delete`.

use std::sync::Arc;

use coffer_agent::api::proto::ExecProcessRequest;
use containerd_shim::{
    api,
    protos::{
        events::task::{TaskExecAdded, TaskExecStarted},
        topics,
    },
};

use super::{
    process::Process,
    rpc::{bounded, timestamp, QUICK_CALL},
    spec::exec_spec,
    Service,
};
use crate::ShimError;

impl Service {
    /// containerd's `Exec`: records the exec; the agent runs it at `Start`, if its policy
    /// allows (the default policy does not).
    pub(super) async fn add_exec(&self, req: api::ExecProcessRequest) -> Result<(), ShimError> {
        let t = self.task(&req.id).await?;
        if t.is_sandbox {
            return Err(ShimError::Invalid(format!(
                "task {} is the pod's sandbox, which runs no processes to exec into",
                req.id
            )));
        }
        if t.init.exited().is_some() || !t.init.is_started() {
            return Err(ShimError::Invalid(format!(
                "container {} is not running",
                req.id
            )));
        }
        let spec = exec_spec(&req.spec.value).map_err(|why| {
            ShimError::Invalid(format!("exec {}: its process spec {why}", req.exec_id))
        })?;
        let p = Arc::new(Process::new(
            &req.id,
            &req.exec_id,
            t.sandbox().clone(),
            spec.args,
            spec.env,
            [&req.stdin, &req.stdout, &req.stderr],
            req.terminal,
        ));
        {
            let mut execs = t.execs.lock().unwrap_or_else(|p| p.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(ShimError::Invalid(format!(
                    "exec {} exists in task {}",
                    req.exec_id, req.id
                )));
            }
            execs.insert(req.exec_id.clone(), p);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    /// `Start` of an exec: `ExecProcess` (the agent's policy decides), then its stdio is
    /// followed like a container's.
    pub(super) async fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let t = self.task(id).await?;
        let p = t.process(exec_id)?;
        if p.is_started() {
            return Err(ShimError::Invalid(format!(
                "exec {exec_id} was already started"
            )));
        }
        let mut c = p.sandbox.client.clone();
        bounded(
            &format!("exec {exec_id} in container {id}"),
            QUICK_CALL,
            c.exec_process(ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                args: p.args.clone(),
                env: p.env.clone(),
                tty: p.terminal,
                stdin: !p.stdin.is_empty(),
                ..Default::default()
            }),
        )
        .await?;
        p.mark_started();
        let me = self.clone();
        let p2 = p.clone();
        tokio::spawn(async move { me.follow(p2).await });
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid: p.sandbox.pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(p.sandbox.pid)
    }

    /// `Delete` of an exec: forgets a finished (or never started) exec.
    pub(super) async fn delete_exec(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<api::DeleteResponse, ShimError> {
        let t = self.task(id).await?;
        let p = t.process(exec_id)?;
        if p.is_started() && p.exited().is_none() {
            return Err(ShimError::Invalid(format!(
                "exec {exec_id} in container {id} is still running"
            )));
        }
        t.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(exec_id);
        p.record_exit(255);
        let exit = p.exited().expect("recorded above");
        Ok(api::DeleteResponse {
            pid: p.sandbox.pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }
}
