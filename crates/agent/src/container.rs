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

use crate::proto::CreateContainerRequest;

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

/// What a process wrote to one stream: the last [`MAX_BUFFER`] bytes and where they start.
#[derive(Default)]
struct StreamBuf {
    data: std::collections::VecDeque<u8>,
    /// Offset of `data[0]` in everything the process wrote.
    start: u64,
}

/// One process (a container's init or an exec): its output and exit status.
pub(crate) struct Process {
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    /// The master side of the process's terminal (TTY processes), once the runtime handed it
    /// over.
    pty: Option<watch::Receiver<Option<Arc<std::fs::File>>>>,
    stdout: Mutex<StreamBuf>,
    stderr: Mutex<StreamBuf>,
    exit: watch::Receiver<Option<i32>>,
    /// The runtime's process id (foreground), or the process's own (detached, once known).
    pid: std::sync::OnceLock<u32>,
    /// Set before the exit is reported when the process's cgroup saw the OOM killer.
    oom_killed: std::sync::atomic::AtomicBool,
}

/// A chunk of output read by [`Containers::read`].
#[derive(Debug, Default, PartialEq)]
pub struct Chunk {
    /// The bytes.
    pub data: Vec<u8>,
    /// Offset of `data[0]` in the stream.
    pub offset: u64,
    /// The process exited and nothing follows.
    pub eof: bool,
}

/// A container's state, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// The container id.
    pub id: String,
    /// The image reference it was created from.
    pub image: String,
    /// `created`, `running` or `exited`.
    pub state: &'static str,
    /// The exit status once exited.
    pub exit_status: Option<i32>,
    /// Unix seconds of creation.
    pub created: i64,
}

/// Resource use of a running container (from the runtime's cgroup statistics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// CPU time used, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Processes in the container.
    pub pids: u32,
}

struct Container {
    bundle: PathBuf,
    /// Keep the init process's stdin open.
    stdin: bool,
    /// The init process has a terminal.
    tty: bool,
    image: String,
    created: i64,
    /// The init process once started.
    init: Option<Arc<Process>>,
    execs: HashMap<String, Arc<Process>>,
}

/// What the pulls take from the KBS, fetched once.
struct PullSettings {
    keyring: Arc<coffer_image::crypt::Keyring>,
    auth: Option<coffer_image::source::AuthFile>,
    policy: Option<Arc<coffer_image::signature::Policy>>,
}

/// The KBS the agent attests to for image keys, registry credentials and the signature policy,
/// on first need.
pub struct KbsKeys {
    /// The attested client (keeps its token).
    pub client: Arc<coffer_kbs_client::KbsClient>,
    /// What the initdata names.
    pub config: crate::keys::KbsConfig,
    settings: tokio::sync::OnceCell<PullSettings>,
}

impl KbsKeys {
    /// Keys from `client`'s KBS: the resources `config` names fetched on first need, layer KEKs
    /// by their kid.
    pub fn new(client: coffer_kbs_client::KbsClient, config: crate::keys::KbsConfig) -> Self {
        Self {
            client: Arc::new(client),
            config,
            settings: tokio::sync::OnceCell::new(),
        }
    }
}

/// The containers of one sandbox.
pub struct Containers {
    root: PathBuf,
    runtime: PathBuf,
    cgroup_parent: String,
    pull: PullOptions,
    kbs: Option<KbsKeys>,
    map: Mutex<HashMap<String, Container>>,
    changed: watch::Sender<u64>,
}

/// Whether `id` is a usable container (or exec, or sandbox) name: 1-64 ASCII letters, digits,
/// `-` or `_` (it becomes a path component and a cgroup name).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_id(id: &str) -> Result<()> {
    if !is_valid_id(id) {
        return Err(ContainerError::Invalid(format!(
            "container id {id:?}: use 1-64 ASCII letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

/// Resolves an image config's `User` (`user[:group]`, each a name or a number; empty is root)
/// against the image's own `/etc/passwd` and `/etc/group`, read inside `rootfs` (symlinks
/// followed as if it were `/`). A name the image does not define is an error, never root.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32)> {
    let user = user.trim();
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let table = |file: &str| -> Result<Vec<Vec<String>>> {
        let comps: Vec<Vec<u8>> = file
            .split('/')
            .filter(|c| !c.is_empty())
            .map(|c| c.as_bytes().to_vec())
            .collect();
        let path = coffer_image::unpack::resolve_in_root(rootfs, &comps, true)
            .map_err(|e| ContainerError::Invalid(format!("the image's {file}: {e}")))?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ContainerError::Invalid(format!("the image's {file} cannot be read: {e}"))
        })?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect())
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => {
            // A number needs no passwd entry; its primary group is taken from one if present.
            let gid = table("/etc/passwd")
                .ok()
                .and_then(|t| {
                    t.into_iter()
                        .find(|f| f.get(2).and_then(|x| x.parse::<u32>().ok()) == Some(n))
                })
                .and_then(|f| f.get(3).and_then(|x| x.parse().ok()));
            (n, gid.unwrap_or(n))
        }
        Err(_) => {
            let entry = table("/etc/passwd")?
                .into_iter()
                .find(|f| f.first().map(String::as_str) == Some(u))
                .ok_or_else(|| {
                    ContainerError::Invalid(format!(
                        "the image's user {u:?} is not in its /etc/passwd"
                    ))
                })?;
            let num = |i: usize| entry.get(i).and_then(|x| x.parse::<u32>().ok());
            match (num(2), num(3)) {
                (Some(uid), Some(gid)) => (uid, gid),
                _ => {
                    return Err(ContainerError::Invalid(format!(
                        "the image's /etc/passwd entry for {u:?} is malformed"
                    )))
                }
            }
        }
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => table("/etc/group")?
                .into_iter()
                .find(|f| f.first().map(String::as_str) == Some(g))
                .and_then(|f| f.get(2).and_then(|x| x.parse().ok()))
                .ok_or_else(|| {
                    ContainerError::Invalid(format!(
                        "the image's group {g:?} is not in its /etc/group"
                    ))
                })?,
        },
    };
    Ok((uid, gid))
}

/// A container's cgroup (the runtime's `cgroupsPath`).
fn cgroup_path(cgroup_parent: &str, id: &str) -> String {
    format!("{}/{id}", cgroup_parent.trim_end_matches('/'))
}

/// The spec's resources: no device, and the memory limit when one is set.
fn resources(memory_limit: u64) -> Value {
    let mut r = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if memory_limit > 0 {
        r["memory"] = json!({"limit": memory_limit});
    }
    r
}

/// Whether the cgroup `path` (as `cgroupsPath` names it) saw the OOM killer: `oom_kill` in its
/// `memory.events` (cgroup v2) or `memory.oom_control` (v1).
fn saw_oom_kill(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    [
        format!("/sys/fs/cgroup/{rel}/memory.events"),
        format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
    ]
    .iter()
    .filter_map(|f| std::fs::read_to_string(f).ok())
    .any(|text| {
        text.lines().any(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    })
}

/// The OCI runtime spec for a container from `image_config` (the image's `config` section), the
/// resolved `user` (uid, gid) and the request.
pub fn spec(
    id: &str,
    cgroup_parent: &str,
    image_config: &Value,
    user: (u32, u32),
    req: &CreateContainerRequest,
) -> Value {
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
    let (uid, gid) = user;
    let caps = DEFAULT_CAPABILITIES.to_vec();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": req.tty,
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
            "cgroupsPath": cgroup_path(cgroup_parent, id),
            "resources": resources(req.memory_limit_bytes),
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

/// Appends what `from` yields to `to` (keeping the last [`MAX_BUFFER`] bytes) until its end or
/// an error, waking readers after each chunk.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    to: &Mutex<StreamBuf>,
    changed: &watch::Sender<u64>,
) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(k) = from.read(&mut buf).await {
        if k == 0 {
            break;
        }
        {
            let mut b = to.lock().unwrap_or_else(|p| p.into_inner());
            b.data.extend(&buf[..k]);
            if b.data.len() > MAX_BUFFER {
                let excess = b.data.len() - MAX_BUFFER;
                b.data.drain(..excess);
                b.start += excess as u64;
            }
        }
        changed.send_modify(|g| *g += 1);
    }
}

/// The process id the runtime started detached and the master side of its terminal: both
/// handed over once the runtime has exited successfully.
async fn handed_over(
    dir: &crate::tty::ConsoleDir,
    listener: tokio::net::UnixListener,
) -> std::io::Result<(u32, std::fs::File)> {
    // The runtime connected (and sent the terminal) before it exited: the connection waits in
    // the listener's backlog.
    let master = crate::tty::receive_console(listener, crate::tty::HANDOVER).await?;
    crate::tty::set_size(&master, 24, 80)?;
    Ok((dir.pid()?, master))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Containers {
    /// Containers kept under `root` (bundles, and the runtime's state in `root/.runtime`), run
    /// by `runtime` (e.g. `runc`) in cgroups under `/coffer`, images pulled with `pull`.
    pub fn new(root: PathBuf, runtime: PathBuf, pull: PullOptions) -> Self {
        // Detached (TTY) container processes are reparented here once the runtime exits.
        crate::tty::become_subreaper();
        Self {
            root,
            runtime,
            cgroup_parent: "/coffer".into(),
            pull,
            kbs: None,
            map: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }

    /// Puts the containers' cgroups under `parent` (e.g. `/coffer/<sandbox>`), so that a
    /// launcher can remove what a killed sandbox left.
    pub fn with_cgroup_parent(mut self, parent: &str) -> Self {
        self.cgroup_parent = parent.to_string();
        self
    }

    /// Takes image keys from a KBS (attesting on first need).
    pub fn with_kbs(mut self, kbs: KbsKeys) -> Self {
        self.kbs = Some(kbs);
        self
    }

    /// The pull options for one image: with the KBS's keys, registry credentials and signature
    /// policy when the initdata names them.
    async fn pull_options(&self) -> Result<PullOptions> {
        let mut opts = self.pull.clone();
        if let Some(kbs) = &self.kbs {
            let s = kbs
                .settings
                .get_or_try_init(|| async {
                    let (keyring, auth, policy) =
                        crate::keys::pull_settings(&kbs.client, &kbs.config).await?;
                    tracing::info!(
                        keys = kbs.config.image_keys.len(),
                        registry_auth = auth.is_some(),
                        signature_policy = policy.is_some(),
                        "attested; resources from the KBS"
                    );
                    Ok::<_, String>(PullSettings {
                        keyring: Arc::new(keyring),
                        auth,
                        policy: policy.map(Arc::new),
                    })
                })
                .await
                .map_err(ContainerError::Keys)?;
            tracing::debug!("pull settings from the KBS in hand");
            opts.keys = s.keyring.clone();
            if let Some(a) = &s.auth {
                opts.source.auth = a.clone();
            }
            if let Some(p) = &s.policy {
                opts.policy = Some(p.clone());
            }
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

    /// The containers and their states, by id.
    pub fn statuses(&self) -> Vec<Status> {
        let map = self.lock();
        let mut out: Vec<Status> = map
            .iter()
            .map(|(id, c)| {
                let exit = c.init.as_ref().and_then(|p| *p.exit.borrow());
                Status {
                    id: id.clone(),
                    image: c.image.clone(),
                    state: match (&c.init, exit) {
                        (None, _) => "created",
                        (Some(_), None) => "running",
                        (Some(_), Some(_)) => "exited",
                    },
                    exit_status: exit,
                    created: c.created,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
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
        let rootfs = bundle.join("rootfs");
        let user = match resolve_user(&rootfs, report.config["User"].as_str().unwrap_or("")) {
            Ok(u) => u,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let spec = spec(id, &self.cgroup_parent, &report.config, user, req);
        if let Err(e) = coffer_fsutil::write_atomic(
            &bundle.join("config.json"),
            spec.to_string().as_bytes(),
            0o600,
        ) {
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(ContainerError::Runtime(format!(
                "cannot write the spec: {e}"
            )));
        }
        self.lock().insert(
            id.into(),
            Container {
                bundle,
                stdin: req.stdin,
                tty: req.tty,
                image: req.image.clone(),
                created: now(),
                init: None,
                execs: HashMap::new(),
            },
        );
        tracing::info!(container = id, image = %image, manifest = %report.manifest_digest, "container created");
        Ok(())
    }

    /// The runtime, with its state kept under the agent's root.
    fn runtime_cmd(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.runtime);
        cmd.arg("--root").arg(self.root.join(".runtime"));
        cmd
    }

    /// Runs the runtime's `sub` command (`run` or `exec`) with `rest` after its options, with the
    /// process's stdout and stderr kept (and its stdin open when `stdin`), and a task that
    /// records its exit.
    ///
    /// Without `tty` the runtime runs in the foreground (`run` keeps the container after it
    /// exits, so that its cgroup can be read) with the process's stdio on pipes, and its exit
    /// status is the process's. With `tty` it runs detached with a console socket (see
    /// [`crate::tty`]): the agent holds the master side of the container's own terminal, whose
    /// output is the process's stdout and to which writes are its input; the process is
    /// waited for once the runtime has started it. A runtime that fails reports its own exit
    /// status, its error output in the process's stderr.
    fn spawn(
        &self,
        sub: &str,
        rest: &[&std::ffi::OsStr],
        stdin: bool,
        tty: bool,
        oom_cgroup: Option<String>,
    ) -> Result<Arc<Process>> {
        let runtime_err = |e: std::io::Error| {
            ContainerError::Runtime(format!("cannot run {}: {e}", self.runtime.display()))
        };
        let mut cmd = self.runtime_cmd();
        cmd.arg(sub);
        let console = if tty {
            let dir = crate::tty::ConsoleDir::new()
                .map_err(|e| ContainerError::Runtime(format!("cannot open a terminal: {e}")))?;
            let listener = tokio::net::UnixListener::bind(dir.socket())
                .map_err(|e| ContainerError::Runtime(format!("cannot open a terminal: {e}")))?;
            cmd.arg("--detach")
                .arg("--console-socket")
                .arg(dir.socket())
                .arg("--pid-file")
                .arg(dir.pid_file());
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            Some((dir, listener))
        } else {
            if sub == "run" {
                cmd.arg("--keep");
            }
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        };
        cmd.args(rest);
        let mut child = cmd.kill_on_drop(true).spawn().map_err(runtime_err)?;
        let (tx, rx) = watch::channel(None);
        let (pty_tx, pty_rx) = watch::channel(None);
        let pid = std::sync::OnceLock::new();
        if console.is_none() {
            if let Some(p) = child.id() {
                let _ = pid.set(p);
            }
        }
        let process = Arc::new(Process {
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            pty: console.as_ref().map(|_| pty_rx),
            stdout: Mutex::new(StreamBuf::default()),
            stderr: Mutex::new(StreamBuf::default()),
            exit: rx,
            pid,
            oom_killed: Default::default(),
        });
        let pipes: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ];
        let mut readers = Vec::new();
        for (n, pipe) in pipes.into_iter().enumerate() {
            let Some(pipe) = pipe else { continue };
            let changed = self.changed.clone();
            let process = process.clone();
            readers.push(tokio::spawn(async move {
                let out = if n == 0 {
                    &process.stdout
                } else {
                    &process.stderr
                };
                pump(pipe, out, &changed).await;
            }));
        }
        let changed = self.changed.clone();
        let exited = process.clone();
        tokio::spawn(async move {
            let runtime = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
            let status = match console {
                None => runtime,
                Some((dir, listener)) => {
                    // The runtime's error output is in before its status is looked at.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                        for r in readers.iter_mut() {
                            let _ = r.await;
                        }
                    })
                    .await;
                    readers.clear();
                    if runtime != 0 {
                        runtime
                    } else {
                        match handed_over(&dir, listener).await {
                            Ok((pid, master)) => {
                                let _ = exited.pid.set(pid);
                                let master = Arc::new(master);
                                let _ = pty_tx.send(Some(master.clone()));
                                // Ends with EIO once the process and everything it started
                                // closed the terminal.
                                match master.try_clone() {
                                    Ok(reader) => {
                                        let (changed, process) = (changed.clone(), exited.clone());
                                        readers.push(tokio::spawn(async move {
                                            let reader = tokio::fs::File::from_std(reader);
                                            pump(reader, &process.stdout, &changed).await;
                                        }));
                                    }
                                    Err(e) => tracing::warn!(error = %e, "cannot read a terminal"),
                                }
                                drop(dir);
                                crate::tty::wait_pid(pid).await.unwrap_or_else(|e| {
                                    tracing::warn!(pid, error = %e, "cannot wait for a detached process");
                                    -1
                                })
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "the runtime started a terminal process but did not hand over its terminal");
                                -1
                            }
                        }
                    }
                }
            };
            // The runtime keeps the container (`--keep`, or detached) until it is removed:
            // its cgroup still tells whether the OOM killer ended it.
            if oom_cgroup.as_deref().is_some_and(saw_oom_kill) {
                exited
                    .oom_killed
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            // The exit is reported once all output is in (or a leftover child of an exec
            // still holds the pipes after a grace period).
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                for r in readers {
                    let _ = r.await;
                }
            })
            .await;
            let _ = tx.send(Some(status));
            changed.send_modify(|g| *g += 1);
        });
        Ok(process)
    }

    /// Starts the container's process under the runtime; returns once the runtime has created
    /// it (so that exec and signals reach it), or fails if the runtime gave up.
    pub async fn start(&self, id: &str) -> Result<()> {
        let process = {
            let mut map = self.lock();
            let c = map
                .get_mut(id)
                .ok_or_else(|| ContainerError::NotFound(id.into()))?;
            if c.init.is_some() {
                return Err(ContainerError::Invalid(format!(
                    "container {id} was already started"
                )));
            }
            let p = self.spawn(
                "run",
                &["--bundle".as_ref(), c.bundle.as_os_str(), id.as_ref()],
                c.stdin,
                c.tty,
                Some(cgroup_path(&self.cgroup_parent, id)),
            )?;
            c.init = Some(p.clone());
            p
        };
        let state = self.root.join(".runtime").join(id).join("state.json");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !state.exists() {
            if let Some(status) = *process.exit.borrow() {
                if status == 0 {
                    break;
                }
                // The runtime writes its state before the container's process runs, so this
                // is the runtime failing, not the container: say why.
                let err = process.stderr.lock().unwrap_or_else(|p| p.into_inner());
                let tail: Vec<u8> = err.data.iter().rev().take(400).rev().copied().collect();
                let tail = String::from_utf8_lossy(&tail);
                let tail = tail.trim();
                tracing::warn!(container = id, status, stderr = %tail, "the runtime failed to start the container");
                return Err(ContainerError::Runtime(format!(
                    "failed to start container {id} (exit status {status}): {tail}"
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(ContainerError::Runtime(format!(
                    "the runtime did not create container {id} within 30 s"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        tracing::info!(container = id, "container started");
        if crate::vm::booted() {
            crate::vm::log_memory("container running");
        }
        Ok(())
    }

    /// Runs `args` (with `env` added) in the running container `id` as exec `exec_id`, under the
    /// container's user, capabilities and other process settings.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
        tty: bool,
    ) -> Result<()> {
        valid_id(exec_id).map_err(|_| {
            ContainerError::Invalid(format!(
                "exec id {exec_id:?}: use 1-64 ASCII letters, digits, '-' or '_'"
            ))
        })?;
        if args.is_empty() {
            return Err(ContainerError::Invalid("exec: no command given".into()));
        }
        let mut map = self.lock();
        let c = map
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        match &c.init {
            Some(p) if p.exit.borrow().is_none() => {}
            _ => {
                return Err(ContainerError::Invalid(format!(
                    "container {id} is not running"
                )))
            }
        }
        if c.execs.contains_key(exec_id) {
            return Err(ContainerError::Exists(format!("{id} exec {exec_id}")));
        }
        let config: Value = std::fs::read(c.bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ContainerError::Runtime("cannot read the container's spec".into()))?;
        let mut process = config["process"].clone();
        process["args"] = json!(args);
        process["terminal"] = json!(tty);
        if let Some(e) = process["env"].as_array_mut() {
            e.extend(env.iter().map(|v| json!(v)));
        }
        let file = c.bundle.join(format!("exec-{exec_id}.json"));
        coffer_fsutil::write_atomic(&file, process.to_string().as_bytes(), 0o600)
            .map_err(|e| ContainerError::Runtime(format!("cannot write the exec spec: {e}")))?;
        let p = self.spawn(
            "exec",
            &["--process".as_ref(), file.as_os_str(), id.as_ref()],
            stdin,
            tty,
            None,
        )?;
        c.execs.insert(exec_id.into(), p);
        tracing::info!(container = id, exec = exec_id, "exec started");
        Ok(())
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let map = self.lock();
        let c = map
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if exec_id.is_empty() {
            c.init
                .clone()
                .ok_or_else(|| ContainerError::Invalid(format!("container {id} was not started")))
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| ContainerError::NotFound(format!("{id} exec {exec_id}")))
        }
    }

    /// Whether the OOM killer ended a container's process (known once it has exited).
    pub fn oom_killed(&self, id: &str, exec_id: &str) -> Result<bool> {
        Ok(self
            .process(id, exec_id)?
            .oom_killed
            .load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Waits for a process (the container's when `exec_id` is empty) to exit; its status.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<i32> {
        let mut rx = self.process(id, exec_id)?.exit.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return Ok(s);
            }
            if rx.changed().await.is_err() {
                return Err(ContainerError::Runtime("the process was lost".into()));
            }
        }
    }

    /// Reads up to `len` bytes of a process's `stream` ("stdout" or "stderr") from `offset`;
    /// with `follow`, waits for output while the process runs. Output older than the last
    /// 4 MiB is gone: the chunk then starts later than asked.
    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        stream: &str,
        offset: u64,
        len: usize,
        follow: bool,
    ) -> Result<Chunk> {
        let p = self.process(id, exec_id)?;
        let out = match stream.to_ascii_lowercase().as_str() {
            "stdout" => &p.stdout,
            "stderr" => &p.stderr,
            other => {
                return Err(ContainerError::Invalid(format!(
                    "stream {other:?}: use stdout or stderr"
                )))
            }
        };
        let mut changed = self.changed.subscribe();
        loop {
            // Exit is published after all output is buffered, so read it first.
            let exited = p.exit.borrow().is_some();
            {
                let b = out.lock().unwrap_or_else(|p| p.into_inner());
                let end = b.start + b.data.len() as u64;
                if offset > end {
                    return Err(ContainerError::Invalid(format!(
                        "offset {offset} is past the end of {stream} ({end})"
                    )));
                }
                let from = offset.max(b.start);
                if from < end {
                    let skip = (from - b.start) as usize;
                    let n = ((end - from) as usize).min(len.max(1));
                    let data: Vec<u8> = b.data.range(skip..skip + n).copied().collect();
                    return Ok(Chunk {
                        data,
                        offset: from,
                        eof: false,
                    });
                }
                if exited || !follow {
                    return Ok(Chunk {
                        data: Vec::new(),
                        offset: from,
                        eof: exited,
                    });
                }
            }
            if changed.changed().await.is_err() {
                return Ok(Chunk {
                    offset,
                    ..Chunk::default()
                });
            }
        }
    }

    /// A TTY process's terminal (master side), waiting for the runtime to hand it over.
    async fn pty(p: &Process) -> Result<Arc<std::fs::File>> {
        let mut rx = p
            .pty
            .clone()
            .ok_or_else(|| ContainerError::Invalid("the process has no terminal".into()))?;
        let mut exit = p.exit.clone();
        tokio::select! {
            r = rx.wait_for(|t| t.is_some()) => match r {
                Ok(t) => Ok(t.clone().expect("a terminal")),
                Err(_) => Err(ContainerError::Invalid("the process's terminal is gone".into())),
            },
            _ = exit.wait_for(|s| s.is_some()) => {
                Err(ContainerError::Invalid("the process has exited".into()))
            }
        }
    }

    /// Writes `data` to a process's stdin (its terminal, for a TTY process); the bytes written.
    pub async fn write(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let p = self.process(id, exec_id)?;
        if p.pty.is_some() {
            let pty = Self::pty(&p).await?;
            let data = data.to_vec();
            let len = data.len();
            return tokio::task::spawn_blocking(move || {
                std::io::Write::write_all(&mut &*pty, &data)
            })
            .await
            .map_err(|e| ContainerError::Runtime(e.to_string()))?
            .map(|()| len)
            .map_err(|e| ContainerError::Invalid(format!("cannot write to the terminal: {e}")));
        }
        let mut stdin = p.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or_else(|| {
            ContainerError::Invalid("the process's stdin is not open (ask for stdin)".into())
        })?;
        tokio::io::AsyncWriteExt::write_all(pipe, data)
            .await
            .map_err(|e| ContainerError::Invalid(format!("cannot write to stdin: {e}")))?;
        Ok(data.len())
    }

    /// Closes a process's stdin (end of input; on a terminal, the end-of-file character).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.process(id, exec_id)?;
        if p.pty.is_some() {
            return self.write(id, exec_id, &[0x04]).await.map(drop);
        }
        p.stdin.lock().await.take();
        Ok(())
    }

    /// Sets the window size of a TTY process's terminal (the kernel sends SIGWINCH to its
    /// foreground process group).
    pub async fn resize(&self, id: &str, exec_id: &str, rows: u16, columns: u16) -> Result<()> {
        let p = self.process(id, exec_id)?;
        let pty = Self::pty(&p).await?;
        crate::tty::set_size(&pty, rows, columns)
            .map_err(|e| ContainerError::Runtime(format!("cannot resize the terminal: {e}")))
    }

    /// Sends `signal` to a process: the container's through the runtime, an exec's directly
    /// (the runtime's exec forwards it).
    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let p = self.process(id, exec_id)?;
        if exec_id.is_empty() {
            return self
                .runtime(&["kill", id, &signal.to_string()])
                .await
                .map(drop);
        }
        let sig = i32::try_from(signal)
            .ok()
            .and_then(rustix::process::Signal::from_named_raw)
            .ok_or_else(|| ContainerError::Invalid(format!("signal {signal} is not known")))?;
        let pid = p
            .pid
            .get()
            .and_then(|p| rustix::process::Pid::from_raw(*p as i32))
            .ok_or_else(|| ContainerError::Invalid("the exec has exited".into()))?;
        if p.exit.borrow().is_some() {
            return Err(ContainerError::Invalid("the exec has exited".into()));
        }
        rustix::process::kill_process(pid, sig)
            .map_err(|e| ContainerError::Runtime(format!("cannot signal the exec: {e}")))
    }

    /// Resource use of a running container.
    pub async fn stats(&self, id: &str) -> Result<Stats> {
        self.process(id, "")?;
        let out = self.runtime(&["events", "--stats", id]).await?;
        let v: Value = serde_json::from_slice(&out)
            .map_err(|e| ContainerError::Runtime(format!("runtime statistics: {e}")))?;
        let d = &v["data"];
        Ok(Stats {
            memory_bytes: d["memory"]["usage"]["usage"].as_u64().unwrap_or(0),
            cpu_usage_ns: d["cpu"]["usage"]["total"].as_u64().unwrap_or(0),
            pids: d["pids"]["current"].as_u64().unwrap_or(0) as u32,
        })
    }

    /// Stops (if needed) and removes the container and its bundle.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self
            .lock()
            .remove(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if let Some(init) = &c.init {
            let _ = self.runtime(&["delete", "--force", id]).await;
            // The runtime's child is reaped before the bundle goes.
            let mut rx = init.exit.clone();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                rx.wait_for(|s| s.is_some()),
            )
            .await;
        }
        self.changed.send_modify(|g| *g += 1);
        std::fs::remove_dir_all(&c.bundle)
            .map_err(|e| ContainerError::Runtime(format!("cannot remove the bundle: {e}")))?;
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    /// Removes every container.
    pub async fn remove_all(&self) -> Result<()> {
        for id in self.list() {
            self.remove(&id).await?;
        }
        Ok(())
    }

    /// Runs the runtime with `args`; its standard output.
    async fn runtime(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = self.runtime_cmd().args(args).output().await.map_err(|e| {
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
        Ok(out.stdout)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_inside_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(root, "").unwrap(), (0, 0));
        assert_eq!(resolve_user(root, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "4242").unwrap(), (4242, 4242));
        assert_eq!(resolve_user(root, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(root, "app:7").unwrap(), (1000, 7));
        let e = resolve_user(root, "nobody").unwrap_err().to_string();
        assert!(e.contains("\"nobody\" is not in its /etc/passwd"), "{e}");
        assert!(resolve_user(root, "app:wheel").is_err());

        // A passwd that points outside the image is read inside it (here: absent), never the
        // host's.
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("etc/passwd")).unwrap();
        assert!(resolve_user(root, "root").is_err());
    }
}
