//! Configuration. Every command-line flag has a key of the same name in the TOML config file
//! (`--config FILE`); flags given on the command line win.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// Default session lifetime (seconds), as upstream.
pub const DEFAULT_SESSION_TTL: u64 = 300;
/// Default token lifetime (seconds), as upstream.
pub const DEFAULT_TOKEN_TTL: u64 = 300;
/// Default lifetime of a mesh workload certificate (seconds); guests renew at two thirds.
pub const DEFAULT_MESH_CERT_TTL: u64 = 3600;
/// Default bound on live sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;
/// Default time a client has to send a request's header (seconds).
pub const DEFAULT_HEADER_READ_TIMEOUT: u64 = 10;
/// Default time a client has to send a request's body once its header arrived (seconds); at
/// the 1 MiB protocol body limit this asks for about 35 KB/s.
pub const DEFAULT_BODY_READ_TIMEOUT: u64 = 30;
/// Default time a client has to complete the TLS handshake (seconds).
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: u64 = 10;
/// Default time a kept-alive connection may sit idle between requests (seconds).
pub const DEFAULT_IDLE_TIMEOUT: u64 = 60;
/// Default bound on open client connections (lowered to fit the process's file limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default largest policy text (bytes).
pub const DEFAULT_MAX_POLICY_BYTES: usize = coffer_wire::rego::MAX_BYTES;
/// Default deepest bracket nesting (`[`, `{`, `(`) in a policy text. The Rego parser's time
/// grows exponentially with unclosed nesting; at this depth a worst-case text still compiles
/// in milliseconds (depth 10: about 40 ms in a debug build, each level more about 5 times
/// that), and real policies nest far less.
pub const DEFAULT_MAX_POLICY_NESTING: usize = coffer_wire::rego::MAX_NESTING;
/// Default time budget of one policy compilation (milliseconds).
pub const DEFAULT_POLICY_COMPILE_TIMEOUT_MS: u64 = 2000;

/// Effective configuration of coffer-kbs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the embedded store (and default audit log).
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL; replaces the embedded store.
    pub database_url: Option<String>,
    /// Serve plain HTTP (development only).
    pub insecure_http: bool,
    /// TLS certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Ed25519 public keys (PEM) allowed to call the admin API.
    pub admin_public_key: Vec<PathBuf>,
    /// Accept the sample TEE (no security).
    pub allow_sample: bool,
    /// Accept the emulated TEE (no confidentiality).
    pub allow_emulated: bool,
    /// The emulated PSP's roots (PEM: its ARK and ASK; `roots.pem` of the PSP's directory).
    pub emulated_root: Option<PathBuf>,
    /// Offline cache of VCEKs for SNP evidence that carries none
    /// (`vcek-<chip id hex>-<bl>-<tee>-<snp>-<ucode>.der`).
    pub snp_vcek_dir: Option<PathBuf>,
    /// DCAP collateral files (JSON, one per platform FMSPC) for TDX and SGX quotes.
    pub dcap_collateral: Vec<PathBuf>,
    /// PCCS (or Intel PCS) URL that DCAP collateral is fetched from, per platform, when no
    /// collateral file matches.
    pub pccs_url: Option<String>,
    /// Session lifetime in seconds.
    pub session_ttl_secs: u64,
    /// Token lifetime in seconds.
    pub token_ttl_secs: u64,
    /// Lifetime of a mesh workload certificate in seconds (at least 10).
    pub mesh_cert_ttl_secs: u64,
    /// Bound on live sessions.
    pub max_sessions: usize,
    /// Audit log file (default: `<data-dir>/audit.jsonl`).
    pub audit_log: Option<PathBuf>,
    /// Seconds a client has to send a request's header; also how long a new connection may
    /// stay silent.
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request's body after its header.
    pub body_read_timeout_secs: u64,
    /// Seconds a client has to complete the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Seconds a kept-alive connection may stay idle between requests.
    pub idle_timeout_secs: u64,
    /// Bound on open client connections; at the bound the longest-idle connection makes room,
    /// or, when every connection is busy, the new one is refused.
    pub max_connections: usize,
    /// Largest accepted policy text in bytes.
    pub max_policy_bytes: usize,
    /// Deepest accepted bracket nesting in a policy text.
    pub max_policy_nesting: usize,
    /// Time budget of one policy compilation in milliseconds.
    pub policy_compile_timeout_ms: u64,
    /// IBM Secure Execution: the host-key documents of the IBM Z / LinuxONE hosts whose SE
    /// guests may attest (PEM or DER); none turns SE off.
    pub se_host_key_document: Vec<PathBuf>,
    /// IBM SE: IBM's host-key signing certificate and its intermediate CA (PEM), which every
    /// host-key document must chain to.
    pub se_signing_cert: Vec<PathBuf>,
    /// IBM SE: the root CA those chain to [default: the system's trust store].
    pub se_root_ca: Option<PathBuf>,
    /// IBM SE: CRLs (PEM or DER) of the signing chain and the host-key documents; a revoked
    /// document is refused.
    pub se_crl: Vec<PathBuf>,
    /// IBM SE: use the host-key documents WITHOUT checking them against IBM's signing keys
    /// (tests and development only; logged loudly).
    pub se_unverified_host_keys: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: None,
            database_url: None,
            insecure_http: false,
            tls_cert: None,
            tls_key: None,
            admin_public_key: Vec::new(),
            allow_sample: false,
            allow_emulated: false,
            emulated_root: None,
            dcap_collateral: Vec::new(),
            pccs_url: None,
            snp_vcek_dir: None,
            session_ttl_secs: DEFAULT_SESSION_TTL,
            token_ttl_secs: DEFAULT_TOKEN_TTL,
            mesh_cert_ttl_secs: DEFAULT_MESH_CERT_TTL,
            max_sessions: DEFAULT_MAX_SESSIONS,
            audit_log: None,
            header_read_timeout_secs: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout_secs: DEFAULT_BODY_READ_TIMEOUT,
            tls_handshake_timeout_secs: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_policy_bytes: DEFAULT_MAX_POLICY_BYTES,
            max_policy_nesting: DEFAULT_MAX_POLICY_NESTING,
            policy_compile_timeout_ms: DEFAULT_POLICY_COMPILE_TIMEOUT_MS,
            se_host_key_document: Vec::new(),
            se_signing_cert: Vec::new(),
            se_root_ca: None,
            se_crl: Vec::new(),
            se_unverified_host_keys: false,
        }
    }
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
    }

    /// Checks the combination of settings.
    pub fn validate(&self) -> anyhow::Result<()> {
        match (&self.tls_cert, &self.tls_key, self.insecure_http) {
            (Some(_), Some(_), false) => {}
            (None, None, true) => {}
            (Some(_), Some(_), true) => {
                anyhow::bail!("--insecure-http and --tls-cert/--tls-key are exclusive")
            }
            (None, None, false) => anyhow::bail!(
                "no TLS: pass --tls-cert and --tls-key (`coffer-kbs gen-tls` makes a development pair), or --insecure-http for plain HTTP"
            ),
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
        match (self.allow_emulated, &self.emulated_root) {
            (true, None) => anyhow::bail!(
                "--allow-emulated needs --emulated-root (the emulated PSP's roots.pem)"
            ),
            (false, Some(_)) => anyhow::bail!(
                "--emulated-root is only used with --allow-emulated; refusing to trust an emulated root silently"
            ),
            _ => {}
        }
        if !self.se_host_key_document.is_empty()
            && self.se_signing_cert.is_empty()
            && !self.se_unverified_host_keys
        {
            anyhow::bail!(
                "--se-host-key-document needs --se-signing-cert (IBM's host-key signing certificate and its intermediate CA) to verify the documents; --se-unverified-host-keys skips that for tests only"
            );
        }
        let se_chain = !self.se_signing_cert.is_empty()
            || !self.se_crl.is_empty()
            || self.se_root_ca.is_some();
        if self.se_unverified_host_keys && se_chain {
            anyhow::bail!("--se-unverified-host-keys would ignore --se-signing-cert, --se-crl and --se-root-ca; drop the test switch to verify the host-key documents");
        }
        if self.se_host_key_document.is_empty() && se_chain {
            anyhow::bail!("--se-signing-cert, --se-crl and --se-root-ca are used only with --se-host-key-document");
        }
        if self.mesh_cert_ttl_secs < 10 {
            anyhow::bail!(
                "mesh-cert-ttl-secs {} is too short: guests renew at two thirds of it; use 10 or more",
                self.mesh_cert_ttl_secs
            );
        }
        if self.session_ttl_secs == 0 || self.token_ttl_secs == 0 {
            anyhow::bail!("session and token lifetimes must be positive");
        }
        for (key, v) in [
            ("header-read-timeout-secs", self.header_read_timeout_secs),
            ("body-read-timeout-secs", self.body_read_timeout_secs),
            (
                "tls-handshake-timeout-secs",
                self.tls_handshake_timeout_secs,
            ),
            ("idle-timeout-secs", self.idle_timeout_secs),
            ("policy-compile-timeout-ms", self.policy_compile_timeout_ms),
        ] {
            if v == 0 {
                anyhow::bail!("{key} must be positive: a zero timeout would let stalled clients stay forever or refuse everyone");
            }
        }
        if self.max_connections == 0 || self.max_policy_bytes == 0 || self.max_policy_nesting == 0 {
            anyhow::bail!(
                "max-connections, max-policy-bytes and max-policy-nesting must be positive"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_has_a_config_key() {
        let text = r#"
listen = "127.0.0.1:9999"
data-dir = "/var/lib/coffer-kbs"
database-url = "postgres://kbs@db/kbs"
insecure-http = false
tls-cert = "cert.pem"
tls-key = "key.pem"
admin-public-key = ["a.pub", "b.pub"]
allow-sample = true
allow-emulated = true
emulated-root = "/var/lib/coffer/psp/roots.pem"
dcap-collateral = ["/etc/coffer/collateral-00806f050000.json"]
snp-vcek-dir = "/var/cache/coffer/vcek"
pccs-url = "https://pccs.example:8081"
session-ttl-secs = 60
token-ttl-secs = 120
max-sessions = 10
audit-log = "/var/log/kbs-audit.jsonl"
"#;
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.admin_public_key.len(), 2);
        assert!(c.allow_sample && c.allow_emulated);
        assert_eq!(
            (c.session_ttl_secs, c.token_ttl_secs, c.max_sessions),
            (60, 120, 10)
        );
        assert_eq!(c.database_url.as_deref(), Some("postgres://kbs@db/kbs"));
        assert_eq!(c.pccs_url.as_deref(), Some("https://pccs.example:8081"));
        assert!(c.snp_vcek_dir.is_some());
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_unsafe_combinations_are_refused() {
        assert!(toml::from_str::<Config>("allow-everything = true").is_err());
        let plain = Config::default();
        let err = plain.validate().unwrap_err().to_string();
        assert!(err.contains("--insecure-http"), "{err}");
        let both = Config {
            insecure_http: true,
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            ..Config::default()
        };
        assert!(both.validate().is_err());
        let half = Config {
            tls_cert: Some("c".into()),
            ..Config::default()
        };
        assert!(half.validate().is_err());
        // A zero timeout would keep stalled clients forever or refuse everyone.
        let zero = Config {
            insecure_http: true,
            header_read_timeout_secs: 0,
            ..Config::default()
        };
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("header-read-timeout-secs"), "{err}");
        let limits: Config = toml::from_str(
            "insecure-http = true\nheader-read-timeout-secs = 5\nbody-read-timeout-secs = 6\ntls-handshake-timeout-secs = 7\nidle-timeout-secs = 8\nmax-connections = 9\nmax-policy-bytes = 10\nmax-policy-nesting = 11\npolicy-compile-timeout-ms = 12\n",
        )
        .unwrap();
        limits.validate().unwrap();
        assert_eq!(
            (
                limits.header_read_timeout_secs,
                limits.idle_timeout_secs,
                limits.max_connections,
                limits.max_policy_nesting
            ),
            (5, 8, 9, 11)
        );
    }
}
