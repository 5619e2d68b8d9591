//! `coffer doctor`: what this host can run and what it lacks, one line per check.
//!
//! Each sandbox kind needs something else of the host: the process sandbox needs root, runc,
//! `unshare` and `ip`; a pod VM needs QEMU (and KVM to start in about a second instead of
//! about five under TCG), `coffer podvm build` needs squashfs-tools and binutils; a Kubernetes
//! node needs containerd configured for Coffer with the shim on its PATH (and, for peer pods, a
//! `coffer-cloud` that answers); a real TEE needs a
//! host that can launch SEV-SNP or TDX guests and a QEMU with their confidential-guest objects.
//! The checks read the host through a [`Host`] — the running system, or one mounted under
//! another root (how the tests give them a fake one) — and never fail: every check ends in a
//! [`Check`] that says what works, what does not, and what to install.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

/// How long one command of a check may take.
const COMMAND_WAIT: Duration = Duration::from_secs(5);

/// Free space below which pod VM images and the image cache may not fit.
pub const DISK_LOW: u64 = 4 << 30;

/// The host the checks read: its files under `root` and its programs on `path`.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
    path: Vec<PathBuf>,
    uid: u32,
}

impl Host {
    /// The running system: `/`, this process's `PATH` and effective user.
    pub fn this() -> Self {
        let path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        Self {
            root: PathBuf::from("/"),
            path,
            uid: rustix::process::geteuid().as_raw(),
        }
    }

    /// A host mounted at `root`: its programs in `root`'s `/usr/local/sbin`, `/usr/local/bin`,
    /// `/usr/sbin`, `/usr/bin`, `/sbin` and `/bin`; the checks run as user `uid`.
    pub fn at(root: &Path, uid: u32) -> Self {
        let path = [
            "usr/local/sbin",
            "usr/local/bin",
            "usr/sbin",
            "usr/bin",
            "sbin",
            "bin",
        ]
        .iter()
        .map(|d| root.join(d))
        .collect();
        Self {
            root: root.to_path_buf(),
            path,
            uid,
        }
    }

    /// The host's file at the absolute path `p`.
    pub fn file(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// The program `name` on the host's path.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        self.path.iter().map(|d| d.join(name)).find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    }
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Works.
    Ok,
    /// Works with a limitation (slower, fewer features).
    Limited,
    /// Missing: what depends on it does not work until it is installed or configured.
    Missing,
    /// A fact about the host, neither good nor bad.
    Info,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Limited => "limited",
            Status::Missing => "missing",
            Status::Info => "info",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked (`kvm`, `qemu`, `containerd`, …).
    pub area: &'static str,
    /// The outcome.
    pub status: Status,
    /// What was found, and what depends on it.
    pub found: String,
    /// What to do about it, when something can be done.
    pub fix: Option<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<7}  {:<14} {}", self.status, self.area, self.found)?;
        if let Some(fix) = &self.fix {
            write!(f, " -> {fix}")?;
        }
        Ok(())
    }
}

fn check(area: &'static str, status: Status, found: impl Into<String>) -> Check {
    Check {
        area,
        status,
        found: found.into(),
        fix: None,
    }
}

fn fixable(area: &'static str, status: Status, found: impl Into<String>, fix: &str) -> Check {
    Check {
        fix: Some(fix.to_string()),
        ..check(area, status, found)
    }
}

/// What the checks look at besides the host itself.
#[derive(Debug, Clone)]
pub struct Options {
    /// A KBS to reach (`GET /healthz`), when given.
    pub kbs: Option<String>,
    /// Where sandboxes keep their state (its free space is checked).
    pub state_dir: PathBuf,
    /// Where pod VM images and the image cache go (its free space is checked).
    pub cache_dir: PathBuf,
    /// A writable directory for the KVM probe's firmware.
    pub scratch: PathBuf,
}

/// Runs every check on `host`.
pub async fn run(host: &Host, o: &Options) -> Vec<Check> {
    let mut out = vec![kernel(host), user(host)];
    out.extend(process_sandbox(host).await);
    let qemu = host.which(coffer_keeper::vm::QEMU);
    out.extend(qemu_checks(qemu.as_deref()).await);
    out.push(kvm(host, qemu.as_deref(), &o.scratch).await);
    out.push(tee_host(host));
    out.push(tee_guest(host));
    out.push(vsock(host));
    out.push(podvm_build(host));
    out.extend(containerd(host).await);
    out.push(peer_pods(host).await);
    out.push(kbs(o.kbs.as_deref()).await);
    out.push(disk(
        "state dir",
        &host.file(&o.state_dir.to_string_lossy()),
    ));
    out.push(disk(
        "cache dir",
        &host.file(&o.cache_dir.to_string_lossy()),
    ));
    out
}

/// What `program args` prints (stdout, else stderr), within [`COMMAND_WAIT`].
async fn printed(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_WAIT, out).await {
        Err(_) => Err(format!("{} did not answer", program.display())),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", program.display())),
        Ok(Ok(o)) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            Ok(String::from_utf8_lossy(&text).into_owned())
        }
    }
}

/// The first line `program args` prints (stdout, else stderr), within [`COMMAND_WAIT`].
async fn first_line(program: &Path, args: &[&str]) -> Result<String, String> {
    let text = printed(program, args).await?;
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

fn kernel(host: &Host) -> Check {
    let release = std::fs::read_to_string(host.file("/proc/sys/kernel/osrelease"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cgroups = if host.file("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2"
    } else if host.file("/sys/fs/cgroup").is_dir() {
        "cgroup v1"
    } else {
        "no cgroup hierarchy mounted"
    };
    check(
        "kernel",
        Status::Info,
        format!("Linux {release} on {}, {cgroups}", std::env::consts::ARCH),
    )
}

fn user(host: &Host) -> Check {
    if host.uid == 0 {
        check("user", Status::Ok, "root: sandboxes can be started")
    } else {
        fixable(
            "user",
            Status::Missing,
            format!(
                "uid {}: sandboxes need root (namespaces, cgroups, runc, QEMU's devices)",
                host.uid
            ),
            "run coffer run/exec/ps/rm as root (sudo)",
        )
    }
}

async fn process_sandbox(host: &Host) -> Vec<Check> {
    let mut out = Vec::new();
    match host.which("runc") {
        Some(p) => {
            let v = first_line(&p, &["--version"]).await.unwrap_or_else(|e| e);
            out.push(check(
                "runc",
                Status::Ok,
                format!("{v}: containers run in both sandbox kinds"),
            ));
        }
        None => out.push(fixable(
            "runc",
            Status::Missing,
            "no runc: the process sandbox cannot run containers (a pod VM brings its own)",
            "apt-get install -y runc",
        )),
    }
    for (prog, package, what) in [
        ("unshare", "util-linux", "the process sandbox's namespaces"),
        ("ip", "iproute2", "the process sandbox's loopback"),
    ] {
        out.push(match host.which(prog) {
            Some(p) => check(prog, Status::Ok, format!("{}: {what}", p.display())),
            None => fixable(
                prog,
                Status::Missing,
                format!("no {prog}: {what} cannot be set up"),
                &format!("apt-get install -y {package}"),
            ),
        });
    }
    out
}

/// The confidential-guest objects QEMU can create, from `-object help`.
const CVM_OBJECTS: [&str; 3] = ["sev-guest", "sev-snp-guest", "tdx-guest"];

async fn qemu_checks(qemu: Option<&Path>) -> Vec<Check> {
    let Some(qemu) = qemu else {
        return vec![fixable(
            "qemu",
            Status::Missing,
            "no qemu-system-x86_64: pod VMs cannot start (the process sandbox still works)",
            "apt-get install -y --no-install-recommends qemu-system-x86",
        )];
    };
    let version = match first_line(qemu, &["-version"]).await {
        Ok(l) => l
            .strip_prefix("QEMU emulator version ")
            .map(|v| format!("QEMU {v}"))
            .unwrap_or(l),
        Err(e) => {
            return vec![fixable(
                "qemu",
                Status::Missing,
                e,
                "reinstall qemu-system-x86",
            )]
        }
    };
    let mut out = vec![check(
        "qemu",
        Status::Ok,
        format!("{version} ({}): pod VMs can start", qemu.display()),
    )];
    let listed: Vec<&str> = match printed(qemu, &["-object", "help"]).await {
        Ok(text) => CVM_OBJECTS
            .into_iter()
            .filter(|name| text.lines().any(|l| l.trim() == *name))
            .collect(),
        Err(_) => Vec::new(),
    };
    let snp_or_tdx = listed.iter().any(|o| *o != "sev-guest");
    out.push(if snp_or_tdx {
        check(
            "qemu cvm",
            Status::Ok,
            format!(
                "confidential-guest objects: {}: SEV-SNP/TDX guests can be described",
                listed.join(", ")
            ),
        )
    } else {
        fixable(
            "qemu cvm",
            Status::Limited,
            format!(
                "confidential-guest objects: {}: this QEMU cannot start SEV-SNP or TDX guests",
                if listed.is_empty() {
                    "none".to_string()
                } else {
                    listed.join(", ")
                }
            ),
            "QEMU 9.1 or later for sev-snp-guest and tdx-guest (Debian bookworm-backports has QEMU 10)",
        )
    });
    out
}

async fn kvm(host: &Host, qemu: Option<&Path>, scratch: &Path) -> Check {
    let dev = host.file("/dev/kvm");
    if !dev.exists() {
        return fixable(
            "kvm",
            Status::Limited,
            "no /dev/kvm: pod VMs run under TCG (about 5 s to ready instead of about 1 s)",
            "enable virtualization in the firmware or the VM (nested virtualization) and load kvm_intel or kvm_amd",
        );
    }
    let Some(qemu) = qemu else {
        return check(
            "kvm",
            Status::Info,
            "/dev/kvm exists; not probed without QEMU",
        );
    };
    match coffer_keeper::vm::kvm_probe(qemu, &dev, &host.file("/sys/module"), scratch).await {
        Ok(()) => check(
            "kvm",
            Status::Ok,
            "a KVM guest runs here: pod VMs start under KVM",
        ),
        Err(why) => fixable(
            "kvm",
            Status::Limited,
            format!("/dev/kvm exists but {why}: pod VMs run under TCG (about 5 s to ready)"),
            "nothing to install; on a cloud VM ask for nested virtualization that runs guests, or use bare metal",
        ),
    }
}

fn yes(host: &Host, p: &str) -> bool {
    std::fs::read_to_string(host.file(p)).is_ok_and(|v| matches!(v.trim(), "Y" | "y" | "1"))
}

fn tee_host(host: &Host) -> Check {
    let mut can = Vec::new();
    if yes(host, "/sys/module/kvm_amd/parameters/sev_snp") {
        can.push("SEV-SNP");
    }
    if yes(host, "/sys/module/kvm_intel/parameters/tdx") {
        can.push("TDX");
    }
    if can.is_empty() {
        fixable(
            "tee host",
            Status::Info,
            "this host cannot launch SEV-SNP or TDX guests (kvm_amd sev_snp / kvm_intel tdx not enabled): sandboxes here use the emulated TEE, which protects nothing (development only)",
            "run confidential workloads on an SEV-SNP or TDX host",
        )
    } else {
        check(
            "tee host",
            Status::Info,
            format!(
                "KVM can launch {} guests; Coffer's launcher does not start them yet",
                can.join(" and ")
            ),
        )
    }
}

fn tee_guest(host: &Host) -> Check {
    let found: Vec<&str> = [
        ("/sys/kernel/config/tsm/report", "configfs-tsm reports"),
        ("/dev/sev-guest", "SEV-SNP guest device"),
        ("/dev/tdx_guest", "TDX guest device"),
        ("/dev/tpmrm0", "TPM (a vTPM in a confidential VM)"),
        ("/dev/uvdevice", "IBM Secure Execution Ultravisor device"),
    ]
    .into_iter()
    .filter(|(p, _)| host.file(p).exists())
    .map(|(_, what)| what)
    .collect();
    if found.is_empty() {
        check(
            "tee guest",
            Status::Info,
            "this host is not a confidential guest (no configfs-tsm, /dev/sev-guest, /dev/tdx_guest, /dev/uvdevice)",
        )
    } else {
        check(
            "tee guest",
            Status::Info,
            format!(
                "TEE interfaces here: {}; Coffer does not gather evidence from them yet",
                found.join(", ")
            ),
        )
    }
}

fn vsock(host: &Host) -> Check {
    let state = if host.file("/dev/vhost-vsock").exists() {
        "/dev/vhost-vsock present"
    } else {
        "no /dev/vhost-vsock"
    };
    check(
        "vsock",
        Status::Info,
        format!("{state}; not needed: pod VMs talk to the host over virtio-serial"),
    )
}

fn podvm_build(host: &Host) -> Check {
    let missing: Vec<(&str, &str)> = [
        ("mksquashfs", "squashfs-tools"),
        ("objcopy", "binutils"),
        ("dpkg-deb", "dpkg"),
        ("apt-get", "apt"),
    ]
    .into_iter()
    .filter(|(prog, _)| host.which(prog).is_none())
    .collect();
    if missing.is_empty() {
        check(
            "podvm build",
            Status::Ok,
            "mksquashfs, objcopy, dpkg-deb, apt-get: `coffer podvm build` can build pod VM images",
        )
    } else {
        let progs: Vec<&str> = missing.iter().map(|m| m.0).collect();
        let mut packages: Vec<&str> = missing.iter().map(|m| m.1).collect();
        packages.dedup();
        fixable(
            "podvm build",
            Status::Missing,
            format!(
                "no {}: `coffer podvm build` cannot build pod VM images",
                progs.join(", ")
            ),
            &format!("apt-get install -y {}", packages.join(" ")),
        )
    }
}

/// The runtime handler and snapshotter `coffer install containerd` configures.
fn containerd_config(text: &str) -> Result<(), String> {
    let v: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
    let cri = v
        .get("plugins")
        .and_then(|p| p.get("io.containerd.grpc.v1.cri"))
        .and_then(|c| c.get("containerd"));
    let runtime = cri
        .and_then(|c| c.get("runtimes"))
        .and_then(|r| r.get("coffer"))
        .and_then(|r| r.get("runtime_type"))
        .and_then(|t| t.as_str());
    if runtime != Some("io.containerd.coffer.v2") {
        return Err("no runtime handler `coffer` (io.containerd.coffer.v2)".into());
    }
    if v.get("proxy_plugins")
        .and_then(|p| p.get("coffer"))
        .is_none()
    {
        return Err("no proxy snapshotter `coffer`".into());
    }
    Ok(())
}

/// The node's peer-pod configuration (`shim-remote.toml`, or `shim.toml` with `sandbox =
/// "remote"`) and whether its `coffer-cloud` answers.
async fn peer_pods(host: &Host) -> Check {
    let configured = ["/etc/coffer/shim-remote.toml", "/etc/coffer/shim.toml"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(host.file(p)).ok())
        .filter_map(|t| t.parse::<toml::Table>().ok())
        .find(|t| t.get("sandbox").and_then(|s| s.as_str()) == Some("remote"));
    let Some(config) = configured else {
        return fixable(
            "peer pods",
            Status::Info,
            "not configured: pod VMs run on this node only",
            "to make them through libvirt or a cloud: coffer install containerd --peer-pods, and run coffer-cloud",
        );
    };
    let socket = config
        .get("cloud")
        .and_then(|c| c.as_str())
        .unwrap_or("/run/coffer/cloud.sock")
        .to_string();
    let path = host.file(&socket);
    let asked = async {
        let mut c = coffer_cloud::client::connect(&path)
            .await
            .map_err(|e| e.to_string())?;
        c.list_vms(coffer_cloud::api::ListVmsRequest {})
            .await
            .map(|r| r.into_inner().vms.len())
            .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(COMMAND_WAIT, asked).await {
        Ok(Ok(n)) => check(
            "peer pods",
            Status::Ok,
            format!("coffer-cloud answers at {socket}: {n} VMs of this node"),
        ),
        Ok(Err(e)) => fixable(
            "peer pods",
            Status::Missing,
            format!("coffer-cloud does not answer at {socket} ({e}): peer pods cannot start"),
            "start coffer-cloud --config /etc/coffer/cloud.toml (deploy/peer-pods.yaml)",
        ),
        Err(_) => fixable(
            "peer pods",
            Status::Missing,
            format!("coffer-cloud at {socket} did not answer in time"),
            "check coffer-cloud's log",
        ),
    }
}

async fn containerd(host: &Host) -> Vec<Check> {
    let Some(bin) = host.which("containerd") else {
        return vec![fixable(
            "containerd",
            Status::Info,
            "no containerd: needed only to run Kubernetes pods with Coffer",
            "apt-get install -y containerd, then coffer install containerd",
        )];
    };
    let line = first_line(&bin, &["--version"]).await.unwrap_or_else(|e| e);
    // "containerd github.com/containerd/containerd 1.6.20~ds1 <revision>"
    let version = line
        .split_whitespace()
        .nth(2)
        .map(|v| format!("containerd {v}"))
        .unwrap_or(line);
    let mut out = vec![check("containerd", Status::Ok, version)];
    let config = host.file("/etc/containerd/config.toml");
    out.push(match std::fs::read_to_string(&config) {
        Err(_) => fixable(
            "containerd cfg",
            Status::Missing,
            format!("no {}: Kubernetes pods cannot use Coffer", config.display()),
            "coffer install containerd (then restart containerd)",
        ),
        Ok(text) => match containerd_config(&text) {
            Ok(()) => check(
                "containerd cfg",
                Status::Ok,
                "runtime handler and snapshotter `coffer` configured",
            ),
            Err(why) => fixable(
                "containerd cfg",
                Status::Missing,
                format!("{}: {why}", config.display()),
                "coffer install containerd (then restart containerd)",
            ),
        },
    });
    out.push(match host.which("containerd-shim-coffer-v2") {
        Some(p) => check("coffer shim", Status::Ok, format!("{}", p.display())),
        None => fixable(
            "coffer shim",
            Status::Missing,
            "containerd-shim-coffer-v2 is not on PATH: containerd cannot start Coffer pods",
            "cargo install --path crates/shim (or copy it next to containerd)",
        ),
    });
    out
}

async fn kbs(url: Option<&str>) -> Check {
    let Some(url) = url else {
        return check("kbs", Status::Info, "not checked (coffer doctor --kbs URL)");
    };
    let health = format!("{}/healthz", url.trim_end_matches('/'));
    let client = match reqwest::Client::builder().timeout(COMMAND_WAIT).build() {
        Ok(c) => c,
        Err(e) => return check("kbs", Status::Missing, format!("no HTTP client: {e}")),
    };
    match client.get(&health).send().await {
        Ok(r) if r.status().is_success() => {
            check("kbs", Status::Ok, format!("{url} answers ({})", r.status()))
        }
        Ok(r) => fixable(
            "kbs",
            Status::Missing,
            format!("{health} answered {}", r.status()),
            "is this the KBS's base URL (without /kbs/v0)?",
        ),
        Err(e) => {
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            fixable(
                "kbs",
                Status::Missing,
                format!("cannot reach {url}: {why}"),
                "start the KBS (coffer-kbs) or check the URL and its TLS certificate",
            )
        }
    }
}

fn disk(area: &'static str, dir: &Path) -> Check {
    // The nearest directory that exists is where the files will go.
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    match rustix::fs::statvfs(at) {
        Ok(s) => {
            let free = s.f_bavail.saturating_mul(s.f_frsize);
            let gib = free as f64 / f64::from(1u32 << 30);
            if free < DISK_LOW {
                fixable(
                    area,
                    Status::Limited,
                    format!(
                        "{gib:.1} GiB free at {}: pod VM images and cached image layers may not fit",
                        at.display()
                    ),
                    "free some space (4 GiB or more)",
                )
            } else {
                check(
                    area,
                    Status::Ok,
                    format!("{gib:.1} GiB free at {}", at.display()),
                )
            }
        }
        Err(e) => check(
            area,
            Status::Info,
            format!("cannot tell the free space at {}: {e}", at.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_coffer_install_writes_is_recognised() {
        let ok = r#"
version = 2
[proxy_plugins.coffer]
  type = "snapshot"
  address = "/run/coffer/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "coffer"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.coffer]
    runtime_type = "io.containerd.coffer.v2"
"#;
        assert_eq!(containerd_config(ok), Ok(()));
        let no_snapshotter = ok.replace("[proxy_plugins.coffer]", "[proxy_plugins.other]");
        assert_eq!(
            containerd_config(&no_snapshotter),
            Err("no proxy snapshotter `coffer`".into())
        );
        assert!(containerd_config("version = 2\n")
            .unwrap_err()
            .contains("runtime handler"));
        assert!(containerd_config("[[").unwrap_err().starts_with("not TOML"));
    }
}
