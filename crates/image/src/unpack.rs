//! Applying an OCI layer (a tar stream) onto a root filesystem directory, safely.
//!
//! Every path in the archive is resolved *inside* the root the way a container sees it: symlinks
//! met on the way (including absolute ones and `..` in their targets) are followed as if the root
//! were `/`, so nothing can be created, replaced or deleted outside the root. Entries whose own
//! path holds a `..` component are refused. Hard-link targets are resolved the same way and must
//! be regular files (or other non-directories) inside the root.
//!
//! Whiteouts (`.wh.<name>`) delete what lower layers created; an opaque marker (`.wh..wh..opq`)
//! empties its directory of everything this layer did not itself create. Permissions (with
//! setuid/setgid/sticky), ownership (when running as root), extended attributes
//! (`SCHILY.xattr.*` PAX records) and modification times are applied. Limits on the entry count
//! and the bytes written bound what a hostile layer can cost.

use std::{
    collections::{HashSet, VecDeque},
    ffi::OsStr,
    fs,
    io::{self, Read, Write},
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tar::EntryType;

use crate::Error;

/// How many symlinks one path may traverse before resolution gives up (as Linux's `ELOOP`).
const MAX_SYMLINKS: usize = 40;

/// Bounds on what unpacking may create, across all layers of one image.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most archive entries in all layers together.
    pub max_entries: u64,
    /// Most bytes of file content written in all layers together.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_bytes: 64 << 30,
        }
    }
}

/// Running totals against [`Limits`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    /// Entries processed.
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

fn unpack_err(path: impl AsRef<Path>, reason: impl std::fmt::Display) -> Error {
    Error::Unpack {
        path: path.as_ref().display().to_string(),
        reason: reason.to_string(),
    }
}

fn io_err<'a>(path: &'a Path, what: &str) -> impl FnOnce(io::Error) -> Error + 'a {
    let what = what.to_string();
    move |e| unpack_err(path, format!("{what}: {e}"))
}

/// The archive path of an entry as clean components: leading `/` and `.` dropped, `..` refused.
fn components(raw: &[u8], shown: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(unpack_err(shown, "path has a `..` component")),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// Resolves `comps` inside `root`: symlinks on the way are followed as if `root` were `/` (the
/// last component too when `follow_last`), `..` never goes above `root`. The result is a path
/// under `root` whose existing components are real directories (except, without `follow_last`,
/// the last one).
pub fn resolve_in_root(
    root: &Path,
    comps: &[Vec<u8>],
    follow_last: bool,
) -> Result<PathBuf, Error> {
    let mut pending: VecDeque<Vec<u8>> = comps.iter().cloned().collect();
    let mut resolved: Vec<Vec<u8>> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        match c.as_slice() {
            b"" | b"." => continue,
            b".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let mut path = root.to_path_buf();
        for r in &resolved {
            path.push(OsStr::from_bytes(r));
        }
        path.push(OsStr::from_bytes(&c));
        let is_last = pending.is_empty();
        let meta = fs::symlink_metadata(&path).ok();
        if meta.as_ref().is_some_and(|m| m.file_type().is_symlink()) && (!is_last || follow_last) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(unpack_err(&path, "too many levels of symbolic links"));
            }
            let target =
                fs::read_link(&path).map_err(io_err(&path, "cannot read symbolic link"))?;
            let target = target.as_os_str().as_bytes();
            if target.starts_with(b"/") {
                resolved.clear();
            }
            for t in target.split(|b| *b == b'/').rev() {
                pending.push_front(t.to_vec());
            }
            continue;
        }
        resolved.push(c);
    }
    let mut path = root.to_path_buf();
    for r in &resolved {
        path.push(OsStr::from_bytes(r));
    }
    Ok(path)
}

/// Removes whatever is at `path` (not following a symlink there).
fn remove_any(path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err(path, "cannot remove")),
        Ok(_) => fs::remove_file(path).map_err(io_err(path, "cannot remove")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(unpack_err(path, e)),
    }
}

/// Makes sure `dir` (resolved inside `root`) exists as a directory, creating missing parents the
/// way tar does (mode 0755).
fn ensure_dir(root: &Path, comps: &[Vec<u8>]) -> Result<PathBuf, Error> {
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut path = root.to_path_buf();
    for c in comps {
        done.push(c.clone());
        path = resolve_in_root(root, &done, true)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(unpack_err(
                    &path,
                    "a parent of an entry exists and is not a directory",
                ))
            }
            Err(_) => {
                // Every existing component of `path` is a real directory (resolution followed
                // the links), so creating the missing ones cannot leave the root.
                fs::create_dir_all(&path).map_err(io_err(&path, "cannot create directory"))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                    .map_err(io_err(&path, "cannot set permissions"))?;
            }
        }
        // Continue from the real location (a symlinked parent resolves elsewhere in the root).
        done = path
            .strip_prefix(root)
            .map_err(|_| unpack_err(&path, "resolved outside the root"))?
            .as_os_str()
            .as_bytes()
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
    }
    Ok(path)
}

/// Applies one layer's tar stream onto `root`.
pub struct LayerUnpacker<'a> {
    root: &'a Path,
    limits: Limits,
    totals: &'a mut Totals,
    as_root: bool,
    /// Paths (under root) this layer created: an opaque marker keeps them.
    created: HashSet<PathBuf>,
    /// Directories whose times are set once the layer is done (children change them).
    dir_times: Vec<(PathBuf, SystemTime)>,
    /// File contents pass through here: large writes, one allocation per layer.
    buf: Vec<u8>,
}

impl<'a> LayerUnpacker<'a> {
    /// An unpacker for one layer onto `root`, counting against `limits` with `totals` carried
    /// from the layers before.
    pub fn new(root: &'a Path, limits: Limits, totals: &'a mut Totals) -> Self {
        Self {
            root,
            limits,
            totals,
            as_root: rustix::process::geteuid().is_root(),
            created: HashSet::new(),
            dir_times: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Reads the whole tar stream and applies it.
    pub fn apply<R: Read>(mut self, reader: R) -> Result<(), Error> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| unpack_err(self.root, format!("not a tar stream: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| unpack_err(self.root, format!("bad tar entry: {e}")))?;
            self.totals.entries += 1;
            if self.totals.entries > self.limits.max_entries {
                return Err(Error::Limit(format!(
                    "the image has more than {} entries",
                    self.limits.max_entries
                )));
            }
            self.entry(entry)?;
        }
        for (dir, t) in self.dir_times.iter().rev() {
            if let Ok(f) = fs::File::open(dir) {
                let _ = f.set_modified(*t);
            }
        }
        Ok(())
    }

    /// Copies up to `size` bytes of an entry into `f` in writes of up to 256 KiB; returns the
    /// count copied.
    fn copy_contents(
        &mut self,
        from: &mut impl Read,
        size: u64,
        f: &mut fs::File,
    ) -> io::Result<u64> {
        const STEP: usize = 256 << 10;
        if self.buf.is_empty() && size > 0 {
            self.buf = vec![0; STEP];
        }
        let mut left = size;
        while left > 0 {
            let want = (left.min(STEP as u64)) as usize;
            // Fill the buffer as far as the stream allows before writing it.
            let mut got = 0;
            while got < want {
                match from.read(&mut self.buf[got..want]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if got == 0 {
                break;
            }
            f.write_all(&self.buf[..got])?;
            left -= got as u64;
            if got < want {
                break;
            }
        }
        Ok(size - left)
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), Error> {
        let raw = entry.path_bytes().into_owned();
        let shown = PathBuf::from(OsStr::from_bytes(&raw));
        let comps = components(&raw, &shown)?;
        let Some((name, parent)) = comps.split_last() else {
            // The root itself (`./`): only its metadata.
            return Ok(());
        };
        let header = entry.header().clone();
        let kind = header.entry_type();

        // Whiteouts.
        if name.as_slice() == b".wh..wh..opq" {
            let dir = resolve_in_root(self.root, parent, true)?;
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    let p = child.path();
                    if !self.created.contains(&p) {
                        remove_any(&p)?;
                    }
                }
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(unpack_err(&shown, "invalid whiteout name"));
            }
            let dir = resolve_in_root(self.root, parent, true)?;
            remove_any(&dir.join(OsStr::from_bytes(hidden)))?;
            return Ok(());
        }

        let dir = ensure_dir(self.root, parent)?;
        let path = dir.join(OsStr::from_bytes(name));
        let mode = header.mode().map_err(|e| unpack_err(&shown, e))? & 0o7777;
        let mtime = header
            .mtime()
            .ok()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));

        // Replace what is there, except a directory by a directory.
        let existing = fs::symlink_metadata(&path).ok();
        if !(kind == EntryType::Directory && existing.as_ref().is_some_and(|m| m.is_dir())) {
            remove_any(&path)?;
        }

        match kind {
            EntryType::Directory => {
                if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                    fs::create_dir(&path).map_err(io_err(&path, "cannot create directory"))?;
                }
                if let Some(t) = mtime {
                    self.dir_times.push((path.clone(), t));
                }
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = header.size().unwrap_or(0);
                if self.totals.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(Error::Limit(format!(
                        "the image's files exceed {} bytes",
                        self.limits.max_bytes
                    )));
                }
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io_err(&path, "cannot create file"))?;
                let n = self
                    .copy_contents(&mut entry, size, &mut f)
                    .map_err(io_err(&path, "cannot write file"))?;
                self.totals.bytes += n;
                if let Some(t) = mtime {
                    let _ = f.set_modified(t);
                }
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unpack_err(&shown, "symbolic link without a target"))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(io_err(&path, "cannot create symbolic link"))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unpack_err(&shown, "hard link without a target"))?;
                let tshown = PathBuf::from(OsStr::from_bytes(&target));
                let tcomps = components(&target, &tshown)?;
                let tpath = resolve_in_root(self.root, &tcomps, false)?;
                let meta = fs::symlink_metadata(&tpath).map_err(|_| {
                    unpack_err(
                        &shown,
                        format!("hard link target {} does not exist", tshown.display()),
                    )
                })?;
                if meta.is_dir() {
                    return Err(unpack_err(&shown, "hard link to a directory"));
                }
                fs::hard_link(&tpath, &path).map_err(io_err(&path, "cannot create hard link"))?;
                self.created.insert(path);
                return Ok(());
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                let file_type = match kind {
                    EntryType::Fifo => rustix::fs::FileType::Fifo,
                    EntryType::Char => rustix::fs::FileType::CharacterDevice,
                    _ => rustix::fs::FileType::BlockDevice,
                };
                let dev = rustix::fs::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                if let Err(e) = rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &path,
                    file_type,
                    rustix::fs::Mode::from_raw_mode(mode),
                    dev,
                ) {
                    if kind == EntryType::Fifo || self.as_root {
                        return Err(unpack_err(&path, format!("cannot create node: {e}")));
                    }
                    tracing::warn!(path = %shown.display(), "device node skipped: not running as root");
                    return Ok(());
                }
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => return Ok(()),
            other => {
                return Err(unpack_err(
                    &shown,
                    format!("unsupported tar entry type {other:?}"),
                ))
            }
        }
        self.created.insert(path.clone());

        // Extended attributes.
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let Some(attr) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                let attr = OsStr::from_bytes(attr);
                if let Err(e) = rustix::fs::lsetxattr(
                    &path,
                    attr,
                    ext.value_bytes(),
                    rustix::fs::XattrFlags::empty(),
                ) {
                    tracing::warn!(path = %shown.display(), attr = ?attr, error = %e, "extended attribute not set");
                }
            }
        }
        // Ownership, then mode (chown clears setuid/setgid).
        if self.as_root {
            let uid = header.uid().unwrap_or(0) as u32;
            let gid = header.gid().unwrap_or(0) as u32;
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                .map_err(io_err(&path, "cannot change owner"))?;
        }
        if kind != EntryType::Symlink {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(io_err(&path, "cannot set permissions"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// One archive entry, written with raw header bytes so that hostile names survive.
    pub(crate) struct E<'a> {
        pub name: &'a str,
        pub kind: EntryType,
        pub link: &'a str,
        pub data: &'a [u8],
        pub mode: u32,
    }

    pub(crate) fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
        E {
            name,
            kind: EntryType::Regular,
            link: "",
            data,
            mode: 0o644,
        }
    }

    pub(crate) fn dir(name: &str) -> E<'_> {
        E {
            name,
            kind: EntryType::Directory,
            link: "",
            data: b"",
            mode: 0o755,
        }
    }

    pub(crate) fn link<'a>(name: &'a str, kind: EntryType, target: &'a str) -> E<'a> {
        E {
            name,
            kind,
            link: target,
            data: b"",
            mode: 0o777,
        }
    }

    pub(crate) fn tar(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
                gnu.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
            }
            h.set_entry_type(e.kind);
            h.set_size(e.data.len() as u64);
            h.set_mode(e.mode);
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append(&h, e.data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, entries: &[E<'_>]) -> Result<(), Error> {
        let mut totals = Totals::default();
        LayerUnpacker::new(root, Limits::default(), &mut totals).apply(&tar(entries)[..])
    }

    #[test]
    fn files_links_modes_owners_and_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        apply(
            root,
            &[
                dir("etc/"),
                file("etc/passwd", b"root:x:0:0"),
                E {
                    mode: 0o4755,
                    ..file("bin/su", b"\x7fELF")
                },
                link("bin/sh", EntryType::Symlink, "/bin/su"),
                link("bin/su2", EntryType::Link, "bin/su"),
                file("old/a", b"a"),
                file("old/b", b"b"),
                file("gone", b"x"),
            ],
        )
        .unwrap();
        assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), b"root:x:0:0");
        let su = fs::metadata(root.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(su.nlink(), 2);
        if rustix::process::geteuid().is_root() {
            assert_eq!((su.uid(), su.gid()), (1000, 1000));
        }
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/su")
        );
        // Layer two: whiteout one file, make `old` opaque but keep what this layer adds.
        apply(
            root,
            &[
                file("old/c", b"c"),
                file("old/.wh..wh..opq", b""),
                file(".wh.gone", b""),
                file("etc/passwd", b"root:x:0:0:new"),
            ],
        )
        .unwrap();
        assert!(!root.join("gone").exists());
        let mut names: Vec<_> = fs::read_dir(root.join("old"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["c"]);
        assert_eq!(
            fs::read(root.join("etc/passwd")).unwrap(),
            b"root:x:0:0:new"
        );
    }

    #[test]
    fn hostile_paths_and_links_never_reach_outside() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        let victim = outer.path().join("victim");
        fs::write(&victim, b"intact").unwrap();

        // `..` in an entry name: refused.
        let err = apply(&root, &[file("../victim", b"owned")]).unwrap_err();
        assert!(err.to_string().contains("`..`"), "{err}");
        let err = apply(&root, &[file("a/../../victim", b"owned")]).unwrap_err();
        assert!(err.to_string().contains("`..`"), "{err}");

        // A symlink to the real parent directory, then a file through it: confined.
        let victim_dir = outer.path().to_str().unwrap().to_string();
        apply(
            &root,
            &[
                link("up", EntryType::Symlink, &victim_dir),
                file("up/victim", b"owned"),
                link("rel", EntryType::Symlink, "../../../../.."),
                file("rel/victim", b"owned"),
            ],
        )
        .unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"intact");
        assert_eq!(
            fs::read(root.join(victim_dir.trim_start_matches('/')).join("victim")).unwrap(),
            b"owned"
        );
        assert_eq!(fs::read(root.join("victim")).unwrap(), b"owned");

        // A symlink pointing out, then a regular file of the same name: the link is replaced,
        // never written through.
        apply(
            &root,
            &[
                link("x", EntryType::Symlink, victim.to_str().unwrap()),
                file("x", b"owned"),
            ],
        )
        .unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"intact");

        // Hard links: an absolute target, or one through an outward symlink, resolves inside
        // the root (to the copy created above); a missing target fails; `..` is refused.
        apply(
            &root,
            &[
                link("h", EntryType::Link, victim.to_str().unwrap()),
                link("out", EntryType::Symlink, &victim_dir),
                link("h2", EntryType::Link, "out/victim"),
            ],
        )
        .unwrap();
        assert_eq!(fs::read(root.join("h")).unwrap(), b"owned");
        assert_eq!(fs::read(root.join("h2")).unwrap(), b"owned");
        assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1);
        let err = apply(&root, &[link("h3", EntryType::Link, "/no/such/file")]).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = apply(&root, &[link("h4", EntryType::Link, "../victim")]).unwrap_err();
        assert!(err.to_string().contains("`..`"), "{err}");

        // A whiteout of `..`, and one through an outward symlink.
        assert!(apply(&root, &[file("a/.wh...", b"")]).is_err());
        apply(&root, &[file("up/.wh.victim", b"")]).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"intact");

        // Symlink loops end with a clear error.
        let err = apply(
            &root,
            &[
                link("l1", EntryType::Symlink, "l2"),
                link("l2", EntryType::Symlink, "l1"),
                file("l1/f", b""),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("too many levels"), "{err}");
    }

    #[test]
    fn extended_attributes_from_pax_records_are_applied() {
        let t = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.user.coffer", &b"layer-value"[..])])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"x"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut totals = Totals::default();
        LayerUnpacker::new(t.path(), Limits::default(), &mut totals)
            .apply(&bytes[..])
            .unwrap();
        let mut buf = [0u8; 64];
        match rustix::fs::lgetxattr(t.path().join("f"), "user.coffer", &mut buf) {
            Ok(n) => assert_eq!(&buf[..n], b"layer-value"),
            // A filesystem without user xattrs: the unpack must still have succeeded.
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => {}
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn limits_stop_entry_floods_and_bombs() {
        let t = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        let entries: Vec<E<'_>> = names.iter().map(|n| file(n, b"")).collect();
        let mut totals = Totals::default();
        let limits = Limits {
            max_entries: 10,
            max_bytes: 1 << 20,
        };
        let err = LayerUnpacker::new(t.path(), limits, &mut totals)
            .apply(&tar(&entries)[..])
            .unwrap_err();
        assert!(matches!(err, Error::Limit(_)), "{err}");

        let big = vec![0u8; 4096];
        let mut totals = Totals::default();
        let limits = Limits {
            max_entries: 100,
            max_bytes: 4000,
        };
        let err = LayerUnpacker::new(t.path(), limits, &mut totals)
            .apply(&tar(&[file("big", &big)])[..])
            .unwrap_err();
        assert!(matches!(err, Error::Limit(_)), "{err}");
    }
}
