//! Shared by the image tests: `coffer` runs, a real `docker-registry` on loopback, OCI layouts
//! written by the test, and skopeo.

#![allow(dead_code)]

use std::{
    fs,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub mod containerd;
pub mod libvirt;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub fn coffer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The `coffer` binary under test.
pub fn coffer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_coffer")
}

/// Runs `cmd` (stdin closed), asserts it succeeded, returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A `docker-registry` process on a free loopback port, killed on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start() -> Self {
        Self::start_with_auth(None)
    }

    /// A registry that requires HTTP basic auth from an htpasswd (bcrypt) line `user:hash`.
    pub fn start_with_auth(htpasswd: Option<&str>) -> Self {
        Self::start_at("127.0.0.1", htpasswd)
    }

    /// A registry listening on `ip` (loopback, or an address of a network namespace that the
    /// test made).
    pub fn start_at(ip: &str, htpasswd: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("{ip}:{port}");
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some(line) = htpasswd {
            let file = dir.path().join("htpasswd");
            fs::write(&file, format!("{line}\n")).unwrap();
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: coffer-test\n    path: {}\n",
                file.display()
            ));
        }
        fs::write(&config, text).unwrap();
        let log = dir.path().join("registry.log");
        let child = Command::new("docker-registry")
            .args(["serve", config.to_str().unwrap()])
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("docker-registry must be installed (scripts/test installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    /// The registry's storage: `docker/registry/v2/blobs/sha256/<xx>/<hex>/data` holds each blob.
    pub fn storage(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// Blob requests (GET) the registry served, from its access log.
    pub fn blob_gets(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/"))
            .map(str::to_string)
            .collect()
    }
}

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// An OCI image layout being written.
pub struct Layout {
    pub dir: PathBuf,
    manifests: Vec<Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        }
    }

    fn blob(&self, bytes: &[u8]) -> String {
        let d = sha(bytes);
        fs::write(
            self.dir
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
            bytes,
        )
        .unwrap();
        d
    }

    /// Adds an image of gzip layers (each a list of tar entries); returns the manifest descriptor.
    pub fn image(
        &mut self,
        layers: &[Vec<u8>],
        arch: &str,
        diff_id_override: Option<&str>,
    ) -> Value {
        self.image_compressed(layers, arch, diff_id_override, false)
    }

    /// As `image`, with zstd instead of gzip when `zstd`.
    pub fn image_compressed(
        &mut self,
        layers: &[Vec<u8>],
        arch: &str,
        diff_id_override: Option<&str>,
        zstd: bool,
    ) -> Value {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in layers {
            let (blob, media_type) = if zstd {
                (
                    zstd::encode_all(&tar[..], 3).unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                )
            } else {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).unwrap();
                (
                    gz.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            };
            diff_ids.push(diff_id_override.map(str::to_string).unwrap_or(sha(tar)));
            descs.push(json!({
                "mediaType": media_type,
                "digest": self.blob(&blob), "size": blob.len()
            }));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/hello"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.blob(&config), "size": config.len()},
            "layers": descs
        }))
        .unwrap();
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.blob(&manifest), "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"}
        })
    }

    pub fn tag(&mut self, desc: Value, tag: &str) {
        let mut d = desc;
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.manifests.push(d);
        self.write_index();
    }

    /// Tags an index of the given manifests.
    pub fn tag_index(&mut self, manifests: &[Value], tag: &str) {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests
        }))
        .unwrap();
        let desc = json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": self.blob(&index), "size": index.len()
        });
        self.tag(desc, tag);
    }

    fn write_index(&self) {
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": self.manifests})).unwrap(),
        )
        .unwrap();
    }
}

/// A tar of (path, content or symlink target, kind).
pub fn tar(entries: &[(&str, &str, char)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content, kind) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match kind {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            'l' => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, content).unwrap();
            }
            _ => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if *kind == 'x' { 0o755 } else { 0o644 });
                h.set_size(content.len() as u64);
                b.append_data(&mut h, path, content.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn skopeo_push(src: &str, dest: &str, all: bool) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    let out = cmd
        .args([src, dest])
        .stdin(Stdio::null())
        .output()
        .expect("skopeo must be installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl {args:?}");
}

/// The busybox image (coffer-testkit) pushed by skopeo to `docker://REGISTRY/app:v1`, encrypted
/// to a fresh RSA JWE key written to `dir/img.pem` (its public half `img.pub`); `creds`
/// ("user:password") when the registry wants them. Returns the image reference.
pub fn push_encrypted_busybox(dir: &Path, registry: &str, creds: Option<&str>) -> String {
    push_encrypted_busybox_of(dir, registry, creds, None)
}

/// [`push_encrypted_busybox`] of `busybox` (a static busybox and its OCI architecture) instead
/// of the host's.
pub fn push_encrypted_busybox_of(
    dir: &Path,
    registry: &str,
    creds: Option<&str>,
    busybox: Option<(&[u8], &str)>,
) -> String {
    match busybox {
        Some((b, arch)) => coffer_testkit::busybox_layout_of(&dir.join("plain"), b, arch),
        None => coffer_testkit::busybox_layout(&dir.join("plain")),
    }
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "img.pem",
        ],
    );
    openssl(
        dir,
        &["pkey", "-in", "img.pem", "-pubout", "-out", "img.pub"],
    );
    let image = format!("docker://{registry}/app:v1");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(creds.iter().flat_map(|c| ["--dest-creds", c]))
        .arg("--encryption-key")
        .arg(format!("jwe:{}", dir.join("img.pub").display()))
        .arg(format!("oci:{}:v1", dir.join("plain").display()))
        .arg(&image)
        .stdin(Stdio::null())
        .output()
        .expect("skopeo must be installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// The `p` quantile (0..=1) of `v` (sorted in place; nearest rank).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// GET `path` from `addr:port` over HTTP/1.0 (benchmarks): the bytes read, none kept.
pub fn http_get_len(addr: &str, port: u16, path: &str) -> std::io::Result<usize> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("{addr}:{port}").parse().unwrap(),
        Duration::from_secs(5),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k,
        }
    }
}

/// Reads `http://addr:port/` over HTTP/1.0 (busybox httpd), retrying until `until`.
pub fn http_get(addr: &str, port: u16, until: std::time::Instant) -> String {
    use std::io::{Read, Write};
    loop {
        let got = std::net::TcpStream::connect((addr, port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        match got {
            Ok(page) if page.contains("200 OK") => return page,
            other => {
                assert!(
                    std::time::Instant::now() < until,
                    "{addr}:{port}: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The number in `key=value` on the last line of a log (`text`) containing `needle`.
pub fn log_field(text: &str, needle: &str, key: &str) -> Option<f64> {
    let line = text.lines().rev().find(|l| l.contains(needle))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// A process killed (and reaped) on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds a pod VM into `out` with `coffer podvm build` and this package's agent.
pub fn build_podvm(out: &Path) {
    build_podvm_with(out, &[]);
}

/// As [`build_podvm`], with more `coffer podvm build` arguments.
pub fn build_podvm_with(out: &Path, args: &[&str]) {
    build_podvm_from(out, &agent_binary(), args);
}

/// As [`build_podvm_with`], with the agent binary `agent` (a benchmark comparing agents).
pub fn build_podvm_from(out: &Path, agent: &Path, args: &[&str]) {
    run_ok(
        Command::new(coffer_bin())
            .args(["podvm", "build", "--out"])
            .arg(out)
            .arg("--agent")
            .arg(agent)
            .args(args),
    );
}

/// The `coffer-agent` binary beside this package's `coffer`. Workspace test runs build it; a
/// benchmark (release profile, this package only) or a lone `cargo test -p coffer` builds it here.
pub fn agent_binary() -> PathBuf {
    sibling_binary("coffer-agent", "coffer-agent")
}

/// The program `bin` of the workspace package `package`, built beside `coffer` (built here when
/// missing, and always for a benchmark's release profile, which builds only this package).
pub fn sibling_binary(package: &str, bin: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_coffer")).with_file_name(bin);
    let release = p.parent().is_some_and(|d| d.ends_with("release"));
    if release || !p.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", package, "--bin", bin]);
        if release {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "cannot build {bin}");
    }
    p
}

/// What the run benchmarks start from: a KBS in this process trusting a fresh emulated PSP,
/// holding the image key as `default/image-keys/app`, and Debian's docker-registry serving the
/// busybox image skopeo encrypted to it; an initdata naming both.
pub struct BenchWorld {
    /// The KBS.
    pub kbs: coffer_testkit::TestKbs,
    /// The registry (stopped on drop).
    pub registry: Registry,
    /// `docker://…` of the encrypted image.
    pub image: String,
    /// The emulated PSP's directory.
    pub psp_dir: PathBuf,
    /// `initdata.toml`.
    pub initdata: PathBuf,
}

/// Sets up a [`BenchWorld`] in `d`.
pub fn bench_world(rt: &tokio::runtime::Runtime, d: &Path) -> BenchWorld {
    bench_world_at(rt, d, "127.0.0.1")
}

/// A [`BenchWorld`] whose KBS and registry listen on `ip` (loopback, or an address of a
/// network namespace that the test made, for pods on its pod network).
pub fn bench_world_at(rt: &tokio::runtime::Runtime, d: &Path, ip: &str) -> BenchWorld {
    bench_world_with(rt, d, ip, |_| {})
}

/// [`bench_world_at`] with the KBS's configuration changed by `tweak`.
pub fn bench_world_with(
    rt: &tokio::runtime::Runtime,
    d: &Path,
    ip: &str,
    tweak: impl FnOnce(&mut coffer_kbs::Config),
) -> BenchWorld {
    let psp_dir = d.join("psp");
    coffer_psp::EmulatedPsp::load_or_generate(&psp_dir).unwrap();
    let kbs = rt.block_on(coffer_testkit::start_kbs_at(d, ip.parse().unwrap(), |c| {
        c.allow_emulated = true;
        c.emulated_root = Some(psp_dir.join("roots.pem"));
        tweak(c);
    }));
    let registry = Registry::start_at(ip, None);
    let image = push_encrypted_busybox(d, &registry.addr, None);
    rt.block_on(kbs.admin.set_resource(
        "default/image-keys/app",
        fs::read(d.join("img.pem")).unwrap(),
    ))
    .unwrap();
    let (ok, text, err) = coffer(&[
        "initdata",
        "new",
        "--kbs-url",
        &kbs.url,
        "--image-key",
        "kbs:///default/image-keys/app",
    ]);
    assert!(ok, "{err}");
    let initdata = d.join("initdata.toml");
    fs::write(&initdata, text).unwrap();
    BenchWorld {
        kbs,
        registry,
        image,
        psp_dir,
        initdata,
    }
}
