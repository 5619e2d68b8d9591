//! Bearer tokens the KBS reads from requests: admin tokens (Ed25519 JWT, checked against a fixed
//! admin key) and EAR attestation tokens (ES256 JWT, with a fixed token key): signature check,
//! the claims of a stored token and the audit digest. The input is the token text.
#![no_main]
use coffer_kbs::{admin::AdminAuth, token::TokenKeys};
use libfuzzer_sys::fuzz_target;

struct Keys {
    admin: AdminAuth,
    tokens: TokenKeys,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().expect("temporary directory");
    let public = dir.path().join("admin.pub.pem");
    std::fs::write(&public, coffer_fuzz::ADMIN_PUB_PEM).expect("admin key");
    Keys {
        admin: AdminAuth::load(&[public]).expect("admin key loads"),
        tokens: TokenKeys::from_pkcs8(coffer_fuzz::EC_KEY_PKCS8).expect("token key loads"),
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local!(static K: Keys = keys());
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    K.with(|k| {
        let _ = k.tokens.verify(token);
        let _ = k.tokens.claims_of_stored(token);
        let _ = TokenKeys::claims_digest(token);
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
            headers.insert(http::header::AUTHORIZATION, v);
            let _ = k.admin.check(&headers);
        }
    });
});
