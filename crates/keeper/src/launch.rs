//! Starting a keeper and waiting for its agent: what the launchers (`coffer run`, the
//! containerd shim) share, so that the keeper's command line is spelled once: [`KeeperArgs`]
//! is both what the keeper parses and what a launcher builds ([`KeeperArgs::to_args`]), and
//! [`Keeper::spawn`] / [`Keeper::ready`] start one and wait until its agent serves, or say why
//! it did not.

use std::{
    ffi::OsString,
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use clap::Args;
use tokio::process::{Child, ChildStdin, Command};

/// The name of the keeper's hidden subcommand.
pub const SUBCOMMAND: &str = "__sandbox";

/// Errors starting a keeper.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// The sandbox directory or its log could not be prepared.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The keeper program could not be started.
    #[error("cannot start the sandbox keeper {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The keeper exited before its agent served.
    #[error("sandbox {name} did not start: {why}")]
    Exited {
        /// The sandbox.
        name: String,
        /// The last words of the keeper and the agent.
        why: String,
    },
    /// The agent did not serve in time.
    #[error("sandbox {name}: the agent did not serve within {wait:?}")]
    Timeout {
        /// The sandbox.
        name: String,
        /// How long was waited.
        wait: Duration,
    },
}

/// `coffer __sandbox` arguments: what a keeper is told to run.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct KeeperArgs {
    /// The sandbox's directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The sandbox's name (its cgroup is /coffer/NAME).
    #[arg(long)]
    pub name: String,
    /// The agent binary.
    #[arg(long)]
    pub agent: PathBuf,
    /// The initdata.
    #[arg(long)]
    pub initdata: PathBuf,
    /// The emulated PSP's directory.
    #[arg(long)]
    pub psp_dir: PathBuf,
    /// The agent pulls over plain HTTP.
    #[arg(long)]
    pub plain_http: bool,
    /// The image blob cache the agent uses.
    #[arg(long)]
    pub image_cache: Option<PathBuf>,
    /// Tear down when stdin reaches its end (the launcher went away).
    #[arg(long)]
    pub watch_stdin: bool,
    /// The pod's network namespace (the CNI's), which a process sandbox's containers join
    /// instead of one of their own, and whose interfaces a pod VM takes over (`podnet`).
    #[arg(long)]
    pub pod_netns: Option<PathBuf>,
    /// The pod's resolver configuration (a resolv.conf), which a pod VM on the pod network
    /// uses itself.
    #[arg(long)]
    pub resolv_conf: Option<PathBuf>,
    /// The sandbox's network when no `--pod-netns` is given: `none` (containers have only
    /// their loopback; the sandbox's own traffic goes through the keeper's logged forwarder),
    /// `host` (a process sandbox's containers share the host's network), or `cni` (a
    /// namespace of its own from the CNI plugins, [`crate::cni`]).
    #[arg(long, default_value = "none")]
    pub network: String,
    /// Where `--network cni` finds its network configuration.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where `--network cni` finds the plugins (`:`-separated).
    #[arg(long, default_value = "/usr/lib/cni:/opt/cni/bin")]
    pub cni_bin_dir: String,
    /// Run the agent in this pod VM (`coffer podvm build --out DIR`) instead of a process
    /// sandbox.
    #[arg(long)]
    pub podvm: Option<PathBuf>,
    /// The pod VM's accelerator: kvm, tcg, or auto (KVM when a guest runs under it here).
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// The pod VM's TEE: `emulated` (the keeper's emulated PSP: no confidentiality), `snp`
    /// (AMD SEV-SNP, measured direct boot, HOST_DATA = the initdata digest) or `tdx` (Intel
    /// TDX, MRCONFIGID = the initdata digest). A hardware TEE needs KVM on such a host.
    #[arg(long, default_value = "emulated")]
    pub tee: String,
    /// The firmware a hardware TEE boots [default: the pod VM's `firmware-snp.fd` or
    /// `firmware-tdx.fd`].
    #[arg(long)]
    pub firmware: Option<PathBuf>,
    /// An SEV-SNP pod VM's vCPU model (QEMU `-cpu`; the launch digest covers it; the host must
    /// be that generation or later).
    #[arg(long, default_value = "EPYC-Milan")]
    pub snp_cpu: String,
    /// The pod VM's memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// The pod VM's scratch disk size in MiB (encrypted and integrity-protected in the guest).
    #[arg(long, default_value_t = 2048)]
    pub scratch_mib: u64,
    /// The pod VM's virtual CPUs (0: 2 under KVM, 1 under TCG, where a second vCPU gains
    /// little on a small host and cross-CPU interrupts can be lost; see docs/podvm.md).
    #[arg(long, default_value_t = 0)]
    pub cpus: u32,
    /// Seconds the pod VM's agent has to become ready before the keeper stops the VM and
    /// records why (0: [`READY_KVM`] under KVM, [`READY_TCG`] under TCG).
    #[arg(long, default_value_t = 0)]
    pub ready_timeout: u64,
    /// Run the pod VM as a peer pod: created by the `coffer-cloud` daemon on this unix socket
    /// through its provider (libvirt, a cloud) instead of by this keeper, its agent reached over
    /// mutual TLS (docs/peer-pods.md). Needs --podvm: the image the emulated PSP measures.
    #[arg(long)]
    pub cloud: Option<PathBuf>,
}

/// How long a pod VM's agent has to become ready under KVM (it takes about a second).
pub const READY_KVM: Duration = Duration::from_secs(60);
/// How long a pod VM's agent has to become ready under TCG (about 5 s idle, 10-16 s with
/// both cores of a 2-core host busy; several pod VMs at once take longer).
pub const READY_TCG: Duration = Duration::from_secs(180);

/// The file a keeper leaves in its sandbox directory when the sandbox failed: why, in one
/// line, then the last lines of the pod VM's console. Everything else but the logs is removed;
/// `coffer ps` shows the sandbox as failed and `coffer rm` removes it.
pub const FAILED: &str = "failed";

/// Lines of the console kept in a failure record and shown with a failed start.
pub const CONSOLE_LINES: usize = 15;

/// Why the sandbox in `dir` failed, when its keeper recorded it.
pub fn failure(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(FAILED)).ok()
}

/// The last `n` lines of the pod VM's console (`agent.log`) in `dir`, or of the process
/// sandbox's agent log.
pub fn console_tail(dir: &Path, n: usize) -> String {
    let log = std::fs::read(dir.join("agent.log")).unwrap_or_default();
    let log = String::from_utf8_lossy(&log);
    let lines: Vec<String> = log
        .lines()
        .map(printable)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A console line without its terminal control sequences (the firmware clears the screen)
/// and other control characters.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters final-byte; otherwise ESC and one character.
                if chars.next_if_eq(&'[').is_some() {
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.trim_end().to_string()
}

impl KeeperArgs {
    /// A process sandbox `name` in `dir` with the defaults for everything optional.
    pub fn new(
        dir: PathBuf,
        name: &str,
        agent: PathBuf,
        initdata: PathBuf,
        psp_dir: PathBuf,
    ) -> Self {
        Self {
            dir,
            name: name.to_string(),
            agent,
            initdata,
            psp_dir,
            plain_http: false,
            image_cache: None,
            watch_stdin: false,
            pod_netns: None,
            resolv_conf: None,
            network: "none".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dir: "/usr/lib/cni:/opt/cni/bin".into(),
            podvm: None,
            accel: "auto".into(),
            tee: "emulated".into(),
            firmware: None,
            snp_cpu: "EPYC-Milan".into(),
            memory: 512,
            scratch_mib: 2048,
            cpus: 0,
            ready_timeout: 0,
            cloud: None,
        }
    }

    /// The command line (after the subcommand) that the keeper parses back into `self`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        let mut opt = |k: &str, val: OsString| {
            v.push(format!("--{k}").into());
            v.push(val);
        };
        opt("dir", self.dir.clone().into());
        opt("name", self.name.clone().into());
        opt("agent", self.agent.clone().into());
        opt("initdata", self.initdata.clone().into());
        opt("psp-dir", self.psp_dir.clone().into());
        if let Some(c) = &self.image_cache {
            opt("image-cache", c.clone().into());
        }
        if let Some(p) = &self.podvm {
            opt("podvm", p.clone().into());
        }
        if let Some(c) = &self.cloud {
            opt("cloud", c.clone().into());
        }
        if let Some(p) = &self.pod_netns {
            opt("pod-netns", p.clone().into());
        }
        if let Some(p) = &self.resolv_conf {
            opt("resolv-conf", p.clone().into());
        }
        opt("network", self.network.clone().into());
        opt("cni-conf-dir", self.cni_conf_dir.clone().into());
        opt("cni-bin-dir", self.cni_bin_dir.clone().into());
        opt("accel", self.accel.clone().into());
        opt("tee", self.tee.clone().into());
        opt("snp-cpu", self.snp_cpu.clone().into());
        if let Some(f) = &self.firmware {
            opt("firmware", f.clone().into());
        }
        opt("memory", self.memory.to_string().into());
        opt("scratch-mib", self.scratch_mib.to_string().into());
        opt("cpus", self.cpus.to_string().into());
        opt("ready-timeout", self.ready_timeout.to_string().into());
        if self.plain_http {
            v.push("--plain-http".into());
        }
        if self.watch_stdin {
            v.push("--watch-stdin".into());
        }
        v
    }

    /// The pod VM's vCPUs: `cpus`, or by default 2 under KVM and 1 under TCG.
    pub fn vcpus(&self, kvm: bool) -> u32 {
        match (self.cpus, kvm) {
            (0, true) => 2,
            (0, false) => 1,
            (n, _) => n,
        }
    }

    /// How long the pod VM's agent has to become ready: `ready_timeout`, or by default
    /// [`READY_KVM`] under KVM and [`READY_TCG`] under TCG.
    pub fn ready_bound(&self, kvm: bool) -> Duration {
        match (self.ready_timeout, kvm) {
            (0, true) => READY_KVM,
            (0, false) => READY_TCG,
            (s, _) => Duration::from_secs(s),
        }
    }

    /// The agent's API socket, which appears once the agent serves.
    pub fn agent_sock(&self) -> PathBuf {
        agent_sock(&self.dir)
    }
}

/// The agent's API socket in the sandbox directory `dir`.
fn agent_sock(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// A keeper being started, or started.
pub struct Keeper {
    child: Child,
    /// `keeper.log`, kept open: a keeper that fails removes the sandbox directory, and its last
    /// words stay readable through this handle.
    log: File,
    dir: PathBuf,
    name: String,
}

impl Keeper {
    /// Starts `program __sandbox <args>` in its own process group (a terminal's ^C reaches the
    /// launcher, not the keeper), stdout discarded and stderr to `<dir>/keeper.log`. With
    /// `piped_stdin`, the keeper's stdin is a pipe that only the launcher holds (with
    /// `watch_stdin`, closing it ends the sandbox); otherwise it reads nothing. The directory
    /// must exist.
    pub fn spawn(
        program: &Path,
        args: &KeeperArgs,
        piped_stdin: bool,
    ) -> Result<Self, KeeperError> {
        let log_path = args.dir.join("keeper.log");
        let log = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log_path)
            .map_err(|source| KeeperError::Io {
                what: format!("cannot create {}", log_path.display()),
                source,
            })?;
        let stderr = log.try_clone().map_err(|source| KeeperError::Io {
            what: format!("cannot share {}", log_path.display()),
            source,
        })?;
        let child = Command::new(program)
            .arg(SUBCOMMAND)
            .args(args.to_args())
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| KeeperError::Spawn {
                program: program.to_path_buf(),
                source,
            })?;
        Ok(Self {
            child,
            log,
            dir: args.dir.clone(),
            name: args.name.clone(),
        })
    }

    /// The keeper's process id (`None` once it has been waited for).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Takes the writing end of the keeper's stdin (with `piped_stdin`).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// The keeper process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Gives up the handle on the keeper process.
    pub fn into_child(self) -> Child {
        self.child
    }

    /// Waits until the agent's socket appears. Fails with the last words of the keeper and
    /// the agent when the keeper exits first, or after `wait`.
    pub async fn ready(&mut self, wait: Duration) -> Result<(), KeeperError> {
        let until = Instant::now() + wait;
        let sock = agent_sock(&self.dir);
        loop {
            if sock.exists() {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(KeeperError::Exited {
                    name: self.name.clone(),
                    why: self.last_words(),
                });
            }
            if Instant::now() > until {
                return Err(KeeperError::Timeout {
                    name: self.name.clone(),
                    wait,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// What says why a sandbox failed: the keeper's failure record when it left one (the
    /// reason and the pod VM's last console lines), else the last line of `keeper.log` and of
    /// the agent's `agent.log`, joined.
    pub fn last_words(&self) -> String {
        if let Some(record) = failure(&self.dir) {
            return record.trim_end().to_string();
        }
        let agent = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        [
            coffer_fsutil::last_line_of(&self.log),
            coffer_fsutil::last_line(&agent).to_string(),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: KeeperArgs,
    }

    fn parse(args: &KeeperArgs) -> KeeperArgs {
        let argv = std::iter::once(OsString::from("keeper")).chain(args.to_args());
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn the_keeper_parses_back_what_a_launcher_builds() {
        let mut a = KeeperArgs::new(
            "/run/coffer/sandboxes/p 1".into(),
            "p1",
            "/usr/libexec/coffer-agent".into(),
            "/tmp/init data.toml".into(),
            "/var/lib/coffer/psp".into(),
        );
        assert_eq!(parse(&a), a);
        a.plain_http = true;
        a.watch_stdin = true;
        a.image_cache = Some("/var/cache/coffer".into());
        a.podvm = Some("/usr/share/coffer/podvm".into());
        a.pod_netns = Some("/var/run/netns/cni-1234".into());
        a.resolv_conf = Some("/run/containerd/sandboxes/p1/resolv.conf".into());
        a.network = "cni".into();
        a.cni_conf_dir = "/etc/coffer/cni".into();
        a.cni_bin_dir = "/opt/cni/bin".into();
        a.accel = "tcg".into();
        a.tee = "snp".into();
        a.firmware = Some("/usr/share/coffer/OVMF.amdsev.fd".into());
        a.snp_cpu = "EPYC-Genoa".into();
        a.memory = 1024;
        a.scratch_mib = 4096;
        a.ready_timeout = 30;
        a.cpus = 1;
        assert_eq!(parse(&a), a);
        assert_eq!(
            (a.vcpus(true), a.ready_bound(true)),
            (1, Duration::from_secs(30))
        );
        a.cpus = 0;
        a.ready_timeout = 0;
        assert_eq!((a.vcpus(true), a.ready_bound(true)), (2, READY_KVM));
        assert_eq!((a.vcpus(false), a.ready_bound(false)), (1, READY_TCG));
    }

    /// A stand-in keeper: a shell script that ignores its arguments.
    fn fake_keeper(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fake-keeper");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn args_in(dir: &Path) -> KeeperArgs {
        KeeperArgs::new(dir.into(), "s", "agent".into(), "init".into(), "psp".into())
    }

    /// Why the keeper `keeper` started on `dir` did not start.
    async fn start_error(keeper: &Path, dir: &Path) -> String {
        let mut k = Keeper::spawn(keeper, &args_in(dir), true).unwrap();
        k.ready(Duration::from_secs(20))
            .await
            .unwrap_err()
            .to_string()
    }

    #[tokio::test]
    async fn a_keeper_that_exits_at_once_says_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("agent.log"),
            "booting\nagent: initdata refused\n",
        )
        .unwrap();
        let keeper = fake_keeper(
            dir.path(),
            "echo 'keeper: starting'; echo 'keeper: QEMU failed' >&2; exit 1",
        );
        assert_eq!(
            start_error(&keeper, dir.path()).await,
            "sandbox s did not start: keeper: QEMU failed; agent: initdata refused"
        );
    }

    #[tokio::test]
    async fn a_keepers_failure_record_is_its_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let console: String = (1..=40).map(|i| format!("console line {i}\r\n")).collect();
        std::fs::write(dir.path().join("agent.log"), console).unwrap();
        let tail = console_tail(dir.path(), CONSOLE_LINES);
        assert!(tail.starts_with("console line 26\n") && tail.ends_with("console line 40"));
        assert_eq!(
            printable("\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS (version 1.16)\r"),
            "SeaBIOS (version 1.16)"
        );
        let keeper = fake_keeper(
            dir.path(),
            &format!(
                "printf 'the agent did not become ready within 3s\\n%s\\n' \"$(tail -n 2 {0}/agent.log | tr -d '\\r')\" > {0}/failed; exit 1",
                dir.path().display()
            ),
        );
        assert_eq!(
            start_error(&keeper, dir.path()).await,
            "sandbox s did not start: the agent did not become ready within 3s\nconsole line 39\nconsole line 40"
        );
        assert!(failure(dir.path()).is_some());
    }

    #[tokio::test]
    async fn waiting_ends_when_the_agent_serves_or_the_time_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let args = args_in(dir.path());
        let keeper = fake_keeper(dir.path(), "exec sleep 30");
        let mut k = Keeper::spawn(&keeper, &args, true).unwrap();
        let err = k.ready(Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, KeeperError::Timeout { .. }), "{err}");
        std::fs::write(args.agent_sock(), "").unwrap();
        k.ready(Duration::from_secs(5)).await.unwrap();
        k.child().start_kill().unwrap();
        k.child().wait().await.unwrap();
    }

    #[test]
    fn a_missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let args = KeeperArgs::new(dir.path().into(), "s", "a".into(), "i".into(), "p".into());
        let err = match Keeper::spawn(Path::new("/nonexistent/coffer"), &args, false) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("started a missing program"),
        };
        assert!(err.contains("/nonexistent/coffer"), "{err}");
    }
}
