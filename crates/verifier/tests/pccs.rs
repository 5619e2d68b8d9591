//! DCAP collateral from a PCCS: a real HTTP server on loopback answers the PCCS v4 API with
//! Intel-signed collateral captured for the test quotes, and the verifiers fetch, cache and use it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_verifier::{
    dcap::CollateralKey,
    pccs::{PccsClient, DEFAULT_REFRESH},
    Expected, Trust, Verifiers,
};
use coffer_wire::Tee;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};

const TDX_QUOTE: &[u8] = include_bytes!("../testdata/tdx/dcapqvl_tdx_quote");
const TDX_COLL: &str = include_str!("../testdata/tdx/dcapqvl_tdx_quote_collateral.json");
const SGX_QUOTE: &[u8] = include_bytes!("../testdata/sgx/dcapqvl_sgx_quote");
const SGX_COLL: &str = include_str!("../testdata/sgx/dcapqvl_sgx_quote_collateral.json");

/// 2025-07-01T00:00:00Z: inside the collateral windows.
fn july_2025() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_751_328_000)
}

/// How the fake PCCS misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Honest,
    /// Re-serializes the signed TCB info with spaces, as a careless proxy would.
    ReformattedTcbInfo,
}

struct Pccs {
    /// Collateral per (tee, fmspc) as the captured JSON (hex fields).
    by_fmspc: HashMap<(String, String), Value>,
    /// Collateral per PCK CA (`processor`, `platform`), for the PCK CRL.
    by_ca: HashMap<String, Value>,
    requests: Mutex<Vec<String>>,
    mode: Mode,
}

fn chain_header(name: &'static str, pem: &str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(name),
        HeaderValue::from_str(&utf8_percent_encode(pem, NON_ALPHANUMERIC).to_string()).unwrap(),
    )
}

fn field<'a>(c: &'a Value, k: &str) -> &'a str {
    c[k].as_str().unwrap()
}

async fn tcb(
    State(p): State<Arc<Pccs>>,
    uri: axum::http::Uri,
    Query(q): Query<HashMap<String, String>>,
) -> axum::response::Response {
    p.requests.lock().unwrap().push(uri.to_string());
    let tee = uri.path().split('/').nth(1).unwrap().to_string();
    let Some(c) = p.by_fmspc.get(&(tee, q["fmspc"].to_lowercase())) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut info = field(c, "tcb_info").to_string();
    if p.mode == Mode::ReformattedTcbInfo {
        let v: Value = serde_json::from_str(&info).unwrap();
        info = serde_json::to_string_pretty(&v).unwrap();
    }
    let body = format!(
        r#"{{"tcbInfo":{info},"signature":"{}"}}"#,
        field(c, "tcb_info_signature")
    );
    let mut h = HeaderMap::new();
    let (n, v) = chain_header("tcb-info-issuer-chain", field(c, "tcb_info_issuer_chain"));
    h.insert(n, v);
    (h, body).into_response()
}

/// The other endpoints do not depend on the FMSPC: answer from the one collateral of that TEE.
fn any_for(p: &Pccs, tee: &str) -> Value {
    p.by_fmspc
        .iter()
        .find(|((t, _), _)| t == tee)
        .map(|(_, c)| c.clone())
        .unwrap()
}

async fn qe_identity(State(p): State<Arc<Pccs>>, uri: axum::http::Uri) -> impl IntoResponse {
    p.requests.lock().unwrap().push(uri.to_string());
    let tee = uri.path().split('/').nth(1).unwrap();
    let c = any_for(&p, tee);
    let body = format!(
        r#"{{"enclaveIdentity":{},"signature":"{}"}}"#,
        field(&c, "qe_identity"),
        field(&c, "qe_identity_signature")
    );
    let mut h = HeaderMap::new();
    let (n, v) = chain_header(
        "sgx-enclave-identity-issuer-chain",
        field(&c, "qe_identity_issuer_chain"),
    );
    h.insert(n, v);
    (h, body)
}

async fn pck_crl(
    State(p): State<Arc<Pccs>>,
    uri: axum::http::Uri,
    Query(q): Query<HashMap<String, String>>,
) -> axum::response::Response {
    p.requests.lock().unwrap().push(uri.to_string());
    let Some(c) = p.by_ca.get(&q["ca"]) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut h = HeaderMap::new();
    let (n, v) = chain_header("sgx-pck-crl-issuer-chain", field(c, "pck_crl_issuer_chain"));
    h.insert(n, v);
    (h, hex::decode(field(c, "pck_crl")).unwrap()).into_response()
}

async fn root_crl(State(p): State<Arc<Pccs>>, uri: axum::http::Uri) -> impl IntoResponse {
    p.requests.lock().unwrap().push(uri.to_string());
    // A PCCS serves the root CA CRL as hex.
    field(&any_for(&p, "tdx"), "root_ca_crl").to_string()
}

/// Starts the fake PCCS on loopback; returns its URL and state.
async fn start(mode: Mode) -> (String, Arc<Pccs>) {
    let mut by_fmspc = HashMap::new();
    let mut by_ca = HashMap::new();
    for (tee, coll, quote) in [("tdx", TDX_COLL, TDX_QUOTE), ("sgx", SGX_COLL, SGX_QUOTE)] {
        let c: Value = serde_json::from_str(coll).unwrap();
        by_ca.insert(CollateralKey::of_quote(quote).unwrap().ca, c.clone());
        let info: Value = serde_json::from_str(field(&c, "tcb_info")).unwrap();
        let fmspc = info["fmspc"].as_str().unwrap().to_lowercase();
        by_fmspc.insert((tee.to_string(), fmspc), c);
    }
    let state = Arc::new(Pccs {
        by_fmspc,
        by_ca,
        requests: Mutex::new(Vec::new()),
        mode,
    });
    let app = Router::new()
        .route("/{tee}/certification/v4/tcb", get(tcb))
        .route("/{tee}/certification/v4/qe/identity", get(qe_identity))
        .route("/sgx/certification/v4/pckcrl", get(pck_crl))
        .route("/sgx/certification/v4/rootcacrl", get(root_crl))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

fn expected() -> Expected<'static> {
    Expected {
        report_data: None,
        init_data_digest: None,
        now: july_2025(),
    }
}

fn verifiers(url: &str) -> Verifiers {
    let mut v = Verifiers::new(Trust::default());
    v.set_pccs(PccsClient::new(url, DEFAULT_REFRESH).unwrap());
    v
}

#[tokio::test]
async fn tdx_and_sgx_quotes_verify_with_collateral_fetched_once_per_platform() {
    let (url, pccs) = start(Mode::Honest).await;
    let v = verifiers(&format!("{url}/sgx/certification/v4/"));

    let tdx = json!({ "quote": STANDARD.encode(TDX_QUOTE) });
    // Without prepare nothing was fetched: verification refuses, naming the PCCS.
    let err = v.verify(Tee::Tdx, &tdx, &expected()).unwrap_err();
    assert!(err.to_string().contains("PCCS"), "{err}");

    v.prepare(Tee::Tdx, &tdx).await.unwrap();
    let claims = v.verify(Tee::Tdx, &tdx, &expected()).unwrap();
    assert_eq!(claims["tcb_status"], "UpToDate");
    let key = CollateralKey::of_quote(TDX_QUOTE).unwrap();
    {
        let reqs = pccs.requests.lock().unwrap();
        assert_eq!(reqs.len(), 4, "{reqs:?}");
        assert!(reqs
            .iter()
            .any(|r| r == &format!("/tdx/certification/v4/tcb?fmspc={}", key.fmspc)));
        assert!(reqs
            .iter()
            .any(|r| r == &format!("/sgx/certification/v4/pckcrl?ca={}&encoding=der", key.ca)));
    }

    // Cached: a second attestation of the same platform fetches nothing.
    v.prepare(Tee::Tdx, &tdx).await.unwrap();
    v.verify(Tee::Tdx, &tdx, &expected()).unwrap();
    assert_eq!(pccs.requests.lock().unwrap().len(), 4);

    // SGX: another platform, fetched from the SGX endpoints.
    let sgx = json!({ "quote": STANDARD.encode(SGX_QUOTE) });
    v.prepare(Tee::Sgx, &sgx).await.unwrap();
    let claims = v.verify(Tee::Sgx, &sgx, &expected()).unwrap();
    assert_eq!(claims["tcb_status"], "ConfigurationAndSWHardeningNeeded");
    let reqs = pccs.requests.lock().unwrap();
    assert_eq!(reqs.len(), 8, "{reqs:?}");
    assert!(reqs
        .iter()
        .any(|r| r.starts_with("/sgx/certification/v4/tcb?fmspc=")));
}

#[tokio::test]
async fn collateral_altered_in_transit_fails_verification() {
    let (url, _) = start(Mode::ReformattedTcbInfo).await;
    let v = verifiers(&url);
    let tdx = json!({ "quote": STANDARD.encode(TDX_QUOTE) });
    v.prepare(Tee::Tdx, &tdx).await.unwrap();
    let err = v.verify(Tee::Tdx, &tdx, &expected()).unwrap_err();
    assert!(
        err.to_string()
            .contains("Signature is invalid for tcb_info"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unknown_platform_or_unreachable_pccs_fails_with_the_url() {
    let (url, _) = start(Mode::Honest).await;
    // A platform the PCCS does not know: 404 on the TCB info.
    let key = CollateralKey {
        sgx: false,
        fmspc: "000000000000".into(),
        ca: "platform".into(),
    };
    let client = PccsClient::new(&url, DEFAULT_REFRESH).unwrap();
    let err = client.fetch(&key).await.unwrap_err().to_string();
    assert!(
        err.contains("/tdx/certification/v4/tcb?fmspc=000000000000") && err.contains("404"),
        "{err}"
    );

    // Nothing listens here: the error names the URL; verification is refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let v = verifiers(&format!("http://{dead}"));
    let tdx = json!({ "quote": STANDARD.encode(TDX_QUOTE) });
    let err = v.prepare(Tee::Tdx, &tdx).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("cannot reach the PCCS at http://{dead}")),
        "{err}"
    );
    assert!(v.verify(Tee::Tdx, &tdx, &expected()).is_err());

    assert!(PccsClient::new("ftp://x", DEFAULT_REFRESH).is_err());
}
