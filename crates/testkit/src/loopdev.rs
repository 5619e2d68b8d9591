//! Loop devices on files: the tests' stand-in for a node's block device (a local block PV).

use std::{path::Path, process::Command};

/// A loop device (`losetup --find --show`) on a file, detached when dropped.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub dev: String,
}

impl LoopDevice {
    /// Attaches the first free loop device to `file`.
    pub fn on(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }

    /// A new sparse file of `bytes` at `file` with a loop device on it.
    pub fn on_new_file(file: &Path, bytes: u64) -> Self {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(bytes))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        Self::on(file)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}
