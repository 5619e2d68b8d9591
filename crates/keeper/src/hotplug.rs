//! Hot-plugging a node's block device into a running pod VM, through QEMU's monitor (QMP, the
//! JSON protocol of QEMU's `docs/interop/qmp-spec`) on the sandbox's `qmp.sock`.
//!
//! The device becomes a `host_device` block node (`O_DIRECT`, so nothing of it is cached on the
//! node) and a `virtio-blk-pci` disk with serial `coffer-volN` in the pod VM's empty root port
//! `coffer-hpN`; the guest's agent finds it by that serial. What the node hands over is only
//! ever ciphertext: the agent opens the disk as LUKS2 under a key from the KBS.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::dir::QMP_SOCK;

/// A failed hotplug.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The monitor could not be reached or answered out of protocol.
    #[error("the pod VM's monitor ({path}): {why}")]
    Monitor {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// QEMU refused a command.
    #[error("QEMU refused {command} for {device}: {why}")]
    Refused {
        /// The command.
        command: &'static str,
        /// The node's device.
        device: String,
        /// QEMU's error description.
        why: String,
    },
    /// Every hot-plug port is taken.
    #[error("a pod VM takes at most {0} block volumes")]
    Full(u32),
}

/// A QMP session.
struct Qmp {
    path: PathBuf,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path) -> Result<Self, HotplugError> {
        let fail = |why: String| HotplugError::Monitor {
            path: path.to_path_buf(),
            why,
        };
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (r, w) = stream.into_split();
        let mut q = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = q.line().await?;
        if greeting.get("QMP").is_none() {
            return Err(fail(format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(q)
    }

    async fn line(&mut self) -> Result<Value, HotplugError> {
        let mut line = String::new();
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            self.reader.read_line(&mut line),
        )
        .await
        .map_err(|_| HotplugError::Monitor {
            path: self.path.clone(),
            why: "no answer within 30 s".into(),
        })?
        .map_err(|e| HotplugError::Monitor {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        if n == 0 {
            return Err(HotplugError::Monitor {
                path: self.path.clone(),
                why: "closed".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| HotplugError::Monitor {
            path: self.path.clone(),
            why: format!("not JSON ({e}): {}", line.trim()),
        })
    }

    /// Runs `command`; its `return` value, or QEMU's error description. Events are skipped.
    async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({"execute": command, "arguments": arguments});
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let v = self.line().await.map_err(|e| e.to_string())?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or("unknown error").to_string());
            }
        }
    }
}

/// The serial (and the guest's name) of hot-plugged volume `index`.
pub fn serial(index: u32) -> String {
    format!("coffer-vol{index}")
}

/// Plugs the node's block device `device` into the pod VM of the sandbox at `dir` as volume
/// `index` (below [`coffer_podvm::launch::HOTPLUG_PORTS`]); returns the disk's serial.
pub async fn attach_block(dir: &Path, device: &Path, index: u32) -> Result<String, HotplugError> {
    let ports = coffer_podvm::launch::HOTPLUG_PORTS;
    if index >= ports {
        return Err(HotplugError::Full(ports));
    }
    let mut q = Qmp::connect(&dir.join(QMP_SOCK)).await?;
    let serial = serial(index);
    let node = format!("{serial}-node");
    let dev = device.display().to_string();
    q.execute(
        "blockdev-add",
        json!({
            "driver": "host_device",
            "node-name": node,
            "filename": dev,
            "cache": {"direct": true},
        }),
    )
    .await
    .map_err(|why| HotplugError::Refused {
        command: "blockdev-add",
        device: dev.clone(),
        why,
    })?;
    if let Err(why) = q
        .execute(
            "device_add",
            json!({
                "driver": "virtio-blk-pci",
                "id": serial,
                "drive": node,
                "serial": serial,
                "bus": coffer_podvm::launch::hotplug_port(index),
            }),
        )
        .await
    {
        let _ = q.execute("blockdev-del", json!({"node-name": node})).await;
        return Err(HotplugError::Refused {
            command: "device_add",
            device: dev,
            why,
        });
    }
    tracing::info!(device = %dev, serial, "block volume plugged into the pod VM");
    Ok(serial)
}

/// The node's device file of block device `major:minor` (`/sys/dev/block/M:m/uevent`'s
/// `DEVNAME`, under `/dev`).
pub fn block_device_path(sys: &Path, major: u64, minor: u64) -> Option<PathBuf> {
    let uevent =
        std::fs::read_to_string(sys.join(format!("dev/block/{major}:{minor}/uevent"))).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    if name.is_empty() || name.split('/').any(|c| c == "..") {
        return None;
    }
    Some(Path::new("/dev").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_number_is_found_in_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let d = sys.path().join("dev/block/7:3");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("uevent"),
            "MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\n",
        )
        .unwrap();
        assert_eq!(
            block_device_path(sys.path(), 7, 3),
            Some(PathBuf::from("/dev/loop3"))
        );
        assert_eq!(block_device_path(sys.path(), 7, 4), None);
        std::fs::write(d.join("uevent"), "DEVNAME=../etc/passwd\n").unwrap();
        assert_eq!(block_device_path(sys.path(), 7, 3), None);
    }

    #[tokio::test]
    async fn more_volumes_than_ports_are_refused_before_the_monitor_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let e = attach_block(dir.path(), Path::new("/dev/loop0"), 4)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "a pod VM takes at most 4 block volumes");
        let e = attach_block(dir.path(), Path::new("/dev/loop0"), 0)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("qmp.sock"), "{e}");
    }
}
