//! The confidential data hub's guest-side functions: KBS resource URIs and sealed secrets in the
//! upstream format, so that secrets can travel through the untrusted control plane (for example
//! as Kubernetes secrets) and be opened only inside an attested guest.
//!
//! A sealed secret is `sealed.<JWS protected header>.<JWS payload>.<JWS signature>` (base64url),
//! the payload being JSON:
//! * `{"version":"0.1.0","type":"vault","provider":"kbs","name":"kbs:///repo/type/tag",
//!   "provider_settings":{},"annotations":{}}`: the secret is that KBS resource;
//! * `{"version":"0.1.0","type":"envelope","provider":"kbs","key_id":"kbs:///repo/type/tag",
//!   "encrypted_key":"<b64>","encrypted_data":"<b64>","wrap_type":"A256GCM","iv":"<b64>",
//!   "provider_settings":{},"annotations":{"iv":"<b64>"}}`: a random data key encrypts the secret
//!   (AES-256-GCM, `iv`, tag appended) and the 32-byte key-encryption key held by the KBS at
//!   `key_id` encrypts the data key (AES-256-GCM, `annotations.iv`, tag appended).
//!
//! The JWS signature is ES256 when the sealer signed (`coffer secret seal --signing-key`) and is
//! then checked against the verification keys given to [`unseal`]; upstream writes placeholder
//! headers and signatures, which are accepted only when no verification key is configured.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::{collections::BTreeMap, future::Future};

use aws_lc_rs::{
    aead::{self, Aad, LessSafeKey, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
    signature::{
        EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
    },
};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// A failed hub operation. Messages never contain secret material.
#[derive(Debug, thiserror::Error)]
pub enum CdhError {
    /// A resource URI is not `kbs:///repo/type/tag`.
    #[error("invalid resource URI {0:?}; use kbs:///REPOSITORY/TYPE/TAG")]
    Uri(String),
    /// The sealed secret is not in the sealed-secret format.
    #[error("invalid sealed secret: {0}")]
    Format(String),
    /// A provider, version or algorithm this hub does not handle.
    #[error("unsupported sealed secret: {0}")]
    Unsupported(String),
    /// The signature is missing, wrong or by an unknown key.
    #[error("sealed secret signature: {0}")]
    Signature(String),
    /// The KBS did not release a resource.
    #[error("cannot get {uri} from the KBS: {reason}")]
    Kbs {
        /// The resource.
        uri: String,
        /// Why.
        reason: String,
    },
    /// Decryption failed (wrong key or altered secret).
    #[error("cannot unseal: {0}")]
    Decrypt(String),
}

type Result<T> = std::result::Result<T, CdhError>;

/// A KBS resource: `kbs:///repo/type/tag` (`kbs://<host>/…` is accepted; the KBS configured
/// for the guest is used whatever the host says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceUri {
    /// Repository.
    pub repository: String,
    /// Type.
    pub kind: String,
    /// Tag.
    pub tag: String,
}

impl ResourceUri {
    /// Parses a URI; each part is ASCII letters, digits, `.`, `_` or `-`.
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("kbs://")
            .ok_or_else(|| CdhError::Uri(s.into()))?;
        let path = rest
            .split_once('/')
            .map(|(_, p)| p)
            .ok_or_else(|| CdhError::Uri(s.into()))?;
        let parts: Vec<&str> = path.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        match parts.as_slice() {
            [r, t, g] if ok(r) && ok(t) && ok(g) => Ok(Self {
                repository: r.to_string(),
                kind: t.to_string(),
                tag: g.to_string(),
            }),
            _ => Err(CdhError::Uri(s.into())),
        }
    }

    /// `repo/type/tag`, the KBS resource path.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.repository, self.kind, self.tag)
    }
}

impl std::fmt::Display for ResourceUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kbs:///{}", self.path())
    }
}

#[derive(Serialize, Deserialize)]
struct Payload {
    version: String,
    #[serde(rename = "type")]
    kind: String,
    provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encrypted_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encrypted_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrap_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iv: Option<String>,
    #[serde(default)]
    provider_settings: Value,
    #[serde(default)]
    annotations: BTreeMap<String, Value>,
}

fn b64(s: &Option<String>, what: &str) -> Result<Vec<u8>> {
    STANDARD
        .decode(
            s.as_deref()
                .ok_or_else(|| CdhError::Format(format!("no {what}")))?,
        )
        .map_err(|_| CdhError::Format(format!("{what} is not base64")))
}

fn gcm_open(key: &[u8], iv: &[u8], data: &mut Vec<u8>, what: &str) -> Result<()> {
    let k = LessSafeKey::new(
        UnboundKey::new(&aead::AES_256_GCM, key)
            .map_err(|_| CdhError::Decrypt(format!("the {what} is not a 32-byte AES key")))?,
    );
    let nonce = Nonce::try_assume_unique_for_key(iv)
        .map_err(|_| CdhError::Format(format!("the {what} iv is not 12 bytes")))?;
    let n = k
        .open_in_place(nonce, Aad::empty(), data)
        .map_err(|_| CdhError::Decrypt(format!("the {what} does not open this secret")))?
        .len();
    data.truncate(n);
    Ok(())
}

fn gcm_seal(key: &[u8], data: &[u8]) -> Result<(Vec<u8>, [u8; 12])> {
    let mut iv = [0u8; 12];
    SystemRandom::new()
        .fill(&mut iv)
        .map_err(|_| CdhError::Decrypt("random".into()))?;
    let k = LessSafeKey::new(
        UnboundKey::new(&aead::AES_256_GCM, key)
            .map_err(|_| CdhError::Unsupported("the key must be 32 bytes".into()))?,
    );
    let mut out = data.to_vec();
    k.seal_in_place_append_tag(Nonce::assume_unique_for_key(iv), Aad::empty(), &mut out)
        .map_err(|_| CdhError::Decrypt("AES-GCM".into()))?;
    Ok((out, iv))
}

/// How a secret is sealed.
pub enum Seal<'a> {
    /// The secret is the KBS resource itself.
    Vault {
        /// The resource.
        name: &'a ResourceUri,
    },
    /// The secret, encrypted under a data key wrapped by the KBS-held key `key_id`.
    Envelope {
        /// The KBS resource holding the key-encryption key.
        key_id: &'a ResourceUri,
        /// That key (32 bytes).
        kek: &'a [u8],
        /// The secret.
        secret: &'a [u8],
    },
}

/// Seals a secret; signs it with `signing_key` (PEM P-256 private key) when given.
pub fn seal(how: Seal<'_>, signing_key: Option<&[u8]>) -> Result<String> {
    let payload = match how {
        Seal::Vault { name } => Payload {
            version: "0.1.0".into(),
            kind: "vault".into(),
            provider: "kbs".into(),
            name: Some(name.to_string()),
            key_id: None,
            encrypted_key: None,
            encrypted_data: None,
            wrap_type: None,
            iv: None,
            provider_settings: json!({}),
            annotations: BTreeMap::new(),
        },
        Seal::Envelope {
            key_id,
            kek,
            secret,
        } => {
            let mut dek = Zeroizing::new([0u8; 32]);
            SystemRandom::new()
                .fill(dek.as_mut())
                .map_err(|_| CdhError::Decrypt("random".into()))?;
            let (data, iv) = gcm_seal(dek.as_ref(), secret)?;
            let (wrapped, key_iv) = gcm_seal(kek, dek.as_ref())?;
            Payload {
                version: "0.1.0".into(),
                kind: "envelope".into(),
                provider: "kbs".into(),
                name: None,
                key_id: Some(key_id.to_string()),
                encrypted_key: Some(STANDARD.encode(wrapped)),
                encrypted_data: Some(STANDARD.encode(data)),
                wrap_type: Some("A256GCM".into()),
                iv: Some(STANDARD.encode(iv)),
                provider_settings: json!({}),
                annotations: [("iv".to_string(), json!(STANDARD.encode(key_iv)))].into(),
            }
        }
    };
    let body = URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&payload).map_err(|e| CdhError::Format(e.to_string()))?);
    let (header, sig) = match signing_key {
        None => (URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#), String::new()),
        Some(pem_text) => {
            let block = pem::parse(pem_text)
                .map_err(|_| CdhError::Signature("the signing key is not PEM".into()))?;
            let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, block.contents())
                .or_else(|_| {
                    EcdsaKeyPair::from_private_key_der(
                        &ECDSA_P256_SHA256_FIXED_SIGNING,
                        block.contents(),
                    )
                })
                .map_err(|_| CdhError::Signature("the signing key is not a P-256 key".into()))?;
            let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#);
            let sig = key
                .sign(&SystemRandom::new(), format!("{header}.{body}").as_bytes())
                .map_err(|_| CdhError::Signature("signing failed".into()))?;
            (header, URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }
    };
    Ok(format!("sealed.{header}.{body}.{sig}"))
}

/// The KBS resources an unseal needs, fetched by the caller's attested client.
pub trait Resources {
    /// The resource at `uri`.
    fn get(
        &self,
        uri: &ResourceUri,
    ) -> impl Future<Output = std::result::Result<Zeroizing<Vec<u8>>, String>>;
}

/// Opens a sealed secret. With `verify_keys` (PEM P-256 public keys) an ES256 signature by one
/// of them is required; without, unsigned secrets (upstream's placeholders) are accepted and
/// signed ones are opened without checking.
pub async fn unseal(
    sealed: &str,
    kbs: &impl Resources,
    verify_keys: &[Vec<u8>],
) -> Result<Zeroizing<Vec<u8>>> {
    let rest = sealed
        .trim()
        .strip_prefix("sealed.")
        .ok_or_else(|| CdhError::Format("does not start with \"sealed.\"".into()))?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [header, body, sig] = parts.as_slice() else {
        return Err(CdhError::Format(
            "expected sealed.<header>.<payload>.<signature>".into(),
        ));
    };
    if !verify_keys.is_empty() {
        let h: Value = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| CdhError::Signature("the header is not a JWS header".into()))?;
        if h["alg"] != "ES256" {
            return Err(CdhError::Signature(format!(
                "algorithm {} is not ES256; this guest requires signed secrets",
                h["alg"]
            )));
        }
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| CdhError::Signature("the signature is not base64url".into()))?;
        let signed = format!("{header}.{body}");
        let ok = verify_keys.iter().any(|pem_text| {
            let Ok(block) = pem::parse(pem_text) else {
                return false;
            };
            let Ok(spki) = x509_cert::spki::SubjectPublicKeyInfoRef::try_from(block.contents())
            else {
                return false;
            };
            spki.algorithm.oid.to_string() == "1.2.840.10045.2.1"
                && UnparsedPublicKey::new(
                    &ECDSA_P256_SHA256_FIXED,
                    spki.subject_public_key.raw_bytes(),
                )
                .verify(signed.as_bytes(), &sig)
                .is_ok()
        });
        if !ok {
            return Err(CdhError::Signature(
                "not signed by a configured sealing key".into(),
            ));
        }
    }
    let payload: Payload = URL_SAFE_NO_PAD
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| CdhError::Format("the payload is not sealed-secret JSON".into()))?;
    if payload.version != "0.1.0" {
        return Err(CdhError::Unsupported(format!(
            "version {}",
            payload.version
        )));
    }
    if payload.provider != "kbs" {
        return Err(CdhError::Unsupported(format!(
            "provider {:?}; only kbs",
            payload.provider
        )));
    }
    let fetch = |uri: ResourceUri| async move {
        kbs.get(&uri).await.map_err(|reason| CdhError::Kbs {
            uri: uri.to_string(),
            reason,
        })
    };
    match payload.kind.as_str() {
        "vault" => {
            let name = payload
                .name
                .as_deref()
                .ok_or_else(|| CdhError::Format("a vault secret needs a name".into()))?;
            fetch(ResourceUri::parse(name)?).await
        }
        "envelope" => {
            if payload.wrap_type.as_deref() != Some("A256GCM") {
                return Err(CdhError::Unsupported(format!(
                    "wrap type {:?}; only A256GCM",
                    payload.wrap_type
                )));
            }
            let key_id = payload
                .key_id
                .as_deref()
                .ok_or_else(|| CdhError::Format("an envelope needs a key_id".into()))?;
            let kek = fetch(ResourceUri::parse(key_id)?).await?;
            let key_iv = payload
                .annotations
                .get("iv")
                .and_then(Value::as_str)
                .map(str::to_string);
            let mut dek = Zeroizing::new(b64(&payload.encrypted_key, "encrypted_key")?);
            gcm_open(
                &kek,
                &b64(&key_iv, "annotations.iv")?,
                &mut dek,
                "key at key_id",
            )?;
            let mut data = Zeroizing::new(b64(&payload.encrypted_data, "encrypted_data")?);
            gcm_open(&dek, &b64(&payload.iv, "iv")?, &mut data, "data key")?;
            Ok(data)
        }
        other => Err(CdhError::Unsupported(format!("type {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(BTreeMap<String, Vec<u8>>);

    impl Resources for Fake {
        async fn get(&self, uri: &ResourceUri) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
            self.0
                .get(&uri.path())
                .map(|v| Zeroizing::new(v.clone()))
                .ok_or_else(|| "not found".to_string())
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        // The fake resolves at once: poll it to completion without a runtime.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn uris_parse_strictly() {
        let u = ResourceUri::parse("kbs:///default/key/one").unwrap();
        assert_eq!(u.path(), "default/key/one");
        assert_eq!(
            ResourceUri::parse("kbs://kbs.example:8080/a/b/c")
                .unwrap()
                .path(),
            "a/b/c"
        );
        for bad in [
            "kbs:///a/b",
            "kbs:///a/../c",
            "http:///a/b/c",
            "kbs:///a/b/c/d",
            "kbs:///a/b c/d",
        ] {
            assert!(ResourceUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn envelopes_and_vaults_unseal_with_the_kbs_keys_only() {
        let key_id = ResourceUri::parse("kbs:///default/sealing/k1").unwrap();
        let kek = [3u8; 32];
        let sealed = seal(
            Seal::Envelope {
                key_id: &key_id,
                kek: &kek,
                secret: b"db-password",
            },
            None,
        )
        .unwrap();
        assert!(sealed.starts_with("sealed.") && !sealed.contains("db-password"));
        let kbs = Fake([("default/sealing/k1".to_string(), kek.to_vec())].into());
        assert_eq!(
            &block_on(unseal(&sealed, &kbs, &[])).unwrap()[..],
            b"db-password"
        );

        let wrong = Fake([("default/sealing/k1".to_string(), vec![4u8; 32])].into());
        let e = block_on(unseal(&sealed, &wrong, &[])).unwrap_err();
        assert!(matches!(e, CdhError::Decrypt(_)), "{e}");
        let none = Fake(BTreeMap::new());
        assert!(matches!(
            block_on(unseal(&sealed, &none, &[])),
            Err(CdhError::Kbs { .. })
        ));

        // Altered payload: the GCM tags fail.
        let parts: Vec<&str> = sealed.split('.').collect();
        let mut p: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
        let mut data = STANDARD
            .decode(p["encrypted_data"].as_str().unwrap())
            .unwrap();
        data[0] ^= 1;
        p["encrypted_data"] = json!(STANDARD.encode(data));
        let altered = format!(
            "sealed.{}.{}.{}",
            parts[1],
            URL_SAFE_NO_PAD.encode(p.to_string()),
            parts[3]
        );
        assert!(block_on(unseal(&altered, &kbs, &[])).is_err());

        // Vault: the resource itself.
        let name = ResourceUri::parse("kbs:///default/secret/api").unwrap();
        let vault = seal(Seal::Vault { name: &name }, None).unwrap();
        let kbs = Fake([("default/secret/api".to_string(), b"token".to_vec())].into());
        assert_eq!(&block_on(unseal(&vault, &kbs, &[])).unwrap()[..], b"token");

        // Upstream's placeholder form unseals too.
        let body = URL_SAFE_NO_PAD.encode(
            json!({"version": "0.1.0", "type": "vault", "name": "kbs:///default/secret/api",
                   "provider": "kbs", "provider_settings": {}, "annotations": {}})
            .to_string(),
        );
        let upstream = format!("sealed.fakejwsheader.{body}.fakesignature");
        assert_eq!(
            &block_on(unseal(&upstream, &kbs, &[])).unwrap()[..],
            b"token"
        );
    }

    #[test]
    fn signed_secrets_verify_and_required_signatures_are_enforced() {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;
        let gen = || {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .unwrap();
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
            let public = key.public_key().as_der().unwrap();
            (
                pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec())).into_bytes(),
                pem::encode(&pem::Pem::new("PUBLIC KEY", public.as_ref().to_vec())).into_bytes(),
            )
        };
        let (sk, pk) = gen();
        let (_, other_pk) = gen();
        let name = ResourceUri::parse("kbs:///default/secret/api").unwrap();
        let kbs = Fake([("default/secret/api".to_string(), b"token".to_vec())].into());
        let signed = seal(Seal::Vault { name: &name }, Some(&sk)).unwrap();
        assert_eq!(
            &block_on(unseal(&signed, &kbs, std::slice::from_ref(&pk))).unwrap()[..],
            b"token"
        );
        assert!(matches!(
            block_on(unseal(&signed, &kbs, &[other_pk])),
            Err(CdhError::Signature(_))
        ));
        let unsigned = seal(Seal::Vault { name: &name }, None).unwrap();
        assert!(matches!(
            block_on(unseal(&unsigned, &kbs, &[pk])),
            Err(CdhError::Signature(_))
        ));
    }
}
