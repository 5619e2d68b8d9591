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
//!    the KBS (in its session record, in the store, until the session expires), never on the
//!    wire.
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
        BootHdrTags, EcPubKeyCoord, HkdVerifier, ReqEncrCtx, Request, SymKeyType,
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

pub use s390_pv::request::CertVerifier;

/// A host's public key (P-521), as [`HostKeys::keys`] gives it.
pub type PublicKey = PKey<Public>;

/// IBM's host-key signing chain: the signing certificate and its intermediate CA (`certs`),
/// CRLs, and the root CA (`None`: the system's trust store). Offline: CRLs come from the files
/// given, never from the network, and a document whose CRL is missing is refused.
pub fn signing_chain(
    certs: &[std::path::PathBuf],
    crls: &[std::path::PathBuf],
    root_ca: Option<&std::path::Path>,
) -> Result<CertVerifier, SeError> {
    CertVerifier::new(certs, crls, root_ca, true).map_err(|e| SeError::HostKey {
        name: "IBM signing chain".into(),
        why: e.to_string(),
    })
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

    /// The hosts' public keys, in the order their documents were given.
    pub fn keys(&self) -> impl Iterator<Item = &PKey<Public>> {
        self.keys.iter().map(|(_, k, _)| k)
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

/// An Ultravisor stand-in for tests: hosts (P-521 keys and host-key documents) that answer an
/// attestation request as the Ultravisor does, using only the host key's private half: find
/// its key slot (SHA-256 of the host key's coordinates), unwrap the request key (ECDH with the
/// request's customer key, AES-256-GCM), open the request (IBM's `s390_pv`), and compute the
/// HMAC-SHA512 measurement over the image's tags, the configuration id, the user data, the
/// nonce and the additional data (the image's and this host's key hashes).
#[cfg(any(test, feature = "se-testing"))]
pub mod testing {
    use openssl::{
        asn1::Asn1Time,
        bn::BigNum,
        ec::{EcGroup, EcKey},
        hash::MessageDigest,
        nid::Nid,
        pkey::{PKey, Private, Public},
        x509::{X509NameBuilder, X509},
    };
    use s390_pv::{
        attest::{
            AttestationItems, AttestationMeasAlg, AttestationMeasurement, AttestationRequest,
        },
        request::{decrypt_aead, derive_aes256_gcm_key, BootHdrTags, SymKey},
    };

    use super::{host_key_hash, Evidence, ImageTags};

    /// The request header's size, the authenticated attestation header's, the customer key's
    /// coordinates' and a key slot's (big-endian fields, as the Ultravisor reads them).
    pub const HDR: usize = 48;
    const AUTH: usize = 16;
    const COORDS: usize = 160;
    const SLOT: usize = 80;

    /// A host: its P-521 key and its host-key document (a certificate of the public key).
    pub struct Host {
        key: PKey<Private>,
        /// The host-key document (PEM).
        pub document: Vec<u8>,
    }

    impl Host {
        /// A new host named `name`.
        pub fn new(name: &str) -> Self {
            let group = EcGroup::from_curve_name(Nid::SECP521R1).expect("P-521");
            let key = PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("key");
            let mut subject = X509NameBuilder::new().expect("name");
            subject.append_entry_by_text("CN", name).expect("name");
            let subject = subject.build();
            let mut b = X509::builder().expect("builder");
            b.set_version(2).expect("version");
            b.set_subject_name(&subject).expect("subject");
            b.set_issuer_name(&subject).expect("issuer");
            b.set_pubkey(&key).expect("key");
            b.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
                .expect("time");
            b.set_not_after(&Asn1Time::days_from_now(30).expect("time"))
                .expect("time");
            b.sign(&key, MessageDigest::sha512()).expect("sign");
            Self {
                key,
                document: b.build().to_pem().expect("pem"),
            }
        }

        /// A host with an existing key (PEM) and host-key document.
        pub fn from_pem(key: &[u8], document: &[u8]) -> Self {
            Self {
                key: PKey::private_key_from_pem(key).expect("a PEM private key"),
                document: document.to_vec(),
            }
        }

        /// The host's public key.
        pub fn public(&self) -> PKey<Public> {
            PKey::public_key_from_pem(&self.key.public_key_to_pem().expect("pem")).expect("pem")
        }

        /// Its public host-key hash.
        pub fn hash(&self) -> [u8; 32] {
            host_key_hash(&self.public()).expect("hash")
        }

        /// Whether `arcb` has a key slot for this host.
        pub fn has_slot(&self, arcb: &[u8]) -> bool {
            let nks = arcb[0x27] as usize;
            let slots = &arcb[HDR + AUTH + COORDS..HDR + AUTH + COORDS + nks * SLOT];
            slots.chunks(SLOT).any(|s| s[..32] == self.hash())
        }

        /// The Ultravisor's answer to `arcb` for a guest with `cuid` running `image`, with
        /// `user` data. Panics when the request has no slot for this host.
        pub fn answer(
            &self,
            arcb: &[u8],
            image: &ImageTags,
            cuid: [u8; 16],
            user: &[u8],
        ) -> Evidence {
            let nks = arcb[0x27] as usize;
            let coords = &arcb[HDR + AUTH..HDR + AUTH + COORDS];
            let group = EcGroup::from_curve_name(Nid::SECP521R1).expect("P-521");
            let x = BigNum::from_slice(&coords[..80]).expect("x");
            let y = BigNum::from_slice(&coords[80..]).expect("y");
            let customer = PKey::from_ec_key(
                EcKey::from_public_key_affine_coordinates(&group, &x, &y).expect("point"),
            )
            .expect("key");
            let mine = self.hash();
            let slots = &arcb[HDR + AUTH + COORDS..HDR + AUTH + COORDS + nks * SLOT];
            let slot = slots
                .chunks(SLOT)
                .find(|s| s[..32] == mine)
                .expect("a key slot for this host");
            let kek = derive_aes256_gcm_key(&self.key, &customer).expect("ECDH");
            let arpk = decrypt_aead(
                &SymKey::Aes256(kek),
                &[0; 12],
                &[],
                &slot[32..64],
                &slot[64..80],
            )
            .expect("the key slot opens");
            // The result is additional data (none), plaintext, tag.
            let arpk: [u8; 32] = arpk.into_buf().value()[..32].try_into().expect("32 bytes");
            let (auth, conf) = AttestationRequest::decrypt_bin(arcb, &SymKey::Aes256(arpk.into()))
                .expect("the request opens");
            assert!(auth.flags().image_phkh() && auth.flags().attest_phkh());
            let mut additional = mine.to_vec();
            additional.extend_from_slice(&mine);
            let tags =
                BootHdrTags::try_from(hex::decode(image.to_hex()).expect("hex")).expect("tags");
            let nonce = conf.nonce().as_ref().map(|n| *n.value());
            let items =
                AttestationItems::new(&tags, &cuid, Some(user), nonce.as_ref(), Some(&additional));
            let key = PKey::hmac(conf.measurement_key()).expect("key");
            let m = AttestationMeasurement::calculate(items, AttestationMeasAlg::HmacSha512, &key)
                .expect("HMAC");
            Evidence {
                cuid: hex::encode(cuid),
                user_data: hex::encode(user),
                measurement: hex::encode(m.as_ref()),
                additional_data: hex::encode(&additional),
            }
        }
    }

    /// What the Ultravisor leaves in guest memory after it unpacked an SE image.
    #[derive(Debug)]
    pub struct Unpacked {
        /// Guest memory from address 0: the image file with every encrypted component
        /// replaced by its plaintext (as unpack decrypts pages in place).
        pub memory: Vec<u8>,
        /// The PSW the secure guest starts with (mask, address), from the header's encrypted
        /// area.
        pub psw: (u64, u64),
        /// The plaintext control flags.
        pub pcf: u64,
        /// The encrypted components (tweak prefix, address, size), as the IPL block lists them.
        pub components: Vec<(u64, u64, u64)>,
        /// The image's tags (reference values).
        pub tags: ImageTags,
    }

    fn be64(b: &[u8], at: usize) -> Result<u64, String> {
        b.get(at..at + 8)
            .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
            .ok_or_else(|| format!("the image ends before offset {at:#x}"))
    }

    impl Host {
        /// Unpacks `image` as the Ultravisor does for a secure IPL on this host (IBM's
        /// Secure Execution architecture): find the SE header and IPL block (the image
        /// metadata at 0xc000), open this host's key slot (ECDH of the host key and the
        /// header's customer key, then AES-256-GCM), open the header's encrypted area (the
        /// GCM tag authenticates the whole header), decrypt each listed component page by
        /// page with AES-256-XTS (tweak: the component's prefix and the page's offset) and
        /// check the page count and the page-, address- and tweak-list digests. Errors name
        /// what failed, as the Ultravisor's return codes do.
        pub fn unpack(&self, image: &[u8]) -> Result<Unpacked, String> {
            use openssl::sha::Sha512;
            use openssl::symm::{Cipher, Crypter, Mode};
            if image.get(0xc000..0xc008) != Some(b"SeImgLnx") {
                return Err("no SE image metadata at 0xc000".into());
            }
            let hdr_at = be64(image, 0xc008)? as usize;
            let ipib_at = u64::from_be_bytes(
                image
                    .get(0xc014..0xc01c)
                    .ok_or("truncated metadata")?
                    .try_into()
                    .expect("8 bytes"),
            ) as usize;
            let hdr = image.get(hdr_at..).ok_or("the SE header is past the end")?;
            if hdr.get(..8) != Some(b"IBMSecEx") {
                return Err("no SE header (magic) where the metadata points".into());
            }
            if hdr[8..12] != 0x100u32.to_be_bytes() {
                return Err("SE header version mismatch".into());
            }
            let sehs = u32::from_be_bytes(hdr[12..16].try_into().expect("4 bytes")) as usize;
            let nks = be64(hdr, 32)? as usize;
            let sea = be64(hdr, 40)? as usize;
            let nep = be64(hdr, 48)?;
            let pcf = be64(hdr, 56)?;
            let head = 416 + nks * SLOT;
            if sehs > 8192 || sea != 128 || head + sea + 16 != sehs || hdr.len() < sehs {
                return Err(format!(
                    "SE header sizes are inconsistent (sehs {sehs}, nks {nks}, sea {sea})"
                ));
            }
            let hdr = &hdr[..sehs];
            let (pld, ald, tld) = (&hdr[224..288], &hdr[288..352], &hdr[352..416]);
            let mine = self.hash();
            let slot = hdr[416..head]
                .chunks(SLOT)
                .find(|s| s[..32] == mine)
                .ok_or("the image has no key slot for this host's key")?;
            let coords = &hdr[64..64 + COORDS];
            let group = EcGroup::from_curve_name(Nid::SECP521R1).expect("P-521");
            let x = BigNum::from_slice(&coords[..80]).map_err(|e| e.to_string())?;
            let y = BigNum::from_slice(&coords[80..]).map_err(|e| e.to_string())?;
            let customer = EcKey::from_public_key_affine_coordinates(&group, &x, &y)
                .and_then(PKey::from_ec_key)
                .map_err(|e| format!("the header's customer key is not a P-521 point: {e}"))?;
            let kek = derive_aes256_gcm_key(&self.key, &customer).map_err(|e| e.to_string())?;
            let key = decrypt_aead(
                &SymKey::Aes256(kek),
                &[0; 12],
                &[],
                &slot[32..64],
                &slot[64..80],
            )
            .map_err(|_| "the key slot does not open with this host's key".to_string())?;
            let key: [u8; 32] = key.into_buf().value()[..32].try_into().expect("32 bytes");
            let secret = decrypt_aead(
                &SymKey::Aes256(key.into()),
                &hdr[16..28],
                &hdr[..head],
                &hdr[head..head + sea],
                &hdr[head + sea..],
            )
            .map_err(|_| "the SE header does not authenticate (GCM tag)".to_string())?;
            // The result is the additional data, the plaintext, the tag.
            let secret = secret.into_buf();
            let secret = &secret.value()[head..head + sea];
            let xts = &secret[32..96];
            let psw = (be64(secret, 96)?, be64(secret, 104)?);
            let ipib = image
                .get(ipib_at..)
                .ok_or("the IPL block is past the end")?;
            if ipib.get(12) != Some(&5) {
                return Err("the IPL block is not a secure-IPL (PV) block".into());
            }
            if ipib.len() < 136 {
                return Err("the IPL block is truncated".into());
            }
            // The Ultravisor takes the header from the IPL block: it must be the one found.
            if be64(ipib, 120)? != hdr_at as u64 || be64(ipib, 128)? != sehs as u64 {
                return Err("the IPL block names another SE header than the image metadata".into());
            }
            let n = u32::from_be_bytes(ipib[116..120].try_into().expect("4 bytes")) as usize;
            let mut memory = image.to_vec();
            let mut components = Vec::new();
            let (mut p, mut a, mut t, mut pages) =
                (Sha512::new(), Sha512::new(), Sha512::new(), 0u64);
            for i in 0..n {
                let e = 136 + 24 * i;
                let (prefix, addr, len) = (be64(ipib, e)?, be64(ipib, e + 8)?, be64(ipib, e + 16)?);
                if addr % 4096 != 0 || len % 4096 != 0 || (addr + len) as usize > image.len() {
                    return Err(format!("component {i} is not whole pages inside the image"));
                }
                for off in (0..len).step_by(4096) {
                    let at = (addr + off) as usize;
                    let mut tweak = [0u8; 16];
                    tweak[..8].copy_from_slice(&prefix.to_be_bytes());
                    tweak[8..].copy_from_slice(&off.to_be_bytes());
                    let page = &image[at..at + 4096];
                    let mut c =
                        Crypter::new(Cipher::aes_256_xts(), Mode::Decrypt, xts, Some(&tweak))
                            .map_err(|e| e.to_string())?;
                    let mut out = vec![0u8; 4096 + 16];
                    let k = c.update(page, &mut out).map_err(|e| e.to_string())?;
                    let k = k + c.finalize(&mut out[k..]).map_err(|e| e.to_string())?;
                    memory[at..at + 4096].copy_from_slice(&out[..k]);
                    p.update(page);
                    a.update(&(addr + off).to_be_bytes());
                    t.update(&tweak);
                    pages += 1;
                }
                components.push((prefix, addr, len));
            }
            if pages != nep {
                return Err(format!(
                    "the image lists {pages} encrypted pages, the header {nep}"
                ));
            }
            for (name, want, got) in [
                ("address-list digest (ALD)", ald, a.finish()),
                ("page-list digest (PLD)", pld, p.finish()),
                ("tweak-list digest (TLD)", tld, t.finish()),
            ] {
                if want != got {
                    return Err(format!("{name} mismatch"));
                }
            }
            let mut tags = hdr[224..416].to_vec();
            tags.extend_from_slice(&hdr[sehs - 16..]);
            Ok(Unpacked {
                memory,
                psw,
                pcf,
                components,
                tags: ImageTags::from_bytes(&tags).map_err(|e| e.to_string())?,
            })
        }
    }

    /// A made-up image's tags (`seed` varies them).
    pub fn image(seed: u8) -> ImageTags {
        let b: Vec<u8> = (0..super::IMAGE_TAGS_LEN)
            .map(|i| (i as u8) ^ seed)
            .collect();
        ImageTags::from_bytes(&b).expect("208 bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    fn hosts(of: &[&Host]) -> HostKeys {
        let docs: Vec<(String, Vec<u8>)> = of
            .iter()
            .enumerate()
            .map(|(i, h)| (format!("host-{i}.crt"), h.document.clone()))
            .collect();
        HostKeys::load(&docs, None).unwrap()
    }

    #[test]
    fn a_challenge_answered_by_the_configured_host_verifies_and_names_the_image() {
        let (a, b) = (Host::new("host-a"), Host::new("host-b"));
        let both = hosts(&[&a, &b]);
        let (arcb, secret) = challenge(&both).unwrap();
        let runtime = [7u8; 64];
        let (good, other) = (image(1), image(2));
        // Either host can answer; the measurement names the image the guest runs.
        let evidence = b.answer(&arcb, &good, [9; 16], &runtime);
        let claims = verify(&evidence, &secret, &[other, good], &runtime, &both).unwrap();
        assert_eq!(claims.image, good);
        assert_eq!(claims.cuid, hex::encode([9u8; 16]));
        assert_eq!(claims.attestation_phkh, hex::encode(b.hash()));

        // Another image's tags, another session's secret, other user data, or any altered
        // field: refused.
        assert!(matches!(
            verify(&evidence, &secret, &[other], &runtime, &both),
            Err(SeError::Measurement(1))
        ));
        let (_, another) = challenge(&both).unwrap();
        assert!(matches!(
            verify(&evidence, &another, &[good], &runtime, &both),
            Err(SeError::Measurement(_))
        ));
        assert!(matches!(
            verify(&evidence, &secret, &[good], &[8u8; 64], &both),
            Err(SeError::UserData)
        ));
        for field in 0..4 {
            let mut e = evidence.clone();
            let f = match field {
                0 => &mut e.cuid,
                1 => &mut e.user_data,
                2 => &mut e.measurement,
                _ => &mut e.additional_data,
            };
            let mut bytes = hex::decode(&*f).unwrap();
            bytes[0] ^= 1;
            *f = hex::encode(bytes);
            assert!(
                verify(&e, &secret, &[good], &runtime, &both).is_err(),
                "altered field {field} passed"
            );
        }
        // A KBS that knows only host a refuses b's answer.
        assert!(matches!(
            verify(&evidence, &secret, &[good], &runtime, &hosts(&[&a])),
            Err(SeError::UnknownHost(_))
        ));
        // The secret survives the KBS's sealing round trip.
        let again = ChallengeSecret::from_bytes(secret.as_bytes()).unwrap();
        assert!(verify(&evidence, &again, &[good], &runtime, &both).is_ok());
    }

    #[test]
    fn a_host_whose_key_is_not_in_the_request_has_no_slot() {
        let (a, stranger) = (Host::new("host-a"), Host::new("stranger"));
        let (arcb, _) = challenge(&hosts(&[&a])).unwrap();
        assert!(a.has_slot(&arcb));
        assert!(!stranger.has_slot(&arcb));
    }

    /// An SE image made by IBM's `pvimg`: its header's tags are what `pvimg info` printed.
    #[test]
    fn an_se_images_tags_are_read_as_ibms_pvimg_reports_them() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/se/");
        let image = std::fs::read(format!("{dir}test-se.img")).unwrap();
        let want = std::fs::read_to_string(format!("{dir}test-se.img.tags")).unwrap();
        let tags = ImageTags::from_se_image(&image).unwrap();
        assert_eq!(tags.to_hex(), want.trim());
        // A changed header byte (inside the page-list digest) changes the tags.
        let at = image.windows(8).position(|w| w == b"IBMSecEx").unwrap();
        let mut other = image.clone();
        let pld = hex::decode(&want.trim()[..128]).unwrap();
        let p = at
            + other[at..]
                .windows(64)
                .position(|w| w == pld.as_slice())
                .unwrap();
        other[p] ^= 1;
        assert_ne!(ImageTags::from_se_image(&other).unwrap(), tags);
    }

    /// The Ultravisor stand-in unpacks the image IBM's `pvimg` made, with the private key of
    /// the host-key document it was sealed for: the kernel and command line come back as they
    /// went in, and a changed byte in an encrypted page or in the header is refused.
    #[test]
    fn the_ultravisor_stand_in_unpacks_an_image_made_by_ibms_pvimg() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/se/");
        let read = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        let image = read("test-se.img");
        let host = Host::from_pem(&read("test-se-host.key"), &read("test-se-host.crt"));
        let u = host.unpack(&image).unwrap();
        assert_eq!(u.tags, ImageTags::from_se_image(&image).unwrap());
        assert_eq!(u.pcf, 0xe0);
        // pvimg's components: kernel, command line, stage3b (its tweak prefixes start with
        // the component kind: 40, 60, 70).
        let kinds: Vec<u64> = u.components.iter().map(|c| c.0 >> 48).collect();
        assert_eq!(kinds, [40, 60, 70]);
        let kernel = read("test-se.kernel");
        let (_, k, _) = u.components[0];
        let (_, c, _) = u.components[1];
        assert!(
            u.memory[k as usize..k as usize + kernel.len()] == kernel[..],
            "the kernel differs"
        );
        // The parameter file as pvimg read it (with its newline), NUL-terminated.
        let cmdline = b"console=ttysclp0 coffer.test=1\n\0";
        assert_eq!(&u.memory[c as usize..c as usize + cmdline.len()], cmdline);
        assert_eq!(u.psw.1, u.components[2].1, "the guest starts at stage3b");
        // Tampering: a ciphertext byte (page-list digest), the header (GCM tag), another host.
        let mut bad = image.clone();
        bad[k as usize + 100] ^= 1;
        assert_eq!(
            host.unpack(&bad).unwrap_err(),
            "page-list digest (PLD) mismatch"
        );
        let at = image.windows(8).position(|w| w == b"IBMSecEx").unwrap();
        let mut bad = image.clone();
        bad[at + 56 + 7] ^= 0x10; // a plaintext control flag
        assert!(host.unpack(&bad).unwrap_err().contains("GCM tag"));
        assert!(Host::new("other")
            .unpack(&image)
            .unwrap_err()
            .contains("no key slot"));
    }

    #[test]
    fn bad_host_key_documents_and_tags_are_refused_naming_them() {
        assert!(matches!(
            HostKeys::load(&[], None),
            Err(SeError::NoHostKeys)
        ));
        let e = HostKeys::load(&[("junk.crt".into(), b"junk".to_vec())], None).unwrap_err();
        assert!(e.to_string().contains("junk.crt"), "{e}");
        let e = ImageTags::from_hex("abcd").unwrap_err();
        assert!(e.to_string().contains("208 bytes"), "{e}");
        let e = ImageTags::from_se_image(&[0u8; 4096]).unwrap_err();
        assert!(e.to_string().contains("not an SE image"), "{e}");
    }

    /// The certificates and CRLs s390-tools publishes for its own tests
    /// (`testdata/se/s390-tools-cert`, MIT licence beside them): a root CA, an intermediate CA,
    /// the IBM Z host-key signing certificate, their CRLs, and host-key documents. With that
    /// chain the valid document loads; the expired one, the revoked one, one signed by another
    /// key-signing service (wrong issuer), one issued by a fake IBM chain and one whose
    /// signature was altered are each refused, naming the document.
    #[test]
    fn host_key_documents_are_checked_against_s390_tools_test_chain() {
        let dir = std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/se/s390-tools-cert"
        ));
        let chain = signing_chain(
            &[dir.join("ibm.crt"), dir.join("inter_ca.crt")],
            &[
                dir.join("root_ca.crl"),
                dir.join("inter_ca.crl"),
                dir.join("ibm.crl"),
            ],
            Some(&dir.join("root_ca.crt")),
        )
        .unwrap();
        let load =
            |name: &str, data: Vec<u8>| HostKeys::load(&[(name.to_string(), data)], Some(&chain));
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let good = load("host.crt", read("host.crt")).unwrap();
        assert_eq!(good.hashes().count(), 1);
        // Loaded under neutral names, so that the reason is the message's, not the file name's.
        for (i, (file, why)) in [
            ("host_crt_expired.crt", "after validity period"),
            ("host_rev.crt", "revoked"),
            ("host_invalid_signing_key.crt", "authority key id mismatch"),
            ("fake_host.crt", "authority key id mismatch"),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("document-{i}");
            let e = load(&name, read(file))
                .err()
                .unwrap_or_else(|| panic!("{file} was accepted"));
            let e = e.to_string();
            assert!(e.contains(&name), "{e}");
            assert!(e.to_lowercase().contains(why), "{file}: {e}");
        }
        // The valid document with one bit of its signature changed.
        let pem = read("host.crt");
        let mut der = X509::from_pem(&pem).unwrap().to_der().unwrap();
        let last = der.len() - 1;
        der[last] ^= 1;
        let e = load("tampered.crt", der).expect_err("a tampered signature is refused");
        assert!(e.to_string().contains("tampered.crt"), "{e}");
        assert!(
            e.to_string().contains("Signature verification failed"),
            "{e}"
        );
        // Without the CRL that lists the revoked document, the chain is incomplete: refused.
        let no_crl = signing_chain(
            &[dir.join("ibm.crt"), dir.join("inter_ca.crt")],
            &[dir.join("root_ca.crl"), dir.join("inter_ca.crl")],
            Some(&dir.join("root_ca.crt")),
        )
        .unwrap();
        assert!(HostKeys::load(&[("host.crt".into(), read("host.crt"))], Some(&no_crl)).is_err());
    }
}
