//! The runtime-data binding: how a TEE proves that its evidence was produced for one challenge
//! and one TEE public key.
//!
//! The guest computes the RFC 8785 (JCS) canonical JSON of
//! `{"tee-pubkey": <JWK>, "nonce": <challenge nonce>, "additional-evidence": <string>}`,
//! hashes it (SHA-384 by default, SHA-512 for IBM Secure Execution) and places the digest in the
//! report-data field of its evidence, zero-padded or truncated to the field's size.

use kbs_types::{HashAlgorithm, TeePubKey};
use serde_json::json;

/// Error computing a binding.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// The JSON could not be canonicalized (RFC 8785).
    #[error("cannot canonicalize runtime data as RFC 8785 JSON: {0}")]
    Canonicalize(String),
}

/// The canonical bytes that are hashed into the evidence's report data.
pub fn runtime_data_canonical(
    tee_pubkey: &TeePubKey,
    nonce: &str,
    additional_evidence: &str,
) -> Result<Vec<u8>, BindingError> {
    let value = json!({
        "tee-pubkey": tee_pubkey,
        "nonce": nonce,
        "additional-evidence": additional_evidence,
    });
    serde_json_canonicalizer::to_vec(&value).map_err(|e| BindingError::Canonicalize(e.to_string()))
}

/// The digest of the runtime data with `alg`.
pub fn runtime_data_digest(
    tee_pubkey: &TeePubKey,
    nonce: &str,
    additional_evidence: &str,
    alg: HashAlgorithm,
) -> Result<Vec<u8>, BindingError> {
    let canonical = runtime_data_canonical(tee_pubkey, nonce, additional_evidence)?;
    Ok(alg.digest(&canonical))
}

/// What device (additional) evidence binds: SHA-256 of the RFC 8785 JSON of
/// `{"nonce": …, "tee-pubkey": …}` (32 bytes, the size of an SPDM nonce).
pub fn device_binding_digest(tee_pubkey: &TeePubKey, nonce: &str) -> Result<Vec<u8>, BindingError> {
    let value = json!({ "tee-pubkey": tee_pubkey, "nonce": nonce });
    let bytes = serde_json_canonicalizer::to_vec(&value)
        .map_err(|e| BindingError::Canonicalize(e.to_string()))?;
    Ok(HashAlgorithm::Sha256.digest(&bytes))
}

/// Fits `digest` to a report-data field of `len` bytes: zero-padded when shorter, truncated when
/// longer.
pub fn fit_report_data(digest: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let n = digest.len().min(len);
    out[..n].copy_from_slice(&digest[..n]);
    out
}

/// The report data a TEE with a `field_len`-byte report-data field must carry.
pub fn expected_report_data(
    tee_pubkey: &TeePubKey,
    nonce: &str,
    additional_evidence: &str,
    alg: HashAlgorithm,
    field_len: usize,
) -> Result<Vec<u8>, BindingError> {
    let digest = runtime_data_digest(tee_pubkey, nonce, additional_evidence, alg)?;
    Ok(fit_report_data(&digest, field_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TeePubKey {
        TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "xx".into(),
            y: "yy".into(),
        }
    }

    #[test]
    fn canonical_form_sorts_keys_and_has_no_whitespace() {
        let bytes = runtime_data_canonical(&key(), "n0", "").unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"additional-evidence":"","nonce":"n0","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"xx","y":"yy"}}"#
        );
    }

    #[test]
    fn digest_is_sha384_of_canonical_bytes_and_padded() {
        use sha2::{Digest, Sha384};
        let canonical = runtime_data_canonical(&key(), "n0", "").unwrap();
        let want = Sha384::digest(&canonical);
        let got = expected_report_data(&key(), "n0", "", HashAlgorithm::Sha384, 64).unwrap();
        assert_eq!(&got[..48], want.as_slice());
        assert_eq!(&got[48..], &[0u8; 16]);
        assert_eq!(fit_report_data(&[1, 2, 3], 2), vec![1, 2]);
    }

    #[test]
    fn device_binding_is_sha256_of_nonce_and_key_only() {
        use sha2::{Digest, Sha256};
        let want = Sha256::digest(
            br#"{"nonce":"n0","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"xx","y":"yy"}}"#,
        );
        assert_eq!(device_binding_digest(&key(), "n0").unwrap(), want.to_vec());
    }

    #[test]
    fn different_nonce_gives_different_binding() {
        let a = runtime_data_digest(&key(), "a", "", HashAlgorithm::Sha384).unwrap();
        let b = runtime_data_digest(&key(), "b", "", HashAlgorithm::Sha384).unwrap();
        assert_ne!(a, b);
    }
}
