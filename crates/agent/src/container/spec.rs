//! The OCI runtime spec a container's bundle gets: its process (arguments, environment, working
//! directory and user from the image config and the request), and its confinement.
//!
//! The spec: new PID, IPC, UTS, mount and network namespaces; a cgroup per container; the
//! runtime's default masked and read-only paths; `noNewPrivileges`; Docker's default capability
//! set (everything else dropped); a default seccomp profile denying kernel-module, keyring,
//! mount, reboot, clock, swap, BPF, ptrace and similar system calls; a read-only rootfs when asked.

use std::path::Path;

use serde_json::{json, Value};

use super::{ContainerError, Result};
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
pub(super) fn cgroup_path(cgroup_parent: &str, id: &str) -> String {
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
