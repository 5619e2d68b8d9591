//! File volumes copied in from the node: configMap, secret, projected (service-account token,
//! downwardAPI, clusterTrustBundle) and downwardAPI volumes.
//!
//! The node never shares a filesystem with the guest: the shim reads the kubelet's directory
//! and sends its files (`SetVolume`), and the agent writes its own copy under the sandbox's
//! state, laid out as the kubelet lays out its own so that updates are atomic for readers: the
//! files live in a generation directory `..vN`, `..data` is a symbolic link to the current one,
//! and each top-level name is a symbolic link into `..data`. An update writes generation `N+1`,
//! swaps `..data` with one rename, then fixes the top-level links and removes generation `N`. A
//! container's mount binds the volume's directory read-only.
//!
//! Refused, naming what was wrong: a volume name that is not a DNS label, a kind that is not a
//! file volume, a path that is absolute, empty, has `.`/`..` components or begins with `..`
//! (the layout's own names), two files at one path or a file where another has its directory,
//! more than [`MAX_FILES`] files, a file over [`MAX_FILE_BYTES`] or all over [`MAX_TOTAL_BYTES`].
//! Nothing is written before every check passed.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{ContainerError, Result};

/// The volume kinds whose files are copied in (the kubelet's plugin directory names).
pub const KINDS: [&str; 4] = ["configmap", "secret", "projected", "downward-api"];
/// The kind of the pod's own files: the kubelet's `/etc/hosts` and containerd's
/// `/etc/hostname` and `/etc/resolv.conf` of the pod sandbox.
pub const POD_FILE: &str = "pod-file";
/// Each pod file: its volume name, its one file's name, where containers see it.
pub const POD_FILES: [(&str, &str, &str); 3] = [
    ("hosts", "hosts", "/etc/hosts"),
    ("hostname", "hostname", "/etc/hostname"),
    ("resolv-conf", "resolv.conf", "/etc/resolv.conf"),
];
/// The largest pod file.
pub const MAX_POD_FILE_BYTES: usize = 64 << 10;
/// The most files one volume may hold.
pub const MAX_FILES: usize = 4096;
/// The largest file (a Secret or ConfigMap is at most 1 MiB in all).
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// The most bytes one volume may hold.
pub const MAX_TOTAL_BYTES: usize = 32 << 20;
/// The link to the current generation.
const DATA: &str = "..data";

/// One file of a volume.
#[derive(Debug, Clone, Copy)]
pub struct File<'a> {
    /// Relative path inside the volume.
    pub path: &'a str,
    /// Permission bits (0: 0644).
    pub mode: u32,
    /// Content.
    pub content: &'a [u8],
    /// Group (the pod's fsGroup as the kubelet applied it; 0: root).
    pub gid: u32,
}

impl<'a> From<&'a crate::proto::VolumeFile> for File<'a> {
    fn from(f: &'a crate::proto::VolumeFile) -> Self {
        Self {
            path: &f.path,
            mode: f.mode,
            content: &f.content,
            gid: f.gid,
        }
    }
}

fn invalid(volume: &str, why: String) -> ContainerError {
    ContainerError::Invalid(format!("volume {volume}: {why}"))
}

/// Whether `name` is a DNS label, as Kubernetes requires of volume names.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Checks a volume before anything is written.
pub fn check(volume: &str, kind: &str, files: &[File<'_>]) -> Result<()> {
    if !is_dns_label(volume) {
        return Err(ContainerError::Invalid(format!(
            "volume name {volume:?} is not a DNS label"
        )));
    }
    if kind == POD_FILE {
        let Some((_, file, _)) = POD_FILES.iter().find(|(v, _, _)| *v == volume) else {
            return Err(invalid(
                volume,
                "is not one of the pod's files (hosts, hostname, resolv-conf)".into(),
            ));
        };
        return match files {
            [f] if f.path == *file && f.content.len() <= MAX_POD_FILE_BYTES => Ok(()),
            [f] if f.path == *file => Err(invalid(
                volume,
                format!("{} bytes, more than {MAX_POD_FILE_BYTES}", f.content.len()),
            )),
            _ => Err(invalid(
                volume,
                format!("must hold exactly the file {file}"),
            )),
        };
    }
    if !KINDS.contains(&kind) {
        return Err(invalid(
            volume,
            format!("kind {kind:?} is not a file volume (it is one of {KINDS:?} or {POD_FILE})"),
        ));
    }
    if files.len() > MAX_FILES {
        return Err(invalid(
            volume,
            format!("{} files, more than {MAX_FILES}", files.len()),
        ));
    }
    let mut total = 0usize;
    let mut seen = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for f in files {
        let comps: Vec<&str> = f.path.split('/').collect();
        if f.path.is_empty()
            || f.path.starts_with('/')
            || comps
                .iter()
                .any(|c| c.is_empty() || *c == "." || *c == ".." || c.contains('\0'))
            || comps[0].starts_with("..")
        {
            return Err(invalid(
                volume,
                format!(
                    "file path {:?} is not a relative path inside the volume",
                    f.path
                ),
            ));
        }
        if f.content.len() > MAX_FILE_BYTES {
            return Err(invalid(
                volume,
                format!(
                    "file {} is {} bytes, more than {MAX_FILE_BYTES}",
                    f.path,
                    f.content.len()
                ),
            ));
        }
        total += f.content.len();
        if !seen.insert(f.path) {
            return Err(invalid(volume, format!("file {} is given twice", f.path)));
        }
        for i in 1..comps.len() {
            dirs.insert(comps[..i].join("/"));
        }
    }
    if total > MAX_TOTAL_BYTES {
        return Err(invalid(
            volume,
            format!("{total} bytes in all, more than {MAX_TOTAL_BYTES}"),
        ));
    }
    if let Some(clash) = files.iter().find(|f| dirs.contains(f.path)) {
        return Err(invalid(
            volume,
            format!("{} is both a file and a directory", clash.path),
        ));
    }
    Ok(())
}

fn io<'a>(volume: &'a str, what: &'a str) -> impl FnOnce(std::io::Error) -> ContainerError + 'a {
    move |e| ContainerError::Runtime(format!("volume {volume}: {what}: {e}"))
}

/// The current generation number of the volume in `dir` (0: none yet).
fn generation(dir: &Path) -> u64 {
    std::fs::read_link(dir.join(DATA))
        .ok()
        .and_then(|t| {
            t.to_str()
                .and_then(|s| s.strip_prefix("..v"))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Replaces `link` with a symbolic link to `target` in one rename.
fn swap_link(dir: &Path, link: &str, target: &str, volume: &str) -> Result<()> {
    let tmp = dir.join(format!("..tmp-{link}"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(volume, "linking"))?;
    std::fs::rename(&tmp, dir.join(link)).map_err(io(volume, "swapping a link"))
}

/// Writes `files` as the new content of the volume at `root/volume` (checked first).
pub fn store(root: &Path, volume: &str, kind: &str, files: &[File<'_>]) -> Result<()> {
    check(volume, kind, files)?;
    let dir = root.join(volume);
    std::fs::create_dir_all(&dir).map_err(io(volume, "creating its directory"))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io(volume, "its directory's mode"))?;
    let old = generation(&dir);
    let new = format!("..v{}", old + 1);
    let gen = dir.join(&new);
    let _ = std::fs::remove_dir_all(&gen);
    std::fs::create_dir(&gen).map_err(io(volume, "creating a generation"))?;
    let mut top = BTreeSet::new();
    for f in files {
        let path = gen.join(f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(volume, "creating a directory"))?;
        }
        std::fs::write(&path, f.content).map_err(io(volume, "writing a file"))?;
        let mode = match f.mode & 0o777 {
            0 => 0o644,
            m => m,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io(volume, "setting a file's mode"))?;
        if f.gid != 0 {
            // The pod's fsGroup: the group may read what the mode gives it, as on the node.
            std::os::unix::fs::chown(&path, None, Some(f.gid))
                .map_err(io(volume, "setting a file's group"))?;
        }
        top.insert(f.path.split('/').next().unwrap_or(f.path).to_string());
    }
    swap_link(&dir, DATA, &new, volume)?;
    for name in &top {
        swap_link(&dir, name, &format!("{DATA}/{name}"), volume)?;
    }
    // What the new generation no longer has, and the old generation itself.
    for e in std::fs::read_dir(&dir).map_err(io(volume, "listing"))? {
        let e = e.map_err(io(volume, "listing"))?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("..") {
            if name.starts_with("..v") && name != new {
                let _ = std::fs::remove_dir_all(e.path());
            }
            continue;
        }
        if !top.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f<'a>(path: &'a str, content: &'a [u8]) -> File<'a> {
        File {
            path,
            mode: 0,
            content,
            gid: 0,
        }
    }

    #[test]
    fn a_volume_is_replaced_atomically_as_the_kubelet_lays_it_out() {
        let d = tempfile::tempdir().unwrap();
        store(
            d.path(),
            "config",
            "configmap",
            &[
                f("app.conf", b"v1"),
                f("nested/a.txt", b"a"),
                f("gone", b"x"),
            ],
        )
        .unwrap();
        let v = d.path().join("config");
        assert_eq!(std::fs::read(v.join("app.conf")).unwrap(), b"v1");
        assert_eq!(std::fs::read(v.join("nested/a.txt")).unwrap(), b"a");
        assert_eq!(
            std::fs::read_link(v.join("app.conf")).unwrap(),
            Path::new("..data/app.conf")
        );
        let mode = std::fs::metadata(v.join("app.conf"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);

        // An update: new content, a removed file gone, the old generation removed.
        store(
            d.path(),
            "config",
            "configmap",
            &[
                File {
                    path: "app.conf",
                    mode: 0o440,
                    content: b"v2",
                    gid: 2000,
                },
                f("nested/a.txt", b"a"),
            ],
        )
        .unwrap();
        assert_eq!(std::fs::read(v.join("app.conf")).unwrap(), b"v2");
        assert!(!v.join("gone").exists() && std::fs::symlink_metadata(v.join("gone")).is_err());
        assert!(!v.join("..v1").exists() && v.join("..v2").is_dir());
        let md = std::fs::metadata(v.join("app.conf")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o440);
        // The pod's fsGroup, as the kubelet set it on the node's copy.
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&md), 2000);
    }

    #[test]
    fn pod_files_are_one_named_file_each() {
        let d = tempfile::tempdir().unwrap();
        store(
            d.path(),
            "hosts",
            POD_FILE,
            &[f("hosts", b"127.0.0.1 localhost\n")],
        )
        .unwrap();
        assert_eq!(
            std::fs::read(d.path().join("hosts/..data/hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        for (volume, files, want) in [
            (
                "passwd",
                vec![f("passwd", b"")],
                "not one of the pod's files",
            ),
            ("hosts", vec![f("other", b"")], "exactly the file hosts"),
            (
                "hosts",
                vec![f("hosts", b""), f("hosts2", b"")],
                "exactly the file hosts",
            ),
            (
                "resolv-conf",
                vec![f("resolv.conf", &[b'#'; MAX_POD_FILE_BYTES + 1])],
                "more than",
            ),
        ] {
            let e = store(d.path(), volume, POD_FILE, &files)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{volume}: {e}");
        }
    }

    #[test]
    fn bad_volumes_are_refused_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![0u8; MAX_FILE_BYTES + 1];
        for (volume, kind, files, want) in [
            ("../x", "configmap", vec![f("a", b"")], "not a DNS label"),
            ("v", "hostpath", vec![f("a", b"")], "not a file volume"),
            (
                "v",
                "secret",
                vec![f("../etc/passwd", b"")],
                "not a relative path",
            ),
            (
                "v",
                "secret",
                vec![f("/etc/passwd", b"")],
                "not a relative path",
            ),
            ("v", "secret", vec![f("a//b", b"")], "not a relative path"),
            ("v", "secret", vec![f("..data", b"")], "not a relative path"),
            ("v", "secret", vec![f("a", &big)], "more than"),
            ("v", "secret", vec![f("a", b""), f("a", b"")], "given twice"),
            (
                "v",
                "secret",
                vec![f("a", b""), f("a/b", b"")],
                "both a file and a directory",
            ),
        ] {
            let e = store(d.path(), volume, kind, &files)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{volume} {kind}: {e}");
        }
        let many: Vec<String> = (0..=MAX_FILES).map(|i| format!("f{i}")).collect();
        let files: Vec<File<'_>> = many.iter().map(|p| f(p, b"")).collect();
        assert!(store(d.path(), "v", "secret", &files).is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
