//! Shared by the agent tests: an OCI layout holding a static busybox.

#![allow(dead_code)]

use std::{io::Write, path::Path};

use serde_json::json;
use sha2::{Digest, Sha256};

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// An OCI layout tagged `v1`: /bin/busybox (static, from the host) with /bin/sh linking to it.
pub fn busybox_layout(dir: &Path) {
    let busybox = std::fs::read("/usr/bin/busybox")
        .or_else(|_| std::fs::read("/bin/busybox"))
        .expect("busybox-static must be installed (scripts/test installs it)");
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(busybox.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
    for (name, target) in [
        ("bin/sh", "busybox"),
        ("bin/mount", "busybox"),
        ("bin/touch", "busybox"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        t.append_link(&mut h, name, target).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    t.append_data(&mut h, "mnt", &[][..]).unwrap();
    let tar = t.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let blob = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b).unwrap();
        d
    };
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh", "-c", "echo default"], "Env": ["GREETING=hi"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&tar)]}}))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(&gz), "size": gz.len()}]}))
    .unwrap();
    let md = blob(&manifest);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
            "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
        .unwrap(),
    )
    .unwrap();
}
