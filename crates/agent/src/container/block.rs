//! Encrypted block volumes: a Kubernetes `volumeDevices` entry (a `volumeMode: Block` claim)
//! that the node attached to the pod VM as a virtio-blk disk, opened here as LUKS2 with
//! dm-integrity (AES-XTS with HMAC-SHA256 per sector) under a key from the KBS, so that the node
//! only ever stores and sees ciphertext.
//!
//! * The key is the KBS resource that the initdata names for the container path (`cdh.toml`
//!   `[block_volumes]`), released only after attestation; it must hold at least 32 bytes. A
//!   device with no key named for it is refused: a confidential pod gets no plaintext volume.
//! * A blank disk (its first MiB all zero, no LUKS header) is formatted on first use; a disk
//!   with a LUKS2 header is opened with the key and refused, naming it, when the key does not
//!   open it; any other content is refused rather than formatted over.
//! * The work is done by Debian's `cryptsetup` in the pod VM's verity root (no header parsing
//!   of our own). The key goes through a pipe, never a file or an argument. The key is random
//!   and as long as the volume key, so the key-slot's PBKDF is PBKDF2 with its minimum count:
//!   Argon2's memory-hard stretching protects passwords, not random keys, and would need more
//!   memory than a pod VM has.
//! * Each disk is opened once per sandbox (`coffer-volN`, after its serial) and shared by the
//!   containers that name it; [`BlockVolumes::close_all`] closes them when the sandbox ends,
//!   which writes back what the containers left in the page cache.

use std::{
    collections::BTreeMap,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::io::AsyncWriteExt;

use super::{ContainerError, Result};

/// The shortest key accepted (a 256-bit secret).
pub const MIN_KEY_BYTES: usize = 32;
/// How long a hot-plugged disk may take to appear (a TCG guest enumerates slowly).
const APPEAR: Duration = Duration::from_secs(60);
/// How much of a disk must be zero for it to count as blank.
const BLANK_PROBE: usize = 1 << 20;
/// Where the disk's serial comes from: `coffer-vol` and a number (the shim's naming).
pub const SERIAL_PREFIX: &str = "coffer-vol";

/// An opened volume: its plaintext device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// `/dev/mapper/NAME`.
    pub path: PathBuf,
    /// The device number's major part.
    pub major: u64,
    /// The device number's minor part.
    pub minor: u64,
}

/// The sandbox's opened volumes, by serial.
#[derive(Default)]
pub struct BlockVolumes {
    open: tokio::sync::Mutex<BTreeMap<String, Opened>>,
}

fn refused(serial: &str, why: impl std::fmt::Display) -> ContainerError {
    ContainerError::Invalid(format!("block volume {serial}: {why}"))
}

fn valid_serial(serial: &str) -> bool {
    serial
        .strip_prefix(SERIAL_PREFIX)
        .is_some_and(|n| !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The disk whose virtio serial is `serial` (`/sys/block/*/serial`), under `sys_block`.
pub fn disk_by_serial(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    std::fs::read_dir(sys_block).ok()?.flatten().find_map(|e| {
        let s = std::fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim() == serial).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Whether the first MiB of `dev` is all zero.
fn is_blank(dev: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(dev)?;
    let mut buf = vec![0u8; BLANK_PROBE];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(buf[..n].iter().all(|&b| b == 0))
}

/// Runs `cryptsetup` with `args`, the key on its stdin; its error output on failure.
async fn cryptsetup(args: &[&str], key: Option<&[u8]>) -> std::result::Result<(), (i32, String)> {
    let mut cmd = tokio::process::Command::new("cryptsetup");
    cmd.args(args)
        // No udev in the pod VM: libdevmapper makes the /dev/mapper nodes itself.
        .env("DM_DISABLE_UDEV", "1")
        .stdin(if key.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| (-1, format!("cannot run cryptsetup: {e}")))?;
    if let (Some(k), Some(mut stdin)) = (key, child.stdin.take()) {
        stdin
            .write_all(k)
            .await
            .map_err(|e| (-1, format!("cannot hand cryptsetup the key: {e}")))?;
        drop(stdin);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| (-1, format!("cryptsetup: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

impl BlockVolumes {
    /// Opens the disk with virtio serial `serial` under `key` (the resource `key_uri` released),
    /// formatting it first when blank; the plaintext device. Opened once per serial.
    pub async fn open(&self, serial: &str, key_uri: &str, key: &[u8]) -> Result<Opened> {
        if !valid_serial(serial) {
            return Err(refused(
                serial,
                "not a serial the node attaches volumes with",
            ));
        }
        // dm-crypt's AEAD and the crypto API's sockets load after the agent serves.
        crate::vm::later_modules()
            .await
            .map_err(|e| refused(serial, format!("the kernel's LUKS2 modules: {e}")))?;
        if key.len() < MIN_KEY_BYTES {
            return Err(refused(
                serial,
                format!(
                    "the key {key_uri} holds {} bytes; a volume key needs at least {MIN_KEY_BYTES} random bytes",
                    key.len()
                ),
            ));
        }
        let mut open = self.open.lock().await;
        if let Some(o) = open.get(serial) {
            return Ok(o.clone());
        }
        let t0 = std::time::Instant::now();
        let dev = loop {
            if let Some(d) = disk_by_serial(Path::new("/sys/block"), serial) {
                break d;
            }
            if t0.elapsed() > APPEAR {
                return Err(refused(
                    serial,
                    format!("no such disk appeared within {} s", APPEAR.as_secs()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let d = dev.display().to_string();
        let name = serial.to_string();
        let luks = cryptsetup(&["isLuks", "--type", "luks2", &d], None)
            .await
            .is_ok();
        if !luks {
            let blank =
                is_blank(&dev).map_err(|e| refused(serial, format!("cannot read {d}: {e}")))?;
            if !blank {
                return Err(refused(
                    serial,
                    "it holds data but no LUKS2 header; refusing to format over it (hand the pod a blank device, or one formatted by a pod with this key)",
                ));
            }
            tracing::info!(serial, device = %d, "formatting a blank block volume: LUKS2, AES-XTS with HMAC-SHA256 integrity");
            cryptsetup(
                &[
                    "luksFormat",
                    "--batch-mode",
                    "--type",
                    "luks2",
                    "--cipher",
                    "aes-xts-plain64",
                    "--key-size",
                    "512",
                    "--integrity",
                    "hmac-sha256",
                    "--sector-size",
                    "4096",
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    "--disable-locks",
                    "--key-file",
                    "-",
                    &d,
                ],
                Some(key),
            )
            .await
            .map_err(|(_, e)| refused(serial, format!("cannot format {d}: {e}")))?;
        }
        cryptsetup(
            &[
                "open",
                "--type",
                "luks2",
                "--disable-locks",
                "--key-file",
                "-",
                &d,
                &name,
            ],
            Some(key),
        )
        .await
        .map_err(|(code, e)| match code {
            // cryptsetup's "no key available with this passphrase".
            2 => refused(
                serial,
                format!("its LUKS2 header does not open with the key {key_uri}: not this pod's volume, or another key"),
            ),
            _ => refused(serial, format!("cannot open {d}: {e}")),
        })?;
        let path = Path::new("/dev/mapper").join(&name);
        let meta = std::fs::metadata(&path)
            .map_err(|e| refused(serial, format!("{}: {e}", path.display())))?;
        if !meta.file_type().is_block_device() {
            return Err(refused(
                serial,
                format!("{} is not a block device", path.display()),
            ));
        }
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        let o = Opened {
            path,
            major: rustix::fs::major(rdev) as u64,
            minor: rustix::fs::minor(rdev) as u64,
        };
        tracing::info!(serial, device = %d, formatted = !luks, ms = t0.elapsed().as_millis() as u64, "block volume opened");
        open.insert(serial.to_string(), o.clone());
        Ok(o)
    }

    /// Closes every opened volume (flushing what is cached for it).
    pub async fn close_all(&self) {
        let mut open = self.open.lock().await;
        for (serial, _) in std::mem::take(&mut *open) {
            match cryptsetup(&["close", "--disable-locks", &serial], None).await {
                Ok(()) => tracing::info!(serial, "block volume closed"),
                Err((_, e)) => tracing::warn!(serial, error = %e, "cannot close a block volume"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_shims_serials_are_taken() {
        for good in ["coffer-vol0", "coffer-vol12"] {
            assert!(valid_serial(good), "{good}");
        }
        for bad in [
            "",
            "coffer-vol",
            "coffer-root",
            "coffer-vol1/..",
            "coffer-vol-1",
            "x",
        ] {
            assert!(!valid_serial(bad), "{bad}");
        }
    }

    #[test]
    fn a_disk_is_found_by_its_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, serial) in [("vda", "coffer-root"), ("vdc", "coffer-vol0\n")] {
            std::fs::create_dir(sys.path().join(dev)).unwrap();
            std::fs::write(sys.path().join(dev).join("serial"), serial).unwrap();
        }
        assert_eq!(
            disk_by_serial(sys.path(), "coffer-vol0"),
            Some(PathBuf::from("/dev/vdc"))
        );
        assert_eq!(disk_by_serial(sys.path(), "coffer-vol1"), None);
    }

    #[test]
    fn blank_means_a_zero_first_mebibyte() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("disk");
        std::fs::write(&f, vec![0u8; 2 << 20]).unwrap();
        assert!(is_blank(&f).unwrap());
        let mut data = vec![0u8; 2 << 20];
        data[4096] = 1;
        std::fs::write(&f, &data).unwrap();
        assert!(!is_blank(&f).unwrap());
        // Beyond the first MiB does not count.
        let mut data = vec![0u8; 2 << 20];
        data[(1 << 20) + 1] = 1;
        std::fs::write(&f, &data).unwrap();
        assert!(is_blank(&f).unwrap());
    }

    #[tokio::test]
    async fn short_keys_and_foreign_serials_are_refused_before_any_disk_is_touched() {
        let v = BlockVolumes::default();
        let e = v
            .open("coffer-vol0", "kbs:///default/pv/k", &[7u8; 16])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds 16 bytes") && e.contains("kbs:///default/pv/k"),
            "{e}"
        );
        assert!(!e.contains("0707"), "{e}");
        let e = v
            .open("coffer-root", "kbs:///default/pv/k", &[7u8; 32])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a serial"), "{e}");
    }
}
