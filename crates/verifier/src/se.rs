//! IBM Secure Execution (SE) attestation, the verifier's half: the attestation request the
//! KBS sends as its challenge, and the check of the Ultravisor's answer.
//!
//! The flow, as IBM's `pvattest` runs it and as upstream's KBS runs it for SE:
//!
//! 1. **Challenge** ([`challenge`]): an attestation request control block (ARCB), made with IBM's
//!    `s390_pv` crate: a random 64-byte HMAC-SHA512 measurement key and 16-byte nonce,
//!    encrypted (AES-256-GCM) under a request key that is wrapped, once per configured host-key
//!    document, for that host's ECDH P-521 key. Only an Ultravisor holding one of those host
//!    keys can open it. The flags ask for the image's and the attesting host's public host-key
//!    hashes as additional data. The measurement key and nonce ([`ChallengeSecret`]) stay with
//!    the KBS (sealed into its stateless session), never in the clear on the wire.
//! 2. **The guest** (`coffer-attester`'s `se`) hands the ARCB and its user data (the
//!    runtime-data digest that binds the KBS's nonce and the guest's ephemeral key) to the
//!    Ultravisor through `/dev/uv`, and returns the measurement, the configuration unique id
//!    and the additional data ([`Evidence`]).
//! 3. **Verification** ([`verify`]): the measurement must be the HMAC-SHA512, under the
//!    challenge's key, of the SE header's page-, address- and tweak-list digests and tag (the
//!    image's reference values, [`ImageTags`]), the configuration unique id, the user data, the
//!    nonce and the additional data. The image is the one whose registered tags make it match;
//!    the user data must be the expected runtime-data digest; the attesting host's key hash
//!    must be one of the configured host keys.
//!
//! Host-key documents are checked against IBM's signing-key chain and CRLs
//! ([`HostKeys::load`] with a `CertVerifier`) before use; an unchecked load is for tests only.

use std::fmt;

use s390_pv::{
    attest::{
        AdditionalData, AttestationFlags, AttestationItems, AttestationMeasAlg,
        AttestationMeasurement, AttestationRequest, AttestationVersion,
    },
    request::{
        openssl::{
            pkey::{PKey, Public},
            x509::X509,
        },
        BootHdrTags, CertVerifier, EcPubKeyCoord, HkdVerifier, ReqEncrCtx, Request, SymKeyType,
    },
};
use zeroize::Zeroizing;

/// Size of the HMAC-SHA512 measurement key.
pub const MEASUREMENT_KEY_LEN: usize = 64;
/// Size of the request's nonce.
pub const NONCE_LEN: usize = 16;
/// Size of a public host-key hash (SHA-256 of the key's coordinates).
pub const PHKH_LEN: usize = 32;
/// Size of the user data the Ultravisor takes at most.
pub const USER_DATA_MAX: usize = 256;
/// Size of the configuration unique id.
pub const CUID_LEN: usize = 16;
/// Size of an image's tags: page-, address- and tweak-list digests (64 each) and the tag (16).
pub const IMAGE_TAGS_LEN: usize = 3 * 64 + 16;

/// Why SE attestation failed.
#[derive(Debug, thiserror::Error)]
pub enum SeError {
    /// A host-key document could not be read or did not verify.
    #[error("host-key document {name}: {why}")]
    HostKey {
        /// Which document.
        name: String,
        /// Why.
        why: String,
    },
    /// No host-key document is configured: nothing could answer a challenge.
    #[error("no host-key document is configured for IBM Secure Execution")]
    NoHostKeys,
    /// The request could not be made.
    #[error("cannot build the SE attestation request: {0}")]
    Request(String),
    /// The evidence is malformed.
    #[error("SE evidence: {0}")]
    Evidence(String),
    /// The measurement matches none of the registered images.
    #[error("the SE measurement matches none of the {0} registered image(s) (or the evidence was altered)")]
    Measurement(usize),
    /// The user data is not the expected runtime-data digest.
    #[error("the SE user data is not this session's runtime-data digest")]
    UserData,
    /// The host that attested is not one of the configured hosts.
    #[error("the attesting host's key hash {0} is not one of the configured host-key documents")]
    UnknownHost(String),
}

fn pv(e: impl fmt::Display) -> SeError {
    SeError::Request(e.to_string())
}

/// The public host-key hash of a host key: SHA-256 of its P-521 coordinates, as the Ultravisor
/// reports it.
pub fn host_key_hash(key: &PKey<Public>) -> Result<[u8; PHKH_LEN], SeError> {
    let coords: EcPubKeyCoord = key.as_ref().try_into().map_err(pv)?;
    Ok(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, coords.as_ref())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes"),
    )
}

/// The configured hosts' public keys, from their host-key documents.
pub struct HostKeys {
    keys: Vec<(String, PKey<Public>, [u8; PHKH_LEN])>,
}

impl fmt::Debug for HostKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|(n, _, h)| (n, hex::encode(h))))
            .finish()
    }
}

impl HostKeys {
    /// Loads host-key documents (`(name, PEM or DER)`), each verified with `verifier` (IBM's
    /// signing-key chain and CRLs). `None` skips the check: for tests and a development KBS
    /// only, and said loudly.
    pub fn load(
        documents: &[(String, Vec<u8>)],
        verifier: Option<&CertVerifier>,
    ) -> Result<Self, SeError> {
        if documents.is_empty() {
            return Err(SeError::NoHostKeys);
        }
        if verifier.is_none() {
            tracing::warn!("IBM SE host-key documents are NOT verified against IBM's signing keys: a test setup, never a production KBS");
        }
        let mut keys = Vec::new();
        for (name, data) in documents {
            let bad = |why: String| SeError::HostKey {
                name: name.clone(),
                why,
            };
            let cert = X509::from_pem(data)
                .or_else(|_| X509::from_der(data))
                .map_err(|e| bad(format!("not a PEM or DER certificate: {e}")))?;
            if let Some(v) = verifier {
                v.verify(&cert).map_err(|e| bad(e.to_string()))?;
            }
            let key = cert
                .public_key()
                .map_err(|e| bad(format!("no public key: {e}")))?;
            let hash = host_key_hash(&key).map_err(|e| bad(e.to_string()))?;
            keys.push((name.clone(), key, hash));
        }
        Ok(Self { keys })
    }

    /// The hosts' public host-key hashes.
    pub fn hashes(&self) -> impl Iterator<Item = &[u8; PHKH_LEN]> {
        self.keys.iter().map(|(_, _, h)| h)
    }
}

/// What the KBS keeps of a challenge to verify its answer: the measurement key and the nonce.
/// Wiped when dropped; never logged.
pub struct ChallengeSecret(Zeroizing<Vec<u8>>);

impl fmt::Debug for ChallengeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChallengeSecret(..)")
    }
}

impl ChallengeSecret {
    /// Its bytes (measurement key, then nonce), for the KBS to seal into its session.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// From bytes the KBS unsealed.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SeError> {
        if bytes.len() != MEASUREMENT_KEY_LEN + NONCE_LEN {
            return Err(SeError::Evidence(format!(
                "a challenge secret is {} bytes, not {}",
                MEASUREMENT_KEY_LEN + NONCE_LEN,
                bytes.len()
            )));
        }
        Ok(Self(Zeroizing::new(bytes.to_vec())))
    }

    fn key(&self) -> &[u8] {
        &self.0[..MEASUREMENT_KEY_LEN]
    }

    fn nonce(&self) -> [u8; NONCE_LEN] {
        self.0[MEASUREMENT_KEY_LEN..]
            .try_into()
            .expect("length checked when made")
    }
}

/// The flags every Coffer challenge sets: a nonce (always) and the image's and the attesting
/// host's public host-key hashes as additional data.
fn flags() -> AttestationFlags {
    let mut f = AttestationFlags::default();
    f.set_image_phkh();
    f.set_attest_phkh();
    f
}

/// A new attestation request for `hosts`: the ARCB to send and the secret to keep.
pub fn challenge(hosts: &HostKeys) -> Result<(Vec<u8>, ChallengeSecret), SeError> {
    let mut arcb = AttestationRequest::new(
        AttestationVersion::One,
        AttestationMeasAlg::HmacSha512,
        flags(),
    )
    .map_err(pv)?;
    for (_, key, _) in &hosts.keys {
        arcb.add_hostkey(key.clone());
    }
    let ctx = ReqEncrCtx::random(SymKeyType::Aes256Gcm).map_err(pv)?;
    let bin = arcb.encrypt(&ctx).map_err(pv)?;
    let conf = arcb.confidential_data();
    let nonce = conf
        .nonce()
        .as_ref()
        .ok_or_else(|| SeError::Request("the request has no nonce".into()))?;
    let mut secret = Zeroizing::new(Vec::with_capacity(MEASUREMENT_KEY_LEN + NONCE_LEN));
    secret.extend_from_slice(conf.measurement_key());
    secret.extend_from_slice(nonce.value());
    Ok((bin, ChallengeSecret::from_bytes(&secret)?))
}

/// An image's SE header tags: the reference values `coffer measure --tee se` prints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ImageTags([u8; IMAGE_TAGS_LEN]);

impl fmt::Debug for ImageTags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageTags({})", self.to_hex())
    }
}

impl ImageTags {
    /// From the header of an SE image (`pvimg`/`genprotimg` output).
    pub fn from_se_image(image: &[u8]) -> Result<Self, SeError> {
        let tags = BootHdrTags::from_se_image(&mut std::io::Cursor::new(image))
            .map_err(|e| SeError::Evidence(format!("not an SE image: {e}")))?;
        Self::from_bytes(tags.as_ref())
    }

    /// From the 208 bytes (page-list, address-list, tweak-list digests, tag).
    pub fn from_bytes(b: &[u8]) -> Result<Self, SeError> {
        b.try_into().map(Self).map_err(|_| {
            SeError::Evidence(format!(
                "SE image tags are {IMAGE_TAGS_LEN} bytes, not {}",
                b.len()
            ))
        })
    }

    /// From hex, as reference values hold them.
    pub fn from_hex(s: &str) -> Result<Self, SeError> {
        let b =
            hex::decode(s.trim()).map_err(|e| SeError::Evidence(format!("SE image tags: {e}")))?;
        Self::from_bytes(&b)
    }

    /// The hex of the 208 bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn boot_hdr_tags(&self) -> Result<BootHdrTags, SeError> {
        BootHdrTags::try_from(self.0.to_vec()).map_err(pv)
    }
}

/// The Ultravisor's answer, as the guest returns it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    /// The configuration unique id (hex, 16 bytes).
    pub cuid: String,
    /// The user data (hex, at most 256 bytes).
    pub user_data: String,
    /// The measurement (hex, 64 bytes for HMAC-SHA512).
    pub measurement: String,
    /// The additional data (hex): the image's and the attesting host's key hashes.
    pub additional_data: String,
}

/// What verified evidence says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The image whose tags the measurement matched.
    pub image: ImageTags,
    /// The configuration unique id (hex).
    pub cuid: String,
    /// The image's public host-key hash (hex).
    pub image_phkh: String,
    /// The attesting host's public host-key hash (hex).
    pub attestation_phkh: String,
}

/// Checks `evidence` against the challenge's `secret`: its measurement must match one of
/// `images`, its user data must be `user_data`, and the attesting host must be one of `hosts`.
pub fn verify(
    evidence: &Evidence,
    secret: &ChallengeSecret,
    images: &[ImageTags],
    user_data: &[u8],
    hosts: &HostKeys,
) -> Result<Claims, SeError> {
    let field = |name: &str, hex_text: &str| {
        hex::decode(hex_text).map_err(|e| SeError::Evidence(format!("{name}: {e}")))
    };
    let cuid: [u8; CUID_LEN] = field("cuid", &evidence.cuid)?
        .try_into()
        .map_err(|_| SeError::Evidence(format!("cuid is not {CUID_LEN} bytes")))?;
    let user = field("user_data", &evidence.user_data)?;
    if user.len() > USER_DATA_MAX {
        return Err(SeError::Evidence(format!(
            "user data is longer than {USER_DATA_MAX} bytes"
        )));
    }
    let measurement = field("measurement", &evidence.measurement)?;
    let additional = field("additional_data", &evidence.additional_data)?;
    let flags = flags();
    let add = AdditionalData::from_slice(&additional, &flags)
        .map_err(|e| SeError::Evidence(format!("additional data: {e}")))?;
    let key = s390_pv::request::openssl::pkey::PKey::hmac(secret.key()).map_err(pv)?;
    let nonce = secret.nonce();
    let mut matched = None;
    for image in images {
        let items = AttestationItems::new(
            &image.boot_hdr_tags()?,
            &cuid,
            Some(&user),
            Some(&nonce),
            Some(&additional),
        );
        let m = AttestationMeasurement::calculate(items, AttestationMeasAlg::HmacSha512, &key)
            .map_err(pv)?;
        if m.eq_secure(&measurement) {
            matched = Some(*image);
            break;
        }
    }
    let image = matched.ok_or(SeError::Measurement(images.len()))?;
    // The measurement covers the user data: compare only once it is authentic.
    if aws_lc_rs::constant_time::verify_slices_are_equal(&user, user_data).is_err() {
        return Err(SeError::UserData);
    }
    let hash = |h: Option<&&[u8]>, what: &str| -> Result<String, SeError> {
        h.map(hex::encode)
            .ok_or_else(|| SeError::Evidence(format!("the additional data has no {what}")))
    };
    let image_phkh = hash(add.image_public_host_key_hash(), "image host-key hash")?;
    let attestation_phkh = hash(
        add.attestation_public_host_key_hash(),
        "attesting host-key hash",
    )?;
    if !hosts.hashes().any(|h| hex::encode(h) == attestation_phkh) {
        return Err(SeError::UnknownHost(attestation_phkh));
    }
    Ok(Claims {
        image,
        cuid: hex::encode(cuid),
        image_phkh,
        attestation_phkh,
    })
}
