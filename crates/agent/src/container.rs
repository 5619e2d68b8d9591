//! Containers on a real OCI runtime (`runc`): the agent pulls the image itself (coffer-image,
//! with the pull options the agent was given: signature policy, keys), writes an OCI bundle whose
//! spec comes from the image config plus the (policy-checked) request, and runs it with the
//! runtime as a child process whose output it keeps for ReadStream.
//!
//! The spec: new PID, IPC, UTS, mount and network namespaces; a cgroup per container; the
//! runtime's default masked and read-only paths; `noNewPrivileges`; Docker's default capability
//! set (everything else dropped); a default seccomp profile denying kernel-module, keyring,
//! mount, reboot, clock, swap, BPF, ptrace and similar system calls; a read-only rootfs when asked.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
};

use coffer_image::{ImageRef, PullOptions};
use serde_json::{json, Value};
use tokio::{io::AsyncReadExt, sync::watch};

use crate::api::proto::CreateContainerRequest;

/// Capabilities a container keeps (Docker's default set).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// System calls the default seccomp profile refuses (EPERM).
pub const DENIED_SYSCALLS: [&str; 38] = [
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_mount",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "umount2",
    "userfaultfd",
];

/// A container problem, mapped to gRPC statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Bad request (id, image reference, …).
    #[error("{0}")]
    Invalid(String),
    /// No such container.
    #[error("no container {0}")]
    NotFound(String),
    /// Already exists.
    #[error("container {0} already exists")]
    Exists(String),
    /// Image keys could not be had from the KBS (attestation or policy refused, or unreachable).
    #[error("image keys: {0}")]
    Keys(String),
    /// The image could not be pulled.
    #[error("cannot pull the image: {0}")]
    Image(#[from] coffer_image::Error),
    /// The runtime failed.
    #[error("runtime: {0}")]
    Runtime(String),
}

type Result<T> = std::result::Result<T, ContainerError>;

/// Output kept per stream (older bytes are dropped beyond this).
const MAX_BUFFER: usize = 4 << 20;

struct Output {
    data: Mutex<Vec<u8>>,
}

struct Container {
    bundle: PathBuf,
    started: bool,
    stdout: Arc<Output>,
    stderr: Arc<Output>,
    /// The exit status once the process ended.
    exit: watch::Receiver<Option<i32>>,
    exit_tx: Option<watch::Sender<Option<i32>>>,
}

/// The KBS the agent attests to for image keys, on first need.
pub struct KbsKeys {
    /// The attested client (keeps its token).
    pub client: Arc<coffer_kbs_client::KbsClient>,
    /// Image key resources named by the initdata.
    pub image_keys: Vec<String>,
    keyring: tokio::sync::OnceCell<Arc<coffer_image::crypt::Keyring>>,
}

impl KbsKeys {
    /// Keys from `client`'s KBS: `image_keys` fetched on first need, layer KEKs by their kid.
    pub fn new(client: coffer_kbs_client::KbsClient, image_keys: Vec<String>) -> Self {
        Self {
            client: Arc::new(client),
            image_keys,
            keyring: tokio::sync::OnceCell::new(),
        }
    }
}

/// The containers of one sandbox.
pub struct Containers {
    root: PathBuf,
    runtime: PathBuf,
    pull: PullOptions,
    kbs: Option<KbsKeys>,
    map: Mutex<HashMap<String, Container>>,
    changed: watch::Sender<u64>,
}

fn valid_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ContainerError::Invalid(format!(
            "container id {id:?}: use 1-64 ASCII letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

/// The OCI runtime spec for a container from `image_config` (the image's `config` section) and
/// the request.
pub fn spec(id: &str, image_config: &Value, req: &CreateContainerRequest) -> Value {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let args = if req.args.is_empty() {
        let mut a = strs(&image_config["Entrypoint"]);
        a.extend(strs(&image_config["Cmd"]));
        a
    } else {
        req.args.clone()
    };
    let mut env = strs(&image_config["Env"]);
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    env.extend(req.env.iter().cloned());
    let cwd = if !req.working_dir.is_empty() {
        req.working_dir.clone()
    } else {
        image_config["WorkingDir"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string()
    };
    // Numeric "uid[:gid]" users; names are not resolved yet (root otherwise).
    let (uid, gid) = image_config["User"]
        .as_str()
        .map(|u| {
            let mut it = u.split(':');
            let uid = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
            let gid = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(uid);
            (uid, gid)
        })
        .unwrap_or((0, 0));
    let caps = DEFAULT_CAPABILITIES.to_vec();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": req.read_only_rootfs},
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}],
            "cgroupsPath": format!("/coffer/{id}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"],
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": DENIED_SYSCALLS.to_vec(), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            },
        },
    })
}

impl Containers {
    /// Containers kept under `root` (bundles), run by `runtime` (e.g. `runc`), images pulled with
    /// `pull`.
    pub fn new(root: PathBuf, runtime: PathBuf, pull: PullOptions) -> Self {
        Self {
            root,
            runtime,
            pull,
            kbs: None,
            map: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }

    /// Takes image keys from a KBS (attesting on first need).
    pub fn with_kbs(mut self, kbs: KbsKeys) -> Self {
        self.kbs = Some(kbs);
        self
    }

    /// The pull options for one image: with the KBS's keys when one is configured.
    async fn pull_options(&self) -> Result<PullOptions> {
        let mut opts = self.pull.clone();
        if let Some(kbs) = &self.kbs {
            let keyring = kbs
                .keyring
                .get_or_try_init(|| async {
                    crate::keys::image_keyring(&kbs.client, &kbs.image_keys)
                        .await
                        .map(Arc::new)
                })
                .await
                .map_err(ContainerError::Keys)?;
            opts.keys = keyring.clone();
            opts.key_broker = Some(Arc::new(crate::keys::Broker(kbs.client.clone())));
        }
        Ok(opts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the containers.
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Pulls the image and writes the bundle.
    pub async fn create(&self, req: &CreateContainerRequest) -> Result<()> {
        let id = req.container_id.as_str();
        valid_id(id)?;
        if self.lock().contains_key(id) {
            return Err(ContainerError::Exists(id.into()));
        }
        let image = ImageRef::parse(&req.image)?;
        let bundle = self.root.join(id);
        if bundle.exists() {
            return Err(ContainerError::Exists(id.into()));
        }
        std::fs::create_dir_all(&bundle)
            .map_err(|e| ContainerError::Runtime(format!("cannot create the bundle: {e}")))?;
        let pulled = match self.pull_options().await {
            Ok(opts) => coffer_image::pull(&image, &bundle.join("rootfs"), &opts)
                .await
                .map_err(ContainerError::from),
            Err(e) => Err(e),
        };
        let report = match pulled {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let spec = spec(id, &report.config, req);
        coffer_fsutil::write_atomic(
            &bundle.join("config.json"),
            spec.to_string().as_bytes(),
            0o600,
        )
        .map_err(|e| ContainerError::Runtime(format!("cannot write the spec: {e}")))?;
        let (tx, rx) = watch::channel(None);
        self.lock().insert(
            id.into(),
            Container {
                bundle,
                started: false,
                stdout: Arc::new(Output {
                    data: Mutex::new(Vec::new()),
                }),
                stderr: Arc::new(Output {
                    data: Mutex::new(Vec::new()),
                }),
                exit: rx,
                exit_tx: Some(tx),
            },
        );
        tracing::info!(container = id, image = %image, manifest = %report.manifest_digest, "container created");
        Ok(())
    }

    /// Starts the container's process under the runtime.
    pub fn start(&self, id: &str) -> Result<()> {
        let mut map = self.lock();
        let c = map
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if c.started {
            return Err(ContainerError::Invalid(format!(
                "container {id} was already started"
            )));
        }
        let mut child = tokio::process::Command::new(&self.runtime)
            .arg("run")
            .arg("--bundle")
            .arg(&c.bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                ContainerError::Runtime(format!("cannot run {}: {e}", self.runtime.display()))
            })?;
        c.started = true;
        let changed = self.changed.clone();
        for (pipe, out) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                c.stdout.clone(),
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                c.stderr.clone(),
            ),
        ] {
            let Some(mut pipe) = pipe else { continue };
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    {
                        let mut d = out.data.lock().unwrap_or_else(|p| p.into_inner());
                        d.extend_from_slice(&buf[..n]);
                        if d.len() > MAX_BUFFER {
                            let excess = d.len() - MAX_BUFFER;
                            d.drain(..excess);
                        }
                    }
                    changed.send_modify(|g| *g += 1);
                }
            });
        }
        let tx = c.exit_tx.take();
        tokio::spawn(async move {
            let status = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
            if let Some(tx) = tx {
                let _ = tx.send(Some(status));
            }
            changed.send_modify(|g| *g += 1);
        });
        Ok(())
    }

    /// Waits for the container's process to exit; its status.
    pub async fn wait(&self, id: &str) -> Result<i32> {
        let mut rx = {
            let map = self.lock();
            map.get(id)
                .ok_or_else(|| ContainerError::NotFound(id.into()))?
                .exit
                .clone()
        };
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return Ok(s);
            }
            if rx.changed().await.is_err() {
                return Err(ContainerError::Runtime(
                    "the container's process was lost".into(),
                ));
            }
        }
    }

    /// Takes up to `len` bytes of `stream` ("stdout" or "stderr") output, waiting for some while
    /// the process runs; empty once it has exited and everything was read.
    pub async fn read(&self, id: &str, stream: &str, len: usize) -> Result<Vec<u8>> {
        let mut changed = self.changed.subscribe();
        loop {
            let (out, exited) = {
                let map = self.lock();
                let c = map
                    .get(id)
                    .ok_or_else(|| ContainerError::NotFound(id.into()))?;
                let out = match stream.to_ascii_lowercase().as_str() {
                    "stdout" => c.stdout.clone(),
                    "stderr" => c.stderr.clone(),
                    other => {
                        return Err(ContainerError::Invalid(format!(
                            "stream {other:?}: use stdout or stderr"
                        )))
                    }
                };
                let exited = c.exit.borrow().is_some();
                (out, exited)
            };
            {
                let mut d = out.data.lock().unwrap_or_else(|p| p.into_inner());
                if !d.is_empty() {
                    let n = d.len().min(len.max(1));
                    return Ok(d.drain(..n).collect());
                }
            }
            if exited {
                return Ok(Vec::new());
            }
            if changed.changed().await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    /// Sends `signal` to the container's process.
    pub async fn signal(&self, id: &str, signal: u32) -> Result<()> {
        if !self.lock().contains_key(id) {
            return Err(ContainerError::NotFound(id.into()));
        }
        self.runtime(&["kill", id, &signal.to_string()]).await
    }

    /// Stops (if needed) and removes the container and its bundle.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self
            .lock()
            .remove(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if c.started {
            let _ = self.runtime(&["delete", "--force", id]).await;
        }
        std::fs::remove_dir_all(&c.bundle)
            .map_err(|e| ContainerError::Runtime(format!("cannot remove the bundle: {e}")))
    }

    async fn runtime(&self, args: &[&str]) -> Result<()> {
        let out = tokio::process::Command::new(&self.runtime)
            .args(args)
            .output()
            .await
            .map_err(|e| {
                ContainerError::Runtime(format!("cannot run {}: {e}", self.runtime.display()))
            })?;
        if !out.status.success() {
            return Err(ContainerError::Runtime(format!(
                "{} {}: {}",
                self.runtime.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The bundle directory of a container (tests, diagnostics).
    pub fn bundle(&self, id: &str) -> Option<PathBuf> {
        self.lock().get(id).map(|c| c.bundle.clone())
    }

    /// Where bundles live.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
