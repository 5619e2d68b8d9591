//! The protocol exactly as an upstream Confidential Containers guest (`kbs_protocol` with its
//! sample attester) speaks it, written from the protocol facts with raw HTTP and JSON rather than
//! with Coffer's client — plus every bad input the protocol endpoints must refuse.

mod common;

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine,
};
use coffer_jose::{TeeKeyAlgorithm, TeeKeyPair};
use coffer_wire::{JweResponse, TeePubKey};
use common::TestKbs;
use reqwest::{header, Client, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha384};

const SECRET: &[u8] = b"upstream-compatible secret";

/// The runtime data upstream hashes, canonicalized by hand (RFC 8785: sorted keys, no spaces).
fn canonical_runtime_data(key: &TeePubKey, nonce: &str) -> String {
    let TeePubKey::EC { crv, alg, x, y } = key else {
        panic!("EC key expected")
    };
    format!(
        r#"{{"additional-evidence":"","nonce":"{nonce}","tee-pubkey":{{"alg":"{alg}","crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}}}"#
    )
}

fn sample_evidence(key: &TeePubKey, nonce: &str) -> Value {
    let digest = Sha384::digest(canonical_runtime_data(key, nonce).as_bytes());
    json!({"svn": "1", "report_data": STANDARD.encode(digest)})
}

fn cookie_of(resp: &Response) -> String {
    resp.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap().trim().to_string())
        .find(|c| c.starts_with("kbs-session-id="))
        .expect("kbs-session-id cookie")
}

async fn auth(http: &Client, url: &str) -> (String, String) {
    let resp = http
        .post(format!("{url}/kbs/v0/auth"))
        .json(&json!({"version": "0.4.0", "tee": "sample",
            "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = cookie_of(&resp);
    let challenge: Value = resp.json().await.unwrap();
    assert_eq!(challenge["extra-params"], "");
    let nonce = challenge["nonce"].as_str().unwrap().to_string();
    assert_eq!(STANDARD.decode(&nonce).unwrap().len(), 32);
    (cookie, nonce)
}

fn attest_body(key: &TeePubKey, nonce: &str, evidence: Value) -> Value {
    json!({
        "init-data": null,
        "runtime-data": {"nonce": nonce, "tee-pubkey": key},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    })
}

async fn post_attest(http: &Client, url: &str, cookie: Option<&str>, body: &Value) -> Response {
    let mut req = http.post(format!("{url}/kbs/v0/attest")).json(body);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    req.send().await.unwrap()
}

async fn error_of(resp: Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    let ty = body["type"].as_str().unwrap().to_string();
    assert!(
        ty.starts_with("https://github.com/confidential-containers/kbs/errors/"),
        "{ty}"
    );
    (
        status,
        ty.rsplit('/').next().unwrap().to_string(),
        body["detail"].as_str().unwrap().to_string(),
    )
}

async fn start() -> TestKbs {
    let kbs = TestKbs::start().await;
    kbs.admin()
        .set_resource("default/test/key", SECRET.to_vec())
        .await
        .unwrap();
    kbs
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_guest_flow_with_cookie_session() {
    let kbs = start().await;
    let http = Client::new();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let (cookie, nonce) = auth(&http, &kbs.url).await;
    let body = attest_body(
        key.public_jwk(),
        &nonce,
        sample_evidence(key.public_jwk(), &nonce),
    );
    let resp = post_attest(&http, &kbs.url, Some(&cookie), &body).await;
    assert_eq!(resp.status(), 200);
    let token = resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();

    // The token is an ES256 EAR JWT in Trustee's layout.
    let mut parts = token.split('.');
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap()).unwrap();
    let cpu0 = &claims["submods"]["cpu0"];
    assert_eq!(cpu0["ear.status"], "affirming");
    assert_eq!(
        cpu0["ear.veraison.annotated-evidence"]["runtime_data_claims"]["tee-pubkey"],
        serde_json::to_value(key.public_jwk()).unwrap()
    );
    assert_eq!(
        cpu0["ear.veraison.annotated-evidence"]["sample"]["svn"],
        "1"
    );
    assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap());

    // The resource, with only the session cookie (as upstream's RCAR client does).
    let resp = http
        .get(format!("{}/kbs/v0/resource/default/test/key", kbs.url))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let jwe: Value = resp.json().await.unwrap();
    let protected: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jwe["protected"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(protected["alg"], "ECDH-ES+A256KW");
    assert_eq!(protected["enc"], "A256GCM");
    let jwe: JweResponse = serde_json::from_value(jwe).unwrap();
    assert_eq!(key.decrypt(&jwe).unwrap().as_slice(), SECRET);

    // The same token as a bearer token (upstream's token client), without the cookie.
    let resp = http
        .get(format!("{}/kbs/v0/resource/default/test/key", kbs.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_refuses_bad_requests() {
    let kbs = start().await;
    let http = Client::new();
    let url = format!("{}/kbs/v0/auth", kbs.url);
    let cases: Vec<(Vec<u8>, u16, &str, &str)> = vec![
        (b"{not json".to_vec(), 400, "InvalidRequest", "malformed"),
        (
            br#"{"version":"0.3.0","tee":"sample","extra-params":{}}"#.to_vec(),
            400,
            "InvalidRequest",
            "0.4.0",
        ),
        (
            br#"{"version":"0.4.0","tee":"quantum","extra-params":{}}"#.to_vec(),
            400,
            "InvalidRequest",
            "quantum",
        ),
        (
            br#"{"version":"0.4.0","tee":"csv","extra-params":{}}"#.to_vec(),
            401,
            "AttestationError",
            "not supported",
        ),
        // Just over the 1 MiB limit: small enough that the whole body is on the wire before the
        // server answers, so the client reads the 413 instead of a reset.
        (
            vec![b' '; (1 << 20) + 1024],
            413,
            "PayloadTooLarge",
            "exceeds",
        ),
    ];
    for (body, status, kind, needle) in cases {
        // A server that refuses an oversized body may close before the client has written it
        // all; on such a reset, send again (the 413 must still be seen).
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            match http
                .post(&url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await
            {
                Ok(r) => break r,
                Err(e) if attempt < 5 && e.is_request() => continue,
                Err(e) => panic!("{e}"),
            }
        };
        assert!(resp.headers().get(header::SET_COOKIE).is_none());
        let (s, k, d) = error_of(resp).await;
        assert_eq!((s, k.as_str()), (status, kind), "{d}");
        assert!(d.contains(needle), "{d} should mention {needle}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn attest_refuses_bad_requests_and_keeps_the_challenge_usable() {
    let kbs = start().await;
    let http = Client::new();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let (cookie, nonce) = auth(&http, &kbs.url).await;
    let good = attest_body(
        key.public_jwk(),
        &nonce,
        sample_evidence(key.public_jwk(), &nonce),
    );

    // No cookie.
    let (s, k, _) = error_of(post_attest(&http, &kbs.url, None, &good).await).await;
    assert_eq!((s, k.as_str()), (401, "AttestationError"));
    // Unknown session.
    let (_, _, d) =
        error_of(post_attest(&http, &kbs.url, Some("kbs-session-id=00112233"), &good).await).await;
    assert!(d.contains("session"), "{d}");
    // Malformed JSON.
    let resp = http
        .post(format!("{}/kbs/v0/attest", kbs.url))
        .header(header::COOKIE, &cookie)
        .header(header::CONTENT_TYPE, "application/json")
        .body("{\"runtime-data\": 5}")
        .send()
        .await
        .unwrap();
    let (s, k, _) = error_of(resp).await;
    assert_eq!((s, k.as_str()), (400, "InvalidRequest"));
    // A nonce that is not the challenge's.
    let other_nonce = STANDARD.encode([9u8; 32]);
    let wrong = attest_body(
        key.public_jwk(),
        &other_nonce,
        sample_evidence(key.public_jwk(), &other_nonce),
    );
    let (_, _, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &wrong).await).await;
    assert!(d.contains("nonce"), "{d}");
    // A tee-pubkey that is not a valid key.
    let mut bad_key = good.clone();
    bad_key["runtime-data"]["tee-pubkey"]["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 31]));
    let (_, _, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &bad_key).await).await;
    assert!(d.contains("tee-pubkey"), "{d}");

    // None of that burned the challenge: the genuine request still succeeds.
    let resp = post_attest(&http, &kbs.url, Some(&cookie), &good).await;
    assert_eq!(resp.status(), 200);
    // Replaying it fails: each nonce is single use.
    let (s, _, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &good).await).await;
    assert_eq!(s, 401);
    assert!(d.contains("already used"), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn evidence_for_another_key_is_refused_and_burns_the_nonce() {
    let kbs = start().await;
    let http = Client::new();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let thief = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let (cookie, nonce) = auth(&http, &kbs.url).await;
    // Evidence bound to `key`, but the request asks for resources encrypted to `thief`.
    let body = attest_body(
        thief.public_jwk(),
        &nonce,
        sample_evidence(key.public_jwk(), &nonce),
    );
    let (s, k, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &body).await).await;
    assert_eq!((s, k.as_str()), (401, "AttestationError"));
    assert!(d.contains("report data"), "{d}");
    // The evidence was examined, so the nonce is spent.
    let good = attest_body(
        key.public_jwk(),
        &nonce,
        sample_evidence(key.public_jwk(), &nonce),
    );
    let (_, _, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &good).await).await;
    assert!(d.contains("already used"), "{d}");
    // And the failed session holds no token.
    let resp = http
        .get(format!("{}/kbs/v0/resource/default/test/key", kbs.url))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    let (s, k, _) = error_of(resp).await;
    assert_eq!((s, k.as_str()), (401, "TokenNotFound"));
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_session_is_refused() {
    let kbs = TestKbs::start_with(|c| c.session_ttl_secs = 1).await;
    let http = Client::new();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let (cookie, nonce) = auth(&http, &kbs.url).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let body = attest_body(
        key.public_jwk(),
        &nonce,
        sample_evidence(key.public_jwk(), &nonce),
    );
    let (s, _, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &body).await).await;
    assert_eq!(s, 401);
    assert!(d.contains("expired"), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn resource_requests_need_a_valid_token() {
    let kbs = start().await;
    let http = Client::new();
    let url = format!("{}/kbs/v0/resource/default/test/key", kbs.url);
    let (s, k, _) = error_of(http.get(&url).send().await.unwrap()).await;
    assert_eq!((s, k.as_str()), (401, "TokenNotFound"));
    let (s, k, _) = error_of(http.get(&url).bearer_auth("a.b.c").send().await.unwrap()).await;
    assert_eq!((s, k.as_str()), (401, "TokenVerifierError"));

    // A token from another KBS (another signing key) is refused.
    let other = TestKbs::start().await;
    let foreign = other.tee().attest().await.unwrap();
    let (s, k, _) = error_of(http.get(&url).bearer_auth(&foreign).send().await.unwrap()).await;
    assert_eq!((s, k.as_str()), (401, "TokenVerifierError"));

    // A genuine token with a changed claim (affirming forged onto another key) is refused.
    let token = kbs.tee().attest().await.unwrap();
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    claims["exp"] = json!(claims["exp"].as_u64().unwrap() + 3600);
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let forged = parts.join(".");
    let (s, k, _) = error_of(http.get(&url).bearer_auth(&forged).send().await.unwrap()).await;
    assert_eq!((s, k.as_str()), (401, "TokenVerifierError"));
    // The genuine one works.
    assert_eq!(
        http.get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn real_snp_evidence_from_another_session_is_refused_on_its_binding() {
    let kbs = start().await;
    let http = Client::new();
    let resp = http
        .post(format!("{}/kbs/v0/auth", kbs.url))
        .json(&json!({"version": "0.4.0", "tee": "snp", "extra-params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "snp is a supported TEE");
    let cookie = cookie_of(&resp);
    let nonce = resp.json::<Value>().await.unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_string();
    // Genuine Genoa evidence (it verifies against AMD's roots) but bound to someone else's
    // challenge: the KBS must refuse it on the report data.
    let evidence: Value = serde_json::from_str(include_str!(
        "../../verifier/testdata/snp/genoa-evidence.json"
    ))
    .unwrap();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let body = attest_body(key.public_jwk(), &nonce, evidence.clone());
    let (s, k, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &body).await).await;
    assert_eq!((s, k.as_str()), (401, "AttestationError"));
    assert!(d.contains("report data"), "{d}");

    // The same evidence with a flipped measurement fails earlier, on the signature.
    let (cookie, nonce) = {
        let resp = http
            .post(format!("{}/kbs/v0/auth", kbs.url))
            .json(&json!({"version": "0.4.0", "tee": "snp", "extra-params": {}}))
            .send()
            .await
            .unwrap();
        let c = cookie_of(&resp);
        (
            c,
            resp.json::<Value>().await.unwrap()["nonce"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    let mut forged = evidence;
    forged["attestation_report"]["measurement"][0] = json!(1);
    let body = attest_body(key.public_jwk(), &nonce, forged);
    let (_, _, d) = error_of(post_attest(&http, &kbs.url, Some(&cookie), &body).await).await;
    assert!(d.contains("signature"), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn device_evidence_is_verified_and_bound_or_refused() {
    let kbs = start().await;
    let http = Client::new();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let attest_with = |additional: String| {
        let http = http.clone();
        let url = kbs.url.clone();
        let pk = key.public_jwk().clone();
        async move {
            let (cookie, nonce) = auth(&http, &url).await;
            // Sample evidence bound to the runtime data *including* this additional evidence.
            let rd =
                coffer_wire::binding::runtime_data_canonical(&pk, &nonce, &additional).unwrap();
            let body = json!({
                "runtime-data": {"nonce": nonce, "tee-pubkey": pk},
                "tee-evidence": {
                    "primary_evidence": {"svn": "1", "report_data": STANDARD.encode(Sha384::digest(&rd))},
                    "additional_evidence": additional,
                },
            });
            error_of(post_attest(&http, &url, Some(&cookie), &body).await).await
        }
    };
    // A real Hopper report, but signed for another nonce: refused on the binding.
    let report = hex::decode(
        include_str!("../../verifier/testdata/nvidia/hopperAttestationReport.txt").trim(),
    )
    .unwrap();
    let chain = include_bytes!("../../verifier/testdata/nvidia/hopper_cert_chain_case1.txt");
    let gpu = json!({"nvidia": ["gpu", {"device_evidence_list": [
        {"evidence": STANDARD.encode(&report), "certificate": STANDARD.encode(chain), "arch": "HOPPER"}
    ]}]});
    let (s, k, d) = attest_with(gpu.to_string()).await;
    assert_eq!((s, k.as_str()), (401, "AttestationError"));
    assert!(d.contains("nvidia") && d.contains("report data"), "{d}");
    // Unknown device types and malformed entries are refused.
    let (_, _, d) = attest_with(json!({"quantum": ["qpu", {}]}).to_string()).await;
    assert!(d.contains("not supported"), "{d}");
    let (_, _, d) = attest_with("[1,2]".into()).await;
    assert!(d.contains("JSON object"), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_attest_cookie_carries_the_sealed_token_and_frees_the_session() {
    let kbs = start().await;
    let http = Client::new();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let (auth_cookie, nonce) = auth(&http, &kbs.url).await;
    let body = attest_body(
        key.public_jwk(),
        &nonce,
        sample_evidence(key.public_jwk(), &nonce),
    );
    let resp = post_attest(&http, &kbs.url, Some(&auth_cookie), &body).await;
    assert_eq!(resp.status(), 200);
    // A client that keeps cookies (reqwest's cookie store, as upstream's) gets a new one: the
    // token sealed for this KBS, not readable by the client or the network.
    let sealed = cookie_of(&resp);
    let token = resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(sealed, auth_cookie);
    assert!(sealed.starts_with("kbs-session-id=v1."), "{sealed}");
    assert!(!sealed.contains(token.split('.').nth(1).unwrap()));
    let get = |cookie: String| {
        let http = http.clone();
        let url = format!("{}/kbs/v0/resource/default/test/key", kbs.url);
        async move {
            http.get(url)
                .header(header::COOKIE, cookie)
                .send()
                .await
                .unwrap()
        }
    };
    // Until the sealed cookie comes back, the cookie of /auth works too.
    assert_eq!(get(auth_cookie.clone()).await.status(), 200);
    let resp = get(sealed.clone()).await;
    assert_eq!(resp.status(), 200);
    let jwe: JweResponse = resp.json().await.unwrap();
    assert_eq!(key.decrypt(&jwe).unwrap().as_slice(), SECRET);
    // Once it has, the session no longer holds the token: the old cookie gets nothing, the
    // sealed one goes on working.
    let (status, ty, _) = error_of(get(auth_cookie).await).await;
    assert_eq!((status, ty.as_str()), (401, "TokenNotFound"));
    assert_eq!(get(sealed.clone()).await.status(), 200);
    // An altered sealed cookie is refused, naming the cookie.
    let mut altered = sealed.into_bytes();
    let i = altered.len() - 10;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let (status, ty, detail) = error_of(get(String::from_utf8(altered).unwrap()).await).await;
    assert_eq!(
        (status, ty.as_str()),
        (401, "TokenVerifierError"),
        "{detail}"
    );
    assert!(detail.contains("session cookie"), "{detail}");
}
