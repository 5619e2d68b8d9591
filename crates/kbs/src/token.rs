//! Attestation tokens: EAR claims in an ES256 JWT signed by a P-256 key that is generated once
//! and kept in the store (so every replica of a shared store signs and verifies with one key).

use aws_lc_rs::{
    aead::{self, Aad, LessSafeKey, Nonce, UnboundKey},
    hkdf,
    rand::{SecureRandom, SystemRandom},
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use coffer_wire::ear::EarClaims;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// Token failures.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The stored key is unusable.
    #[error("token signing key is invalid: {0}")]
    Key(String),
    /// Signing failed.
    #[error("token signing failed: {0}")]
    Sign(String),
    /// The token is not valid (signature, expiry, format).
    #[error("attestation token is invalid: {0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Signs and verifies attestation tokens.
pub struct TokenKeys {
    signer: EcdsaKeyPair,
    decoding: DecodingKey,
    kid: String,
    validation: Validation,
    /// Seals attested sessions' tokens into their cookies ([`TokenKeys::seal_cookie`]).
    cookie_key: LessSafeKey,
}

/// What a sealed session cookie starts with (a session id is 32 hex digits).
pub const SEALED_COOKIE_PREFIX: &str = "v1.";

/// The additional data every sealed cookie is bound to.
const COOKIE_AAD: &[u8] = b"coffer-kbs attested session cookie v1";

fn generate_pkcs8() -> Vec<u8> {
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map(|d| d.as_ref().to_vec())
        .unwrap_or_default()
}

impl TokenKeys {
    /// Loads the store's token key, creating it on first start.
    pub async fn load(store: &Store) -> Result<Self, TokenError> {
        let pkcs8 = store.token_key(generate_pkcs8).await?;
        Self::from_pkcs8(&pkcs8)
    }

    /// Builds the keys from a PKCS#8 P-256 private key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, TokenError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        let point = pair.public_key().as_ref().to_vec();
        if point.len() != 65 {
            return Err(TokenError::Key("unexpected public key encoding".into()));
        }
        let decoding =
            DecodingKey::from_ec_components(&B64.encode(&point[1..33]), &B64.encode(&point[33..]))
                .map_err(|e| TokenError::Key(e.to_string()))?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_required_spec_claims(&["exp", "iat"]);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        // The cookie key comes from the signing key, so that every replica sharing the store
        // (and with it the signing key) opens the cookies of the others.
        let mut cookie_key = zeroize::Zeroizing::new([0u8; 32]);
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"coffer-kbs")
            .extract(pkcs8)
            .expand(&[b"session cookie v1"], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(cookie_key.as_mut()))
            .map_err(|_| TokenError::Key("cannot derive the session cookie key".into()))?;
        let cookie_key = UnboundKey::new(&aead::AES_256_GCM, cookie_key.as_ref())
            .map(LessSafeKey::new)
            .map_err(|_| TokenError::Key("session cookie key rejected".into()))?;
        Ok(Self {
            signer: pair,
            decoding,
            kid: hex::encode(&Sha256::digest(&point)[..8]),
            validation,
            cookie_key,
        })
    }

    /// Signs `claims` as a compact JWS (RFC 7515) with ES256: the signature is the fixed-size
    /// `R ‖ S` that RFC 7518 §3.4 prescribes. The key pair stays parsed between tokens.
    pub fn issue(&self, claims: &EarClaims) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let header = serde_json::to_vec(&header).map_err(|e| TokenError::Sign(e.to_string()))?;
        let payload = serde_json::to_vec(claims).map_err(|e| TokenError::Sign(e.to_string()))?;
        let mut jws = B64.encode(header);
        jws.push('.');
        jws.push_str(&B64.encode(payload));
        let sig = self
            .signer
            .sign(&SystemRandom::new(), jws.as_bytes())
            .map_err(|_| TokenError::Sign("ECDSA signing failed".into()))?;
        jws.push('.');
        jws.push_str(&B64.encode(sig.as_ref()));
        Ok(jws)
    }

    /// The claims of a token this KBS issued and kept in its own session store, checking only
    /// its lifetime: the store is as trusted as the key that signed it, so the signature need
    /// not be checked again.
    pub fn claims_of_stored(&self, token: &str) -> Result<EarClaims, TokenError> {
        let payload = token
            .split('.')
            .nth(1)
            .and_then(|p| B64.decode(p).ok())
            .ok_or_else(|| TokenError::Invalid("stored token is malformed".into()))?;
        let claims: EarClaims = serde_json::from_slice(&payload)
            .map_err(|e| TokenError::Invalid(format!("stored token claims: {e}")))?;
        if claims.exp <= crate::store::now_secs() {
            return Err(TokenError::Invalid("token expired; attest again".into()));
        }
        Ok(claims)
    }

    /// Seals `token` into a session cookie value (`v1.` + base64url of a random nonce and the
    /// AES-256-GCM ciphertext): an attested session costs the KBS no memory, and any replica
    /// sharing the signing key opens it. Only this KBS can make or read one.
    pub fn seal_cookie(&self, token: &str) -> Result<String, TokenError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| TokenError::Sign("random number generator failed".into()))?;
        let mut sealed = Vec::with_capacity(aead::NONCE_LEN + token.len() + aead::MAX_TAG_LEN);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(token.as_bytes());
        let tag = self
            .cookie_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(COOKIE_AAD),
                &mut sealed[aead::NONCE_LEN..],
            )
            .map_err(|_| TokenError::Sign("cannot seal the session cookie".into()))?;
        sealed.extend_from_slice(tag.as_ref());
        Ok(format!("{SEALED_COOKIE_PREFIX}{}", B64.encode(sealed)))
    }

    /// The token sealed in a cookie value made by [`TokenKeys::seal_cookie`] (without its
    /// prefix); a cookie altered, made by another KBS or malformed is refused.
    pub fn open_cookie(&self, sealed: &str) -> Result<String, TokenError> {
        let bad = || TokenError::Invalid("the session cookie does not open; attest again".into());
        let mut bytes = B64.decode(sealed).map_err(|_| bad())?;
        if bytes.len() < aead::NONCE_LEN + aead::MAX_TAG_LEN {
            return Err(bad());
        }
        let nonce =
            Nonce::try_assume_unique_for_key(&bytes[..aead::NONCE_LEN]).map_err(|_| bad())?;
        let plain = self
            .cookie_key
            .open_in_place(nonce, Aad::from(COOKIE_AAD), &mut bytes[aead::NONCE_LEN..])
            .map_err(|_| bad())?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad())
    }

    /// `sha256:<hex>` of a token's claims (the JSON bytes of its payload), for the audit log.
    pub fn claims_digest(token: &str) -> String {
        let payload = token
            .split('.')
            .nth(1)
            .and_then(|p| B64.decode(p).ok())
            .unwrap_or_default();
        format!("sha256:{}", hex::encode(Sha256::digest(payload)))
    }

    /// Verifies a token's signature and lifetime (`exp` required and not passed, `nbf` when
    /// present, `iat` not in the future) and returns its claims.
    pub fn verify(&self, token: &str) -> Result<EarClaims, TokenError> {
        let claims = jsonwebtoken::decode::<EarClaims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        // This KBS's own clock dated it: a token from the future was not issued here as it is.
        if claims.iat > crate::store::now_secs() + self.validation.leeway {
            return Err(TokenError::Invalid("token `iat` lies in the future".into()));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffer_wire::ear::VerifierId;

    fn claims(iat: u64, exp: u64) -> EarClaims {
        EarClaims {
            eat_profile: coffer_wire::ear::EAR_PROFILE.into(),
            iat,
            exp,
            verifier_id: VerifierId {
                developer: "test".into(),
                build: "0".into(),
            },
            tee: "sample".into(),
            submods: Default::default(),
        }
    }

    #[test]
    fn tokens_dated_ahead_or_expired_are_refused() {
        let keys = TokenKeys::from_pkcs8(&generate_pkcs8()).unwrap();
        let now = crate::store::now_secs();
        keys.verify(&keys.issue(&claims(now, now + 300)).unwrap())
            .unwrap();
        let ahead = keys.issue(&claims(now + 3600, now + 3900)).unwrap();
        let err = keys.verify(&ahead).unwrap_err().to_string();
        assert!(err.contains("`iat`"), "{err}");
        let expired = keys.issue(&claims(now - 600, now - 300)).unwrap();
        assert!(keys.verify(&expired).is_err());
    }

    #[test]
    fn sealed_cookies_open_only_unaltered_and_with_the_same_signing_key() {
        let pkcs8 = generate_pkcs8();
        let keys = TokenKeys::from_pkcs8(&pkcs8).unwrap();
        let now = crate::store::now_secs();
        let token = keys.issue(&claims(now, now + 300)).unwrap();
        let cookie = keys.seal_cookie(&token).unwrap();
        let sealed = cookie.strip_prefix(SEALED_COOKIE_PREFIX).unwrap();
        assert!(
            !cookie.contains(token.split('.').nth(1).unwrap()),
            "the token is not in clear"
        );
        assert_eq!(keys.open_cookie(sealed).unwrap(), token);
        // Another replica sharing the signing key opens it; a KBS with another key does not.
        let replica = TokenKeys::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(replica.open_cookie(sealed).unwrap(), token);
        let other = TokenKeys::from_pkcs8(&generate_pkcs8()).unwrap();
        assert!(other.open_cookie(sealed).is_err());
        // One changed character, a cut or garbage: refused.
        let mut altered = sealed.as_bytes().to_vec();
        altered[20] = if altered[20] == b'A' { b'B' } else { b'A' };
        assert!(keys
            .open_cookie(std::str::from_utf8(&altered).unwrap())
            .is_err());
        assert!(keys.open_cookie(&sealed[..sealed.len() - 4]).is_err());
        assert!(keys.open_cookie("").is_err());
        assert!(keys.open_cookie("not base64!").is_err());
        // Two seals of one token differ (fresh nonces).
        assert_ne!(keys.seal_cookie(&token).unwrap(), cookie);
    }
}
