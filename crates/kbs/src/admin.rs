//! Administrator authentication: each admin request carries `Authorization: Bearer <JWT>`, an
//! EdDSA (Ed25519) JWT with `iat` and `exp` (and optionally `nbf`) signed by a key whose public
//! half the KBS was configured with. With no key configured every admin request is refused.
//!
//! A token is valid for at most [`MAX_ADMIN_TOKEN_LIFETIME`] counted both from its `iat` and
//! from now, `iat` may not lie in the future beyond [`CLOCK_SKEW`], and `nbf` is honoured: a
//! token dated ahead cannot outlive the cap. Each refusal names the claim that failed.

use std::path::Path;

use axum::http::HeaderMap;
use coffer_wire::error::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::KbsError;

/// Longest accepted admin token lifetime (`exp - iat`, and `exp - now`), in seconds.
pub const MAX_ADMIN_TOKEN_LIFETIME: u64 = 3600;
/// Clock difference tolerated between the admin's machine and the KBS, in seconds.
pub const CLOCK_SKEW: u64 = 30;

/// The configured admin public keys.
pub struct AdminAuth {
    keys: Vec<(String, DecodingKey)>,
    validation: Validation,
}

/// The claims checked here; both are required (the validation says which is missing).
#[derive(Deserialize)]
struct AdminClaims {
    #[serde(default)]
    iat: u64,
    #[serde(default)]
    exp: u64,
}

/// Why a token whose signature verified is refused, if it is.
fn lifetime_error(c: &AdminClaims, now: u64) -> Option<String> {
    if c.iat > now + CLOCK_SKEW {
        return Some(format!(
            "admin token `iat` lies {}s in the future (at most {CLOCK_SKEW}s of clock skew is allowed)",
            c.iat - now
        ));
    }
    if c.exp.saturating_sub(c.iat) > MAX_ADMIN_TOKEN_LIFETIME {
        return Some("admin token lifetime (`exp` - `iat`) exceeds one hour".into());
    }
    if c.exp.saturating_sub(now) > MAX_ADMIN_TOKEN_LIFETIME + CLOCK_SKEW {
        return Some("admin token `exp` is more than one hour from now".into());
    }
    None
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
        validation.leeway = CLOCK_SKEW;
        validation.validate_nbf = true;
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
            use jsonwebtoken::errors::ErrorKind as Jwt;
            match jsonwebtoken::decode::<AdminClaims>(token, key, &self.validation) {
                Ok(data) => {
                    return match lifetime_error(&data.claims, crate::store::now_secs()) {
                        Some(why) => Err(deny(&why)),
                        None => Ok(name.clone()),
                    }
                }
                // The signature verified; a claim did not.
                Err(e) => match e.kind() {
                    Jwt::ExpiredSignature => {
                        return Err(deny("admin token expired (`exp` has passed)"))
                    }
                    Jwt::ImmatureSignature => {
                        return Err(deny("admin token not valid yet (`nbf` lies in the future)"))
                    }
                    Jwt::MissingRequiredClaim(c) => {
                        return Err(deny(&format!("admin token has no `{c}` claim")))
                    }
                    _ => {}
                },
            }
        }
        Err(deny(
            "admin token is not signed by a configured admin key, or it is malformed",
        ))
    }
}
