//! DCAP collateral from a PCCS (or Intel's PCS) over the v4 API, for TDX and SGX quotes.
//!
//! For one platform (FMSPC and PCK CA, read from the quote's own PCK certificate) the client
//! fetches the PCK CRL, the TCB info, the QE identity and the root CA CRL, with their issuer
//! chains from the response headers. Nothing fetched is trusted on its own: `dcap-qvl` checks
//! every signature and CRL against Intel's SGX root when the quote is verified.
//!
//! The signed JSON objects (`tcbInfo`, `enclaveIdentity`) are kept byte for byte as the server
//! sent them, since Intel signs those exact bytes.
//!
//! Quotes whose certification data is the PCK chain itself (type 5, what TDX guests and current
//! SGX quoting enclaves produce) are supported; encrypted-PPID quotes (types 2 and 3) would need
//! the PCK certificate from the PCCS first and are refused with a message saying so.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use dcap_qvl::QuoteCollateralV3;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::VerifyError;

/// Intel's Provisioning Certification Service, usable as a PCCS URL.
pub const INTEL_PCS_URL: &str = "https://api.trustedservices.intel.com";

/// Where the Intel SGX root CA's CRL is published (the root certificate's CRL distribution
/// point), used when the server has no `rootcacrl` endpoint (Intel's PCS).
const INTEL_ROOT_CA_CRL_URL: &str =
    "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der";

/// How long fetched collateral is used before it is fetched again.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);

/// The platform a quote's collateral is for: TDX or SGX, the FMSPC and the PCK CA, all read
/// from the quote's PCK leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CollateralKey {
    /// An SGX quote (else TDX).
    pub sgx: bool,
    /// The platform's FMSPC, lowercase hex.
    pub fmspc: String,
    /// `processor` or `platform`.
    pub ca: String,
}

impl CollateralKey {
    /// The key of a raw quote. Only quotes carrying their PCK chain (certification data type 5)
    /// name their platform; others are refused with a message saying so.
    pub fn of_quote(quote: &[u8]) -> Result<Self, VerifyError> {
        let q = dcap_qvl::quote::Quote::parse(quote)
            .map_err(|e| VerifyError::Malformed(format!("DCAP quote: {e}")))?;
        let fmspc = dcap_qvl::intel::quote_fmspc(&q).map_err(|e| {
            VerifyError::Malformed(format!(
                "DCAP quote: cannot read the FMSPC from its PCK certificate chain \
                 (only quotes carrying the chain, certification data type 5, are supported): {e}"
            ))
        })?;
        let ca = dcap_qvl::intel::quote_ca(&q)
            .map_err(|e| VerifyError::Malformed(format!("DCAP quote: PCK CA: {e}")))?;
        Ok(Self {
            sgx: q.header.is_sgx(),
            fmspc: hex::encode(fmspc),
            ca: ca.as_id_str().to_string(),
        })
    }
}

/// A failed collateral fetch. The message names the URL and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum PccsError {
    /// The configured URL is not an http(s) URL.
    #[error("PCCS URL {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    /// The request did not complete (no network, refused, TLS, timeout).
    #[error("cannot reach the PCCS at {url}: {reason}")]
    Unreachable {
        /// The URL requested.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("PCCS request {url} failed with HTTP {status}")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The answer lacks something or is not in the PCCS format.
    #[error("PCCS response from {url} is invalid: {reason}")]
    Invalid {
        /// The URL requested.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

struct Fetched {
    collateral: Arc<QuoteCollateralV3>,
    at: Instant,
}

/// A PCCS client with a cache of collateral per platform.
pub struct PccsClient {
    base: String,
    http: reqwest::Client,
    refresh: Duration,
    cache: RwLock<HashMap<CollateralKey, Fetched>>,
    fetch_lock: tokio::sync::Mutex<()>,
}

struct Response {
    body: Vec<u8>,
    headers: reqwest::header::HeaderMap,
}

impl PccsClient {
    /// A client for the PCCS (or PCS) at `url`, e.g. `https://pccs.example:8081` or
    /// [`INTEL_PCS_URL`]; a trailing `/sgx/certification/v4` or `/tdx/certification/v4` is
    /// accepted. Collateral is fetched again after `refresh`.
    pub fn new(url: &str, refresh: Duration) -> Result<Self, PccsError> {
        let trimmed = url
            .trim()
            .trim_end_matches('/')
            .trim_end_matches("/sgx/certification/v4")
            .trim_end_matches("/tdx/certification/v4")
            .to_string();
        if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
            return Err(PccsError::BadUrl(url.to_string()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| PccsError::Unreachable {
                url: trimmed.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            base: trimmed,
            http,
            refresh,
            cache: RwLock::new(HashMap::new()),
            fetch_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The base URL requests go to.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Cached collateral for `key`, if any (fresh or not).
    pub fn cached(&self, key: &CollateralKey) -> Option<Arc<QuoteCollateralV3>> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.get(key).map(|f| f.collateral.clone())
    }

    fn fresh(&self, key: &CollateralKey) -> Option<Arc<QuoteCollateralV3>> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|f| f.at.elapsed() < self.refresh)
            .map(|f| f.collateral.clone())
    }

    /// Collateral for `key`: from the cache while fresh, otherwise fetched (one fetch at a time;
    /// concurrent callers wait for it). When a refresh fails but older collateral is cached, the
    /// older collateral is returned and the failure logged: `dcap-qvl` still refuses collateral
    /// past its validity window.
    pub async fn collateral(
        &self,
        key: &CollateralKey,
    ) -> Result<Arc<QuoteCollateralV3>, PccsError> {
        if let Some(c) = self.fresh(key) {
            return Ok(c);
        }
        let _guard = self.fetch_lock.lock().await;
        if let Some(c) = self.fresh(key) {
            return Ok(c);
        }
        match self.fetch(key).await {
            Ok(c) => {
                let c = Arc::new(c);
                let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
                cache.insert(
                    key.clone(),
                    Fetched {
                        collateral: c.clone(),
                        at: Instant::now(),
                    },
                );
                tracing::info!(fmspc = %key.fmspc, ca = %key.ca, sgx = key.sgx, pccs = %self.base, "fetched DCAP collateral");
                Ok(c)
            }
            Err(e) => match self.cached(key) {
                Some(old) => {
                    tracing::warn!(error = %e, fmspc = %key.fmspc, "PCCS refresh failed; using the collateral fetched before");
                    Ok(old)
                }
                None => Err(e),
            },
        }
    }

    /// Fetches the collateral for one platform, without the cache.
    pub async fn fetch(&self, key: &CollateralKey) -> Result<QuoteCollateralV3, PccsError> {
        let tee = if key.sgx { "sgx" } else { "tdx" };
        let base = &self.base;

        let url = format!(
            "{base}/sgx/certification/v4/pckcrl?ca={}&encoding=der",
            key.ca
        );
        let r = self.get(&url).await?;
        let pck_crl_issuer_chain = header(&r, &url, &["SGX-PCK-CRL-Issuer-Chain"])?;
        let pck_crl = der_or_hex(r.body);

        let url = format!("{base}/{tee}/certification/v4/tcb?fmspc={}", key.fmspc);
        let r = self.get(&url).await?;
        let tcb_info_issuer_chain = header(
            &r,
            &url,
            &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
        )?;
        let (tcb_info, tcb_info_signature) = signed_json(&r.body, &url, "tcbInfo")?;

        let url = format!("{base}/{tee}/certification/v4/qe/identity");
        let r = self.get(&url).await?;
        let qe_identity_issuer_chain = header(
            &r,
            &url,
            &[
                "SGX-Enclave-Identity-Issuer-Chain",
                "Enclave-Identity-Issuer-Chain",
            ],
        )?;
        let (qe_identity, qe_identity_signature) = signed_json(&r.body, &url, "enclaveIdentity")?;

        // A PCCS serves the root CA CRL itself (hex); Intel's PCS does not, the root
        // certificate's CRL distribution point does.
        let url = format!("{base}/sgx/certification/v4/rootcacrl");
        let root_ca_crl = match self.get(&url).await {
            Ok(r) => der_or_hex(r.body),
            Err(PccsError::Status { status: 404, .. }) => {
                der_or_hex(self.get(INTEL_ROOT_CA_CRL_URL).await?.body)
            }
            Err(e) => return Err(e),
        };

        Ok(QuoteCollateralV3 {
            pck_crl_issuer_chain,
            root_ca_crl,
            pck_crl,
            tcb_info_issuer_chain,
            tcb_info,
            tcb_info_signature,
            qe_identity_issuer_chain,
            qe_identity,
            qe_identity_signature,
            pck_certificate_chain: None,
        })
    }

    async fn get(&self, url: &str) -> Result<Response, PccsError> {
        let unreachable = |e: reqwest::Error| PccsError::Unreachable {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let resp = self.http.get(url).send().await.map_err(unreachable)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(PccsError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(unreachable)?.to_vec();
        Ok(Response { body, headers })
    }
}

fn invalid(url: &str, reason: impl Into<String>) -> PccsError {
    PccsError::Invalid {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// The first of `names` present, percent-decoded (issuer chains are URL-encoded PEM).
fn header(r: &Response, url: &str, names: &[&str]) -> Result<String, PccsError> {
    let raw = names
        .iter()
        .find_map(|n| r.headers.get(*n))
        .ok_or_else(|| invalid(url, format!("no {} header", names[0])))?;
    let raw = raw
        .to_str()
        .map_err(|_| invalid(url, format!("{} header is not ASCII", names[0])))?;
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| invalid(url, format!("{} header is not UTF-8", names[0])))?;
    if !decoded.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid(
            url,
            format!("{} header holds no PEM certificate", names[0]),
        ));
    }
    Ok(decoded.into_owned())
}

/// A CRL body: DER as served, or the hex a PCCS serves for some endpoints.
fn der_or_hex(body: Vec<u8>) -> Vec<u8> {
    let text = body.trim_ascii();
    if !text.is_empty() && text.iter().all(u8::is_ascii_hexdigit) {
        if let Ok(der) = hex::decode(text) {
            return der;
        }
    }
    body
}

/// `{"<field>": {…}, "signature": "<hex>"}`: the object's exact bytes and the signature.
fn signed_json(body: &[u8], url: &str, field: &str) -> Result<(String, Vec<u8>), PccsError> {
    #[derive(Deserialize)]
    struct Signed<'a> {
        #[serde(borrow, rename = "tcbInfo")]
        tcb_info: Option<&'a RawValue>,
        #[serde(borrow, rename = "enclaveIdentity")]
        enclave_identity: Option<&'a RawValue>,
        signature: String,
    }
    let s: Signed<'_> =
        serde_json::from_slice(body).map_err(|e| invalid(url, format!("not JSON: {e}")))?;
    let raw = match field {
        "tcbInfo" => s.tcb_info,
        _ => s.enclave_identity,
    }
    .ok_or_else(|| invalid(url, format!("no {field} object")))?;
    let sig =
        hex::decode(&s.signature).map_err(|_| invalid(url, "signature is not hex".to_string()))?;
    Ok((raw.get().to_string(), sig))
}
