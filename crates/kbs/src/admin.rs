//! Administrator authentication: each admin request carries `Authorization: Bearer <JWT>`, an
//! EdDSA (Ed25519) JWT with `iat` and `exp` signed by a key whose public half the KBS was
//! configured with. With no key configured every admin request is refused.

use std::path::Path;

use axum::http::HeaderMap;
use coffer_wire::error::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::KbsError;

/// Longest accepted admin token lifetime (`exp - iat`), in seconds.
pub const MAX_ADMIN_TOKEN_LIFETIME: u64 = 3600;

/// The configured admin public keys.
pub struct AdminAuth {
    keys: Vec<(String, DecodingKey)>,
    validation: Validation,
}

#[derive(Deserialize)]
struct AdminClaims {
    iat: u64,
    exp: u64,
}

impl AdminAuth {
    /// Loads Ed25519 public keys (SPKI PEM). An empty list refuses every admin call.
    pub fn load(paths: &[impl AsRef<Path>]) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let pem = std::fs::read(p).map_err(|e| {
                anyhow::anyhow!("cannot read admin public key {}: {e}", p.display())
            })?;
            let key = DecodingKey::from_ed_pem(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "admin public key {} is not an Ed25519 public key in PEM: {e}",
                    p.display()
                )
            })?;
            keys.push((p.display().to_string(), key));
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_required_spec_claims(&["exp", "iat"]);
        validation.leeway = 30;
        validation.validate_aud = false;
        Ok(Self { keys, validation })
    }

    /// True when at least one admin key is configured.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the request's admin token; returns the name of the key that signed it.
    pub fn check(&self, headers: &HeaderMap) -> Result<String, KbsError> {
        let deny = |d: &str| KbsError::new(ErrorKind::AdminAuthAccess, d);
        if self.keys.is_empty() {
            return Err(deny(
                "admin API disabled: the KBS was started without --admin-public-key",
            ));
        }
        let token = crate::api::bearer(headers)
            .ok_or_else(|| deny("admin request without an Authorization: Bearer token"))?;
        for (name, key) in &self.keys {
            if let Ok(data) = jsonwebtoken::decode::<AdminClaims>(token, key, &self.validation) {
                if data.claims.exp.saturating_sub(data.claims.iat) > MAX_ADMIN_TOKEN_LIFETIME {
                    return Err(deny("admin token lifetime exceeds one hour"));
                }
                return Ok(name.clone());
            }
        }
        Err(deny(
            "admin token is not signed by a configured admin key, or it expired",
        ))
    }
}
