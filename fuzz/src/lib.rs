//! What the fuzz targets and `seedgen` share: the fixed keys (fuzz/fixtures, fuzzing only), the
//! agent API's request types by number, and a confined directory for unpacking layers.

use std::path::{Path, PathBuf};

/// P-256 private key (PEM): TEE key, ocicrypt recipient key.
pub const EC_KEY_PEM: &[u8] = include_bytes!("../fixtures/ec-p256.pem");
/// The same key as PKCS#8 DER: the KBS token key.
pub const EC_KEY_PKCS8: &[u8] = include_bytes!("../fixtures/ec-p256.pk8");
/// Its public half (PEM SPKI).
pub const EC_PUB_PEM: &[u8] = include_bytes!("../fixtures/ec-p256.pub.pem");
/// Ed25519 admin private key (PEM PKCS#8).
pub const ADMIN_KEY_PEM: &[u8] = include_bytes!("../fixtures/admin.pem");
/// Its public half (PEM SPKI), the key the KBS is configured with.
pub const ADMIN_PUB_PEM: &[u8] = include_bytes!("../fixtures/admin.pub.pem");

/// The `kid` of the KBS key-encryption key layer keys are wrapped with.
pub const KBS_KID: &str = "kbs:///default/image-kek/fuzz";
/// That key-encryption key.
pub const KBS_KEK: [u8; 32] = [7; 32];

/// Decodes `bytes` as the agent API request type `selector` picks (modulo the number of types)
/// and builds the agent policy's `input` from it the way the agent does (the request serialized
/// to JSON). Returns the type's name (the policy rule) and the input; `None` when the bytes do
/// not decode. An `ExecProcessRequest` also goes through the owner-signature message.
pub fn agent_request(selector: u8, bytes: &[u8]) -> Option<(&'static str, serde_json::Value)> {
    use coffer_agent::proto::*;
    use prost::Message;
    fn input<T: Message + Default + serde::Serialize>(b: &[u8]) -> Option<serde_json::Value> {
        serde_json::to_value(T::decode(b).ok()?).ok()
    }
    let name = AGENT_REQUESTS[selector as usize % AGENT_REQUESTS.len()];
    let value = match name {
        "CreateSandboxRequest" => input::<CreateSandboxRequest>(bytes),
        "DestroySandboxRequest" => input::<DestroySandboxRequest>(bytes),
        "CreateContainerRequest" => input::<CreateContainerRequest>(bytes),
        "StartContainerRequest" => input::<StartContainerRequest>(bytes),
        "RemoveContainerRequest" => input::<RemoveContainerRequest>(bytes),
        "ExecProcessRequest" => {
            let req = ExecProcessRequest::decode(bytes).ok()?;
            let _ = coffer_agent::owner::exec_message(&req);
            serde_json::to_value(req).ok()
        }
        "WaitProcessRequest" => input::<WaitProcessRequest>(bytes),
        "SignalProcessRequest" => input::<SignalProcessRequest>(bytes),
        "ReadStreamRequest" => input::<ReadStreamRequest>(bytes),
        "WriteStreamRequest" => input::<WriteStreamRequest>(bytes),
        "CloseStdinRequest" => input::<CloseStdinRequest>(bytes),
        "TtyWinResizeRequest" => input::<TtyWinResizeRequest>(bytes),
        "StatsContainerRequest" => input::<StatsContainerRequest>(bytes),
        "ListContainersRequest" => input::<ListContainersRequest>(bytes),
        "GetGuestDetailsRequest" => input::<GetGuestDetailsRequest>(bytes),
        "SetPolicyRequest" => input::<SetPolicyRequest>(bytes),
        _ => input::<IssueExecNonceRequest>(bytes),
    }?;
    Some((name, value))
}

/// The agent API's request types, by selector number ([`agent_request`]).
pub const AGENT_REQUESTS: [&str; 17] = [
    "CreateSandboxRequest",
    "DestroySandboxRequest",
    "CreateContainerRequest",
    "StartContainerRequest",
    "RemoveContainerRequest",
    "ExecProcessRequest",
    "WaitProcessRequest",
    "SignalProcessRequest",
    "ReadStreamRequest",
    "WriteStreamRequest",
    "CloseStdinRequest",
    "TtyWinResizeRequest",
    "StatsContainerRequest",
    "ListContainersRequest",
    "GetGuestDetailsRequest",
    "SetPolicyRequest",
    "IssueExecNonceRequest",
];

/// An audit sink that keeps nothing (a fuzzer makes millions of decisions).
pub struct NoAudit;

impl coffer_agent::policy::Audit for NoAudit {
    fn record(&self, _entry: serde_json::Value) {}
}

/// A directory to unpack one layer into, beside a sentinel directory that nothing may touch:
/// `<tmp>/root` is the root, `<tmp>/outside/file` the sentinel.
pub struct Confined {
    dir: tempfile::TempDir,
    sentinel: Vec<u8>,
}

impl Confined {
    /// Creates the directories.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("coffer-fuzz-unpack-")
            .tempdir()
            .expect("temporary directory");
        let sentinel = b"outside the root".to_vec();
        std::fs::create_dir(dir.path().join("outside")).expect("sentinel directory");
        std::fs::write(dir.path().join("outside/file"), &sentinel).expect("sentinel file");
        Self { dir, sentinel }
    }

    /// The (new, empty) root for the next layer.
    pub fn fresh_root(&self) -> PathBuf {
        let root = self.dir.path().join("root");
        remove_tree(&root);
        std::fs::create_dir(&root).expect("root directory");
        root
    }

    /// Panics unless the parent holds exactly `root` and the untouched sentinel; then removes
    /// the root.
    pub fn check_and_clean(&self) {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("read the parent directory")
            .map(|e| e.expect("directory entry").file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["outside", "root"],
            "something was created beside the root"
        );
        let outside: Vec<_> = std::fs::read_dir(self.dir.path().join("outside"))
            .expect("read the sentinel directory")
            .map(|e| e.expect("directory entry").file_name())
            .collect();
        assert_eq!(outside, ["file"], "the sentinel directory changed");
        let meta =
            std::fs::symlink_metadata(self.dir.path().join("outside/file")).expect("sentinel file");
        assert!(meta.file_type().is_file(), "the sentinel was replaced");
        assert_eq!(
            std::fs::read(self.dir.path().join("outside/file")).expect("sentinel content"),
            self.sentinel,
            "the sentinel was written"
        );
        remove_tree(&self.dir.path().join("root"));
    }
}

impl Default for Confined {
    fn default() -> Self {
        Self::new()
    }
}

/// Removes `path` (never following symlinks), making directories writable first where a layer
/// made them read-only.
fn remove_tree(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::symlink_metadata(path).is_err() || std::fs::remove_dir_all(path).is_ok() {
        return;
    }
    fn open_up(p: &Path) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.is_dir() {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    open_up(&e.path());
                }
            }
        }
    }
    open_up(path);
    std::fs::remove_dir_all(path).expect("remove the unpacked root");
}
