//! File volumes from the node into the sandbox: configMap, secret, projected and downwardAPI.
//!
//! The kubelet writes such a volume into `…/volumes/kubernetes.io~KIND/NAME` on the node and
//! asks for a bind mount of it. The guest never mounts a node directory: the shim reads the
//! volume as a container would see it (the visible names, following the kubelet's `..data`
//! links, never a link that leaves the volume) and sends its files to the agent (`SetVolume`),
//! which keeps its own copy. The shim then polls the node's directory every
//! [`POLL`] and sends the volume again when it changed (a ConfigMap edit, a token rotation: the
//! kubelet's atomic `..data` swap), for as long as the sandbox runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use coffer_agent::container::files::{
    KINDS, MAX_FILES, MAX_FILE_BYTES, MAX_POD_FILE_BYTES, MAX_TOTAL_BYTES, POD_FILE, POD_FILES,
};
use coffer_agent::proto::{Mount, SetVolumeRequest, VolumeFile};

use crate::{sandbox::Sandbox, ShimError};

/// How often a file volume's node directory is checked for changes at the latest (inotify
/// reports most changes at once).
pub const POLL: Duration = Duration::from_secs(1);

/// A file volume a mount names: its kind (the kubelet plugin) and name, and the node directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVolume {
    /// `configmap`, `secret`, `projected` or `downward-api`.
    pub kind: String,
    /// The pod's volume name.
    pub name: String,
    /// The kubelet's directory of it on the node.
    pub dir: PathBuf,
}

/// The file volume `m` binds, if it binds one.
pub fn file_volume(m: &Mount) -> Option<FileVolume> {
    let (_, rest) = m.source.rsplit_once("/volumes/kubernetes.io~")?;
    let (kind, name) = rest.split_once('/')?;
    KINDS.contains(&kind).then(|| FileVolume {
        kind: kind.to_string(),
        name: name.to_string(),
        dir: PathBuf::from(&m.source),
    })
}

fn refused(v: &FileVolume, why: String) -> ShimError {
    ShimError::Refused(format!("{} volume {}: {why}", v.kind, v.name))
}

/// The files of `v` as a container would see them, sorted by path.
pub fn read(v: &FileVolume) -> Result<Vec<VolumeFile>, ShimError> {
    let root = std::fs::canonicalize(&v.dir)
        .map_err(|e| refused(v, format!("cannot open {}: {e}", v.dir.display())))?;
    let mut out = BTreeMap::new();
    let mut total = 0usize;
    walk(v, &root, &root, "", &mut out, &mut total, 0)?;
    Ok(out.into_values().collect())
}

fn walk(
    v: &FileVolume,
    root: &Path,
    dir: &Path,
    prefix: &str,
    out: &mut BTreeMap<String, VolumeFile>,
    total: &mut usize,
    depth: usize,
) -> Result<(), ShimError> {
    if depth > 16 {
        return Err(refused(v, "directories nested more than 16 deep".into()));
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| refused(v, format!("cannot list {}: {e}", dir.display())))?;
    for e in entries {
        let e = e.map_err(|e| refused(v, format!("cannot list {}: {e}", dir.display())))?;
        let name = e.file_name().to_string_lossy().to_string();
        // The kubelet's own names (`..data`, `..2024_…`): not what a container sees.
        if depth == 0 && name.starts_with("..") {
            continue;
        }
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let real =
            std::fs::canonicalize(e.path()).map_err(|err| refused(v, format!("{path}: {err}")))?;
        if !real.starts_with(root) {
            return Err(refused(
                v,
                format!("{path} is a link to {}, outside the volume", real.display()),
            ));
        }
        let meta = std::fs::metadata(&real).map_err(|err| refused(v, format!("{path}: {err}")))?;
        if meta.is_dir() {
            walk(v, root, &real, &path, out, total, depth + 1)?;
            continue;
        }
        if !meta.is_file() {
            return Err(refused(v, format!("{path} is not a regular file")));
        }
        if meta.len() > MAX_FILE_BYTES as u64 {
            return Err(refused(
                v,
                format!("{path} is {} bytes, more than {MAX_FILE_BYTES}", meta.len()),
            ));
        }
        let content = std::fs::read(&real).map_err(|err| refused(v, format!("{path}: {err}")))?;
        *total += content.len();
        if *total > MAX_TOTAL_BYTES || out.len() >= MAX_FILES {
            return Err(refused(
                v,
                format!("more than {MAX_FILES} files or {MAX_TOTAL_BYTES} bytes"),
            ));
        }
        use std::os::unix::fs::PermissionsExt;
        out.insert(
            path.clone(),
            VolumeFile {
                path,
                mode: meta.permissions().mode() & 0o777,
                content,
                // The pod's fsGroup, where the kubelet applied one to its copy.
                gid: std::os::unix::fs::MetadataExt::gid(&meta),
            },
        );
    }
    Ok(())
}

/// The size of the tmpfs at `dir` when the kubelet backed an emptyDir with memory (`medium:
/// Memory`: it mounts a tmpfs there, sized by `sizeLimit` or the pod's memory), else `None`.
pub fn memory_medium(dir: &Path) -> Option<u64> {
    coffer_fsutil::tmpfs_size(dir)
}

/// Where a kubelet `subPath` bind (`…/pods/UID/volume-subpaths/NAME/CONTAINER/INDEX`) comes
/// from, read from `mountinfo` (`/proc/self/mountinfo`): the volume's kind and name and the
/// path inside it (for a configMap or secret, the key, without the kubelet's generation
/// directory).
pub fn subpath_origin(source: &str, mountinfo: &str) -> Option<(String, String, String)> {
    if !source.contains("/volume-subpaths/") {
        return None;
    }
    // Fields (from 0): 2 the device, 3 the root of the mount within its filesystem, 4 the mount
    // point.
    let lines: Vec<Vec<&str>> = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() > 5)
        .collect();
    let sub = lines.iter().rev().find(|f| f[4] == source)?;
    let (kind, name, inner) = match sub[3].split_once("/volumes/kubernetes.io~") {
        // The volume is a directory of the node's filesystem: its path is in the root.
        Some((_, rest)) => {
            let (kind, rest) = rest.split_once('/')?;
            let (name, inner) = rest.split_once('/')?;
            (kind.to_string(), name.to_string(), inner.to_string())
        }
        // The volume is a filesystem of its own (a secret's or projected volume's tmpfs, a
        // memory-backed emptyDir): the kubelet's mount of it, on the same device, says which.
        None => {
            let vol = lines.iter().rev().find(|f| {
                f[2] == sub[2] && f[4].contains("/volumes/kubernetes.io~") && f[4] != source
            })?;
            let (_, rest) = vol[4].split_once("/volumes/kubernetes.io~")?;
            let (kind, name) = rest.split_once('/')?;
            let base = vol[3].trim_end_matches('/');
            let inner = sub[3].strip_prefix(base)?.trim_start_matches('/');
            (kind.to_string(), name.to_string(), inner.to_string())
        }
    };
    let inner = match inner.split_once('/') {
        // A file volume's key, bound through the generation the kubelet had then.
        Some((gen, key)) if gen.starts_with("..") => key.to_string(),
        _ => inner,
    };
    Some((kind, name, inner))
}

/// Tells the agent where each `subPath` mount comes from (`coffer.volume=KIND/NAME`,
/// `coffer.subpath=PATH`), as far as the node's mount table says; the agent checks both.
pub fn mark_subpaths(mounts: &mut [Mount]) {
    if !mounts
        .iter()
        .any(|m| m.source.contains("/volume-subpaths/"))
    {
        return;
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in mounts {
        if let Some((kind, name, path)) = subpath_origin(&m.source, &info) {
            m.options.push(format!("coffer.volume={kind}/{name}"));
            m.options.push(format!("coffer.subpath={path}"));
        }
    }
}

/// Marks each memory-backed emptyDir mount for the agent (`coffer.medium=memory`,
/// `coffer.size=BYTES`), which then makes that volume a tmpfs of the same size in the guest.
pub fn mark_memory_media(mounts: &mut [Mount]) {
    for m in mounts {
        if m.source.contains("/volumes/kubernetes.io~empty-dir/") {
            if let Some(size) = memory_medium(Path::new(&m.source)) {
                m.options.push("coffer.medium=memory".into());
                m.options.push(format!("coffer.size={size}"));
            }
        }
    }
}

/// The file volume a marked `subPath` mount ([`mark_subpaths`]) is part of: the kubelet's
/// directory of it beside the subpath's.
fn subpath_volume(m: &Mount) -> Option<FileVolume> {
    let (pod, _) = m.source.split_once("/volume-subpaths/")?;
    let (kind, name) = m
        .options
        .iter()
        .find_map(|o| o.strip_prefix("coffer.volume="))?
        .split_once('/')?;
    KINDS.contains(&kind).then(|| FileVolume {
        kind: kind.to_string(),
        name: name.to_string(),
        dir: PathBuf::from(format!("{pod}/volumes/kubernetes.io~{kind}/{name}")),
    })
}

/// Sends `v` to the sandbox's agent.
async fn send(sandbox: &Sandbox, v: &FileVolume, files: Vec<VolumeFile>) -> Result<(), ShimError> {
    let mut c = sandbox.client.clone();
    c.set_volume(SetVolumeRequest {
        volume: v.name.clone(),
        kind: v.kind.clone(),
        files,
    })
    .await
    .map_err(|s| ShimError::Agent(format!("{} volume {}: {}", v.kind, v.name, s.message())))?;
    Ok(())
}

/// A pod file read on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFile {
    /// Its volume name (`hosts`, `hostname`, `resolv-conf`).
    pub volume: String,
    /// Its file name in that volume.
    pub file: String,
    /// The node file's content.
    pub content: Vec<u8>,
}

/// The pod file `m` binds (the kubelet's `/etc/hosts`, containerd's `/etc/hostname` or
/// `/etc/resolv.conf`), read.
pub fn pod_file(m: &Mount) -> Option<Result<PodFile, ShimError>> {
    if m.source.contains("/volumes/kubernetes.io~") {
        return None;
    }
    let (volume, file, _) = POD_FILES.iter().find(|(_, _, d)| *d == m.destination)?;
    let read = || -> Result<Vec<u8>, String> {
        let meta = std::fs::metadata(&m.source).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if meta.len() > MAX_POD_FILE_BYTES as u64 {
            return Err(format!(
                "{} bytes, more than {MAX_POD_FILE_BYTES}",
                meta.len()
            ));
        }
        std::fs::read(&m.source).map_err(|e| e.to_string())
    };
    Some(
        read()
            .map(|content| PodFile {
                volume: volume.to_string(),
                file: file.to_string(),
                content,
            })
            .map_err(|e| ShimError::Refused(format!("{} ({}): {e}", m.destination, m.source))),
    )
}

/// Copies every file volume `mounts` name into the sandbox (before the container that mounts
/// them is created), and keeps each one up to date while the sandbox runs; and the pod's own
/// files, once. A pod file the policy refuses is left out (the container keeps the image's).
pub async fn sync(sandbox: &Arc<Sandbox>, mounts: &[Mount]) -> Result<(), ShimError> {
    for m in mounts {
        if let Some(found) = pod_file(m) {
            let found = found?;
            let mut c = sandbox.client.clone();
            let sent = c
                .set_volume(SetVolumeRequest {
                    volume: found.volume,
                    kind: POD_FILE.into(),
                    files: vec![VolumeFile {
                        path: found.file,
                        mode: 0o644,
                        content: found.content,
                        gid: 0,
                    }],
                })
                .await;
            if let Err(s) = sent {
                tracing::warn!(sandbox = %sandbox.name, file = %m.destination, error = %s.message(), "pod file not copied: the container keeps the image's");
            }
            continue;
        }
        let Some(v) = file_volume(m).or_else(|| subpath_volume(m)) else {
            continue;
        };
        let files = read(&v)?;
        let digest = fingerprint(&files);
        send(sandbox, &v, files).await?;
        if sandbox.watch_volume(&v.name) {
            tokio::spawn(follow(sandbox.clone(), v, digest));
        }
    }
    Ok(())
}

fn fingerprint(files: &[VolumeFile]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for f in files {
        h.update((f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update(f.mode.to_le_bytes());
        h.update(f.gid.to_le_bytes());
        h.update((f.content.len() as u64).to_le_bytes());
        h.update(&f.content);
    }
    h.finalize().into()
}

/// Watches `dir` with inotify (its entries created, moved in or out, deleted or written: the
/// kubelet's `..data` swap is a rename into it) on a thread of its own, which sends one message
/// per batch of events. None when inotify is unavailable. The thread ends when the directory
/// goes (the kubelet removes it with the pod) or the receiver is dropped.
fn watch(dir: &Path) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let fd = inotify::init(CreateFlags::CLOEXEC).ok()?;
    inotify::add_watch(
        &fd,
        dir,
        WatchFlags::CREATE
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::DELETE
            | WatchFlags::CLOSE_WRITE
            | WatchFlags::ATTRIB,
    )
    .ok()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("volume-watch".into())
        .spawn(move || {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
            let mut events = inotify::Reader::new(&fd, &mut buf);
            loop {
                match events.next() {
                    Ok(e) => {
                        // The watch is gone with the directory.
                        let gone = e.events().contains(inotify::ReadFlags::IGNORED);
                        if tx.send(()).is_err() || gone {
                            return;
                        }
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(_) => return,
                }
            }
        })
        .ok()?;
    Some(rx)
}

/// Waits until `watch` reports a change or `POLL` has passed.
async fn changed(watch: &mut Option<tokio::sync::mpsc::UnboundedReceiver<()>>) {
    match watch {
        Some(rx) => {
            if let Ok(None) = tokio::time::timeout(POLL, rx.recv()).await {
                // The watcher ended: poll from now on.
                *watch = None;
            }
            // Whatever else arrived meanwhile belongs to the same change.
            if let Some(rx) = watch {
                while rx.try_recv().is_ok() {}
            }
        }
        None => tokio::time::sleep(POLL).await,
    }
}

/// Resends `v` whenever its node directory changes, until the sandbox is gone: at once when
/// inotify reports a change there, and at least every [`POLL`].
async fn follow(sandbox: Arc<Sandbox>, v: FileVolume, mut last: [u8; 32]) {
    let mut watcher = watch(&v.dir);
    while sandbox.alive() {
        changed(&mut watcher).await;
        let files = match tokio::task::spawn_blocking({
            let v = v.clone();
            move || read(&v)
        })
        .await
        {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => {
                // The kubelet removes the directory when the pod goes; keep the last copy.
                tracing::debug!(volume = %v.name, error = %e, "file volume not read");
                continue;
            }
            Err(_) => return,
        };
        let digest = fingerprint(&files);
        if digest == last {
            continue;
        }
        match send(&sandbox, &v, files).await {
            Ok(()) => {
                tracing::info!(sandbox = %sandbox.name, volume = %v.name, "file volume updated");
                last = digest;
            }
            Err(e) => tracing::warn!(volume = %v.name, error = %e, "file volume update refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kubelet_style_swap_is_seen_before_the_next_poll() {
        let d = tempfile::tempdir().unwrap();
        kubelet_volume(d.path(), &[("key", "one")]);
        let mut w = watch(d.path());
        assert!(w.is_some(), "inotify is available here");
        let dir = d.path().to_path_buf();
        let t = std::time::Instant::now();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // A new generation and the atomic ..data swap, as the kubelet edits a ConfigMap.
            let gen = dir.join("..2");
            std::fs::create_dir(&gen).unwrap();
            std::fs::write(gen.join("key"), "two").unwrap();
            std::os::unix::fs::symlink("..2", dir.join("..data_tmp")).unwrap();
            std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        });
        changed(&mut w).await;
        assert!(t.elapsed() < POLL / 2, "woken after {:?}", t.elapsed());
        writer.join().unwrap();
    }

    fn mount(source: &str) -> Mount {
        Mount {
            destination: "/etc/config".into(),
            r#type: "bind".into(),
            source: source.into(),
            options: vec!["rbind".into(), "ro".into()],
        }
    }

    /// A volume as the kubelet writes it: files in a timestamped directory, `..data` linking
    /// to it, each visible name linking through `..data`.
    fn kubelet_volume(dir: &Path, files: &[(&str, &str)]) {
        let gen = dir.join("..2026_12_04_22_00_00.000000001");
        for (name, content) in files {
            let p = gen.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        std::os::unix::fs::symlink(gen.file_name().unwrap(), dir.join("..data")).unwrap();
        for (name, _) in files {
            let top = name.split('/').next().unwrap();
            let link = dir.join(top);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{top}"), link).unwrap();
            }
        }
    }

    #[test]
    fn a_kubelet_volume_is_read_as_a_container_sees_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d
            .path()
            .join("pods/u/volumes/kubernetes.io~configmap/config");
        std::fs::create_dir_all(&dir).unwrap();
        kubelet_volume(&dir, &[("app.conf", "a=1"), ("sub/x.txt", "x")]);
        let v = file_volume(&mount(&dir.display().to_string())).unwrap();
        assert_eq!((v.kind.as_str(), v.name.as_str()), ("configmap", "config"));
        let files = read(&v).unwrap();
        let got: Vec<(&str, &[u8])> = files
            .iter()
            .map(|f| (f.path.as_str(), f.content.as_slice()))
            .collect();
        assert_eq!(got, [("app.conf", &b"a=1"[..]), ("sub/x.txt", &b"x"[..])]);
        // The kubelet's fsGroup on its copy goes with each file.
        std::os::unix::fs::chown(
            dir.join("..2026_12_04_22_00_00.000000001/app.conf"),
            None,
            Some(2000),
        )
        .unwrap();
        assert_eq!(read(&v).unwrap()[0].gid, 2000);
        assert!(file_volume(&mount(
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/w"
        ))
        .is_none());
        assert!(file_volume(&mount("/var/lib/kubelet/pods/u/etc-hosts")).is_none());
    }

    #[test]
    fn a_subpath_bind_is_traced_to_its_volume_through_mountinfo() {
        let info = "\
36 25 0:32 / /run rw,nosuid - tmpfs tmpfs rw
812 29 254:1 /var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/config/..2026_12_04_00_00_01.000000001/app.conf /var/lib/kubelet/pods/u/volume-subpaths/config/web/1 rw - ext4 /dev/vda1 rw
700 29 0:60 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache rw - tmpfs tmpfs rw
701 29 0:61 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~secret/creds rw - tmpfs tmpfs rw
813 29 0:60 /sub /var/lib/kubelet/pods/u/volume-subpaths/cache/web/2 rw - tmpfs tmpfs rw
815 29 0:61 /..2026_12_04_00_00_01.000000001/tls.key /var/lib/kubelet/pods/u/volume-subpaths/creds/web/4 rw - tmpfs tmpfs rw
816 29 0:62 /x /var/lib/kubelet/pods/u/volume-subpaths/lost/web/5 rw - tmpfs tmpfs rw
814 29 254:1 /var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/work/logs/web /var/lib/kubelet/pods/u/volume-subpaths/work/web/3 rw - ext4 /dev/vda1 rw";
        let at = |i: u32, v: &str| format!("/var/lib/kubelet/pods/u/volume-subpaths/{v}/web/{i}");
        assert_eq!(
            subpath_origin(&at(1, "config"), info),
            Some(("configmap".into(), "config".into(), "app.conf".into()))
        );
        assert_eq!(
            subpath_origin(&at(3, "work"), info),
            Some(("empty-dir".into(), "work".into(), "logs/web".into()))
        );
        // A volume that is a filesystem of its own (a memory-backed emptyDir, a secret's
        // tmpfs): traced through the kubelet's mount of it on the same device.
        assert_eq!(
            subpath_origin(&at(2, "cache"), info),
            Some(("empty-dir".into(), "cache".into(), "sub".into()))
        );
        assert_eq!(
            subpath_origin(&at(4, "creds"), info),
            Some(("secret".into(), "creds".into(), "tls.key".into()))
        );
        // Nothing on its device is a volume: unmarked (and the agent refuses it, naming it).
        assert_eq!(subpath_origin(&at(5, "lost"), info), None);
        assert_eq!(
            subpath_origin("/var/lib/kubelet/pods/u/etc-hosts", info),
            None
        );
        let mut m = mount(&at(1, "config"));
        m.options.push("coffer.volume=configmap/config".into());
        let v = subpath_volume(&m).unwrap();
        assert_eq!(
            v.dir,
            Path::new("/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/config")
        );
    }

    #[test]
    fn pod_files_are_the_runtime_files_at_their_places() {
        let d = tempfile::tempdir().unwrap();
        let hosts = d.path().join("etc-hosts");
        std::fs::write(&hosts, "10.1.2.3 web-0\n").unwrap();
        let mut m = mount(&hosts.display().to_string());
        m.destination = "/etc/hosts".into();
        let found = pod_file(&m).unwrap().unwrap();
        assert_eq!(
            (found.volume.as_str(), found.file.as_str()),
            ("hosts", "hosts")
        );
        assert_eq!(found.content, b"10.1.2.3 web-0\n");
        m.destination = "/etc/other".into();
        assert!(pod_file(&m).is_none());
        m.destination = "/etc/resolv.conf".into();
        m.source = d.path().display().to_string();
        let e = pod_file(&m).unwrap().unwrap_err().to_string();
        assert!(
            e.contains("/etc/resolv.conf") && e.contains("not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn a_memory_backed_empty_dir_is_told_by_its_tmpfs() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(memory_medium(d.path()), None);
        // /dev/shm is a tmpfs on Linux.
        let size = memory_medium(Path::new("/dev/shm")).expect("/dev/shm is a tmpfs");
        assert!(size > 0);
        let mut mounts = vec![mount(&format!(
            "{}/volumes/kubernetes.io~empty-dir/cache",
            d.path().display()
        ))];
        mark_memory_media(&mut mounts);
        assert_eq!(mounts[0].options, ["rbind", "ro"]);
    }

    #[test]
    fn links_out_of_the_volume_and_oversized_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("volumes/kubernetes.io~secret/creds");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(d.path().join("outside"), "the node's file").unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), dir.join("leak")).unwrap();
        let v = file_volume(&mount(&dir.display().to_string())).unwrap();
        let e = read(&v).unwrap_err().to_string();
        assert!(
            e.contains("leak is a link to") && e.contains("outside the volume"),
            "{e}"
        );

        std::fs::remove_file(dir.join("leak")).unwrap();
        std::fs::write(dir.join("big"), vec![0u8; MAX_FILE_BYTES + 1]).unwrap();
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("big is") && e.contains("more than"), "{e}");
    }
}
