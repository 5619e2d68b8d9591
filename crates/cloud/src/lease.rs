//! Whether a sandbox lives: its keeper holds an exclusive `flock` on `<dir>/keeper.lock` for its
//! whole life (coffer-keeper), and the kernel drops it when the keeper ends, `kill -9` included.
//! The lock is looked up in `/proc/locks`, never taken, so the check cannot race a keeper that
//! is starting.

use std::{os::unix::fs::MetadataExt, path::Path};

/// The lock file a keeper holds.
pub const KEEPER_LOCK: &str = "keeper.lock";

/// Whether a process holds a `flock` on the sandbox directory's `keeper.lock`. A directory or
/// lock file that is gone is a sandbox that is gone. When `/proc/locks` cannot be read the
/// sandbox counts as alive: nothing is deleted on a guess. (`/proc/locks` shows only the locks
/// of this PID namespace: the daemon runs in the host's, as `deploy/peer-pods.yaml` says.)
pub fn alive(sandbox_dir: &Path) -> bool {
    if !sandbox_dir.is_absolute() {
        return false; // not a sandbox's (an instance with no record of one)
    }
    let Ok(meta) = std::fs::metadata(sandbox_dir.join(KEEPER_LOCK)) else {
        return false;
    };
    match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => held(&locks, meta.dev(), meta.ino()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/locks; keeping every VM");
            true
        }
    }
}

/// Whether `locks` (the text of `/proc/locks`) has a FLOCK on the file `dev`/`ino`.
fn held(locks: &str, dev: u64, ino: u64) -> bool {
    let major = rustix::fs::major(dev);
    let minor = rustix::fs::minor(dev);
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; blocked waiters are "-> FLOCK …".
        if f.len() < 6 || f[1] != "FLOCK" {
            return false;
        }
        let mut id = f[5].split(':');
        let (Some(ma), Some(mi), Some(i)) = (id.next(), id.next(), id.next()) else {
            return false;
        };
        u32::from_str_radix(ma, 16).ok() == Some(major)
            && u32::from_str_radix(mi, 16).ok() == Some(minor)
            && i.parse::<u64>().ok() == Some(ino)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{flock, FlockOperation};

    #[test]
    fn a_held_lock_is_a_live_sandbox_and_a_released_one_is_not() {
        let d = tempfile::tempdir().unwrap();
        assert!(!alive(d.path()), "no lock file");
        let f = std::fs::File::create(d.path().join(KEEPER_LOCK)).unwrap();
        assert!(!alive(d.path()), "not locked");
        flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
        assert!(alive(d.path()));
        // The check took nothing: another locker is still refused, not blocked by us.
        let g = std::fs::File::open(d.path().join(KEEPER_LOCK)).unwrap();
        assert!(flock(&g, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(f);
        assert!(!alive(d.path()));
    }

    #[test]
    fn the_proc_locks_format_is_read_by_device_and_inode() {
        let dev = rustix::fs::makedev(0xfd, 0x01);
        let text = "1: POSIX  ADVISORY  WRITE 9 fd:01:42 0 EOF\n2: FLOCK  ADVISORY  WRITE 10 fd:01:43 0 EOF\n2: -> FLOCK  ADVISORY  WRITE 11 fd:01:44 0 EOF\n";
        assert!(held(text, dev, 43));
        assert!(!held(text, dev, 42), "a POSIX lock is not the keeper's");
        assert!(!held(text, dev, 44), "a waiter holds nothing");
    }
}
