//! HTTP handlers of the KBS protocol (`/kbs/v0/auth`, `/attest`, `/resource/…`), the admin API,
//! `/metrics` and `/healthz`.

use std::{sync::Arc, time::Instant};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use axum::{
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine,
};
use coffer_verifier::Expected;
use coffer_wire::{
    binding,
    ear::{self, EarClaims, VerifierId},
    error::ErrorKind,
    initdata::{self, INITDATA_FORMAT},
    reference, Attestation, Challenge, HashAlgorithm, Request as AuthRequest, Tee, BASE_PATH,
    NONCE_LEN, PROTOCOL_VERSION, SESSION_COOKIE,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::KbsError,
    policy,
    store::{now_secs, NonceClaim, PolicyKind, Session},
    token::TokenKeys,
    Kbs,
};

/// Largest accepted body of a protocol request (`/auth`, `/attest`).
pub const MAX_PROTOCOL_BODY: usize = 1 << 20;
/// Largest accepted admin body (resources, policies, reference values).
pub const MAX_ADMIN_BODY: usize = 8 << 20;

type Shared = State<Arc<Kbs>>;

/// The router of every endpoint.
pub fn router(kbs: Arc<Kbs>) -> Router {
    let api = Router::new()
        .route("/auth", post(auth))
        .route("/attest", post(attest))
        .route(
            "/resource/{*path}",
            get(get_resource).post(set_resource).delete(delete_resource),
        )
        .route(
            "/resource-policy",
            post(set_resource_policy).get(get_resource_policy),
        )
        .route(
            "/attestation-policy",
            post(set_attestation_policy).get(get_attestation_policy),
        )
        .route(
            "/reference-values",
            post(set_reference_values).get(get_reference_values),
        )
        .route(
            "/reference-values/{name}",
            axum::routing::delete(delete_reference_value),
        )
        .route(coffer_wire::mesh::CERTIFICATE_PATH, post(mesh_certificate))
        .route(coffer_wire::mesh::CA_PATH, get(mesh_ca))
        .route("/mesh/certificates", get(mesh_certificates));
    Router::new()
        .nest(BASE_PATH, api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async { KbsError::new(ErrorKind::InvalidRequestPath, "no such endpoint") })
        .layer(middleware::from_fn_with_state(kbs.clone(), observe))
        .with_state(kbs)
}

/// Counts and times every request by its route.
async fn observe(State(kbs): Shared, req: Request, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let start = Instant::now();
    let resp = next.run(req).await;
    kbs.metrics
        .latency
        .with_label_values(&[endpoint])
        .observe(start.elapsed().as_secs_f64());
    kbs.metrics
        .requests
        .with_label_values(&[endpoint, resp.status().as_str()])
        .inc();
    resp
}

fn endpoint_label(path: &str) -> &'static str {
    let rest = path.strip_prefix(BASE_PATH).unwrap_or(path);
    match rest {
        "/auth" => "auth",
        "/attest" => "attest",
        "/resource-policy" => "resource-policy",
        "/attestation-policy" => "attestation-policy",
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        r if r.starts_with("/resource/") => "resource",
        r if r.starts_with("/reference-values") => "reference-values",
        _ => "other",
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

/// Reads a request body of at most `limit` bytes within the body read timeout. A body larger
/// than the limit is `PayloadTooLarge` (413), one that ends before its declared length
/// `IncompleteBody` (400), one that does not arrive in time `RequestTimeout` (408).
async fn read_body(
    kbs: &Kbs,
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, KbsError> {
    use http_body_util::BodyExt;
    let too_large = || {
        KbsError::new(
            ErrorKind::PayloadTooLarge,
            format!("request body exceeds {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    let wait = std::time::Duration::from_secs(kbs.config.body_read_timeout_secs);
    let read = async {
        let mut body = body;
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                KbsError::new(
                    ErrorKind::IncompleteBody,
                    format!("the request body ended early: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(wait, read).await.unwrap_or_else(|_| {
        Err(KbsError::new(
            ErrorKind::RequestTimeout,
            format!("the request body did not arrive within {}s", wait.as_secs()),
        ))
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, KbsError> {
    serde_json::from_slice(bytes)
        .map_err(|e| KbsError::new(ErrorKind::InvalidRequest, format!("malformed {what}: {e}")))
}

fn attestation_error(detail: impl Into<String>) -> KbsError {
    KbsError::new(ErrorKind::AttestationError, detail)
}

/// The largest token sealed into a session cookie (base64 makes the cookie about 4/3 of it);
/// a larger one is kept in the session store instead.
const MAX_SEALED_TOKEN: usize = 2800;

fn set_cookie(id: &str, ttl: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={id}; Path={BASE_PATH}; Max-Age={ttl}; HttpOnly"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The hash algorithm the TEE uses for its runtime-data binding (upstream: SHA-512 for IBM SE,
/// SHA-384 otherwise).
fn binding_hash(tee: Tee) -> HashAlgorithm {
    if tee == Tee::Se {
        HashAlgorithm::Sha512
    } else {
        HashAlgorithm::Sha384
    }
}

async fn auth(State(kbs): Shared, headers: HeaderMap, body: Body) -> Result<Response, KbsError> {
    let bytes = read_body(&kbs, body, &headers, MAX_PROTOCOL_BODY).await?;
    let req: AuthRequest = parse_json(&bytes, "auth request")?;
    if req.version != PROTOCOL_VERSION {
        return Err(KbsError::new(
            ErrorKind::InvalidRequest,
            format!(
                "protocol version {:?} is not supported; this KBS speaks {PROTOCOL_VERSION}",
                req.version
            ),
        ));
    }
    if req.tee == Tee::Se {
        if kbs.se.is_none() {
            return Err(attestation_error(
                "IBM Secure Execution is not configured on this KBS (--se-host-key-document)",
            ));
        }
    } else {
        kbs.verifiers
            .check_enabled(req.tee)
            .map_err(|e| attestation_error(e.to_string()))?;
    }
    // IBM SE: the challenge is an attestation request only the configured hosts can open; its
    // measurement key and nonce stay in the session.
    let se = match (&kbs.se, req.tee) {
        (Some(hosts), Tee::Se) => {
            let (arcb, secret) = coffer_verifier::se::challenge(hosts)
                .map_err(|e| attestation_error(e.to_string()))?;
            Some((STANDARD.encode(arcb), STANDARD.encode(secret.as_bytes())))
        }
        _ => None,
    };
    let rng = SystemRandom::new();
    let mut nonce = [0u8; NONCE_LEN];
    let mut id = [0u8; 16];
    rng.fill(&mut nonce)
        .and_then(|_| rng.fill(&mut id))
        .map_err(|_| attestation_error("random number generator failed"))?;
    let id = hex::encode(id);
    let nonce = STANDARD.encode(nonce);
    let ttl = kbs.config.session_ttl_secs;
    kbs.store
        .insert_session(
            &id,
            &Session {
                tee: req.tee,
                nonce: nonce.clone(),
                nonce_used: false,
                expires_at: now_secs() + ttl,
                token: None,
                se_secret: se.as_ref().map(|(_, secret)| secret.clone()),
            },
        )
        .await?;
    let extra = match &se {
        Some((arcb, _)) => json!({"selected-hash-algorithm": "sha512", "arcb": arcb}),
        None => json!(""),
    };
    let mut resp = Json(Challenge {
        nonce,
        extra_params: extra,
    })
    .into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&id, ttl));
    Ok(resp)
}

/// IBM SE evidence: the Ultravisor's answer to this session's request, checked against the
/// registered images (reference value `se_image_tags`), the session's user data (the
/// runtime-data digest, then the initdata digest when the guest presented initdata) and the
/// configured hosts. The initdata is bound by the measured guest reporting it in the user data.
async fn verify_se(
    kbs: &Kbs,
    session: &Session,
    att: &Attestation,
    report_data: &[u8],
    init_data_digest: Option<&[u8]>,
) -> Result<coffer_verifier::Claims, String> {
    use coffer_verifier::se;
    let hosts = kbs
        .se
        .as_ref()
        .ok_or("IBM Secure Execution is not configured on this KBS")?;
    let secret = session
        .se_secret
        .as_deref()
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or("the session has no SE challenge; call /auth again")?;
    let secret = se::ChallengeSecret::from_bytes(&secret).map_err(|e| e.to_string())?;
    let evidence: se::Evidence = serde_json::from_value(att.tee_evidence.primary_evidence.clone())
        .map_err(|e| format!("SE evidence: {e}"))?;
    let refs = kbs
        .store
        .reference_values()
        .await
        .map_err(|e| e.to_string())?;
    let images = refs
        .get("se_image_tags")
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str())
                .map(se::ImageTags::from_hex)
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(|e| format!("reference value se_image_tags: {e}"))?
        .unwrap_or_default();
    if images.is_empty() {
        return Err("no SE image is registered (reference value se_image_tags)".into());
    }
    let mut user_data = report_data.to_vec();
    if let Some(d) = init_data_digest {
        user_data.extend_from_slice(d);
    }
    let claims =
        se::verify(&evidence, &secret, &images, &user_data, hosts).map_err(|e| e.to_string())?;
    let mut out = coffer_verifier::Claims::new();
    out.insert("image_tags".into(), json!(claims.image.to_hex()));
    out.insert("cuid".into(), json!(claims.cuid));
    out.insert("image_phkh".into(), json!(claims.image_phkh));
    out.insert("attestation_phkh".into(), json!(claims.attestation_phkh));
    Ok(out)
}

async fn attest(State(kbs): Shared, headers: HeaderMap, body: Body) -> Result<Response, KbsError> {
    let bytes = read_body(&kbs, body, &headers, MAX_PROTOCOL_BODY).await?;
    let att: Attestation = parse_json(&bytes, "attestation request")?;
    let id = session_cookie(&headers)
        .ok_or_else(|| {
            attestation_error(format!(
                "no {SESSION_COOKIE} cookie; call /auth first and send its cookie"
            ))
        })?
        .to_string();
    // Checks that change nothing come first: a wrong nonce or key does not burn the challenge.
    let session = kbs
        .store
        .get_session(&id)
        .await?
        .ok_or_else(|| attestation_error("session not found or expired; call /auth again"))?;
    if session.nonce_used {
        return Err(attestation_error(
            "the challenge nonce was already used; call /auth for a new one",
        ));
    }
    if att.runtime_data.nonce != session.nonce {
        return Err(attestation_error(
            "runtime-data nonce does not match this session's challenge",
        ));
    }
    coffer_jose::validate_public_key(&att.runtime_data.tee_pubkey)
        .map_err(|e| attestation_error(format!("tee-pubkey: {e}")))?;
    let init = match &att.init_data {
        Some(d) => {
            if d.format != INITDATA_FORMAT {
                return Err(KbsError::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "init-data format {:?} is not supported; use \"toml\"",
                        d.format
                    ),
                ));
            }
            let parsed = initdata::Initdata::parse(&d.body)
                .map_err(|e| KbsError::new(ErrorKind::InvalidRequest, e.to_string()))?;
            let digest = parsed.algorithm.digest(d.body.as_bytes());
            Some((digest, parsed))
        }
        None => None,
    };
    let tee = session.tee;
    let report_data = binding::runtime_data_digest(
        &att.runtime_data.tee_pubkey,
        &att.runtime_data.nonce,
        &att.tee_evidence.additional_evidence,
        binding_hash(tee),
    )
    .map_err(|e| attestation_error(e.to_string()))?;

    // From here on the nonce is spent, whatever the outcome.
    match kbs.store.claim_nonce(&id).await? {
        NonceClaim::Claimed(_) => {}
        NonceClaim::Replayed => {
            return Err(attestation_error(
                "the challenge nonce was already used; call /auth for a new one",
            ))
        }
        NonceClaim::NoSession => {
            return Err(attestation_error(
                "session not found or expired; call /auth again",
            ))
        }
    }
    let tee_name = tee.to_string();
    let fail = |kbs: &Kbs, e: String| {
        kbs.metrics
            .attestations
            .with_label_values(&[tee_name.as_str(), "error"])
            .inc();
        tracing::info!(tee = %tee_name, error = %e, "attestation failed");
        attestation_error(e)
    };
    let devices = match verify_additional(&att, std::time::SystemTime::now()) {
        Ok(d) => d,
        Err(e) => return Err(fail(&kbs, e)),
    };
    let claims = if tee == Tee::Se {
        verify_se(
            &kbs,
            &session,
            &att,
            &report_data,
            init.as_ref().map(|(d, _)| d.as_slice()),
        )
        .await
        .map_err(|e| fail(&kbs, e))?
    } else {
        if let Err(e) = kbs
            .verifiers
            .prepare(tee, &att.tee_evidence.primary_evidence)
            .await
        {
            return Err(fail(&kbs, e.to_string()));
        }
        kbs.verifiers
            .verify(
                tee,
                &att.tee_evidence.primary_evidence,
                &Expected {
                    report_data: Some(&report_data),
                    init_data_digest: init.as_ref().map(|(d, _)| d.as_slice()),
                    now: std::time::SystemTime::now(),
                },
            )
            .map_err(|e| fail(&kbs, e.to_string()))?
    };

    let mut evidence = json!({
        tee_name.clone(): claims,
        "report_data": hex::encode(&report_data),
        "runtime_data_claims": att.runtime_data,
    });
    if let Some((digest, parsed)) = &init {
        evidence["init_data"] = json!(hex::encode(digest));
        evidence["init_data_claims"] = json!(parsed.data);
    }
    let policies = kbs.policies.get(&kbs.store).await?;
    // The policy's input is the evidence with the TEE's name (no copy of it is made); the EAR
    // keeps the evidence alone.
    evidence["tee"] = json!(tee_name);
    let appraisal = policies.attestation.appraise(&evidence);
    if let Some(e) = evidence.as_object_mut() {
        e.remove("tee");
    }
    let appraisal = appraisal?;

    let now = now_secs();
    let mut submods = std::collections::BTreeMap::new();
    let mut device_outcomes = Vec::new();
    for (name, tee_name, claims) in devices {
        let mut input = json!({ tee_name: claims.clone() });
        input["tee"] = json!(tee_name);
        let a = policies.attestation.appraise(&input)?;
        device_outcomes.push((name.clone(), tee_name, a.status, a.reason.clone()));
        submods.insert(
            name,
            ear::Appraisal {
                status: a.status,
                trust_vector: a.trust_vector,
                policy_id: policies.attestation.id.clone(),
                evidence: json!({ tee_name: claims }),
            },
        );
    }

    submods.insert(
        ear::PRIMARY_SUBMOD.to_string(),
        ear::Appraisal {
            status: appraisal.status,
            trust_vector: appraisal.trust_vector,
            policy_id: policies.attestation.id.clone(),
            evidence,
        },
    );
    let claims = EarClaims {
        eat_profile: ear::EAR_PROFILE.into(),
        iat: now,
        exp: now + kbs.config.token_ttl_secs,
        verifier_id: VerifierId {
            developer: "https://github.com/coffer".into(),
            build: concat!("coffer-kbs ", env!("CARGO_PKG_VERSION")).into(),
        },
        tee: tee_name.clone(),
        submods,
    };
    let token = kbs
        .tokens
        .issue(&claims)
        .map_err(|e| KbsError::new(ErrorKind::AttestationError, e.to_string()))?;
    // The token is kept with the session, for clients that go on sending the cookie of
    // `/auth`; the response's cookie carries it too, sealed with the session id. A client that
    // comes back with the sealed cookie shows that it keeps cookies, and its session drops the
    // token: attested sessions then cost this KBS no memory. A token too large for a cookie
    // stays with the session only.
    kbs.store.set_session_token(&id, &token).await?;
    let cookie = if token.len() <= MAX_SEALED_TOKEN {
        kbs.tokens
            .seal_cookie(&format!("{id}.{token}"))
            .map_err(|e| KbsError::new(ErrorKind::AttestationError, e.to_string()))?
    } else {
        id.clone()
    };
    kbs.metrics
        .attestations
        .with_label_values(&[tee_name.as_str(), appraisal.status.as_str()])
        .inc();
    let digest = TokenKeys::claims_digest(&token);
    kbs.audit.attestation(
        ear::PRIMARY_SUBMOD,
        &tee_name,
        appraisal.status.as_str(),
        appraisal.reason.as_deref(),
        &digest,
    );
    for (name, tee, status, reason) in &device_outcomes {
        kbs.audit
            .attestation(name, tee, status.as_str(), reason.as_deref(), &digest);
    }
    let mut resp = Json(json!({ "token": token })).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&cookie, kbs.config.session_ttl_secs),
    );
    Ok(resp)
}

/// A validated resource path: `repo/type/tag` (a two-part `type/tag` means repository
/// `default`). Each part is ASCII letters, digits, `.`, `_` or `-`, and not `.` or `..`.
pub fn resource_path(raw: &str) -> Result<(String, [String; 3]), KbsError> {
    let bad = || {
        KbsError::new(
            ErrorKind::InvalidRequestPath,
            format!("invalid resource path {raw:?}; use <repository>/<type>/<tag>"),
        )
    };
    let parts: Vec<&str> = raw.split('/').collect();
    let parts: [&str; 3] = match parts.as_slice() {
        [r, t, g] => [r, t, g],
        [t, g] => ["default", t, g],
        _ => return Err(bad()),
    };
    for p in parts {
        if p.is_empty()
            || p == "."
            || p == ".."
            || p.len() > 255
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad());
        }
    }
    Ok((
        parts.join("/"),
        [parts[0].into(), parts[1].into(), parts[2].into()],
    ))
}

/// The caller's attestation token (its session's, or a bearer token) and its verified claims.
async fn attested(kbs: &Kbs, headers: &HeaderMap) -> Result<(EarClaims, String), KbsError> {
    let stored = match session_cookie(headers) {
        Some(cookie) => match cookie.strip_prefix(crate::token::SEALED_COOKIE_PREFIX) {
            Some(sealed) => {
                let opened = kbs
                    .tokens
                    .open_cookie(sealed)
                    .map_err(|e| KbsError::new(ErrorKind::TokenVerifierError, e.to_string()))?;
                let (id, token) = opened.split_once('.').ok_or_else(|| {
                    KbsError::new(
                        ErrorKind::TokenVerifierError,
                        "sealed session cookie is malformed",
                    )
                })?;
                kbs.store.forget_session_token(id).await?;
                Some(token.to_string())
            }
            None => kbs.store.get_session(cookie).await?.and_then(|s| s.token),
        },
        None => None,
    };
    let (claims, token) =
        match (stored, bearer(headers)) {
            (Some(token), _) => (kbs.tokens.claims_of_stored(&token), token),
            (None, Some(token)) => (kbs.tokens.verify(token), token.to_string()),
            (None, None) => return Err(KbsError::new(
                ErrorKind::TokenNotFound,
                "no attestation token: attest first (session cookie) or send Authorization: Bearer",
            )),
        };
    let claims = claims.map_err(|e| KbsError::new(ErrorKind::TokenVerifierError, e.to_string()))?;
    Ok((claims, token))
}

async fn get_resource(
    State(kbs): Shared,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<Response, KbsError> {
    let (path, [repo, ty, tag]) = resource_path(&raw)?;
    let (claims, token) = attested(&kbs, &headers).await?;
    let digest = TokenKeys::claims_digest(&token);
    let tee_pubkey = claims.tee_pubkey().ok_or_else(|| {
        KbsError::new(
            ErrorKind::TokenVerifierError,
            "attestation token carries no TEE public key",
        )
    })?;
    let policies = kbs.policies.get(&kbs.store).await?;
    let input = serde_json::to_value(&claims)
        .map_err(|e| KbsError::new(ErrorKind::PolicyEngineError, e.to_string()))?;
    let allowed = policies
        .resource
        .allow_resource(&input, [repo.as_str(), ty.as_str(), tag.as_str()])?;
    if !allowed {
        kbs.metrics.releases.with_label_values(&["denied"]).inc();
        kbs.audit.release(
            &claims.tee,
            &digest,
            &path,
            "deny",
            "resource policy denied",
        );
        return Err(KbsError::new(
            ErrorKind::PolicyDeny,
            format!("the resource policy denies access to {path}"),
        ));
    }
    let Some(value) = kbs.store.get_resource(&path).await? else {
        kbs.metrics.releases.with_label_values(&["not_found"]).inc();
        kbs.audit
            .release(&claims.tee, &digest, &path, "deny", "no such resource");
        return Err(KbsError::new(
            ErrorKind::ResourceNotFound,
            format!("resource {path} does not exist"),
        ));
    };
    let jwe = coffer_jose::encrypt(&tee_pubkey, &value)
        .map_err(|e| KbsError::new(ErrorKind::JweError, e.to_string()))?;
    kbs.metrics.releases.with_label_values(&["released"]).inc();
    kbs.audit.release(
        &claims.tee,
        &digest,
        &path,
        "release",
        "allowed by resource policy",
    );
    Ok(Json(jwe).into_response())
}

/// `POST /mesh/certificate`: a workload certificate for the identity the attested initdata's
/// `mesh.toml` names, when the resource policy allows it (`data.policy.allow` with the
/// resource path `/mesh/certificate/workload` and `input.mesh` = `{"identity", "peers"}`).
async fn mesh_certificate(
    State(kbs): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, KbsError> {
    use coffer_wire::mesh::{
        CertificateRequest, CertificateResponse, Issued, MeshConfig, MESH_TOML,
    };
    let (claims, token) = attested(&kbs, &headers).await?;
    let body = read_body(&kbs, body, &headers, MAX_PROTOCOL_BODY).await?;
    let req: CertificateRequest = serde_json::from_slice(&body).map_err(|e| {
        KbsError::new(
            ErrorKind::InvalidRequest,
            format!("the certificate request: {e}"),
        )
    })?;
    let digest = TokenKeys::claims_digest(&token);
    let primary = claims.submods.get(ear::PRIMARY_SUBMOD);
    let init_data = primary
        .and_then(|a| a.evidence.get("init_data"))
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string();
    let mesh_text = primary
        .and_then(|a| a.evidence.get("init_data_claims"))
        .and_then(|c| c.get(MESH_TOML))
        .and_then(|t| t.as_str())
        .ok_or_else(|| {
            KbsError::new(
                ErrorKind::PolicyDeny,
                "the attested initdata names no mesh identity (its mesh.toml): no mesh certificate",
            )
        })?;
    let mesh = MeshConfig::parse(mesh_text).map_err(|e| {
        KbsError::new(
            ErrorKind::InvalidRequest,
            format!("the attested initdata's {e}"),
        )
    })?;
    let policies = kbs.policies.get(&kbs.store).await?;
    let mut input = serde_json::to_value(&claims)
        .map_err(|e| KbsError::new(ErrorKind::PolicyEngineError, e.to_string()))?;
    input["mesh"] = json!({"identity": mesh.identity, "peers": mesh.peers});
    let path = "mesh/certificate/workload";
    if !policies
        .resource
        .allow_resource(&input, ["mesh", "certificate", "workload"])?
    {
        kbs.metrics.releases.with_label_values(&["denied"]).inc();
        kbs.audit
            .release(&claims.tee, &digest, path, "deny", "resource policy denied");
        return Err(KbsError::new(
            ErrorKind::PolicyDeny,
            format!(
                "the resource policy denies a mesh certificate to {}",
                mesh.identity
            ),
        ));
    }
    let ttl = std::time::Duration::from_secs(kbs.config.mesh_cert_ttl_secs);
    let (certificate, serial, not_after) = kbs
        .mesh
        .issue(&req.csr, &mesh.identity, ttl)
        .map_err(|e| KbsError::new(ErrorKind::InvalidRequest, e.to_string()))?;
    let record = Issued {
        serial: serial.clone(),
        identity: mesh.identity.clone(),
        init_data,
        tee: claims.tee.clone(),
        issued_at: now_secs(),
        not_after,
    };
    kbs.store
        .put_mesh_issued(&serial, &serde_json::to_vec(&record).unwrap_or_default())
        .await?;
    kbs.metrics.releases.with_label_values(&["released"]).inc();
    kbs.audit.release(
        &claims.tee,
        &digest,
        path,
        "release",
        &format!("mesh certificate {serial} for {}", mesh.identity),
    );
    tracing::info!(identity = %mesh.identity, serial, not_after, "mesh certificate issued");
    Ok(Json(CertificateResponse {
        certificate,
        ca: kbs.mesh.certificate().to_string(),
        identity: mesh.identity,
        peers: mesh.peers,
        not_after,
    })
    .into_response())
}

/// `GET /mesh/ca`: the mesh CA's certificate (PEM), public.
async fn mesh_ca(State(kbs): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        kbs.mesh.certificate().to_string(),
    )
        .into_response()
}

/// `GET /mesh/certificates` (admin): the mesh certificates that have not expired; expired
/// records are forgotten.
async fn mesh_certificates(State(kbs): Shared, headers: HeaderMap) -> Result<Response, KbsError> {
    admin(&kbs, &headers)?;
    let now = now_secs();
    let mut live = Vec::new();
    for (serial, bytes) in kbs.store.mesh_issued().await? {
        match serde_json::from_slice::<coffer_wire::mesh::Issued>(&bytes) {
            Ok(r) if r.not_after > now => live.push(r),
            _ => kbs.store.delete_mesh_issued(&serial).await?,
        }
    }
    live.sort_by(|a, b| (&a.identity, a.not_after).cmp(&(&b.identity, b.not_after)));
    Ok(Json(live).into_response())
}

fn admin(kbs: &Kbs, headers: &HeaderMap) -> Result<String, KbsError> {
    kbs.admin.check(headers)
}

async fn set_resource(
    State(kbs): Shared,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, KbsError> {
    let who = admin(&kbs, &headers)?;
    let (path, _) = resource_path(&raw)?;
    let bytes = read_body(&kbs, body, &headers, MAX_ADMIN_BODY).await?;
    kbs.store.put_resource(&path, &bytes).await?;
    kbs.audit.admin(&who, "set-resource", &path, "ok");
    Ok(StatusCode::OK)
}

async fn delete_resource(
    State(kbs): Shared,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, KbsError> {
    let who = admin(&kbs, &headers)?;
    let (path, _) = resource_path(&raw)?;
    if !kbs.store.delete_resource(&path).await? {
        return Err(KbsError::new(
            ErrorKind::ResourceNotFound,
            format!("resource {path} does not exist"),
        ));
    }
    kbs.audit.admin(&who, "delete-resource", &path, "ok");
    Ok(StatusCode::OK)
}

/// Body of the policy endpoints (upstream shape): the policy text, base64url or base64.
#[derive(Deserialize)]
struct PolicyBody {
    policy: String,
}

fn decode_policy(body: &[u8]) -> Result<String, KbsError> {
    let p: PolicyBody = parse_json(body, "policy request (expected {\"policy\": \"<base64>\"})")?;
    let raw = URL_SAFE_NO_PAD
        .decode(p.policy.trim_end_matches('='))
        .or_else(|_| STANDARD.decode(&p.policy))
        .map_err(|_| KbsError::new(ErrorKind::InvalidRequest, "policy is not base64"))?;
    String::from_utf8(raw)
        .map_err(|_| KbsError::new(ErrorKind::InvalidRequest, "policy is not UTF-8 text"))
}

async fn set_policy(
    kbs: &Kbs,
    kind: PolicyKind,
    headers: &HeaderMap,
    body: Body,
) -> Result<StatusCode, KbsError> {
    let who = admin(kbs, headers)?;
    let bytes = read_body(kbs, body, headers, MAX_ADMIN_BODY).await?;
    let text = decode_policy(&bytes)?;
    // Compiled now, within the limits and off the async workers; the compiled form serves the
    // requests after the write.
    kbs.policies
        .prepare(kind, &text, &kbs.store)
        .await
        .map_err(|e| {
            kbs.audit
                .admin(&who, &format!("set-{}-policy", kind.key()), "-", "rejected");
            match e {
                policy::PolicyError::TooComplex { .. } => {
                    KbsError::new(ErrorKind::PolicyTooComplex, e.to_string())
                }
                policy::PolicyError::Store(s) => s.into(),
                _ => KbsError::new(ErrorKind::InvalidRequest, e.to_string()),
            }
        })?;
    kbs.store.put_policy(kind, &text).await?;
    kbs.audit
        .admin(&who, &format!("set-{}-policy", kind.key()), "-", "ok");
    Ok(StatusCode::OK)
}

async fn get_policy(kbs: &Kbs, kind: PolicyKind, headers: &HeaderMap) -> Result<String, KbsError> {
    admin(kbs, headers)?;
    Ok(kbs.store.get_policy(kind).await?.unwrap_or_else(|| {
        match kind {
            PolicyKind::Resource => policy::DEFAULT_RESOURCE_POLICY,
            PolicyKind::Attestation => policy::DEFAULT_ATTESTATION_POLICY,
        }
        .to_string()
    }))
}

async fn set_resource_policy(
    State(kbs): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, KbsError> {
    set_policy(&kbs, PolicyKind::Resource, &headers, body).await
}

async fn set_attestation_policy(
    State(kbs): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, KbsError> {
    set_policy(&kbs, PolicyKind::Attestation, &headers, body).await
}

async fn get_resource_policy(State(kbs): Shared, headers: HeaderMap) -> Result<String, KbsError> {
    get_policy(&kbs, PolicyKind::Resource, &headers).await
}

async fn get_attestation_policy(
    State(kbs): Shared,
    headers: HeaderMap,
) -> Result<String, KbsError> {
    get_policy(&kbs, PolicyKind::Attestation, &headers).await
}

async fn set_reference_values(
    State(kbs): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, KbsError> {
    let who = admin(&kbs, &headers)?;
    let bytes = read_body(&kbs, body, &headers, MAX_ADMIN_BODY).await?;
    let values = reference::parse(&bytes)
        .map_err(|e| KbsError::new(ErrorKind::InvalidRequest, e.to_string()))?;
    kbs.store.set_reference_values(&values).await?;
    let names: Vec<&str> = values.keys().map(String::as_str).collect();
    kbs.audit
        .admin(&who, "set-reference-values", &names.join(","), "ok");
    // The attestation policy's data changed: compile it now rather than on the next attestation.
    if let Err(e) = kbs.policies.get(&kbs.store).await {
        tracing::warn!(error = %e, "the policies do not compile with the new reference values");
    }
    Ok(StatusCode::OK)
}

async fn get_reference_values(
    State(kbs): Shared,
    headers: HeaderMap,
) -> Result<Json<Value>, KbsError> {
    admin(&kbs, &headers)?;
    Ok(Json(json!(kbs.store.reference_values().await?)))
}

async fn delete_reference_value(
    State(kbs): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, KbsError> {
    let who = admin(&kbs, &headers)?;
    if !kbs.store.delete_reference_value(&name).await? {
        return Err(KbsError::new(
            ErrorKind::InvalidRequestPath,
            format!("no reference value named {name:?}"),
        ));
    }
    kbs.audit.admin(&who, "delete-reference-value", &name, "ok");
    Ok(StatusCode::OK)
}

async fn metrics(State(kbs): Shared) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        kbs.metrics.render(),
    )
}

async fn healthz(State(kbs): Shared) -> Result<&'static str, KbsError> {
    kbs.store.generation().await?;
    Ok("ok")
}

/// A verified device: its submodule name, TEE type and claims.
type DeviceClaims = (String, &'static str, serde_json::Map<String, Value>);

/// Verifies the protocol's additional (device) evidence: a JSON object mapping a TEE name to
/// `[class, evidence]`. Supported: `nvidia` (class `gpu`), bound to the SHA-256 of the RFC 8785
/// JSON of `{"nonce", "tee-pubkey"}`. Returns `(submodule, tee, claims)` per device.
fn verify_additional(
    att: &Attestation,
    now: std::time::SystemTime,
) -> Result<Vec<DeviceClaims>, String> {
    let raw = att.tee_evidence.additional_evidence.trim();
    if raw.is_empty() || raw == "{}" {
        return Ok(Vec::new());
    }
    let map: serde_json::Map<String, Value> = serde_json::from_str(raw)
        .map_err(|e| format!("additional evidence is not a JSON object: {e}"))?;
    let binding =
        binding::device_binding_digest(&att.runtime_data.tee_pubkey, &att.runtime_data.nonce)
            .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (tee, entry) in map {
        let evidence = match &entry {
            Value::Array(pair) if pair.len() == 2 => &pair[1],
            _ => {
                return Err(format!(
                    "additional evidence for {tee} must be [class, evidence]"
                ))
            }
        };
        match tee.as_str() {
            "nvidia" => {
                let devices =
                    coffer_verifier::nvidia::verify_device_evidence(evidence, &binding, now)
                        .map_err(|e| format!("nvidia device evidence: {e}"))?;
                for (i, claims) in devices.into_iter().enumerate() {
                    out.push((format!("gpu{i}"), "nvidia", claims));
                }
            }
            other => {
                return Err(format!(
                    "additional evidence of TEE {other:?} is not supported"
                ))
            }
        }
    }
    Ok(out)
}
