//! JWE in the JSON serializations (RFC 7516 §7.2), general (several recipients) and flattened,
//! with keys from PEM files: what ocicrypt writes into `org.opencontainers.image.enc.keys.jwe`.
//!
//! Key management: `ECDH-ES+A256KW` (P-256, P-384, P-521; `apu`/`apv` honoured), `RSA-OAEP`
//! (SHA-1, what ocicrypt and skopeo use for RSA keys) and `RSA-OAEP-256`. Content encryption:
//! `A256GCM`. The additional authenticated data is `ASCII(protected)` or
//! `ASCII(protected) '.' ASCII(aad)` when the JWE carries `aad`.

use aws_lc_rs::{
    agreement::{self, UnparsedPublicKey},
    key_wrap::{AesKek, KeyWrap, AES_256},
    rand::{SecureRandom, SystemRandom},
    rsa::{
        OaepAlgorithm, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
        PublicEncryptingKey, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256,
    },
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use rsa::pkcs8::{der::Decode, spki::SubjectPublicKeyInfoRef, EncodePrivateKey};
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use crate::{
    concat_kdf, ecdh_es_wrap, open_a256gcm, seal_a256gcm, Curve, JoseError, Result,
    ALG_ECDH_ES_A256KW, ALG_RSA_OAEP_256, ENC_A256GCM, P256, P521,
};

/// `alg` of RSA-OAEP with SHA-1 (ocicrypt's choice for RSA keys).
pub const ALG_RSA_OAEP: &str = "RSA-OAEP";

const P384: Curve = Curve {
    name: "P-384",
    alg: &agreement::ECDH_P384,
    coord_len: 48,
};

const CURVES: [&Curve; 3] = [&P256, &P384, &P521];

fn curve_by_name(name: &str) -> Result<&'static Curve> {
    CURVES
        .iter()
        .copied()
        .find(|c| c.name == name)
        .ok_or_else(|| JoseError::Unsupported(format!("curve {name:?}")))
}

fn curve_by_oid(oid: &str) -> Option<&'static Curve> {
    match oid {
        "1.2.840.10045.3.1.7" => Some(&P256),
        "1.3.132.0.34" => Some(&P384),
        "1.3.132.0.35" => Some(&P521),
        _ => None,
    }
}

/// A recipient's private key (EC P-256/P-384/P-521 or RSA), loaded from PEM.
pub struct RecipientKey(Priv);

enum Priv {
    Ec(agreement::PrivateKey, &'static Curve),
    Rsa(PrivateDecryptingKey),
}

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Priv::Ec(_, c) => write!(f, "RecipientKey(EC {})", c.name),
            Priv::Rsa(_) => write!(f, "RecipientKey(RSA)"),
        }
    }
}

impl RecipientKey {
    /// Parses a PEM private key: `PRIVATE KEY` (PKCS#8, EC or RSA), `EC PRIVATE KEY` (SEC 1) or
    /// `RSA PRIVATE KEY` (PKCS#1). Encrypted PEM is refused.
    pub fn from_pem(pem_text: &[u8]) -> Result<Self> {
        let block = pem::parse(pem_text)
            .map_err(|_| JoseError::InvalidKey("not a PEM private key".into()))?;
        let der = Zeroizing::new(block.contents().to_vec());
        match block.tag() {
            "PRIVATE KEY" => {
                if let Ok(k) = PrivateDecryptingKey::from_pkcs8(&der) {
                    return Ok(Self(Priv::Rsa(k)));
                }
                Self::ec_from_der(&der)
            }
            "EC PRIVATE KEY" => Self::ec_from_der(&der),
            "RSA PRIVATE KEY" => {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                let k = rsa::RsaPrivateKey::from_pkcs1_der(&der)
                    .map_err(|_| JoseError::InvalidKey("RSA private key is malformed".into()))?;
                let pkcs8 = k
                    .to_pkcs8_der()
                    .map_err(|_| JoseError::Crypto("RSA key encoding"))?;
                PrivateDecryptingKey::from_pkcs8(pkcs8.as_bytes())
                    .map(|k| Self(Priv::Rsa(k)))
                    .map_err(|_| JoseError::InvalidKey("RSA private key rejected".into()))
            }
            "ENCRYPTED PRIVATE KEY" => Err(JoseError::Unsupported(
                "encrypted PEM private keys; decrypt it first".into(),
            )),
            other => Err(JoseError::InvalidKey(format!(
                "PEM block {other:?} is not a private key"
            ))),
        }
    }

    fn ec_from_der(der: &[u8]) -> Result<Self> {
        for c in CURVES {
            if let Ok(k) = agreement::PrivateKey::from_private_key_der(c.alg, der) {
                return Ok(Self(Priv::Ec(k, c)));
            }
        }
        Err(JoseError::InvalidKey(
            "not an RSA or EC (P-256, P-384, P-521) private key".into(),
        ))
    }
}

impl crate::TeeKeyPair {
    /// A TEE key pair from a PEM private key (the forms [`RecipientKey::from_pem`] reads; EC on
    /// P-256 or P-521, or RSA with `RSA-OAEP-256`). TEEs generate their keys
    /// ([`crate::TeeKeyPair::generate`]); a fixed key is for tests and fuzzing, which need the
    /// same key in every run.
    pub fn from_pem(pem_text: &[u8]) -> Result<Self> {
        use rsa::{pkcs8::DecodePublicKey, traits::PublicKeyParts};
        match RecipientKey::from_pem(pem_text)?.0 {
            Priv::Ec(key, c) => {
                let curve = crate::curve(c.name)?;
                let point = key
                    .compute_public_key()
                    .map_err(|_| JoseError::Crypto("EC public key"))?;
                let (x, y) = crate::split_point(point.as_ref(), curve.coord_len)?;
                let public = coffer_wire::TeePubKey::EC {
                    crv: curve.name.into(),
                    alg: ALG_ECDH_ES_A256KW.into(),
                    x,
                    y,
                };
                Ok(Self {
                    secret: crate::Secret::Ec(key, curve),
                    public,
                })
            }
            Priv::Rsa(key) => {
                use aws_lc_rs::encoding::AsDer;
                let der = key
                    .public_key()
                    .as_der()
                    .map_err(|_| JoseError::Crypto("RSA public key encoding"))?;
                let parsed = rsa::RsaPublicKey::from_public_key_der(der.as_ref())
                    .map_err(|_| JoseError::Crypto("RSA public key decoding"))?;
                let public = coffer_wire::TeePubKey::RSA {
                    alg: ALG_RSA_OAEP_256.into(),
                    k_mod: B64.encode(parsed.n().to_bytes_be()),
                    k_exp: B64.encode(parsed.e().to_bytes_be()),
                };
                Ok(Self {
                    secret: crate::Secret::Rsa(key),
                    public,
                })
            }
        }
    }
}

/// A recipient's public key (EC P-256/P-384/P-521 or RSA), loaded from PEM.
pub struct RecipientPublicKey(Pub);

enum Pub {
    /// The curve and the uncompressed point.
    Ec(&'static Curve, Vec<u8>),
    Rsa(PublicEncryptingKey),
}

impl RecipientPublicKey {
    /// Parses a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn from_pem(pem_text: &[u8]) -> Result<Self> {
        let block = pem::parse(pem_text)
            .map_err(|_| JoseError::InvalidKey("not a PEM public key".into()))?;
        if block.tag() != "PUBLIC KEY" {
            return Err(JoseError::InvalidKey(format!(
                "PEM block {:?} is not a PUBLIC KEY",
                block.tag()
            )));
        }
        let spki = SubjectPublicKeyInfoRef::from_der(block.contents())
            .map_err(|_| JoseError::InvalidKey("public key is malformed".into()))?;
        match spki.algorithm.oid.to_string().as_str() {
            "1.2.840.113549.1.1.1" => PublicEncryptingKey::from_der(block.contents())
                .map(|k| Self(Pub::Rsa(k)))
                .map_err(|_| JoseError::InvalidKey("RSA public key rejected".into())),
            "1.2.840.10045.2.1" => {
                let curve = spki
                    .algorithm
                    .parameters
                    .and_then(|p| p.decode_as::<rsa::pkcs8::ObjectIdentifier>().ok())
                    .and_then(|oid| curve_by_oid(&oid.to_string()))
                    .ok_or_else(|| {
                        JoseError::Unsupported("EC curve; use P-256, P-384 or P-521".into())
                    })?;
                let point = spki.subject_public_key.raw_bytes().to_vec();
                agreement::ParsedPublicKey::try_from(UnparsedPublicKey::new(curve.alg, &point))
                    .map_err(|_| JoseError::InvalidKey("point is not on the curve".into()))?;
                Ok(Self(Pub::Ec(curve, point)))
            }
            other => Err(JoseError::Unsupported(format!(
                "public key algorithm {other}"
            ))),
        }
    }
}

fn b64(v: Option<&Value>, what: &str) -> Result<Vec<u8>> {
    let s = v
        .and_then(Value::as_str)
        .ok_or_else(|| JoseError::InvalidJwe(format!("missing {what}")))?;
    B64.decode(s)
        .map_err(|_| JoseError::InvalidJwe(format!("{what} is not base64url")))
}

fn merge(into: &mut Map<String, Value>, from: Option<&Value>) -> Result<()> {
    match from {
        None => Ok(()),
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if into.insert(k.clone(), v.clone()).is_some() {
                    return Err(JoseError::InvalidJwe(format!(
                        "header parameter {k:?} appears twice"
                    )));
                }
            }
            Ok(())
        }
        Some(_) => Err(JoseError::InvalidJwe("a header is not an object".into())),
    }
}

fn oaep_alg(alg: &str) -> Option<&'static OaepAlgorithm> {
    match alg {
        ALG_RSA_OAEP => Some(&OAEP_SHA1_MGF1SHA1),
        ALG_RSA_OAEP_256 => Some(&OAEP_SHA256_MGF1SHA256),
        _ => None,
    }
}

/// Unwraps the content key for one recipient, or `None` when this key cannot be the recipient.
fn unwrap_cek(
    key: &RecipientKey,
    header: &Map<String, Value>,
    encrypted_key: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    match &key.0 {
        Priv::Ec(k, curve) => {
            if alg != ALG_ECDH_ES_A256KW {
                return Ok(None);
            }
            let epk = header
                .get("epk")
                .ok_or_else(|| JoseError::InvalidJwe("missing epk".into()))?;
            if epk.get("crv").and_then(Value::as_str) != Some(curve.name) {
                return Ok(None);
            }
            let epk_curve = curve_by_name(curve.name)?;
            let mut point = vec![4u8];
            for c in ["x", "y"] {
                let v = b64(epk.get(c), c)?;
                if v.len() != epk_curve.coord_len {
                    return Err(JoseError::InvalidJwe(format!(
                        "epk {c} has the wrong length"
                    )));
                }
                point.extend(v);
            }
            let apu = header
                .get("apu")
                .map(|v| b64(Some(v), "apu"))
                .transpose()?
                .unwrap_or_default();
            let apv = header
                .get("apv")
                .map(|v| b64(Some(v), "apv"))
                .transpose()?
                .unwrap_or_default();
            let kek = agreement::agree(
                k,
                UnparsedPublicKey::new(curve.alg, &point),
                JoseError::InvalidJwe("epk is not a valid point".into()),
                |z| Ok(concat_kdf(z, ALG_ECDH_ES_A256KW, &apu, &apv, 256)),
            )?;
            let kek =
                AesKek::new(&AES_256, &kek[..32]).map_err(|_| JoseError::Crypto("AES-KW key"))?;
            let mut out = Zeroizing::new(vec![0u8; encrypted_key.len()]);
            match kek.unwrap(encrypted_key, &mut out) {
                Ok(v) => {
                    let n = v.len();
                    out.truncate(n);
                    Ok(Some(out))
                }
                Err(_) => Ok(None),
            }
        }
        Priv::Rsa(k) => {
            let Some(oaep) = oaep_alg(alg) else {
                return Ok(None);
            };
            let key = OaepPrivateDecryptingKey::new(k.clone())
                .map_err(|_| JoseError::Crypto("RSA-OAEP key"))?;
            let mut out = Zeroizing::new(vec![0u8; key.min_output_size()]);
            match key.decrypt(oaep, encrypted_key, &mut out, None) {
                Ok(v) => {
                    let n = v.len();
                    out.truncate(n);
                    Ok(Some(out))
                }
                Err(_) => Ok(None),
            }
        }
    }
}

/// Decrypts a JWE in JSON serialization (general or flattened) with `key`, trying each
/// recipient entry whose algorithm fits the key.
pub fn decrypt_json(jwe: &[u8], key: &RecipientKey) -> Result<Zeroizing<Vec<u8>>> {
    let v: Value =
        serde_json::from_slice(jwe).map_err(|e| JoseError::InvalidJwe(format!("not JSON: {e}")))?;
    let protected_b64 = v.get("protected").and_then(Value::as_str).unwrap_or("");
    let mut shared = Map::new();
    if !protected_b64.is_empty() {
        let p: Value = serde_json::from_slice(&b64(v.get("protected"), "protected")?)
            .map_err(|_| JoseError::InvalidJwe("protected header is not JSON".into()))?;
        merge(&mut shared, Some(&p))?;
    }
    merge(&mut shared, v.get("unprotected"))?;
    let recipients: Vec<(Option<&Value>, Option<&Value>)> = match v.get("recipients") {
        Some(Value::Array(rs)) => rs
            .iter()
            .map(|r| (r.get("header"), r.get("encrypted_key")))
            .collect(),
        Some(_) => return Err(JoseError::InvalidJwe("recipients is not an array".into())),
        None => vec![(v.get("header"), v.get("encrypted_key"))],
    };
    let iv = b64(v.get("iv"), "iv")?;
    let ciphertext = b64(v.get("ciphertext"), "ciphertext")?;
    let tag = b64(v.get("tag"), "tag")?;
    let mut aad = protected_b64.as_bytes().to_vec();
    if let Some(a) = v.get("aad").and_then(Value::as_str) {
        aad.push(b'.');
        aad.extend_from_slice(a.as_bytes());
    }
    for (header, encrypted_key) in recipients {
        let mut joint = shared.clone();
        merge(&mut joint, header)?;
        if joint.get("enc").and_then(Value::as_str) != Some(ENC_A256GCM) {
            return Err(JoseError::Unsupported(format!(
                "content encryption {}; only A256GCM",
                joint.get("enc").unwrap_or(&Value::Null)
            )));
        }
        let ek = b64(encrypted_key, "encrypted_key")?;
        let Some(cek) = unwrap_cek(key, &joint, &ek)? else {
            continue;
        };
        return open_a256gcm(&cek, &iv, &aad, &ciphertext, &tag);
    }
    Err(JoseError::Decrypt)
}

/// Encrypts `plaintext` to every key in `to` as one JWE in general JSON serialization
/// (protected header `{"enc":"A256GCM"}`; per recipient `ECDH-ES+A256KW` with its `epk`, or
/// `RSA-OAEP` as ocicrypt writes it).
pub fn encrypt_json(plaintext: &[u8], to: &[RecipientPublicKey]) -> Result<String> {
    if to.is_empty() {
        return Err(JoseError::InvalidKey("no recipient".into()));
    }
    let rng = SystemRandom::new();
    let mut cek = Zeroizing::new([0u8; 32]);
    rng.fill(cek.as_mut())
        .map_err(|_| JoseError::Crypto("random"))?;
    let mut recipients = Vec::new();
    for r in to {
        match &r.0 {
            Pub::Ec(curve, point) => {
                let (epk, wrapped) = ecdh_es_wrap(curve, point, cek.as_ref())?;
                recipients.push(json!({
                    "header": {"alg": ALG_ECDH_ES_A256KW, "epk": epk},
                    "encrypted_key": B64.encode(&wrapped),
                }));
            }
            Pub::Rsa(k) => {
                let key = OaepPublicEncryptingKey::new(k.clone())
                    .map_err(|_| JoseError::Crypto("RSA-OAEP key"))?;
                let mut out = vec![0u8; key.ciphertext_size()];
                let n = key
                    .encrypt(&OAEP_SHA1_MGF1SHA1, cek.as_ref(), &mut out, None)
                    .map_err(|_| JoseError::Crypto("RSA-OAEP encryption"))?
                    .len();
                out.truncate(n);
                recipients.push(json!({
                    "header": {"alg": ALG_RSA_OAEP},
                    "encrypted_key": B64.encode(&out),
                }));
            }
        }
    }
    let protected = B64.encode(br#"{"enc":"A256GCM"}"#);
    let (iv, ciphertext, tag) = seal_a256gcm(cek.as_ref(), protected.as_bytes(), plaintext)?;
    Ok(json!({
        "protected": protected,
        "recipients": recipients,
        "iv": B64.encode(iv),
        "ciphertext": B64.encode(&ciphertext),
        "tag": B64.encode(&tag),
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys made with openssl (genrsa / ecparam -genkey), public halves with -pubout.
    fn keypair(kind: &str) -> (RecipientKey, RecipientPublicKey) {
        let dir = tempdir();
        let run = |args: &[&str]| openssl(&dir, args);
        match kind {
            "rsa" => {
                run(&["genrsa", "-traditional", "-out", "k.pem", "2048"]);
                run(&["rsa", "-in", "k.pem", "-pubout", "-out", "p.pem"]);
            }
            curve => {
                run(&[
                    "ecparam", "-name", curve, "-genkey", "-noout", "-out", "k.pem",
                ]);
                run(&["ec", "-in", "k.pem", "-pubout", "-out", "p.pem"]);
            }
        }
        let k = RecipientKey::from_pem(&std::fs::read(dir.join("k.pem")).unwrap()).unwrap();
        let p = RecipientPublicKey::from_pem(&std::fs::read(dir.join("p.pem")).unwrap()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (k, p)
    }

    /// Runs `openssl ARGS` in `dir`, which must succeed.
    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl {args:?}");
    }

    fn tempdir() -> std::path::PathBuf {
        let mut r = [0u8; 8];
        SystemRandom::new().fill(&mut r).unwrap();
        let d = std::env::temp_dir().join(format!("jose-{}", hex_of(&r)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn tee_key_pair_from_pem_decrypts_what_its_jwk_receives() {
        let dir = tempdir();
        let gen = |args: &[&str]| {
            openssl(&dir, args);
            std::fs::read(dir.join("k.pem")).unwrap()
        };
        let pems = [
            gen(&["genrsa", "-out", "k.pem", "2048"]),
            gen(&[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "k.pem",
            ]),
            gen(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-521",
                "-out",
                "k.pem",
            ]),
        ];
        let p384 = gen(&[
            "ecparam",
            "-name",
            "secp384r1",
            "-genkey",
            "-noout",
            "-out",
            "k.pem",
        ]);
        let _ = std::fs::remove_dir_all(&dir);
        for pem in &pems {
            let tee = crate::TeeKeyPair::from_pem(pem).unwrap();
            crate::validate_public_key(tee.public_jwk()).unwrap();
            let jwe = crate::encrypt(tee.public_jwk(), b"resource").unwrap();
            assert_eq!(&tee.decrypt(&jwe).unwrap()[..], b"resource");
        }
        // A TEE key is P-256, P-521 or RSA.
        assert!(crate::TeeKeyPair::from_pem(&p384).is_err());
        assert!(crate::TeeKeyPair::from_pem(b"not pem").is_err());
    }

    #[test]
    fn every_recipient_decrypts_and_others_do_not() {
        let keys: Vec<_> = ["rsa", "prime256v1", "secp384r1", "secp521r1"]
            .iter()
            .map(|k| keypair(k))
            .collect();
        let (privs, pubs): (Vec<_>, Vec<_>) = keys.into_iter().unzip();
        let jwe = encrypt_json(b"layer key", &pubs[..3]).unwrap();
        for k in &privs[..3] {
            assert_eq!(&decrypt_json(jwe.as_bytes(), k).unwrap()[..], b"layer key");
        }
        assert!(matches!(
            decrypt_json(jwe.as_bytes(), &privs[3]),
            Err(JoseError::Decrypt)
        ));
        // Tampered ciphertext.
        let mut v: Value = serde_json::from_str(&jwe).unwrap();
        v["ciphertext"] = json!(B64.encode(b"other bytes"));
        assert!(decrypt_json(v.to_string().as_bytes(), &privs[0]).is_err());
    }
}
