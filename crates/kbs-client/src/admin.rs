//! The admin API client and admin key generation.

use aws_lc_rs::{
    encoding::AsDer,
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair},
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use coffer_wire::reference::ReferenceValues;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use zeroize::Zeroizing;

use crate::{check, http_err, now_secs, ClientError, Result};

/// Lifetime of each admin token, in seconds.
const ADMIN_TOKEN_LIFETIME: u64 = 300;

/// Generates an Ed25519 admin key pair: (private key PKCS#8 PEM, public key SPKI PEM).
pub fn generate_admin_key() -> Result<(Zeroizing<String>, String)> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| ClientError::Config("Ed25519 key generation failed".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| ClientError::Config("Ed25519 key generation failed".into()))?;
    let spki = pair
        .public_key()
        .as_der()
        .map_err(|_| ClientError::Config("Ed25519 public key encoding failed".into()))?;
    let private = Zeroizing::new(pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        pkcs8.as_ref().to_vec(),
    )));
    let public = pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec()));
    Ok((private, public))
}

/// A client of the KBS admin API.
///
/// ```
/// use coffer_kbs_client::{generate_admin_key, http_client, AdminClient};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // The KBS trusts the public half of an admin key (here: a KBS in this process).
/// let dir = tempfile::tempdir()?;
/// let (private_pem, public_pem) = generate_admin_key()?;
/// let public_file = dir.path().join("ops.pub");
/// std::fs::write(&public_file, public_pem)?;
/// let kbs = coffer_testkit::start_kbs(dir.path(), |config| {
///     config.admin_public_key.push(public_file);
/// })
/// .await;
///
/// let admin = AdminClient::new(&kbs.url, http_client(None)?, private_pem.as_bytes())?;
/// admin.set_resource("default/image-key/app", vec![7; 32]).await?;
/// let deny_all = "package policy\n\ndefault allow := false\n";
/// admin.set_resource_policy(deny_all).await?;
/// assert_eq!(admin.get_policy("resource-policy").await?, deny_all);
///
/// // A key the KBS was not given is refused.
/// let (stranger_pem, _) = generate_admin_key()?;
/// let stranger = AdminClient::new(&kbs.url, http_client(None)?, stranger_pem.as_bytes())?;
/// let refused = stranger.delete_resource("default/image-key/app").await;
/// assert_eq!(refused.unwrap_err().status(), Some(401));
/// # Ok(())
/// # }
/// ```
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    key: EncodingKey,
}

impl AdminClient {
    /// A client of the KBS at `url` that signs its requests with the Ed25519 private key in
    /// `private_pem`. The URL is checked as [`KbsClient::new`](crate::KbsClient::new) checks it.
    pub fn new(url: &str, http: reqwest::Client, private_pem: &[u8]) -> Result<Self> {
        let key = EncodingKey::from_ed_pem(private_pem).map_err(|e| {
            ClientError::Config(format!(
                "admin key is not an Ed25519 private key in PEM: {e}"
            ))
        })?;
        Ok(Self {
            http,
            base: crate::protocol_base(url)?,
            key,
        })
    }

    fn token(&self) -> Result<String> {
        let now = now_secs();
        jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &json!({"iat": now, "exp": now + ADMIN_TOKEN_LIFETIME}),
            &self.key,
        )
        .map_err(|e| ClientError::Config(format!("cannot sign the admin token: {e}")))
    }

    async fn send(
        &self,
        op: &str,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response> {
        let resp = req
            .bearer_auth(self.token()?)
            .send()
            .await
            .map_err(http_err(url))?;
        check(op, resp).await
    }

    /// Stores a resource at `repo/type/tag`.
    pub async fn set_resource(&self, path: &str, value: Vec<u8>) -> Result<()> {
        let url = format!("{}/resource/{path}", self.base);
        let req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(value);
        self.send("set-resource", req, &url).await.map(|_| ())
    }

    /// Deletes a resource.
    pub async fn delete_resource(&self, path: &str) -> Result<()> {
        let url = format!("{}/resource/{path}", self.base);
        let req = self.http.delete(&url);
        self.send("delete-resource", req, &url).await.map(|_| ())
    }

    async fn set_policy(&self, which: &str, text: &str) -> Result<()> {
        let url = format!("{}/{which}", self.base);
        let req = self
            .http
            .post(&url)
            .json(&json!({"policy": URL_SAFE_NO_PAD.encode(text)}));
        self.send(&format!("set-{which}"), req, &url)
            .await
            .map(|_| ())
    }

    /// Replaces the resource policy (Rego, package `policy`, rule `allow`).
    pub async fn set_resource_policy(&self, text: &str) -> Result<()> {
        self.set_policy("resource-policy", text).await
    }

    /// Replaces the attestation policy (Rego, package `policy`, rule `status`).
    pub async fn set_attestation_policy(&self, text: &str) -> Result<()> {
        self.set_policy("attestation-policy", text).await
    }

    /// The policy in force (`resource-policy` or `attestation-policy`).
    pub async fn get_policy(&self, which: &str) -> Result<String> {
        let url = format!("{}/{which}", self.base);
        let req = self.http.get(&url);
        let resp = self.send(&format!("get-{which}"), req, &url).await?;
        resp.text().await.map_err(http_err(&url))
    }

    /// Sets reference values from a JSON document (names → arrays).
    pub async fn set_reference_values(&self, doc: &[u8]) -> Result<()> {
        let values =
            coffer_wire::reference::parse(doc).map_err(|e| ClientError::Config(e.to_string()))?;
        let url = format!("{}/reference-values", self.base);
        let req = self.http.post(&url).json(&values);
        self.send("set-reference-values", req, &url)
            .await
            .map(|_| ())
    }

    /// All reference values.
    pub async fn get_reference_values(&self) -> Result<ReferenceValues> {
        let url = format!("{}/reference-values", self.base);
        let req = self.http.get(&url);
        let resp = self.send("get-reference-values", req, &url).await?;
        resp.json().await.map_err(|e| ClientError::Protocol {
            op: "get-reference-values".into(),
            detail: e.to_string(),
        })
    }

    /// The mesh certificates that have not expired: which workloads hold one, until when.
    pub async fn mesh_certificates(&self) -> Result<Vec<coffer_wire::mesh::Issued>> {
        let url = format!("{}/mesh/certificates", self.base);
        let req = self.http.get(&url);
        let resp = self.send("mesh-certificates", req, &url).await?;
        resp.json().await.map_err(|e| ClientError::Protocol {
            op: "mesh-certificates".into(),
            detail: e.to_string(),
        })
    }

    /// Deletes one named reference-value list.
    pub async fn delete_reference_value(&self, name: &str) -> Result<()> {
        let url = format!("{}/reference-values/{name}", self.base);
        let req = self.http.delete(&url);
        self.send("delete-reference-value", req, &url)
            .await
            .map(|_| ())
    }
}
