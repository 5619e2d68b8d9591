//! Owner-signed exec: when the initdata names the workload owner's public key
//! (`owner-key.pem`: Ed25519, ECDSA P-256 or P-384), an ExecProcess request is allowed, whatever
//! the policy says about exec, if it carries the owner's signature over the exec and a fresh
//! nonce this agent issued. Each nonce is single-use, bound to one container and expires after
//! [`NONCE_TTL`]; a replayed, foreign or expired nonce is refused.
//!
//! The signed bytes are the JCS form of `{"purpose": "coffer exec v1", "container_id",
//! "exec_id", "args", "env", "tty", "stdin", "nonce": "<hex>"}` ([`exec_message`]). Writes to
//! the exec's stdin are not covered by the signature: they stay subject to the policy
//! (WriteStreamRequest, denied by default).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::proto::ExecProcessRequest;

/// How long an issued nonce stays valid.
pub const NONCE_TTL: Duration = Duration::from_secs(120);
/// Nonces outstanding at once; the oldest is dropped beyond this.
pub const MAX_NONCES: usize = 256;

/// Why an owner signature was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OwnerError {
    /// The initdata names no owner key.
    #[error("the initdata names no owner key: owner-signed exec is off")]
    NoOwnerKey,
    /// The nonce was not issued, was used already, expired or belongs to another container.
    #[error(
        "the exec nonce is unknown, used, expired or for another container: ask for a new one"
    )]
    Nonce,
    /// The signature does not verify with the owner key.
    #[error("the owner signature does not verify over this exec")]
    Signature,
}

/// Checks that `pem_text` is a public key owner signatures can be checked with.
pub fn validate_key(pem_text: &str) -> Result<(), String> {
    let block = pem::parse(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    let spki = x509_cert::spki::SubjectPublicKeyInfoRef::try_from(block.contents())
        .map_err(|e| format!("not a PEM public key: {e}"))?;
    match spki.algorithm.oid.to_string().as_str() {
        "1.3.101.112" | "1.2.840.10045.2.1" | "1.2.840.113549.1.1.1" => Ok(()),
        other => Err(format!(
            "a public key of algorithm {other}: use Ed25519, ECDSA P-256/P-384 or RSA"
        )),
    }
}

/// The bytes an owner signs for `req`.
pub fn exec_message(req: &ExecProcessRequest) -> Vec<u8> {
    let v = serde_json::json!({
        "purpose": "coffer exec v1",
        "container_id": req.container_id,
        "exec_id": req.exec_id,
        "args": req.args,
        "env": req.env,
        "tty": req.tty,
        "stdin": req.stdin,
        "nonce": hex::encode(&req.nonce),
    });
    serde_json_canonicalizer::to_vec(&v).unwrap_or_default()
}

/// The owner key and the nonces issued for it.
pub struct OwnerExec {
    key_pem: Option<String>,
    nonces: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl OwnerExec {
    /// Owner-signed exec with the owner's PEM public key, or off when `None`.
    pub fn new(key_pem: Option<String>) -> Self {
        Self {
            key_pem,
            nonces: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an owner key is configured.
    pub fn enabled(&self) -> bool {
        self.key_pem.is_some()
    }

    /// A fresh nonce for an exec in `container_id`.
    pub fn issue(&self, container_id: &str) -> Result<[u8; 32], OwnerError> {
        if !self.enabled() {
            return Err(OwnerError::NoOwnerKey);
        }
        let mut nonce = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let mut map = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (_, t)| t.elapsed() < NONCE_TTL);
        if map.len() >= MAX_NONCES {
            if let Some(oldest) = map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(nonce, (container_id.to_string(), Instant::now()));
        Ok(nonce)
    }

    /// Checks the owner's signature on `req` and uses up its nonce (also when the signature is
    /// bad, so that a nonce is tried once).
    pub fn check(&self, req: &ExecProcessRequest) -> Result<(), OwnerError> {
        let key = self.key_pem.as_ref().ok_or(OwnerError::NoOwnerKey)?;
        let nonce: [u8; 32] = req
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| OwnerError::Nonce)?;
        let issued = self
            .nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nonce);
        match issued {
            Some((c, t)) if c == req.container_id && t.elapsed() < NONCE_TTL => {}
            _ => return Err(OwnerError::Nonce),
        }
        if coffer_image::signature::verify_pem(
            key.as_bytes(),
            &exec_message(req),
            &req.owner_signature,
        ) {
            Ok(())
        } else {
            Err(OwnerError::Signature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // openssl genpkey -algorithm ed25519; openssl pkey -pubout
    const SK: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINqPaWruTUpqCbK9aE5ZwUA9JAeOw03CLZe1vD9YtXGs\n-----END PRIVATE KEY-----\n";

    fn pk() -> String {
        let der = pem::parse(SK).unwrap().contents().to_vec();
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).unwrap();
        let raw = aws_lc_rs::signature::KeyPair::public_key(&pair)
            .as_ref()
            .to_vec();
        let mut spki = hex::decode("302a300506032b6570032100").unwrap();
        spki.extend(raw);
        pem::encode(&pem::Pem::new("PUBLIC KEY", spki))
    }

    fn signed(o: &OwnerExec, container: &str, args: &[&str]) -> ExecProcessRequest {
        let mut req = ExecProcessRequest {
            container_id: container.into(),
            exec_id: "e1".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            nonce: o.issue(container).unwrap().to_vec(),
            ..Default::default()
        };
        let signer = coffer_image::sign::PemSigner::from_pem(SK.as_bytes()).unwrap();
        req.owner_signature = signer.sign(&exec_message(&req)).unwrap();
        req
    }

    #[test]
    fn a_signed_exec_passes_once() {
        let o = OwnerExec::new(Some(pk()));
        let req = signed(&o, "app", &["id"]);
        assert_eq!(o.check(&req), Ok(()));
        assert_eq!(o.check(&req), Err(OwnerError::Nonce));
    }

    #[test]
    fn altered_foreign_or_unsigned_execs_fail() {
        let o = OwnerExec::new(Some(pk()));
        let mut req = signed(&o, "app", &["id"]);
        req.args = vec!["sh".into()];
        assert_eq!(o.check(&req), Err(OwnerError::Signature));
        // The nonce was used up by the failed try.
        assert_eq!(o.check(&req), Err(OwnerError::Nonce));

        let mut req = signed(&o, "app", &["id"]);
        req.container_id = "other".into();
        assert_eq!(o.check(&req), Err(OwnerError::Nonce));

        let req = ExecProcessRequest {
            container_id: "app".into(),
            nonce: vec![0; 32],
            ..Default::default()
        };
        assert_eq!(o.check(&req), Err(OwnerError::Nonce));

        let off = OwnerExec::new(None);
        assert_eq!(off.issue("app"), Err(OwnerError::NoOwnerKey));
    }
}
