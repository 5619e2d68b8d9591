//! Durable file writes: a file is written to a temporary file beside it, synced, given its mode,
//! renamed into place and its directory synced, so that after a crash the path holds either the
//! old content or the whole new content — never a prefix. Also the last words of a log, which
//! the launchers quote when a sandbox fails to start, and whether a directory is a tmpfs.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
};

/// Replaces `path` with `bytes` atomically and durably, with permissions `mode` (e.g. `0o600`
/// for keys). The temporary file is created with mode 0600, so secret bytes are never readable
/// by others, even before the final mode is set.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.persist(path).map_err(|e| e.error)?;
    fs::File::open(dir)?.sync_all()
}

/// The last line of `text` that is not blank ("" when none).
pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
}

/// The last non-blank line of an open log file (within its last 4 KiB), read through the handle
/// even when the file was removed meanwhile.
pub fn last_line_of(f: &fs::File) -> String {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(4096);
    let mut buf = vec![0u8; (len - start) as usize];
    if f.read_exact_at(&mut buf, start).is_err() {
        return String::new();
    }
    last_line(&String::from_utf8_lossy(&buf)).to_string()
}

/// The size in bytes of the tmpfs that `path` is on, or `None` when it is on another file
/// system (or cannot be examined).
pub fn tmpfs_size(path: &Path) -> Option<u64> {
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    let st = rustix::fs::statfs(path).ok()?;
    // `f_type` is a signed 64-bit field on x86_64 and an unsigned 32-bit one on s390x.
    #[allow(clippy::unnecessary_cast)]
    let fs_type = st.f_type as u64;
    #[allow(clippy::unnecessary_cast)]
    let block = st.f_bsize as u64;
    (fs_type == u64::from(TMPFS_MAGIC)).then(|| st.f_blocks * block)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn replaces_content_and_sets_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o640).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        // Nothing else is left in the directory.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        assert!(write_atomic(&d.path().join("missing/key"), b"x", 0o600).is_err());
    }

    #[test]
    fn the_last_line_skips_blank_ones() {
        assert_eq!(last_line("a\nerror: x\n\n  \n"), "error: x");
        assert_eq!(last_line(""), "");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        fs::write(&p, format!("{}\nlast words\n", "x".repeat(10_000))).unwrap();
        let f = fs::File::open(&p).unwrap();
        fs::remove_file(&p).unwrap();
        assert_eq!(last_line_of(&f), "last words");
    }
}
