//! Sealed logs: when the initdata names a log recipient (`log-recipient.pem`, an X25519 public
//! key), every chunk of container output leaves the guest as one HPKE record (RFC 9180 base
//! mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305) that only the holder of
//! the recipient's private key opens (`coffer logs --owner-key`).
//!
//! A record is the 32-byte encapsulated key followed by the ciphertext. The associated data
//! binds it to its place: the JCS form of `{"container_id", "exec_id", "stream", "offset"}`,
//! so the host can neither move a record to another stream nor reorder records undetected.
//! The info string is [`INFO`].

use hpke::{
    aead::ChaCha20Poly1305, kdf::HkdfSha256, kem::X25519HkdfSha256, Deserializable, Kem as _,
    OpModeR, OpModeS, Serializable,
};
use zeroize::Zeroizing;

/// The HPKE info string of sealed log records.
pub const INFO: &[u8] = b"coffer sealed log v1";

const X25519_OID: &str = "1.3.101.110";
const ENC_LEN: usize = 32;

/// A sealed-log problem.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A key could not be read.
    #[error("{0}")]
    Key(String),
    /// A record did not open: wrong key, or altered, moved or truncated by the host.
    #[error("a sealed log record at offset {0} does not open with this key (wrong key, or altered or moved by the host)")]
    Open(u64),
    /// Sealing failed.
    #[error("cannot seal a log record")]
    Seal,
}

/// Where a record belongs; its JCS form is the record's associated data.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecordPlace<'a> {
    /// The container.
    pub container_id: &'a str,
    /// The exec (empty for the container's own process).
    pub exec_id: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// Offset of the record's first plaintext byte in the stream.
    pub offset: u64,
}

impl RecordPlace<'_> {
    fn aad(&self) -> Vec<u8> {
        serde_json_canonicalizer::to_vec(self).unwrap_or_default()
    }
}

/// A log recipient's public key.
#[derive(Clone)]
pub struct Recipient(<X25519HkdfSha256 as hpke::Kem>::PublicKey);

impl Recipient {
    /// Reads an X25519 public key (PEM SubjectPublicKeyInfo, as `openssl pkey -pubout` writes).
    pub fn from_pem(text: &str) -> Result<Self, SealError> {
        let block = pem::parse(text)
            .map_err(|e| SealError::Key(format!("the log recipient key is not PEM: {e}")))?;
        let spki =
            x509_cert::spki::SubjectPublicKeyInfoRef::try_from(block.contents()).map_err(|e| {
                SealError::Key(format!("the log recipient key is not a public key: {e}"))
            })?;
        if spki.algorithm.oid.to_string() != X25519_OID {
            return Err(SealError::Key(format!(
                "the log recipient key is {}, not X25519 (openssl genpkey -algorithm x25519)",
                spki.algorithm.oid
            )));
        }
        <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(spki.subject_public_key.raw_bytes())
            .map(Self)
            .map_err(|_| SealError::Key("the log recipient key is not a valid X25519 key".into()))
    }

    /// Seals `plaintext` for `place`.
    pub fn seal(&self, place: &RecordPlace<'_>, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let (enc, ct) =
            hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
                &OpModeS::Base,
                &self.0,
                INFO,
                plaintext,
                &place.aad(),
                &mut rand_core::UnwrapErr(rand_core::OsRng),
            )
            .map_err(|_| SealError::Seal)?;
        let mut out = enc.to_bytes().to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }
}

/// A log recipient's private key (zeroized on drop).
pub struct RecipientKey(<X25519HkdfSha256 as hpke::Kem>::PrivateKey);

impl RecipientKey {
    /// Reads an X25519 private key (PEM PKCS#8, as `openssl genpkey -algorithm x25519` writes).
    pub fn from_pem(text: &str) -> Result<Self, SealError> {
        let block =
            pem::parse(text).map_err(|_| SealError::Key("the owner key is not PEM".into()))?;
        let der = Zeroizing::new(block.contents().to_vec());
        let info = pkcs8::PrivateKeyInfo::try_from(der.as_slice())
            .map_err(|_| SealError::Key("the owner key is not a PKCS#8 private key".into()))?;
        if info.algorithm.oid.to_string() != X25519_OID {
            return Err(SealError::Key(format!(
                "the owner key is {}, not the X25519 key logs are sealed to",
                info.algorithm.oid
            )));
        }
        // CurvePrivateKey ::= OCTET STRING (RFC 8410): 04 20 ‖ 32 bytes.
        let raw = info.private_key;
        let key = match raw {
            [0x04, 0x20, k @ ..] if k.len() == 32 => k,
            _ => {
                return Err(SealError::Key(
                    "the owner key's X25519 key is malformed".into(),
                ))
            }
        };
        <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(key)
            .map(Self)
            .map_err(|_| SealError::Key("the owner key's X25519 key is malformed".into()))
    }

    /// The matching public key.
    pub fn recipient(&self) -> Recipient {
        Recipient(X25519HkdfSha256::sk_to_pk(&self.0))
    }

    /// Opens a record sealed for `place`.
    pub fn open(&self, place: &RecordPlace<'_>, record: &[u8]) -> Result<Vec<u8>, SealError> {
        if record.len() < ENC_LEN {
            return Err(SealError::Open(place.offset));
        }
        let (enc, ct) = record.split_at(ENC_LEN);
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(enc)
            .map_err(|_| SealError::Open(place.offset))?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.0,
            &enc,
            INFO,
            ct,
            &place.aad(),
        )
        .map_err(|_| SealError::Open(place.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // openssl genpkey -algorithm x25519 / openssl pkey -pubout
    const PRIV: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEIHBgWUNPo0F/7wwIu4HfQ+1oAqKGXbH8wwwjAabkMZ1/\n-----END PRIVATE KEY-----\n";

    fn place(offset: u64) -> RecordPlace<'static> {
        RecordPlace {
            container_id: "app",
            exec_id: "",
            stream: "stdout",
            offset,
        }
    }

    #[test]
    fn records_open_only_in_their_place_with_the_key() {
        let key = RecipientKey::from_pem(PRIV).unwrap();
        let r = key.recipient();
        let rec = r.seal(&place(10), b"hello").unwrap();
        assert!(!rec.windows(5).any(|w| w == b"hello"));
        assert_eq!(key.open(&place(10), &rec).unwrap(), b"hello");
        assert!(matches!(
            key.open(&place(11), &rec),
            Err(SealError::Open(11))
        ));
        let mut other = place(10);
        other.stream = "stderr";
        assert!(key.open(&other, &rec).is_err());
        let mut bad = rec.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(key.open(&place(10), &bad).is_err());
        assert!(key.open(&place(10), &rec[..20]).is_err());
    }

    #[test]
    fn other_key_types_are_refused_by_name() {
        let ed = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        let e = Recipient::from_pem(ed).err().unwrap().to_string();
        assert!(e.contains("not X25519"), "{e}");
        assert!(Recipient::from_pem("junk").is_err());
    }
}
