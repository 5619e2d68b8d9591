//! JSON Web Encryption as the KBS protocol uses it.
//!
//! A TEE generates a key pair ([`TeeKeyPair`]) and sends its public half as a JWK in the
//! attestation request; the KBS encrypts each released resource to that key ([`encrypt`]) as a
//! flattened JWE with content encryption `A256GCM` and key management
//!
//! * `ECDH-ES+A256KW` for EC P-256 and P-521 keys (RFC 7518 §4.6: ephemeral-static ECDH, Concat
//!   KDF with SHA-256, AlgorithmID = the `alg` value, empty PartyUInfo/PartyVInfo, then AES Key
//!   Wrap of a random content key), or
//! * `RSA-OAEP-256` for RSA keys (OAEP with SHA-256 and MGF1-SHA-256).
//!
//! The additional authenticated data is the ASCII of the base64url (unpadded) protected header.
//! Cryptography is aws-lc-rs; the `rsa` crate only converts RSA key components to DER.
//!
//! # Example
//!
//! The TEE generates its key pair, the KBS encrypts a resource to the public JWK, and only the
//! TEE's private key opens the JWE:
//!
//! ```
//! use coffer_jose::{encrypt, JoseError, TeeKeyAlgorithm, TeeKeyPair};
//!
//! // TEE side: a fresh key pair; its public half goes into the attestation request.
//! let tee = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256)?;
//!
//! // KBS side: the resource, encrypted to that public key.
//! let jwe = encrypt(tee.public_jwk(), b"database password")?;
//!
//! // TEE side again: the plaintext comes back (in a buffer wiped on drop).
//! let plaintext = tee.decrypt(&jwe)?;
//! assert_eq!(&plaintext[..], b"database password");
//!
//! // Another key cannot open it, and an altered ciphertext is refused.
//! let other = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256)?;
//! assert!(matches!(other.decrypt(&jwe), Err(JoseError::Decrypt)));
//! let mut tampered = jwe.clone();
//! tampered.ciphertext[0] ^= 1;
//! assert!(matches!(tee.decrypt(&tampered), Err(JoseError::Decrypt)));
//! # Ok::<(), JoseError>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod json;

use aws_lc_rs::{
    aead::{self, Aad, LessSafeKey, Nonce, UnboundKey},
    agreement::{self, PrivateKey, UnparsedPublicKey},
    digest,
    encoding::AsDer,
    key_wrap::{AesKek, KeyWrap, AES_256},
    rand::{SecureRandom, SystemRandom},
    rsa::{
        KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
        PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
    },
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use coffer_wire::{JweResponse, ProtectedHeader, TeePubKey};
use rsa::{
    pkcs8::{DecodePublicKey, EncodePublicKey},
    traits::PublicKeyParts,
    BigUint, RsaPublicKey,
};
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

/// `alg` of EC keys.
pub const ALG_ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// `alg` of RSA keys.
pub const ALG_RSA_OAEP_256: &str = "RSA-OAEP-256";
/// Content encryption algorithm of every response.
pub const ENC_A256GCM: &str = "A256GCM";

/// Errors of JWE operations. Messages never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum JoseError {
    /// The JWK uses a key type, curve or algorithm that is not supported.
    #[error("unsupported TEE key: {0}")]
    Unsupported(String),
    /// The JWK is malformed (bad base64, wrong coordinate length, point not on the curve, …).
    #[error("invalid TEE public key: {0}")]
    InvalidKey(String),
    /// The JWE is malformed or uses other algorithms than the ones this key expects.
    #[error("invalid JWE: {0}")]
    InvalidJwe(String),
    /// Authenticated decryption failed: the JWE was not made for this key or was altered.
    #[error("JWE decryption failed: wrong key or tampered ciphertext")]
    Decrypt,
    /// The crypto library reported a failure.
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

type Result<T> = std::result::Result<T, JoseError>;

/// The kind of TEE key pair to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TeeKeyAlgorithm {
    /// EC P-256 with ECDH-ES+A256KW (the upstream default).
    #[default]
    EcP256,
    /// EC P-521 with ECDH-ES+A256KW.
    EcP521,
    /// RSA 2048 with RSA-OAEP-256.
    Rsa2048,
}

impl std::str::FromStr for TeeKeyAlgorithm {
    type Err = JoseError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ec-p256" | "P-256" => Ok(Self::EcP256),
            "ec-p521" | "P-521" => Ok(Self::EcP521),
            "rsa" | "rsa2048" | "RSA-OAEP-256" => Ok(Self::Rsa2048),
            other => Err(JoseError::Unsupported(format!(
                "{other:?}; use ec-p256, ec-p521 or rsa2048"
            ))),
        }
    }
}

struct Curve {
    name: &'static str,
    alg: &'static agreement::Algorithm,
    coord_len: usize,
}

const P256: Curve = Curve {
    name: "P-256",
    alg: &agreement::ECDH_P256,
    coord_len: 32,
};
const P521: Curve = Curve {
    name: "P-521",
    alg: &agreement::ECDH_P521,
    coord_len: 66,
};

fn curve(name: &str) -> Result<&'static Curve> {
    match name {
        "P-256" => Ok(&P256),
        "P-521" => Ok(&P521),
        other => Err(JoseError::Unsupported(format!(
            "curve {other:?}; use P-256 or P-521"
        ))),
    }
}

enum Secret {
    Ec(PrivateKey, &'static Curve),
    Rsa(PrivateDecryptingKey),
}

/// A TEE's key pair. The private half never leaves the process and is freed (and wiped by
/// aws-lc) on drop.
///
/// ```
/// use coffer_jose::{encrypt, TeeKeyAlgorithm, TeeKeyPair};
/// use coffer_wire::TeePubKey;
///
/// // An RSA key pair: its JWK is what a TEE sends as `tee-pubkey`.
/// let tee = TeeKeyPair::generate("rsa2048".parse::<TeeKeyAlgorithm>()?)?;
/// assert!(matches!(tee.public_jwk(), TeePubKey::RSA { alg, .. } if alg == "RSA-OAEP-256"));
///
/// // The JWE travels as JSON; what arrives decrypts to what was sent.
/// let wire = serde_json::to_string(&encrypt(tee.public_jwk(), b"api token")?)?;
/// let received = serde_json::from_str(&wire)?;
/// assert_eq!(&tee.decrypt(&received)?[..], b"api token");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TeeKeyPair {
    secret: Secret,
    public: TeePubKey,
}

impl std::fmt::Debug for TeeKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn split_point(point: &[u8], coord_len: usize) -> Result<(String, String)> {
    if point.len() != 1 + 2 * coord_len || point[0] != 4 {
        return Err(JoseError::Crypto("unexpected public key encoding"));
    }
    Ok((
        B64.encode(&point[1..1 + coord_len]),
        B64.encode(&point[1 + coord_len..]),
    ))
}

impl TeeKeyPair {
    /// Generates a fresh key pair.
    pub fn generate(alg: TeeKeyAlgorithm) -> Result<Self> {
        match alg {
            TeeKeyAlgorithm::EcP256 => Self::generate_ec(&P256),
            TeeKeyAlgorithm::EcP521 => Self::generate_ec(&P521),
            TeeKeyAlgorithm::Rsa2048 => {
                let key = PrivateDecryptingKey::generate(KeySize::Rsa2048)
                    .map_err(|_| JoseError::Crypto("RSA key generation"))?;
                let der = key
                    .public_key()
                    .as_der()
                    .map_err(|_| JoseError::Crypto("RSA public key encoding"))?;
                let parsed = RsaPublicKey::from_public_key_der(der.as_ref())
                    .map_err(|_| JoseError::Crypto("RSA public key decoding"))?;
                let public = TeePubKey::RSA {
                    alg: ALG_RSA_OAEP_256.into(),
                    k_mod: B64.encode(parsed.n().to_bytes_be()),
                    k_exp: B64.encode(parsed.e().to_bytes_be()),
                };
                Ok(Self {
                    secret: Secret::Rsa(key),
                    public,
                })
            }
        }
    }

    fn generate_ec(curve: &'static Curve) -> Result<Self> {
        let key =
            PrivateKey::generate(curve.alg).map_err(|_| JoseError::Crypto("EC key generation"))?;
        let point = key
            .compute_public_key()
            .map_err(|_| JoseError::Crypto("EC public key"))?;
        let (x, y) = split_point(point.as_ref(), curve.coord_len)?;
        let public = TeePubKey::EC {
            crv: curve.name.into(),
            alg: ALG_ECDH_ES_A256KW.into(),
            x,
            y,
        };
        Ok(Self {
            secret: Secret::Ec(key, curve),
            public,
        })
    }

    /// The public key as the JWK sent in the attestation request (`tee-pubkey`).
    pub fn public_jwk(&self) -> &TeePubKey {
        &self.public
    }

    /// Decrypts a JWE produced for this key.
    pub fn decrypt(&self, jwe: &JweResponse) -> Result<Zeroizing<Vec<u8>>> {
        if jwe.protected.enc != ENC_A256GCM {
            return Err(JoseError::InvalidJwe(format!(
                "content encryption {:?} is not A256GCM",
                jwe.protected.enc
            )));
        }
        let cek: Zeroizing<Vec<u8>> = match &self.secret {
            Secret::Ec(key, curve) => {
                if jwe.protected.alg != ALG_ECDH_ES_A256KW {
                    return Err(JoseError::InvalidJwe(format!(
                        "key management {:?} does not match an EC key",
                        jwe.protected.alg
                    )));
                }
                let epk = jwe
                    .protected
                    .other_fields
                    .get("epk")
                    .ok_or_else(|| JoseError::InvalidJwe("missing epk".into()))?;
                let epk: TeePubKey = serde_json::from_value(with_default_alg(epk.clone()))
                    .map_err(|e| JoseError::InvalidJwe(format!("epk: {e}")))?;
                let (epk_curve, point) = ec_point(&epk)?;
                if epk_curve.name != curve.name {
                    return Err(JoseError::InvalidJwe("epk is on another curve".into()));
                }
                let kek = agreement::agree(
                    key,
                    UnparsedPublicKey::new(curve.alg, &point),
                    JoseError::InvalidJwe("epk is not a valid point".into()),
                    |z| Ok(concat_kdf(z, ALG_ECDH_ES_A256KW, b"", b"", 256)),
                )?;
                let kek = AesKek::new(&AES_256, &kek[..32])
                    .map_err(|_| JoseError::Crypto("AES-KW key"))?;
                let mut out = Zeroizing::new(vec![0u8; jwe.encrypted_key.len()]);
                let n = kek
                    .unwrap(&jwe.encrypted_key, &mut out)
                    .map_err(|_| JoseError::Decrypt)?
                    .len();
                out.truncate(n);
                out
            }
            Secret::Rsa(key) => {
                if jwe.protected.alg != ALG_RSA_OAEP_256 {
                    return Err(JoseError::InvalidJwe(format!(
                        "key management {:?} does not match an RSA key",
                        jwe.protected.alg
                    )));
                }
                let oaep = OaepPrivateDecryptingKey::new(key.clone())
                    .map_err(|_| JoseError::Crypto("RSA-OAEP key"))?;
                let mut out = Zeroizing::new(vec![0u8; oaep.min_output_size()]);
                let n = oaep
                    .decrypt(&OAEP_SHA256_MGF1SHA256, &jwe.encrypted_key, &mut out, None)
                    .map_err(|_| JoseError::Decrypt)?
                    .len();
                out.truncate(n);
                out
            }
        };
        if jwe.iv.len() != aead::NONCE_LEN || jwe.tag.len() != aead::MAX_TAG_LEN {
            return Err(JoseError::InvalidJwe(
                "iv or tag has the wrong length".into(),
            ));
        }
        let aad = jwe
            .protected
            .generate_aad()
            .map_err(|_| JoseError::InvalidJwe("protected header does not serialize".into()))?;
        open_a256gcm(&cek, &jwe.iv, &aad, &jwe.ciphertext, &jwe.tag)
    }
}

/// ECDH-ES+A256KW towards `point` on `curve`: a fresh ephemeral key pair, Concat KDF (empty
/// PartyUInfo/PartyVInfo), AES Key Wrap of `cek`. Returns the `epk` JWK and the wrapped key.
fn ecdh_es_wrap(curve: &Curve, point: &[u8], cek: &[u8]) -> Result<(Value, Vec<u8>)> {
    let eph =
        PrivateKey::generate(curve.alg).map_err(|_| JoseError::Crypto("EC key generation"))?;
    let eph_pub = eph
        .compute_public_key()
        .map_err(|_| JoseError::Crypto("EC public key"))?;
    let (x, y) = split_point(eph_pub.as_ref(), curve.coord_len)?;
    let kek = agreement::agree(
        &eph,
        UnparsedPublicKey::new(curve.alg, point),
        JoseError::InvalidKey("point is not on the curve".into()),
        |z| Ok(concat_kdf(z, ALG_ECDH_ES_A256KW, b"", b"", 256)),
    )?;
    let kek = AesKek::new(&AES_256, &kek).map_err(|_| JoseError::Crypto("AES-KW key"))?;
    let mut wrapped = vec![0u8; cek.len() + 8];
    kek.wrap(cek, &mut wrapped)
        .map_err(|_| JoseError::Crypto("AES key wrap"))?;
    Ok((
        json!({"kty": "EC", "crv": curve.name, "x": x, "y": y}),
        wrapped,
    ))
}

/// A256GCM content encryption under `cek` with a random IV: (iv, ciphertext, tag).
fn seal_a256gcm(cek: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let mut iv = [0u8; aead::NONCE_LEN];
    SystemRandom::new()
        .fill(&mut iv)
        .map_err(|_| JoseError::Crypto("random"))?;
    let key = LessSafeKey::new(
        UnboundKey::new(&aead::AES_256_GCM, cek).map_err(|_| JoseError::Crypto("AES key"))?,
    );
    let mut ciphertext = plaintext.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(iv),
            Aad::from(aad),
            &mut ciphertext,
        )
        .map_err(|_| JoseError::Crypto("AES-GCM"))?;
    Ok((iv.to_vec(), ciphertext, tag.as_ref().to_vec()))
}

/// A256GCM content decryption; any mismatch (lengths, key, tag) is [`JoseError::Decrypt`].
fn open_a256gcm(
    cek: &[u8],
    iv: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    if cek.len() != 32 || iv.len() != aead::NONCE_LEN || tag.len() != aead::MAX_TAG_LEN {
        return Err(JoseError::Decrypt);
    }
    let key = LessSafeKey::new(
        UnboundKey::new(&aead::AES_256_GCM, cek).map_err(|_| JoseError::Crypto("AES key"))?,
    );
    let nonce = Nonce::try_assume_unique_for_key(iv).map_err(|_| JoseError::Decrypt)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(ciphertext.len() + tag.len()));
    buf.extend_from_slice(ciphertext);
    buf.extend_from_slice(tag);
    let n = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| JoseError::Decrypt)?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// Upstream epk JWKs carry no `alg`; the kbs-types JWK type requires one.
fn with_default_alg(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.entry("alg")
            .or_insert_with(|| Value::String(ALG_ECDH_ES_A256KW.into()));
    }
    v
}

fn decode_coord(s: &str, len: usize, which: &str) -> Result<Vec<u8>> {
    let b = B64
        .decode(s)
        .map_err(|_| JoseError::InvalidKey(format!("{which} is not base64url")))?;
    if b.len() != len {
        return Err(JoseError::InvalidKey(format!(
            "{which} has {} bytes, expected {len}",
            b.len()
        )));
    }
    Ok(b)
}

fn ec_point(jwk: &TeePubKey) -> Result<(&'static Curve, Vec<u8>)> {
    let TeePubKey::EC { crv, x, y, .. } = jwk else {
        return Err(JoseError::Unsupported("expected an EC key".into()));
    };
    let curve = curve(crv)?;
    let mut point = Vec::with_capacity(1 + 2 * curve.coord_len);
    point.push(4);
    point.extend(decode_coord(x, curve.coord_len, "x")?);
    point.extend(decode_coord(y, curve.coord_len, "y")?);
    Ok((curve, point))
}

/// Checks that a JWK is usable as a TEE key (supported type, well-formed, point on the curve)
/// without encrypting anything.
///
/// ```
/// use coffer_jose::{validate_public_key, JoseError, TeeKeyAlgorithm, TeeKeyPair};
/// use coffer_wire::TeePubKey;
///
/// let tee = TeeKeyPair::generate(TeeKeyAlgorithm::EcP521)?;
/// validate_public_key(tee.public_jwk())?;
///
/// // The same key with its y coordinate swapped for x: no longer a point on the curve.
/// let TeePubKey::EC { crv, alg, x, .. } = tee.public_jwk().clone() else { unreachable!() };
/// let bad = TeePubKey::EC { crv, alg, y: x.clone(), x };
/// assert!(matches!(validate_public_key(&bad), Err(JoseError::InvalidKey(_))));
/// # Ok::<(), JoseError>(())
/// ```
pub fn validate_public_key(jwk: &TeePubKey) -> Result<()> {
    match jwk {
        TeePubKey::EC { alg, .. } => {
            if alg != ALG_ECDH_ES_A256KW {
                return Err(JoseError::Unsupported(format!(
                    "EC key algorithm {alg:?}; use ECDH-ES+A256KW"
                )));
            }
            let (curve, point) = ec_point(jwk)?;
            // Parsing the point as a peer key checks that it lies on the curve.
            agreement::ParsedPublicKey::try_from(UnparsedPublicKey::new(curve.alg, &point))
                .map(|_| ())
                .map_err(|_| JoseError::InvalidKey("point is not on the curve".into()))
        }
        TeePubKey::RSA { .. } => rsa_public(jwk).map(|_| ()),
        TeePubKey::AKP { alg, .. } => Err(JoseError::Unsupported(format!("AKP key ({alg})"))),
    }
}

fn rsa_public(jwk: &TeePubKey) -> Result<OaepPublicEncryptingKey> {
    let TeePubKey::RSA { alg, k_mod, k_exp } = jwk else {
        return Err(JoseError::Unsupported("expected an RSA key".into()));
    };
    if alg != ALG_RSA_OAEP_256 {
        return Err(JoseError::Unsupported(format!(
            "RSA key algorithm {alg:?}; use RSA-OAEP-256"
        )));
    }
    let n = B64
        .decode(k_mod)
        .map_err(|_| JoseError::InvalidKey("n is not base64url".into()))?;
    let e = B64
        .decode(k_exp)
        .map_err(|_| JoseError::InvalidKey("e is not base64url".into()))?;
    if !(2048..=8192).contains(&(n.len() * 8)) {
        return Err(JoseError::InvalidKey(format!(
            "RSA modulus of {} bits; use 2048 to 8192",
            n.len() * 8
        )));
    }
    let key = RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
        .map_err(|e| JoseError::InvalidKey(format!("RSA key: {e}")))?;
    let der = key
        .to_public_key_der()
        .map_err(|_| JoseError::Crypto("RSA public key encoding"))?;
    let key = PublicEncryptingKey::from_der(der.as_bytes())
        .map_err(|_| JoseError::InvalidKey("RSA key rejected".into()))?;
    OaepPublicEncryptingKey::new(key).map_err(|_| JoseError::Crypto("RSA-OAEP key"))
}

/// Concat KDF of NIST SP 800-56A as profiled by RFC 7518 §4.6.2, with SHA-256.
/// `keydatalen_bits` must be at most 256 (one hash block), which covers every use here.
pub fn concat_kdf(
    z: &[u8],
    alg_id: &str,
    apu: &[u8],
    apv: &[u8],
    keydatalen_bits: u32,
) -> Zeroizing<Vec<u8>> {
    debug_assert!(keydatalen_bits <= 256 && keydatalen_bits.is_multiple_of(8));
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&1u32.to_be_bytes());
    ctx.update(z);
    for part in [alg_id.as_bytes(), apu, apv] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part);
    }
    ctx.update(&keydatalen_bits.to_be_bytes());
    let out = ctx.finish();
    Zeroizing::new(out.as_ref()[..(keydatalen_bits / 8) as usize].to_vec())
}

/// Encrypts `plaintext` to the TEE public key `to` as a flattened JWE.
pub fn encrypt(to: &TeePubKey, plaintext: &[u8]) -> Result<JweResponse> {
    let rng = SystemRandom::new();
    let mut cek = Zeroizing::new([0u8; 32]);
    rng.fill(cek.as_mut())
        .map_err(|_| JoseError::Crypto("random"))?;

    let (protected, encrypted_key) = match to {
        TeePubKey::EC { alg, .. } => {
            if alg != ALG_ECDH_ES_A256KW {
                return Err(JoseError::Unsupported(format!(
                    "EC key algorithm {alg:?}; use ECDH-ES+A256KW"
                )));
            }
            let (curve, point) = ec_point(to)?;
            let (epk, wrapped) = ecdh_es_wrap(curve, &point, cek.as_ref())?;
            let mut other = Map::new();
            other.insert("epk".into(), epk);
            (
                ProtectedHeader {
                    alg: ALG_ECDH_ES_A256KW.into(),
                    enc: ENC_A256GCM.into(),
                    other_fields: other,
                },
                wrapped,
            )
        }
        TeePubKey::RSA { .. } => {
            let key = rsa_public(to)?;
            let mut out = vec![0u8; key.ciphertext_size()];
            let n = key
                .encrypt(&OAEP_SHA256_MGF1SHA256, cek.as_ref(), &mut out, None)
                .map_err(|_| JoseError::Crypto("RSA-OAEP encryption"))?
                .len();
            out.truncate(n);
            (
                ProtectedHeader {
                    alg: ALG_RSA_OAEP_256.into(),
                    enc: ENC_A256GCM.into(),
                    other_fields: Map::new(),
                },
                out,
            )
        }
        TeePubKey::AKP { alg, .. } => {
            return Err(JoseError::Unsupported(format!("AKP key ({alg})")))
        }
    };

    let aad = protected
        .generate_aad()
        .map_err(|_| JoseError::Crypto("protected header"))?;
    let (iv, ciphertext, tag) = seal_a256gcm(cek.as_ref(), &aad, plaintext)?;
    Ok(JweResponse {
        protected,
        encrypted_key,
        aad: None,
        iv,
        ciphertext,
        tag,
    })
}

#[cfg(test)]
mod tests;
