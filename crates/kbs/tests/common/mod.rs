//! Test harness: a real coffer-kbs served on a loopback port, with an admin key.

#![allow(dead_code)]

use std::{path::PathBuf, sync::Arc};

use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs::{server, Config, Kbs};
use coffer_kbs_client::{generate_admin_key, http_client, AdminClient, KbsClient, SampleAttester};

pub struct TestKbs {
    pub url: String,
    pub kbs: Arc<Kbs>,
    pub dir: tempfile::TempDir,
    pub admin_private: Vec<u8>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestKbs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn admin_keypair(dir: &std::path::Path, name: &str) -> (Vec<u8>, PathBuf) {
    let (private, public) = generate_admin_key().unwrap();
    let pub_path = dir.join(format!("{name}.pub"));
    std::fs::write(&pub_path, public).unwrap();
    (private.as_bytes().to_vec(), pub_path)
}

/// A config with sample allowed, plain HTTP on loopback, embedded store in `dir`.
pub fn config(dir: &std::path::Path, admin_pub: Option<PathBuf>) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: Some(dir.join("data")),
        insecure_http: true,
        admin_public_key: admin_pub.into_iter().collect(),
        allow_sample: true,
        ..Config::default()
    }
}

impl TestKbs {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (admin_private, pub_path) = admin_keypair(dir.path(), "admin");
        let mut cfg = config(dir.path(), Some(pub_path));
        tweak(&mut cfg);
        Self::serve(cfg, dir, admin_private).await
    }

    pub async fn serve(cfg: Config, dir: tempfile::TempDir, admin_private: Vec<u8>) -> Self {
        let scheme = if cfg.insecure_http { "http" } else { "https" };
        let kbs = Kbs::new(cfg).await.unwrap();
        let listener = server::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let k = kbs.clone();
        let task = tokio::spawn(async move {
            let _ = server::serve(k, listener).await;
        });
        Self {
            url,
            kbs,
            dir,
            admin_private,
            task,
        }
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&self.url, http_client(None).unwrap(), &self.admin_private).unwrap()
    }

    pub fn tee(&self) -> KbsClient {
        self.tee_with(TeeKeyAlgorithm::EcP256)
    }

    pub fn tee_with(&self, alg: TeeKeyAlgorithm) -> KbsClient {
        KbsClient::new(
            &self.url,
            http_client(None).unwrap(),
            Box::new(SampleAttester::default()),
            alg,
        )
        .unwrap()
    }

    pub fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/audit.jsonl")).unwrap_or_default()
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the real `coffer-kbs` binary with `args`.
pub fn spawn_kbs(args: &[&std::ffi::OsStr]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_coffer-kbs"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

pub async fn wait_ready(url: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("{url}/healthz")).await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("coffer-kbs did not become ready at {url}");
}
