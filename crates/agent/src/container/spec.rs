//! The OCI runtime spec a container's bundle gets: its process (arguments, environment, working
//! directory and user from the image config and the request), and its confinement.
//!
//! The spec: new PID, IPC, UTS and mount namespaces, and the pod's network namespace, which the
//! pod's containers share (the agent makes it, with only a loopback interface); a cgroup per container; the
//! runtime's default masked and read-only paths; `noNewPrivileges`; Docker's default capability
//! set (everything else dropped); a default seccomp profile denying kernel-module, keyring,
//! mount, reboot, clock, swap, BPF, ptrace and similar system calls; a read-only rootfs when asked.

use std::path::Path;

use serde_json::{json, Value};

use super::{ContainerError, Result};
use crate::proto::CreateContainerRequest;

/// Capabilities a container keeps (Docker's default set).
pub use coffer_wire::capabilities::DEFAULT as DEFAULT_CAPABILITIES;

/// Every Linux capability, the set a privileged container gets.
pub use coffer_wire::capabilities::ALL as ALL_CAPABILITIES;

/// The seccomp filter's architectures: the machine the agent runs on, with its compatibility
/// ABIs (libseccomp refuses an architecture the kernel does not have).
const SECCOMP_ARCHITECTURES: &[&str] = if cfg!(target_arch = "s390x") {
    &["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]
} else if cfg!(target_arch = "aarch64") {
    &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
} else {
    &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
};

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

/// Gives the container the block device `dev` at `path` (node and cgroup access).
pub(super) fn add_block_device(spec: &mut Value, path: &str, dev: &super::block::Opened) {
    let node = json!({
        "path": path, "type": "b", "major": dev.major, "minor": dev.minor,
        "fileMode": 0o660, "uid": 0, "gid": 0,
    });
    let rule = json!({"allow": true, "type": "b", "major": dev.major, "minor": dev.minor, "access": "rwm"});
    match spec["linux"]["devices"].as_array_mut() {
        Some(d) => d.push(node),
        None => spec["linux"]["devices"] = json!([node]),
    }
    match spec["linux"]["resources"]["devices"].as_array_mut() {
        Some(r) => r.push(rule),
        None => spec["linux"]["resources"]["devices"] = json!([rule]),
    }
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
    merge_env(&mut env, &req.env);
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
    let additional_gids = req
        .user
        .as_ref()
        .map(|u| u.additional_gids.clone())
        .unwrap_or_default();
    let caps: Vec<String> = if req.privileged {
        ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect()
    } else if req.capabilities.is_empty() {
        DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect()
    } else {
        req.capabilities.clone()
    };
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": req.tty,
            "user": {"uid": uid, "gid": gid, "additionalGids": additional_gids},
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
                "architectures": SECCOMP_ARCHITECTURES,
                "syscalls": [{"names": DENIED_SYSCALLS.to_vec(), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            },
        },
    });
    if req.privileged {
        // As runc runs a privileged container: no seccomp filter, nothing masked, /sys writable.
        let linux = &mut spec["linux"];
        if let Some(l) = linux.as_object_mut() {
            l.remove("seccomp");
            l.insert("maskedPaths".into(), json!([]));
            l.insert("readonlyPaths".into(), json!([]));
        }
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            for m in mounts.iter_mut().filter(|m| m["destination"] == "/sys") {
                m["options"] = json!(["nosuid", "noexec", "nodev", "rw"]);
            }
        }
    }
    spec
}

/// The guest-side mounts for the node's mounts the guest can honour, with the sandbox's
/// volumes under `root` (the containers' root): each emptyDir volume (a bind mount whose source
/// ends in the kubelet's `volumes/kubernetes.io~empty-dir/NAME`) becomes a directory of this
/// sandbox, `root/.volumes/NAME`, made on first use and shared by every container that mounts
/// the same volume, read-only where the node's mount is. A configMap, secret, projected or
/// downwardAPI volume (`kubernetes.io~configmap/NAME`, …) binds the sandbox's copy
/// `root/.files/NAME` read-only, which the shim must have sent first (`SetVolume`); the pod's
/// files come from `root/.podfiles`. The host's directory is never mounted: nothing the node
/// writes reaches the guest through it. Other node paths are refused, naming them.
pub fn volume_mounts(
    root: &Path,
    bundle: &Path,
    req: &CreateContainerRequest,
) -> Result<Vec<Value>> {
    let volumes = root.join(super::VOLUMES);
    let files = root.join(super::FILES);
    let pod_files = root.join(super::POD_FILES);
    let mut out = Vec::new();
    for m in &req.mounts {
        // The pod's /etc/hosts, /etc/hostname, /etc/resolv.conf: the copy the shim sent, if
        // any (else the image's own file stays).
        if !m.source.contains("/volumes/kubernetes.io~") {
            if let Some((volume, file, _)) = super::files::POD_FILES
                .iter()
                .find(|(_, _, dest)| *dest == m.destination)
            {
                let copy = pod_files.join(volume).join("..data").join(file);
                if copy.is_file() {
                    let ro = m.options.iter().any(|o| o == "ro");
                    out.push(json!({
                        "destination": m.destination,
                        "type": "bind",
                        "source": copy,
                        "options": ["rbind", "rprivate", if ro { "ro" } else { "rw" }],
                    }));
                }
                continue;
            }
        }
        if is_termination_log(&m.source) {
            // The container's own file, read back when it exits (the node's copy is the
            // shim's to write then).
            let file = bundle.join(TERMINATION_LOG);
            std::fs::write(&file, b"")
                .and_then(|()| {
                    std::fs::set_permissions(
                        &file,
                        std::os::unix::fs::PermissionsExt::from_mode(0o666),
                    )
                })
                .map_err(|e| ContainerError::Runtime(format!("the termination log: {e}")))?;
            out.push(json!({
                "destination": m.destination,
                "type": "bind",
                "source": file,
                "options": ["rbind", "rprivate", "rw"],
            }));
            continue;
        }
        // The kubelet's volume directory: `…/volumes/kubernetes.io~PLUGIN/NAME`.
        let Some((plugin, name)) = m
            .source
            .rsplit_once("/volumes/kubernetes.io~")
            .and_then(|(_, rest)| rest.split_once('/'))
        else {
            if let Some(bind) = subpath_mount(&volumes, &files, bundle, m)? {
                out.push(bind);
                continue;
            }
            refuse_node_path(m)?;
            continue;
        };
        let file_volume = super::files::KINDS.contains(&plugin);
        if plugin != "empty-dir" && !file_volume {
            return Err(ContainerError::Invalid(format!(
                "mount {}: volume kind {plugin:?} is not available in the sandbox (its files would be the node's, readable and changeable there); use an emptyDir, a configMap, secret, projected or downwardAPI volume, or a KBS resource, and for persistent data a volumeMode: Block claim, which a pod VM encrypts",
                m.destination
            )));
        }
        // A DNS label, as Kubernetes requires of volume names: never a path.
        if !super::files::is_dns_label(name) {
            return Err(ContainerError::Invalid(format!(
                "mount {}: volume name {name:?} is not a DNS label",
                m.destination
            )));
        }
        if !m.destination.starts_with('/') || m.destination.split('/').any(|c| c == "..") {
            return Err(ContainerError::Invalid(format!(
                "mount destination {:?} is not an absolute path without '..'",
                m.destination
            )));
        }
        let ro = m.options.iter().any(|o| o == "ro");
        let dir = if file_volume {
            // Copied in by the shim before the container (SetVolume); always read-only.
            let dir = files.join(name);
            if !dir.join("..data").exists() {
                return Err(ContainerError::Invalid(format!(
                    "mount {}: {plugin} volume {name} was not copied into the sandbox (SetVolume) before the container",
                    m.destination
                )));
            }
            dir
        } else {
            let dir = volumes.join(name);
            std::fs::create_dir_all(&dir).map_err(|e| {
                ContainerError::Runtime(format!("cannot make emptyDir volume {name}: {e}"))
            })?;
            if m.options.iter().any(|o| o == "coffer.medium=memory") {
                memory_medium(&dir, name, &m.options)?;
            }
            // World-writable with the sticky bit off, as the kubelet makes an emptyDir.
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .map_err(|e| ContainerError::Runtime(format!("emptyDir volume {name}: {e}")))?;
            dir
        };
        out.push(json!({
            "destination": m.destination,
            "type": "bind",
            "source": dir,
            "options": ["rbind", "rprivate", if ro || file_volume { "ro" } else { "rw" }],
        }));
    }
    Ok(out)
}

/// Makes emptyDir `name` at `dir` a tmpfs (`medium: Memory`) of the size the node's mount had
/// (`coffer.size=BYTES`), once: the containers that share the volume share that tmpfs. In a
/// pod VM it is guest memory, which the TEE encrypts.
fn memory_medium(dir: &Path, name: &str, options: &[String]) -> Result<()> {
    let size: u64 = options
        .iter()
        .find_map(|o| o.strip_prefix("coffer.size="))
        .and_then(|s| s.parse().ok())
        .filter(|s| *s > 0)
        .ok_or_else(|| {
            ContainerError::Invalid(format!(
                "emptyDir volume {name}: medium memory without a size (coffer.size=BYTES)"
            ))
        })?;
    // Already this volume's own tmpfs (a second container sharing it): a mount point whose
    // device differs from its parent's, of type tmpfs. (The state directory may itself be a
    // tmpfs, as in a process sandbox, so the type alone says nothing.)
    let dev = |p: &Path| rustix::fs::stat(p).map(|st| st.st_dev).ok();
    if dev(dir) != dir.parent().and_then(dev) && coffer_fsutil::tmpfs_size(dir).is_some() {
        return Ok(());
    }
    let opts = std::ffi::CString::new(format!("size={size},mode=0777"))
        .map_err(|_| ContainerError::Invalid("tmpfs options".into()))?;
    rustix::mount::mount(
        "tmpfs",
        dir,
        "tmpfs",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        Some(opts.as_c_str()),
    )
    .map_err(|e| {
        ContainerError::Runtime(format!(
            "emptyDir volume {name}: cannot mount its tmpfs: {e}"
        ))
    })
}

/// A `subPath` mount (the kubelet's `volume-subpaths/` bind) whose origin the shim traced
/// (`coffer.volume=KIND/NAME`, `coffer.subpath=PATH`): the same path inside the sandbox's copy of
/// that volume. An emptyDir's subpath is made as a directory when absent (as the kubelet
/// does); no component of it may be a symbolic link, which a container could have planted to
/// reach outside the volume. A file volume's subpath must exist in its current generation
/// (and, as with the kubelet, does not follow later updates). `None`: not a traced subPath.
fn subpath_mount(
    volumes: &Path,
    files: &Path,
    bundle: &Path,
    m: &crate::proto::Mount,
) -> Result<Option<Value>> {
    if !m.source.contains("/volume-subpaths/") {
        return Ok(None);
    }
    let opt = |k: &str| m.options.iter().find_map(|o| o.strip_prefix(k));
    let (Some(volume), Some(sub)) = (opt("coffer.volume="), opt("coffer.subpath=")) else {
        return Ok(None);
    };
    let bad = |why: String| ContainerError::Invalid(format!("mount {}: {why}", m.destination));
    let (kind, name) = volume
        .split_once('/')
        .ok_or_else(|| bad(format!("subPath volume {volume:?} is not KIND/NAME")))?;
    if !super::files::is_dns_label(name) {
        return Err(bad(format!("volume name {name:?} is not a DNS label")));
    }
    // The kubelet's bind names its volume (`…/volume-subpaths/NAME/CONTAINER/INDEX`): what the
    // shim traced must be that volume.
    let named = m
        .source
        .split_once("/volume-subpaths/")
        .and_then(|(_, rest)| rest.split('/').next());
    if named != Some(name) {
        return Err(bad(format!(
            "subPath said to come from volume {name}, but the node's mount names {named:?}"
        )));
    }
    let comps: Vec<&str> = sub.split('/').collect();
    if sub.is_empty()
        || sub.starts_with('/')
        || comps
            .iter()
            .any(|c| c.is_empty() || *c == "." || *c == "..")
        || comps[0].starts_with("..")
    {
        return Err(bad(format!(
            "subPath {sub:?} is not a relative path inside the volume"
        )));
    }
    let ro = m.options.iter().any(|o| o == "ro");
    let (source, ro) = if kind == "empty-dir" {
        (
            bind_beneath(&volumes.join(name), &comps, bundle, &m.destination)
                .map_err(|e| bad(format!("subPath {sub} of emptyDir {name}: {e}")))?,
            ro,
        )
    } else if super::files::KINDS.contains(&kind) {
        let root = files.join(name);
        let at = root.join("..data").join(sub);
        let real = std::fs::canonicalize(&at).map_err(|e| {
            bad(format!(
                "subPath {sub} of {kind} volume {name}: {e} (was the volume copied in first?)"
            ))
        })?;
        let root = std::fs::canonicalize(&root).map_err(|e| bad(e.to_string()))?;
        if !real.starts_with(&root) {
            return Err(bad(format!(
                "subPath {sub} leads outside {kind} volume {name}"
            )));
        }
        (real, true)
    } else {
        return Err(bad(format!(
            "volume kind {kind:?} is not available in the sandbox"
        )));
    };
    Ok(Some(json!({
        "destination": m.destination,
        "type": "bind",
        "source": source,
        "options": ["rbind", "rprivate", if ro { "ro" } else { "rw" }],
    })))
}

/// Where a container's subPath binds live in its bundle (out of every container's reach).
pub const SUBPATHS: &str = "subpaths";

/// Opens `comps` under `root` one component at a time, never following a symbolic link
/// (`O_PATH | O_NOFOLLOW`; a missing directory is made, mode 0777 as the volume's), and binds
/// the object reached — through its descriptor, so a link swapped in meanwhile cannot redirect
/// it — at a place of the bundle's own, which the container's spec then binds. A container that
/// shares the volume can plant links there; they are refused, and a later swap changes nothing.
fn bind_beneath(
    root: &Path,
    comps: &[&str],
    bundle: &Path,
    destination: &str,
) -> std::result::Result<std::path::PathBuf, String> {
    use rustix::fs::{FileType, Mode, OFlags};
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    std::fs::create_dir_all(root).map_err(|e| e.to_string())?;
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .map_err(|e| e.to_string())?;
    let mut fd = rustix::fs::open(root, flags | OFlags::DIRECTORY, Mode::empty())
        .map_err(|e| e.to_string())?;
    for c in comps {
        let next = match rustix::fs::openat(&fd, *c, flags, Mode::empty()) {
            Ok(next) => next,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(&fd, *c, Mode::from_raw_mode(0o777))
                    .map_err(|e| e.to_string())?;
                rustix::fs::openat(&fd, *c, flags | OFlags::DIRECTORY, Mode::empty())
                    .map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        let st = rustix::fs::fstat(&next).map_err(|e| e.to_string())?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(
                "passes through a symbolic link, which could lead outside the volume".into(),
            );
        }
        fd = next;
    }
    let st = rustix::fs::fstat(&fd).map_err(|e| e.to_string())?;
    let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
    let dir = bundle.join(SUBPATHS);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // One place per destination (a container has each destination once).
    let slot = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(destination.as_bytes())[..8])
    };
    let target = dir.join(slot);
    if is_dir {
        std::fs::create_dir(&target).map_err(|e| e.to_string())?;
    } else {
        std::fs::write(&target, b"").map_err(|e| e.to_string())?;
    }
    let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::mount::mount_bind(via.as_str(), &target).map_err(|e| e.to_string())?;
    Ok(target)
}

/// The runtime's own binds for every container (`/etc/hostname`, `/etc/resolv.conf`,
/// `/etc/hosts`, `/dev/shm`): the sandbox has its own (or the copies the shim sent).
const RUNTIME_BINDS: [&str; 4] = [
    "/etc/hostname",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/dev/shm",
];

/// A bind mount of a node path the sandbox cannot honour is refused, naming it, rather than
/// left out: a `hostPath` (the node's files), a `subPath` the shim could not trace to its volume,
/// or any other node directory. The runtime's own binds and non-bind mounts (the sandbox makes
/// its own `/proc`, `/dev`, `/sys`) pass.
fn refuse_node_path(m: &crate::proto::Mount) -> Result<()> {
    let bind = m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
    if !bind || RUNTIME_BINDS.contains(&m.destination.as_str()) {
        return Ok(());
    }
    let why = if m.source.contains("/volume-subpaths/") {
        "the volume this subPath comes from is not known (the node's mount table does not trace it to a volume): mount the whole volume"
            .to_string()
    } else {
        format!(
            "a bind of the node's {} is not available in the sandbox (the node's files stay on the node); use an emptyDir, a configMap, secret, projected or downwardAPI volume, or a KBS resource",
            m.source
        )
    };
    Err(ContainerError::Invalid(format!(
        "mount {}: {why}",
        m.destination
    )))
}

/// The container's termination log in its bundle.
pub const TERMINATION_LOG: &str = "termination-log";

/// Whether `source` is the kubelet's termination-log file of a container:
/// `…/pods/UID/containers/NAME/ID`.
pub fn is_termination_log(source: &str) -> bool {
    let parts: Vec<&str> = source.rsplit('/').take(5).collect();
    parts.len() == 5 && parts[2] == "containers" && parts[4] == "pods"
}

/// Adds `extra` (`NAME=value` entries) to `env`, each replacing an entry of the same name in
/// place: one entry per name, so that what the request sets is what the process sees.
fn merge_env(env: &mut Vec<String>, extra: &[String]) {
    let name = |e: &str| e.split_once('=').map(|(n, _)| n).unwrap_or(e).to_string();
    for e in extra {
        let n = name(e);
        match env.iter_mut().find(|x| name(x) == n) {
            Some(slot) => *slot = e.clone(),
            None => env.push(e.clone()),
        }
    }
}

/// Checks the capabilities a request asks for: each must be a Linux capability's name.
pub fn check_capabilities(caps: &[String]) -> Result<()> {
    match caps
        .iter()
        .find(|c| !ALL_CAPABILITIES.contains(&c.as_str()))
    {
        Some(c) => Err(ContainerError::Invalid(format!(
            "capability {c:?} is not a Linux capability (CAP_CHOWN, CAP_NET_ADMIN, …)"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_overrides_image_env_in_place_and_sets_user_and_capabilities() {
        let req = CreateContainerRequest {
            container_id: "c".into(),
            env: vec!["A=2".into(), "B=x=y".into()],
            user: Some(crate::proto::User {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![5],
            }),
            capabilities: vec!["CAP_KILL".into()],
            ..Default::default()
        };
        let config = json!({"Env": ["A=1", "PATH=/bin", "C=3"]});
        let s = spec("c", "/p", &config, (1000, 1000), &req);
        assert_eq!(
            s["process"]["env"],
            json!(["A=2", "PATH=/bin", "C=3", "B=x=y"])
        );
        assert_eq!(s["process"]["user"]["additionalGids"], json!([5]));
        assert_eq!(
            s["process"]["capabilities"]["bounding"],
            json!(["CAP_KILL"])
        );
        assert!(s["linux"]["seccomp"].is_object());

        let privileged = CreateContainerRequest {
            privileged: true,
            ..req
        };
        let s = spec("c", "/p", &config, (0, 0), &privileged);
        assert_eq!(
            s["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            ALL_CAPABILITIES.len()
        );
        assert!(s["linux"]["seccomp"].is_null());
        assert_eq!(s["linux"]["maskedPaths"], json!([]));
        check_capabilities(&["CAP_SYS_ADMIN".into()]).unwrap();
        let e = check_capabilities(&["CAP_EVERYTHING".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CAP_EVERYTHING"), "{e}");
    }

    #[test]
    fn empty_dirs_become_sandbox_directories_and_other_host_paths_stay_out() {
        let d = tempfile::tempdir().unwrap();
        let mount = |dest: &str, source: &str, ro: bool| crate::proto::Mount {
            destination: dest.into(),
            r#type: "bind".into(),
            source: source.into(),
            options: vec!["rbind".into(), if ro { "ro" } else { "rw" }.into()],
        };
        let req = CreateContainerRequest {
            mounts: vec![
                mount(
                    "/work",
                    "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/work",
                    false,
                ),
                mount(
                    "/in",
                    "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/work",
                    true,
                ),
                mount("/etc/hosts", "/var/lib/kubelet/pods/u/etc-hosts", false),
            ],
            ..Default::default()
        };
        let m = volume_mounts(d.path(), d.path(), &req).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["source"], json!(d.path().join(".volumes/work")));
        assert_eq!(m[1]["options"][2], "ro");
        assert!(d.path().join(".volumes/work").is_dir());
        for bad in ["..", "a/b", "", "UPPER"] {
            let req = CreateContainerRequest {
                mounts: vec![mount(
                    "/w",
                    &format!("/x/volumes/kubernetes.io~empty-dir/{bad}"),
                    false,
                )],
                ..Default::default()
            };
            assert!(volume_mounts(d.path(), d.path(), &req).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_paths_the_sandbox_cannot_honour_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let bind = |dest: &str, source: &str| CreateContainerRequest {
            mounts: vec![crate::proto::Mount {
                destination: dest.into(),
                r#type: "bind".into(),
                source: source.into(),
                options: vec!["rbind".into(), "rw".into()],
            }],
            ..Default::default()
        };
        for (req, want) in [
            (
                bind("/host", "/"),
                "a bind of the node's / is not available",
            ),
            (
                bind(
                    "/data",
                    "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv-1/mount",
                ),
                "volume kind \"csi\" is not available in the sandbox (its files would be the node's, readable and changeable there); use an emptyDir, a configMap, secret, projected or downwardAPI volume, or a KBS resource, and for persistent data a volumeMode: Block claim",
            ),
            (
                bind(
                    "/etc/app.conf",
                    "/var/lib/kubelet/pods/u/volume-subpaths/config/app/0",
                ),
                "the volume this subPath comes from is not known",
            ),
        ] {
            let e = volume_mounts(d.path(), d.path(), &req)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        // The runtime's own binds and the sandbox's own filesystems pass (left to the sandbox).
        let mut ok = bind("/dev/shm", "/run/containerd/sandboxes/x/shm");
        ok.mounts.push(crate::proto::Mount {
            destination: "/proc".into(),
            r#type: "proc".into(),
            source: "proc".into(),
            options: vec![],
        });
        assert!(volume_mounts(d.path(), d.path(), &ok).unwrap().is_empty());
    }

    #[test]
    fn subpaths_bind_inside_the_sandboxs_copy_and_never_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let (volumes, files) = (d.path().join(".volumes"), d.path().join(".files"));
        let sub = |volume: &str, path: &str| CreateContainerRequest {
            mounts: vec![crate::proto::Mount {
                destination: "/x".into(),
                r#type: "bind".into(),
                source: format!(
                    "/var/lib/kubelet/pods/u/volume-subpaths/{}/app/0",
                    volume.split('/').nth(1).unwrap_or("")
                ),
                options: vec![
                    "rbind".into(),
                    "rw".into(),
                    format!("coffer.volume={volume}"),
                    format!("coffer.subpath={path}"),
                ],
            }],
            ..Default::default()
        };
        let run = |r: &CreateContainerRequest| volume_mounts(d.path(), d.path(), r);
        // An emptyDir subpath is made on first use and bound, through its descriptor, at a
        // place of the bundle's own: what is written there lands in the volume.
        let m = run(&sub("empty-dir/work", "logs/app")).unwrap();
        let bound = std::path::PathBuf::from(m[0]["source"].as_str().unwrap());
        assert!(bound.starts_with(d.path().join(SUBPATHS)), "{bound:?}");
        assert!(volumes.join("work/logs/app").is_dir());
        std::fs::write(bound.join("x"), b"through the bind").unwrap();
        assert_eq!(
            std::fs::read(volumes.join("work/logs/app/x")).unwrap(),
            b"through the bind"
        );
        rustix::mount::unmount(&bound, rustix::mount::UnmountFlags::DETACH).unwrap();
        // A link a container planted in the emptyDir is never followed.
        std::os::unix::fs::symlink("/", volumes.join("work/escape")).unwrap();
        let e = run(&sub("empty-dir/work", "escape/etc"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("passes through a symbolic link"), "{e}");
        // A configMap key, from the sandbox's copy, read-only.
        super::super::files::store(
            &files,
            "config",
            "configmap",
            &[super::super::files::File {
                path: "app.conf",
                mode: 0,
                content: b"a=1",
                gid: 0,
            }],
        )
        .unwrap();
        let m = run(&sub("configmap/config", "app.conf")).unwrap();
        assert_eq!(m[0]["options"][2], "ro");
        assert_eq!(
            std::fs::read(m[0]["source"].as_str().unwrap()).unwrap(),
            b"a=1"
        );
        for (volume, path, want) in [
            (
                "configmap/config",
                "missing",
                "was the volume copied in first",
            ),
            ("configmap/config", "../x", "not a relative path"),
            ("csi/pv", "a", "not available in the sandbox"),
            ("configmap/Bad", "a", "not a DNS label"),
        ] {
            let e = run(&sub(volume, path)).unwrap_err().to_string();
            assert!(e.contains(want), "{volume} {path}: {e}");
        }
        // The shim's word against the kubelet's bind: another volume than the mount names.
        let mut other = sub("configmap/config", "app.conf");
        other.mounts[0].source = "/var/lib/kubelet/pods/u/volume-subpaths/work/app/0".into();
        let e = run(&other).unwrap_err().to_string();
        assert!(e.contains("but the node's mount names"), "{e}");
        let e = run(&sub("empty-dir/work", "..x")).unwrap_err().to_string();
        assert!(e.contains("not a relative path"), "{e}");
    }

    #[test]
    fn a_memory_medium_empty_dir_is_a_tmpfs_of_the_nodes_size() {
        let d = tempfile::tempdir().unwrap();
        let req = CreateContainerRequest {
            mounts: vec![crate::proto::Mount {
                destination: "/cache".into(),
                r#type: "bind".into(),
                source: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache".into(),
                options: vec![
                    "rbind".into(),
                    "rw".into(),
                    "coffer.medium=memory".into(),
                    format!("coffer.size={}", 8 << 20),
                ],
            }],
            ..Default::default()
        };
        let m = volume_mounts(d.path(), d.path(), &req).unwrap();
        let dir = d.path().join(".volumes/cache");
        assert_eq!(m[0]["source"], json!(dir));
        assert_eq!(
            coffer_fsutil::tmpfs_size(&dir),
            Some(8 << 20),
            "a tmpfs of 8 MiB"
        );
        // A second container sharing it: the same tmpfs, not a second one.
        volume_mounts(d.path(), d.path(), &req).unwrap();
        rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::empty()).unwrap();
        assert!(rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::empty()).is_err());
        let mut no_size = req.clone();
        no_size.mounts[0].options.pop();
        let e = volume_mounts(d.path(), d.path(), &no_size)
            .unwrap_err()
            .to_string();
        assert!(e.contains("without a size"), "{e}");
    }

    #[test]
    fn the_kubelets_termination_log_is_recognized_by_its_place() {
        assert!(is_termination_log(
            "/var/lib/kubelet/pods/0f3c/containers/app/5d1e2a4b"
        ));
        for other in [
            "/var/lib/kubelet/pods/0f3c/etc-hosts",
            "/var/lib/kubelet/pods/0f3c/volumes/kubernetes.io~empty-dir/containers",
            "/containers/app/x",
            "/srv/containers/app/x",
        ] {
            assert!(!is_termination_log(other), "{other}");
        }
    }

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
