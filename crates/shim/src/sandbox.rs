//! One pod's sandbox: a `coffer __sandbox` keeper (the same one `coffer run` starts) holding a
//! pod VM or a process sandbox, and the agent API client that reaches it.
//!
//! The keeper's stdin is a pipe whose writing end only this shim holds: when the shim goes away
//! for any reason, `kill -9` included, the keeper sees the end of its input and tears the whole
//! sandbox down (VM or agent, containers, cgroups, directory). A keeper killed on its own is
//! reaped as `coffer rm -f` does ([`coffer_keeper::SandboxDir::stop`]), which the shim's
//! `delete` action runs.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use coffer_agent::api::proto::{agent_client::AgentClient, DestroySandboxRequest};
use coffer_keeper::{Keeper, KeeperArgs, KeeperError};
use tokio::{
    process::{Child, ChildStdin},
    sync::{watch, Mutex},
};
use tonic::transport::Channel;

use crate::{
    config::{SandboxKind, ShimConfig},
    ShimError,
};

/// A running sandbox.
pub struct Sandbox {
    /// Its name (directory and cgroup).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// The keeper's process id.
    pub pid: u32,
    /// The agent.
    pub client: AgentClient<Channel>,
    /// The keeper's stdin; dropping it ends the sandbox.
    stdin: Mutex<Option<ChildStdin>>,
    /// Whether the keeper has exited.
    gone: watch::Receiver<bool>,
    /// The file volumes whose node directories are followed for changes.
    watched: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The node's block devices plugged into the pod VM (device number → serial).
    block: Mutex<std::collections::BTreeMap<(u64, u64), String>>,
}

/// The sandbox name for a containerd id: the id itself when it is a valid sandbox name of at
/// most 32 characters, else 32 hex digits of its digest (the sandbox's socket paths must stay
/// under the 108 bytes of a unix socket address).
pub fn name_for(id: &str) -> String {
    if id.len() <= 32 && coffer_agent::container::is_valid_id(id) {
        id.to_string()
    } else {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(id.as_bytes())[..16])
    }
}

/// The pod's network as containerd hands it to the sandbox.
#[derive(Clone, Copy, Debug, Default)]
pub struct PodNet<'a> {
    /// The network namespace the CNI configured (none: the node's network).
    pub netns: Option<&'a str>,
    /// The pod's resolv.conf (from the CRI's DNS settings), for a pod VM's own resolver.
    pub resolv_conf: Option<&'a Path>,
}

impl Sandbox {
    /// Starts the sandbox `name` with `initdata` and waits until its agent serves. On a pod
    /// network (`net.netns`, the CNI's namespace) a process sandbox's containers join that
    /// namespace, and a pod VM takes over its interfaces.
    pub async fn launch(
        config: &ShimConfig,
        name: &str,
        initdata: &str,
        net: PodNet<'_>,
    ) -> Result<Sandbox, ShimError> {
        let dir = config.state_dir.join(name);
        if dir.exists() {
            // A sandbox of that name left behind (its keeper was killed): reap it first.
            reap(config, name).await;
            if dir.exists() {
                return Err(ShimError::Sandbox(format!(
                    "sandbox {name} already exists in {}",
                    config.state_dir.display()
                )));
            }
        }
        let io = |e: std::io::Error, what: &str| ShimError::Sandbox(format!("{what}: {e}"));
        std::fs::create_dir_all(&dir).map_err(|e| io(e, &format!("creating {}", dir.display())))?;
        let initdata_file = dir.join("initdata.toml");
        std::fs::write(&initdata_file, initdata).map_err(|e| io(e, "writing the initdata"))?;
        let mut args = KeeperArgs::new(
            dir.clone(),
            name,
            config.agent_bin(),
            initdata_file,
            config.psp_dir.clone(),
        );
        args.image_cache = Some(config.image_cache());
        args.plain_http = config.plain_http;
        args.watch_stdin = true;
        if let Some(ns) = net.netns {
            args.pod_netns = Some(ns.into());
            if config.sandbox != SandboxKind::Process {
                args.resolv_conf = net.resolv_conf.map(Path::to_path_buf);
            }
        }
        if let (SandboxKind::Vm | SandboxKind::Remote, Some(podvm)) =
            (config.sandbox, &config.podvm)
        {
            args.podvm = Some(podvm.clone());
            if config.sandbox == SandboxKind::Remote {
                args.cloud = Some(
                    config
                        .cloud
                        .clone()
                        .unwrap_or_else(|| coffer_cloud::DEFAULT_SOCKET.into()),
                );
            }
            args.accel = config.accel.clone();
            args.tee = config.tee.as_str().into();
            args.firmware = config.firmware.clone();
            args.snp_cpu = config.snp_cpu.clone();
            args.memory = config.memory_mib;
        }
        if config.tee == crate::config::TeeKind::Emulated {
            tracing::warn!(
                sandbox = name,
                "EMULATED TEE: this sandbox has no confidentiality from the node (development only)"
            );
        }
        let sandbox_err = |e: KeeperError| ShimError::Sandbox(e.to_string());
        let mut keeper = Keeper::spawn(&config.coffer_bin(), &args, true).map_err(sandbox_err)?;
        let pid = keeper.pid().unwrap_or_default();
        let stdin = keeper.take_stdin();
        let wait = match config.sandbox {
            SandboxKind::Vm | SandboxKind::Remote => Duration::from_secs(600),
            SandboxKind::Process => Duration::from_secs(30),
        };
        let mut keeper = match keeper.ready(wait).await {
            Ok(()) => keeper.into_child(),
            Err(e) => {
                drop(stdin);
                let _ = keeper.child().wait().await;
                return Err(sandbox_err(e));
            }
        };
        let sock = args.agent_sock();
        let client = match coffer_agent::api::connect_unix(&sock).await {
            Ok(c) => c,
            Err(e) => {
                drop(stdin);
                let _ = keeper.wait().await;
                return Err(ShimError::Sandbox(format!(
                    "cannot reach the agent of sandbox {name}: {e}"
                )));
            }
        };
        let (tx, gone) = watch::channel(false);
        tokio::spawn(watch_keeper(keeper, tx));
        Ok(Sandbox {
            name: name.to_string(),
            dir,
            pid,
            client,
            stdin: Mutex::new(stdin),
            gone,
            watched: Default::default(),
            block: Default::default(),
        })
    }

    /// Plugs the node's block device `major:minor` into the pod VM (once; later calls give the
    /// same serial) and returns the serial the guest finds it by.
    pub async fn attach_block(&self, major: u64, minor: u64) -> Result<String, ShimError> {
        let mut block = self.block.lock().await;
        if let Some(s) = block.get(&(major, minor)) {
            return Ok(s.clone());
        }
        let device = coffer_keeper::hotplug::block_device_path(Path::new("/sys"), major, minor)
            .ok_or_else(|| {
                ShimError::Invalid(format!(
                    "block device {major}:{minor} is not a block device of this node"
                ))
            })?;
        let index = u32::try_from(block.len()).unwrap_or(u32::MAX);
        let serial = coffer_keeper::hotplug::attach_block(&self.dir, &device, index)
            .await
            .map_err(|e| ShimError::Sandbox(format!("sandbox {}: {e}", self.name)))?;
        block.insert((major, minor), serial.clone());
        Ok(serial)
    }

    /// Records that file volume `name` is followed; false when it already was.
    pub fn watch_volume(&self, name: &str) -> bool {
        self.watched
            .lock()
            .map(|mut w| w.insert(name.to_string()))
            .unwrap_or(false)
    }

    /// Whether the sandbox is still running.
    pub fn alive(&self) -> bool {
        !*self.gone.borrow()
    }

    /// Waits until the keeper has exited (and so has torn the sandbox down).
    pub async fn wait_gone(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|g| *g).await;
    }

    /// Asks the agent to destroy the sandbox and closes the keeper's stdin: the keeper then
    /// tears everything down ([`Sandbox::wait_gone`] says when that is over).
    pub async fn stop(&self) {
        if self.alive() {
            let mut c = self.client.clone();
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                c.destroy_sandbox(DestroySandboxRequest {}),
            )
            .await;
        }
        drop(self.stdin.lock().await.take());
    }

    /// [`Sandbox::stop`], then waits until the keeper has torn everything down.
    pub async fn destroy(&self) {
        self.stop().await;
        self.wait_gone().await;
    }
}

async fn watch_keeper(mut keeper: Child, gone: watch::Sender<bool>) {
    let _ = keeper.wait().await;
    let _ = gone.send(true);
}

/// Removes what a sandbox whose keeper was killed left (its cgroups and directory), or tears
/// down one that still runs, as `coffer rm -f` does.
pub async fn reap(config: &ShimConfig, name: &str) {
    let Ok(sandbox) = coffer_keeper::SandboxDir::new(&config.state_dir, name) else {
        return;
    };
    if !sandbox.dir.exists() {
        return;
    }
    if let Err(e) = sandbox.stop(true).await {
        tracing::warn!(sandbox = name, error = %e, "cannot reap the sandbox");
    }
}
