//! The keeper's life (`coffer __sandbox`): it holds an exclusive lock on `<dir>/keeper.lock`
//! for its whole life, runs the sandbox (a process sandbox, [`crate::process`], or a pod VM,
//! [`crate::vm`]), and tears it down — agent and every container process killed, cgroups under
//! `/coffer/<name>` removed, the directory deleted — when the agent or the VM ends
//! (DestroySandbox, a crash, `kill -9`), when it is asked to (SIGTERM, SIGINT), or, for a
//! foreground launcher, when that process goes away (its pipe to the keeper's stdin closes). A
//! sandbox that failed keeps its reason and logs (`failed`) until it is removed; one whose keeper
//! was itself killed is reaped by the next `coffer ps`, `coffer rm` or launch of that name.

use anyhow::Context as _;
use rustix::fs::{flock, FlockOperation};

use crate::{dir::check_name, KeeperArgs, SandboxDir, SandboxError};

/// Runs the keeper (`coffer __sandbox`) until the sandbox ends, then tears it down. A sandbox
/// that ended with an error is retired (its reason recorded, see [`crate::FAILED`]) and the
/// error returned.
pub fn keep(a: KeeperArgs) -> Result<(), SandboxError> {
    check_name(&a.name)?;
    let io = |what: String| move |source| SandboxError::Io { what, source };
    let lock_path = a.dir.join("keeper.lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(io(format!("cannot create {}", lock_path.display())))?;
    flock(&lock, FlockOperation::NonBlockingLockExclusive).map_err(|e| SandboxError::Io {
        what: format!("another keeper holds sandbox {}", a.name),
        source: e.into(),
    })?;
    let pid_path = a.dir.join("keeper.pid");
    std::fs::write(&pid_path, std::process::id().to_string())
        .map_err(io(format!("cannot write {}", pid_path.display())))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("cannot start the keeper's runtime".into()))?;
    let result = runtime.block_on(serve(&a));
    // A read of stdin may still be pending on the blocking pool; do not wait for it.
    runtime.shutdown_background();
    // Everything below runs however the sandbox ended. A failed sandbox leaves its reason
    // and logs for `coffer ps`, `coffer logs` and the launcher.
    let sandbox = SandboxDir {
        dir: a.dir.clone(),
        name: a.name.clone(),
    };
    let result = result.map_err(|e| format!("{e:#}"));
    let cleaned = match &result {
        Ok(()) => sandbox.remove(),
        Err(why) => {
            tracing::error!(error = %why, "the sandbox failed");
            sandbox.retire(why)
        }
    };
    drop(lock);
    result.map_err(SandboxError::Ended).and(cleaned)
}

/// Runs the sandbox the arguments name until it ends.
async fn serve(a: &KeeperArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.initdata)
        .with_context(|| format!("cannot read {}", a.initdata.display()))?;
    let digest = coffer_wire::initdata::digest(&text)?;
    let a = &with_network(a)?;
    match (&a.podvm, &a.cloud) {
        (Some(podvm), Some(cloud)) => crate::remote::serve(a, podvm, cloud, &text, &digest).await,
        (Some(podvm), None) => crate::vm::serve(a, podvm, &text, &digest).await,
        (None, Some(_)) => anyhow::bail!(
            "--cloud needs --podvm: the pod VM image the peer pod boots (and the emulated PSP measures)"
        ),
        (None, None) => crate::process::serve(a, &digest).await,
    }
}

/// The arguments with the pod network `--network` asks for as `pod_netns` (a CNI attachment
/// is released when the sandbox is removed, [`SandboxDir`]).
fn with_network(a: &KeeperArgs) -> anyhow::Result<KeeperArgs> {
    let mut a = a.clone();
    match (a.network.as_str(), &a.pod_netns, &a.podvm) {
        ("none", None, _) => {}
        ("none", _, _) => {}
        (_, Some(_), _) => anyhow::bail!(
            "--network {} and --pod-netns: the pod's network is already given",
            a.network
        ),
        ("host", None, Some(_)) => anyhow::bail!(
            "--network host: a pod VM cannot share the host's network; use none or cni"
        ),
        ("host", None, None) => {
            // The keeper's own namespace, bound to a file the agent's mount namespace (with its
            // own /proc) still shows; unmounted when the sandbox is removed.
            let file = a.dir.join(crate::dir::HOST_NETNS);
            std::fs::File::create(&file)
                .and_then(|_| {
                    rustix::mount::mount_bind("/proc/thread-self/ns/net", &file).map_err(Into::into)
                })
                .with_context(|| {
                    format!(
                        "cannot bind the host's network namespace to {}",
                        file.display()
                    )
                })?;
            a.pod_netns = Some(file);
        }
        ("cni", None, _) => {
            a.pod_netns = Some(crate::cni::attach(
                &a.dir,
                &a.name,
                &a.cni_conf_dir,
                &a.cni_bin_dir,
            )?);
            tracing::info!(
                address = crate::cni::address(&a.dir).unwrap_or_default(),
                "the sandbox is on the CNI network"
            );
        }
        (other, None, _) => anyhow::bail!("--network {other}: use none, host or cni"),
    }
    Ok(a)
}
