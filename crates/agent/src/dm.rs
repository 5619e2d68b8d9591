//! Device-mapper through its control device (`/dev/mapper/control`, the `DM_*` ioctls of
//! `<linux/dm-ioctl.h>`, interface version 4): create a device, load its table, resume it, read
//! its status, remove it. Enough for the pod VM's verity root and encrypted scratch disk.
//!
//! Tables may carry keys (dm-crypt, dm-integrity): every buffer that held one is zeroized.

use std::{fs::File, os::fd::AsRawFd, path::PathBuf, time::Duration};

use zeroize::Zeroize;

const HEADER: usize = 312;
const SPEC: usize = 40;
const DEV_CREATE: u64 = 3;
const DEV_REMOVE: u64 = 4;
const DEV_SUSPEND: u64 = 6;
const TABLE_LOAD: u64 = 9;
const TABLE_STATUS: u64 = 12;
/// `DM_READONLY_FLAG`.
const READONLY: u32 = 1;
/// `DM_BUFFER_FULL_FLAG`.
const BUFFER_FULL: u32 = 1 << 8;

/// A device-mapper failure.
#[derive(Debug, thiserror::Error)]
#[error("device-mapper {op} {name}: {source}")]
pub struct DmError {
    op: &'static str,
    name: String,
    source: std::io::Error,
}

/// One target line of a table.
pub struct Target<'a> {
    /// Length in 512-byte sectors.
    pub sectors: u64,
    /// The target type (`verity`, `integrity`, `crypt`).
    pub kind: &'a str,
    /// Its parameters (may hold a key).
    pub params: &'a str,
}

/// The control device.
pub struct Control(File);

fn opcode(nr: u64) -> u64 {
    // _IOWR(0xfd, nr, struct dm_ioctl)
    (3 << 30) | ((HEADER as u64) << 16) | (0xfd << 8) | nr
}

impl Control {
    /// Opens `/dev/mapper/control` (the `dm_mod` module must be loaded).
    pub fn open() -> Result<Self, DmError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mapper/control")
            .map(Self)
            .map_err(|source| DmError {
                op: "open",
                name: "/dev/mapper/control".into(),
                source,
            })
    }

    fn call(
        &self,
        op: &'static str,
        nr: u64,
        name: &str,
        flags: u32,
        target: Option<&Target<'_>>,
    ) -> Result<Vec<u8>, DmError> {
        let err = |source| DmError {
            op,
            name: name.to_string(),
            source,
        };
        if name.is_empty() || name.len() >= 128 {
            return Err(err(std::io::Error::other("bad device name")));
        }
        let mut size = 16 * 1024;
        loop {
            let mut buf = vec![0u8; size];
            let put32 =
                |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            put32(&mut buf, 0, 4);
            put32(&mut buf, 12, size as u32);
            put32(&mut buf, 16, HEADER as u32);
            put32(&mut buf, 20, u32::from(target.is_some()));
            put32(&mut buf, 28, flags);
            buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
            if let Some(t) = target {
                let s = HEADER;
                buf[s + 8..s + 16].copy_from_slice(&t.sectors.to_ne_bytes());
                let kind = t.kind.as_bytes();
                if kind.len() >= 16 || SPEC + t.params.len() + 1 > size - HEADER {
                    return Err(err(std::io::Error::other("table too large")));
                }
                buf[s + 24..s + 24 + kind.len()].copy_from_slice(kind);
                buf[s + SPEC..s + SPEC + t.params.len()].copy_from_slice(t.params.as_bytes());
            }
            // SAFETY: `buf` is a live, writable buffer of `size` bytes laid out as a
            // `struct dm_ioctl` (version, data_size = size, data_start = HEADER) followed by at
            // most one `struct dm_target_spec` and its NUL-terminated parameters; the kernel
            // reads and writes only within data_size bytes of it.
            let rc = unsafe {
                libc::ioctl(
                    self.0.as_raw_fd(),
                    opcode(nr) as libc::c_ulong,
                    buf.as_mut_ptr(),
                )
            };
            let e = std::io::Error::last_os_error();
            if let Some(t) = target {
                // The parameters may hold a key.
                buf[HEADER..HEADER + SPEC + t.params.len()].zeroize();
            }
            if rc < 0 {
                buf.zeroize();
                return Err(err(e));
            }
            let out_flags = u32::from_ne_bytes(buf[28..32].try_into().unwrap_or_default());
            if out_flags & BUFFER_FULL != 0 && size < 1 << 20 {
                buf.zeroize();
                size *= 4;
                continue;
            }
            return Ok(buf);
        }
    }

    /// Creates `name` with one target and activates it; returns its device node.
    pub fn create(
        &self,
        name: &str,
        target: Target<'_>,
        readonly: bool,
    ) -> Result<PathBuf, DmError> {
        let flags = if readonly { READONLY } else { 0 };
        let mut created = self.call("create", DEV_CREATE, name, flags, None)?;
        let dev = u64::from_ne_bytes(created[40..48].try_into().unwrap_or_default());
        created.zeroize();
        let loaded = self.call("load", TABLE_LOAD, name, flags, Some(&target));
        if let Err(e) = loaded {
            let _ = self.remove(name);
            return Err(e);
        }
        let mut resumed = self.call("resume", DEV_SUSPEND, name, 0, None);
        if let Ok(b) = resumed.as_mut() {
            b.zeroize();
        }
        if let Err(e) = resumed {
            let _ = self.remove(name);
            return Err(e);
        }
        // new_encode_dev: minor's low byte, major, minor's high bits.
        let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
        let node = PathBuf::from(format!("/dev/dm-{minor}"));
        for _ in 0..200 {
            if node.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(node)
    }

    /// The status line of `name`'s (first) target.
    pub fn status(&self, name: &str) -> Result<String, DmError> {
        let buf = self.call("status", TABLE_STATUS, name, 0, None)?;
        let start = u32::from_ne_bytes(buf[16..20].try_into().unwrap_or_default()) as usize;
        let text = buf.get(start + SPEC..).unwrap_or_default();
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        Ok(String::from_utf8_lossy(&text[..end]).to_string())
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        self.call("remove", DEV_REMOVE, name, 0, None).map(|_| ())
    }
}
