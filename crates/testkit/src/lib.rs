//! Test support shared by the integration tests of several crates: a real coffer-kbs served in
//! the test's process, an OCI image layout holding a static busybox (the containers' image), and
//! an emulated configfs-tsm report interface ([`tsm`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::{io::Write, path::Path};

pub mod loopdev;
pub mod ovmf;
pub mod tsm;
pub mod vtpm;

use coffer_kbs::{server, Config, Kbs};
use coffer_kbs_client::{generate_admin_key, http_client, AdminClient};
use serde_json::json;
use sha2::{Digest, Sha256};

/// `sha256:<hex>` of `b`.
pub fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A coffer-kbs on a loopback port, served by a task of the current runtime.
pub struct TestKbs {
    /// Its URL (plain HTTP).
    pub url: String,
    /// An admin client with the configured admin key.
    pub admin: AdminClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestKbs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a coffer-kbs with its store and admin key under `dir`; `tweak` adjusts the config
/// (trust switches, emulated roots, …).
pub async fn start_kbs(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestKbs {
    start_kbs_at(dir, [127, 0, 0, 1].into(), tweak).await
}

/// [`start_kbs`] listening on `ip` (loopback, or an address of a network namespace that the
/// test made).
pub async fn start_kbs_at(
    dir: &Path,
    ip: std::net::IpAddr,
    tweak: impl FnOnce(&mut Config),
) -> TestKbs {
    let (admin_private, admin_public) = generate_admin_key().unwrap();
    std::fs::write(dir.join("admin.pub"), admin_public).unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: Some(dir.join("kbs")),
        insecure_http: true,
        admin_public_key: vec![dir.join("admin.pub")],
        ..Config::default()
    };
    tweak(&mut config);
    let kbs = Kbs::new(config).await.unwrap();
    let listener = coffer_kbs::server::listen((ip, 0).into()).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = server::serve(kbs, listener).await;
    });
    let admin =
        AdminClient::new(&url, http_client(None).unwrap(), admin_private.as_bytes()).unwrap();
    TestKbs { url, admin, task }
}

/// Writes an OCI layout tagged `v1` at `dir`: one gzip layer with the host's static busybox as
/// /bin/busybox, /bin/sh, /bin/mount and /bin/touch linking to it, and an empty /mnt; the image
/// config's Cmd prints "default" and its Env sets GREETING=hi.
pub fn busybox_layout(dir: &Path) {
    let busybox = std::fs::read("/usr/bin/busybox")
        .or_else(|_| std::fs::read("/bin/busybox"))
        .expect("busybox-static must be installed (scripts/test installs it)");
    busybox_layout_of(dir, &busybox, "amd64");
}

/// [`busybox_layout`] with `busybox` (a static busybox for `architecture`, the OCI name:
/// `amd64`, `s390x`).
pub fn busybox_layout_of(dir: &Path, busybox: &[u8], architecture: &str) {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(busybox.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, "bin/busybox", busybox).unwrap();
    for name in ["bin/sh", "bin/mount", "bin/touch"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        t.append_link(&mut h, name, "busybox").unwrap();
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
    let config = serde_json::to_vec(&json!({"architecture": architecture, "os": "linux",
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

/// Where `coffer podvm build` keeps Debian's package files by default (`$XDG_CACHE_HOME`, else
/// `~/.cache`, then `coffer/debs`), which the tests share with it.
pub fn debs_cache() -> std::path::PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME")
        .join("coffer/debs")
}

/// The agent built for s390x (`cargo build --target s390x-unknown-linux-gnu`, with Debian's cross
/// compiler), in the target directory `scripts/test-s390x` uses (`COFFER_S390X_TARGET_DIR`, else
/// `$CARGO_TARGET_DIR-s390x`, else `target-s390x`), so that the two share their build.
pub fn s390x_agent() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target_dir = std::env::var_os("COFFER_S390X_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            std::path::PathBuf::from(format!("{}-s390x", base.display()))
        });
    let target = "s390x-unknown-linux-gnu";
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--target",
            target,
            "-p",
            "coffer-agent",
            "--bin",
            "coffer-agent",
        ])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env(
            "CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_LINKER",
            "s390x-linux-gnu-gcc",
        )
        .env("CC_s390x_unknown_linux_gnu", "s390x-linux-gnu-gcc")
        .env("CXX_s390x_unknown_linux_gnu", "s390x-linux-gnu-g++")
        .env("AR_s390x_unknown_linux_gnu", "s390x-linux-gnu-ar")
        .output()
        .expect("cargo");
    assert!(
        out.status.success(),
        "building the s390x agent (needs `rustup target add {target}` and Debian's \
         gcc-s390x-linux-gnu; scripts/test sets both up): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target_dir.join(target).join("debug/coffer-agent")
}

/// The static busybox of Debian's s390x `busybox-static` in `cache/s390x/` (where
/// `coffer podvm build --arch s390x` keeps its package files), extracted into `work`.
pub fn s390x_busybox(cache: &Path, work: &Path) -> Vec<u8> {
    let dir = cache.join("s390x");
    let deb = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (build an s390x pod VM first)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("busybox-static_") && n.ends_with("_s390x.deb"))
        })
        .max()
        .expect("busybox-static for s390x in the package cache");
    let x = work.join("busybox-s390x");
    let ok = std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&x)
        .status()
        .expect("dpkg-deb");
    assert!(ok.success());
    std::fs::read(x.join("bin/busybox")).unwrap()
}
