//! Client side of the KBS protocol, used by the `coffer` CLI and by the guest agent.
//!
//! * [`Attester`]: produces TEE evidence over given report data ([`SampleAttester`] here; the
//!   guest's hardware and emulated attesters implement the same trait).
//! * [`KbsClient`]: the RCAR handshake (`/auth` → `/attest`), a TEE key pair whose public half is
//!   bound into the evidence, token reuse until expiry, and resource fetches decrypted from JWE.
//! * [`AdminClient`]: the admin API, authenticated by short-lived Ed25519 JWTs.
//!
//! # Example
//!
//! A TEE gets a secret from a KBS. Here the KBS runs in this process (`coffer-testkit`, on
//! loopback) and accepts the `sample` TEE, which has no security and exists for tests like this.
//!
//! ```
//! use coffer_jose::TeeKeyAlgorithm;
//! use coffer_kbs_client::{http_client, KbsClient, SampleAttester};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let kbs = coffer_testkit::start_kbs(dir.path(), |config| config.allow_sample = true).await;
//! kbs.admin
//!     .set_resource("default/db/password", b"correct horse".to_vec())
//!     .await?;
//!
//! // The TEE side: an attester and a client with a fresh TEE key pair.
//! let client = KbsClient::new(
//!     &kbs.url,
//!     http_client(None)?,
//!     Box::new(SampleAttester::default()),
//!     TeeKeyAlgorithm::EcP256,
//! )?;
//! // Attests (`/auth`, `/attest`), then fetches the resource, which the KBS encrypted to the
//! // client's TEE key, and decrypts it.
//! let secret = client.get_resource("kbs:///default/db/password").await?;
//! assert_eq!(&secret[..], b"correct horse");
//!
//! // Once the reference values accept only svn 2, a TEE reporting svn 1 gets nothing.
//! kbs.admin
//!     .set_reference_values(br#"{"sample_svn": ["2"]}"#)
//!     .await?;
//! let outdated = KbsClient::new(
//!     &kbs.url,
//!     http_client(None)?,
//!     Box::new(SampleAttester { svn: "1".into() }),
//!     TeeKeyAlgorithm::EcP256,
//! )?;
//! let refused = outdated.get_resource("kbs:///default/db/password").await;
//! assert_eq!(refused.unwrap_err().status(), Some(403));
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod attester;

use std::{sync::Mutex, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use coffer_jose::{TeeKeyAlgorithm, TeeKeyPair};
use coffer_wire::{
    binding, error::ErrorKind, initdata, Attestation, Challenge, CompositeEvidence,
    ErrorInformation, HashAlgorithm, InitData, JweResponse, Request, RuntimeData, Tee, BASE_PATH,
    PROTOCOL_VERSION, SESSION_COOKIE,
};
use reqwest::{header, StatusCode};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

pub use admin::{generate_admin_key, AdminClient};
pub use attester::{
    Attester, AttesterError, EmulatedSnpAttester, PspChannelAttester, SampleAttester,
};

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The KBS could not be reached or the connection failed.
    #[error("cannot reach the KBS at {url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The KBS answered with an error.
    #[error("KBS refused {op}: {detail} ({kind}, HTTP {status})")]
    Refused {
        /// What was asked.
        op: String,
        /// HTTP status.
        status: u16,
        /// The error kind name from the body.
        kind: String,
        /// The server's detail.
        detail: String,
    },
    /// The KBS answered something that is not the protocol.
    #[error("unexpected answer from the KBS to {op}: {detail}")]
    Protocol {
        /// What was asked.
        op: String,
        /// What was wrong.
        detail: String,
    },
    /// JWE decryption or key generation failed.
    #[error(transparent)]
    Jose(#[from] coffer_jose::JoseError),
    /// The attester failed.
    #[error(transparent)]
    Attester(#[from] AttesterError),
    /// Local configuration problem (CA file, admin key, …).
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    /// The protocol error kind, when the KBS refused with a known one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Refused { kind, .. } => {
                ErrorKind::from_type(&format!("{}{kind}", coffer_wire::error::ERROR_TYPE_PREFIX))
            }
            _ => None,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// Builds an HTTP client that trusts the system roots, or only `ca_pem` when given.
pub fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client> {
    http_client_via(ca_pem, None)
}

/// [`http_client`] sending every request through `proxy` (e.g. `socks5h://127.0.0.1:1080`).
pub fn http_client_via(ca_pem: Option<&[u8]>, proxy: Option<&str>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("coffer-kbs-client/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientError::Config(format!("invalid CA certificate PEM: {e}")))?;
        b = b.tls_certs_only(certs);
    }
    if let Some(p) = proxy {
        b = b.proxy(
            reqwest::Proxy::all(p)
                .map_err(|e| ClientError::Config(format!("invalid proxy {p}: {e}")))?,
        );
    }
    b.build()
        .map_err(|e| ClientError::Config(format!("cannot build the HTTP client: {e}")))
}

async fn check(op: &str, resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    let (kind, detail) = match serde_json::from_slice::<ErrorInformation>(&body) {
        Ok(info) => (
            info.error_type
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            info.detail,
        ),
        Err(_) => (
            "unknown".into(),
            String::from_utf8_lossy(&body).chars().take(200).collect(),
        ),
    };
    Err(ClientError::Refused {
        op: op.to_string(),
        status: status.as_u16(),
        kind,
        detail,
    })
}

/// `url` with the KBS protocol's path appended (`…/kbs/v0`), once it is checked: `https://` or
/// `http://` with a host, no query or fragment (the protocol's paths are appended to it), no user
/// name or password (the URL is logged and named in errors; the KBS authenticates by attestation
/// or by the admin key). The error names `url` unless it has an `@`.
pub(crate) fn protocol_base(url: &str) -> Result<String> {
    let shown = if url.contains('@') {
        "(not shown: it has an @)"
    } else {
        url
    };
    let bad = |why: &str| {
        ClientError::Config(format!(
            "the KBS URL `{shown}` {why}; give one like https://kbs.example:8080"
        ))
    };
    let given = reqwest::Url::parse(url).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(given.scheme(), "https" | "http") || given.host_str().is_none_or(str::is_empty) {
        return Err(bad("is not an https:// or http:// URL with a host"));
    }
    if given.query().is_some() || given.fragment().is_some() {
        return Err(bad(
            "has a query or fragment, which the KBS paths cannot follow",
        ));
    }
    if !given.username().is_empty() || given.password().is_some() {
        return Err(bad(
            "carries a user name or password; remove them: the KBS authenticates by attestation \
             or the admin key, and its URL is logged",
        ));
    }
    Ok(format!("{}{BASE_PATH}", url.trim_end_matches('/')))
}

fn http_err(url: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| ClientError::Http {
        url: url.to_string(),
        source,
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: String,
}

#[derive(Deserialize)]
struct TokenTimes {
    exp: u64,
}

#[derive(Clone)]
struct CachedToken {
    token: String,
    /// The session cookie of the attestation that produced the token.
    cookie: String,
    exp: u64,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A TEE's client of one KBS.
pub struct KbsClient {
    http: reqwest::Client,
    base: String,
    /// `{base}/auth` and `{base}/attest`, parsed once when the client is made.
    auth_url: reqwest::Url,
    attest_url: reqwest::Url,
    attester: Box<dyn Attester>,
    key: TeeKeyPair,
    initdata: Option<String>,
    token: Mutex<Option<CachedToken>>,
}

impl KbsClient {
    /// A client of the KBS at `url` (e.g. `https://kbs.example:8080`), with a fresh TEE key.
    /// A `url` that is not `https://` or `http://` with a host, or that has a query, a fragment
    /// or credentials, is refused here ([`ClientError::Config`], naming it unless it has an `@`),
    /// not at the first request. [`AdminClient::new`] checks its URL the same way.
    pub fn new(
        url: &str,
        http: reqwest::Client,
        attester: Box<dyn Attester>,
        key_alg: TeeKeyAlgorithm,
    ) -> Result<Self> {
        let base = protocol_base(url)?;
        let endpoint = |name: &str| {
            reqwest::Url::parse(&format!("{base}/{name}")).map_err(|e| {
                ClientError::Config(format!("the KBS URL cannot take the path /{name}: {e}"))
            })
        };
        Ok(Self {
            http,
            auth_url: endpoint("auth")?,
            attest_url: endpoint("attest")?,
            base,
            attester,
            key: TeeKeyPair::generate(key_alg)?,
            initdata: None,
            token: Mutex::new(None),
        })
    }

    /// Sends this initdata (TOML text) with the evidence; the attester must bind its digest.
    pub fn with_initdata(mut self, toml: String) -> Self {
        self.initdata = Some(toml);
        self
    }

    /// The TEE public key bound into this client's evidence.
    pub fn tee_pubkey(&self) -> &coffer_wire::TeePubKey {
        self.key.public_jwk()
    }

    /// Runs the RCAR handshake and returns the attestation token (also kept for reuse).
    pub async fn attest(&self) -> Result<String> {
        Ok(self.attest_session().await?.token)
    }

    async fn attest_session(&self) -> Result<CachedToken> {
        let url = self.auth_url.as_str();
        tracing::debug!(%url, "attesting");
        let resp = self
            .http
            .post(self.auth_url.clone())
            .json(&Request {
                version: PROTOCOL_VERSION.into(),
                tee: self.attester.tee(),
                extra_params: json!({}),
            })
            .send()
            .await
            .map_err(http_err(url))?;
        let resp = check("auth", resp).await?;
        let cookie = session_cookie(&resp).ok_or_else(|| ClientError::Protocol {
            op: "auth".into(),
            detail: format!("no {SESSION_COOKIE} cookie"),
        })?;
        let challenge: Challenge = resp.json().await.map_err(|e| ClientError::Protocol {
            op: "auth".into(),
            detail: e.to_string(),
        })?;
        let hash = match challenge
            .extra_params
            .get("selected-hash-algorithm")
            .and_then(|v| v.as_str())
        {
            Some("sha512") => HashAlgorithm::Sha512,
            Some("sha256") => HashAlgorithm::Sha256,
            _ if self.attester.tee() == Tee::Se => HashAlgorithm::Sha512,
            _ => HashAlgorithm::Sha384,
        };
        let additional = String::new();
        let digest = binding::runtime_data_digest(
            self.key.public_jwk(),
            &challenge.nonce,
            &additional,
            hash,
        )
        .map_err(|e| ClientError::Protocol {
            op: "attest".into(),
            detail: e.to_string(),
        })?;
        let init_digest = match &self.initdata {
            Some(t) => Some(initdata::digest(t).map_err(|e| ClientError::Config(e.to_string()))?),
            None => None,
        };
        tracing::debug!("KBS challenge received");
        let evidence = self.attester.evidence_for_challenge(
            &challenge.extra_params,
            &digest,
            init_digest.as_deref(),
        )?;
        tracing::debug!("evidence from the attester");
        let body = Attestation {
            init_data: self.initdata.as_ref().map(|t| InitData {
                format: initdata::INITDATA_FORMAT.into(),
                body: t.clone(),
            }),
            runtime_data: RuntimeData {
                nonce: challenge.nonce,
                tee_pubkey: self.key.public_jwk().clone(),
            },
            tee_evidence: CompositeEvidence {
                primary_evidence: evidence,
                additional_evidence: additional,
            },
        };
        let url = self.attest_url.as_str();
        let resp = self
            .http
            .post(self.attest_url.clone())
            .header(header::COOKIE, &cookie)
            .json(&body)
            .send()
            .await
            .map_err(http_err(url))?;
        let resp = check("attest", resp).await?;
        // The KBS may replace the session cookie once attested (it seals the token into it).
        let cookie = session_cookie(&resp).unwrap_or(cookie);
        let TokenResponse { token } = resp.json().await.map_err(|e| ClientError::Protocol {
            op: "attest".into(),
            detail: e.to_string(),
        })?;
        let exp = token
            .split('.')
            .nth(1)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|b| serde_json::from_slice::<TokenTimes>(&b).ok())
            .map(|t| t.exp)
            .unwrap_or(0);
        tracing::debug!("attestation token received");
        let cached = CachedToken { token, cookie, exp };
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(cached.clone());
        Ok(cached)
    }

    fn cached_token(&self) -> Option<CachedToken> {
        let guard = self.token.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|t| t.exp > now_secs() + 10).cloned()
    }

    /// Fetches and decrypts the resource at `repo/type/tag`, attesting first when no valid
    /// token is held. A token the KBS no longer accepts is replaced once.
    pub async fn get_resource(&self, path: &str) -> Result<Zeroizing<Vec<u8>>> {
        let path = path.strip_prefix("kbs:///").unwrap_or(path);
        self.with_token(|token| async move { self.fetch(path, &token).await })
            .await
    }

    /// Runs `call` with the held token, attesting first when no valid token is held; a held
    /// token the KBS no longer accepts (401) is replaced once and `call` run again.
    async fn with_token<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(CachedToken) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut fresh = false;
        let token = match self.cached_token() {
            Some(t) => t,
            None => {
                fresh = true;
                self.attest_session().await?
            }
        };
        match call(token).await {
            Err(e) if !fresh && e.status() == Some(StatusCode::UNAUTHORIZED.as_u16()) => {
                call(self.attest_session().await?).await
            }
            other => other,
        }
    }

    /// Sends the session cookie (the KBS uses the session's token while the session lives) and
    /// the token as a bearer token (used once the session has expired).
    async fn fetch(&self, path: &str, token: &CachedToken) -> Result<Zeroizing<Vec<u8>>> {
        let url = format!("{}/resource/{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(header::COOKIE, &token.cookie)
            .bearer_auth(&token.token)
            .send()
            .await
            .map_err(http_err(&url))?;
        let resp = check(&format!("resource {path}"), resp).await?;
        let jwe: JweResponse = resp.json().await.map_err(|e| ClientError::Protocol {
            op: format!("resource {path}"),
            detail: format!("not a JWE: {e}"),
        })?;
        Ok(self.key.decrypt(&jwe)?)
    }
}

impl KbsClient {
    /// Asks the KBS's mesh CA for a workload certificate for the key of `csr_pem` (a PKCS#10
    /// request, PEM), attesting first when no valid token is held; the certificate names the
    /// identity of the attested initdata's `mesh.toml`.
    pub async fn mesh_certificate(
        &self,
        csr_pem: &str,
    ) -> Result<coffer_wire::mesh::CertificateResponse> {
        self.with_token(|token| async move { self.post_csr(csr_pem, &token).await })
            .await
    }

    async fn post_csr(
        &self,
        csr_pem: &str,
        token: &CachedToken,
    ) -> Result<coffer_wire::mesh::CertificateResponse> {
        let url = format!("{}{}", self.base, coffer_wire::mesh::CERTIFICATE_PATH);
        let resp = self
            .http
            .post(&url)
            .header(header::COOKIE, &token.cookie)
            .bearer_auth(&token.token)
            .json(&coffer_wire::mesh::CertificateRequest {
                csr: csr_pem.to_string(),
            })
            .send()
            .await
            .map_err(http_err(&url))?;
        let resp = check("mesh certificate", resp).await?;
        resp.json().await.map_err(|e| ClientError::Protocol {
            op: "mesh certificate".into(),
            detail: format!("not a certificate response: {e}"),
        })
    }

    /// One full handshake without token reuse: `/auth`, `/attest`, then the resource. Used by
    /// benchmarks and by callers that must prove freshness.
    pub async fn handshake(&self, path: &str) -> Result<Zeroizing<Vec<u8>>> {
        let token = self.attest_session().await?;
        self.fetch(path.strip_prefix("kbs:///").unwrap_or(path), &token)
            .await
    }
}

/// The `kbs-session-id=…` pair a response sets, if it sets one.
fn session_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|kv| kv.trim_start().starts_with(&format!("{SESSION_COOKIE}=")))
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> Result<KbsClient> {
        KbsClient::new(
            url,
            reqwest::Client::new(),
            Box::new(SampleAttester::default()),
            TeeKeyAlgorithm::EcP256,
        )
    }

    #[test]
    fn the_endpoints_are_parsed_once_under_the_protocol_path() {
        let c = client("http://127.0.0.1:8080/").unwrap();
        assert_eq!(c.auth_url.as_str(), "http://127.0.0.1:8080/kbs/v0/auth");
        assert_eq!(c.attest_url.as_str(), "http://127.0.0.1:8080/kbs/v0/attest");
        let c = client("https://kbs.example").unwrap();
        assert_eq!(c.auth_url.as_str(), "https://kbs.example/kbs/v0/auth");
    }

    #[test]
    fn a_kbs_url_the_protocol_paths_cannot_follow_is_refused_when_the_client_is_made() {
        for url in [
            "127.0.0.1:8080",
            "kbs.example:8080",
            "ftp://kbs.example",
            "",
            "http://",
            "https://kbs.example/?tenant=a",
            "https://kbs.example#top",
        ] {
            let Err(ClientError::Config(msg)) = client(url) else {
                panic!("`{url}` was accepted as a KBS URL");
            };
            assert!(msg.contains(&format!("`{url}`")), "{msg}");
            assert!(msg.contains("https://kbs.example:8080"), "{msg}");
        }
    }

    #[test]
    fn a_kbs_url_with_credentials_is_refused_without_repeating_them() {
        for url in [
            "https://admin:hunter2@kbs.example",
            "https://hunter2@kbs.example",
        ] {
            let Err(ClientError::Config(msg)) = client(url) else {
                panic!("a KBS URL with credentials was accepted");
            };
            assert!(!msg.contains("hunter2"), "{msg}");
            assert!(msg.contains("user name or password"), "{msg}");
            assert!(msg.contains("not shown"), "{msg}");
        }
    }

    #[test]
    fn the_admin_client_checks_its_url_as_the_tee_client_does() {
        let (private, _) = generate_admin_key().unwrap();
        let admin = |url: &str| AdminClient::new(url, reqwest::Client::new(), private.as_bytes());
        assert!(admin("https://kbs.example:8080/").is_ok());
        for url in [
            "kbs.example:8080",
            "https://admin:hunter2@kbs.example",
            "https://kbs.example/?a=b",
        ] {
            let Err(ClientError::Config(msg)) = admin(url) else {
                panic!("the admin client accepted a bad KBS URL");
            };
            assert!(msg.starts_with("the KBS URL"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }
}
