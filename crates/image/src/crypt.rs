//! ocicrypt layer encryption: AES-256-CTR with HMAC-SHA256 over the ciphertext, the layer key
//! wrapped for JWE recipients (`org.opencontainers.image.enc.keys.jwe`) and/or by a key-encryption
//! key held by a KBS (`org.opencontainers.image.enc.keys.provider.attestation-agent`).
//!
//! Formats as skopeo and the upstream confidential-containers tools write them:
//! * `…enc.pubopts`: base64 of `{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"<b64>","cipheroptions":{}}`.
//! * the wrapped private options: `{"symkey":"<b64 32 bytes>","cipheroptions":{"nonce":"<b64 16
//!   bytes>"},"digest":"sha256:…"}` where `digest` names the layer before encryption.
//! * `…keys.jwe`: base64 of a JWE (JSON serialization) of the private options; several JWEs are
//!   joined with `,`.
//! * `…keys.provider.attestation-agent`: base64 of `{"kid":"kbs:///repo/type/tag",
//!   "wrapped_data":"<b64 AES-256-GCM ciphertext‖tag of the private options>","iv":"<b64 12
//!   bytes>","wrap_type":"A256GCM"}`, the key-encryption key being the KBS resource `kid`.
//!
//! The HMAC covers the whole ciphertext and is checked when the stream ends; everything read
//! before is unauthenticated, which is why a pull applies layers into a staging directory that
//! is discarded on any failure.

use std::{collections::BTreeMap, io::Read};

use aws_lc_rs::{
    aead::{self, Aad, LessSafeKey, Nonce, UnboundKey},
    cipher::{
        DecryptionContext, EncryptionContext, StreamingDecryptingKey, StreamingEncryptingKey,
        UnboundCipherKey, AES_256,
    },
    constant_time, hmac,
    iv::FixedLength,
    rand::{SecureRandom, SystemRandom},
};
use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_jose::json::{RecipientKey, RecipientPublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;

/// Annotation holding the JWE-wrapped layer keys.
pub const ANNOTATION_JWE: &str = "org.opencontainers.image.enc.keys.jwe";
/// Annotation holding the KBS-wrapped layer key.
pub const ANNOTATION_KBS: &str = "org.opencontainers.image.enc.keys.provider.attestation-agent";
/// Annotation holding the public cipher options (cipher name, HMAC).
pub const ANNOTATION_PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
/// The one layer cipher.
pub const CIPHER: &str = "AES_256_CTR_HMAC_SHA256";

fn err(what: impl Into<String>) -> Error {
    Error::Decrypt(what.into())
}

#[derive(Serialize, Deserialize)]
struct PublicOptions {
    cipher: String,
    hmac: String,
    #[serde(default)]
    cipheroptions: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct PrivateOptions {
    symkey: String,
    cipheroptions: BTreeMap<String, String>,
    digest: String,
}

impl Drop for PrivateOptions {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.symkey.zeroize();
    }
}

/// The KBS-wrapped key annotation.
#[derive(Serialize, Deserialize)]
pub struct AnnotationPacket {
    /// The KBS resource holding the key-encryption key (`kbs:///repo/type/tag`).
    pub kid: String,
    /// AES-256-GCM ciphertext and tag of the private options (base64).
    pub wrapped_data: String,
    /// The GCM nonce (base64).
    pub iv: String,
    /// `A256GCM`.
    pub wrap_type: String,
}

/// Everything needed to decrypt one layer. The key is wiped on drop.
pub struct LayerKey {
    key: Zeroizing<[u8; 32]>,
    nonce: [u8; 16],
    hmac: Vec<u8>,
    /// The digest of the layer before encryption, as the encryptor recorded it. A pull does
    /// not recompute it: the HMAC fixes the plaintext and the `diff_id` covers its content.
    pub plain_digest: String,
}

impl std::fmt::Debug for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerKey")
            .field("plain_digest", &self.plain_digest)
            .finish_non_exhaustive()
    }
}

/// The keys a pull may use to unwrap layer keys.
#[derive(Default)]
pub struct Keyring {
    /// JWE recipient private keys.
    pub private_keys: Vec<RecipientKey>,
    /// Key-encryption keys already fetched from a KBS, by `kid`.
    pub kbs_keks: BTreeMap<String, Zeroizing<Vec<u8>>>,
}

impl Keyring {
    /// True when no key of any kind is configured.
    pub fn is_empty(&self) -> bool {
        self.private_keys.is_empty() && self.kbs_keks.is_empty()
    }
}

/// The `kid` a layer's KBS annotation names, if it has one.
pub fn kbs_kid(annotations: Option<&BTreeMap<String, String>>) -> Result<Option<String>, Error> {
    let Some(v) = annotations.and_then(|a| a.get(ANNOTATION_KBS)) else {
        return Ok(None);
    };
    Ok(Some(parse_packet(v)?.kid))
}

fn parse_packet(v: &str) -> Result<AnnotationPacket, Error> {
    let raw = STANDARD
        .decode(v.trim())
        .map_err(|_| err("the KBS key annotation is not base64"))?;
    serde_json::from_slice(&raw).map_err(|e| err(format!("the KBS key annotation: {e}")))
}

fn private_from_json(json: &[u8], hmac: Vec<u8>) -> Result<LayerKey, Error> {
    let p: PrivateOptions =
        serde_json::from_slice(json).map_err(|_| err("the unwrapped layer key is malformed"))?;
    let key = Zeroizing::new(
        STANDARD
            .decode(&p.symkey)
            .map_err(|_| err("the layer key is not base64"))?,
    );
    let nonce = p
        .cipheroptions
        .get("nonce")
        .and_then(|n| STANDARD.decode(n).ok())
        .ok_or_else(|| err("the layer key has no nonce"))?;
    let (Ok(key), Ok(nonce)) = (
        <[u8; 32]>::try_from(&key[..]),
        <[u8; 16]>::try_from(&nonce[..]),
    ) else {
        return Err(err("the layer key or nonce has the wrong length"));
    };
    crate::digest::sha256_hex(&p.digest)?;
    Ok(LayerKey {
        key: Zeroizing::new(key),
        nonce,
        hmac,
        plain_digest: p.digest.clone(),
    })
}

/// Unwraps the key of an encrypted layer with whatever in `keys` fits its annotations.
pub fn layer_key(
    digest: &str,
    annotations: Option<&BTreeMap<String, String>>,
    keys: &Keyring,
) -> Result<LayerKey, Error> {
    layer_key_with(digest, annotations, &keys.private_keys, &keys.kbs_keks)
}

/// [`layer_key`] with the private keys and key-encryption keys given apart.
pub fn layer_key_with(
    digest: &str,
    annotations: Option<&BTreeMap<String, String>>,
    private_keys: &[RecipientKey],
    kbs_keks: &BTreeMap<String, Zeroizing<Vec<u8>>>,
) -> Result<LayerKey, Error> {
    let a =
        annotations.ok_or_else(|| err(format!("encrypted layer {digest} has no annotations")))?;
    let pubopts = a.get(ANNOTATION_PUBOPTS).ok_or_else(|| {
        err(format!(
            "encrypted layer {digest} has no {ANNOTATION_PUBOPTS}"
        ))
    })?;
    let pubopts: PublicOptions = STANDARD
        .decode(pubopts.trim())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            err(format!(
                "{ANNOTATION_PUBOPTS} of layer {digest} is malformed"
            ))
        })?;
    if pubopts.cipher != CIPHER {
        return Err(Error::Unsupported(format!(
            "layer cipher {}; only {CIPHER}",
            pubopts.cipher
        )));
    }
    let hmac = STANDARD
        .decode(&pubopts.hmac)
        .map_err(|_| err("the layer HMAC is not base64"))?;

    let mut tried = Vec::new();
    if let Some(jwes) = a.get(ANNOTATION_JWE) {
        tried.push("JWE recipients");
        for jwe in jwes.split(',').filter(|s| !s.is_empty()) {
            let jwe = STANDARD
                .decode(jwe.trim())
                .map_err(|_| err(format!("{ANNOTATION_JWE} is not base64")))?;
            for k in private_keys {
                if let Ok(json) = coffer_jose::json::decrypt_json(&jwe, k) {
                    return private_from_json(&json, hmac);
                }
            }
        }
    }
    if let Some(v) = a.get(ANNOTATION_KBS) {
        tried.push("the KBS key");
        let packet = parse_packet(v)?;
        if let Some(kek) = kbs_keks.get(&packet.kid) {
            if packet.wrap_type != "A256GCM" {
                return Err(Error::Unsupported(format!(
                    "wrap type {}",
                    packet.wrap_type
                )));
            }
            let json = unwrap_a256gcm(kek, &packet)?;
            return private_from_json(&json, hmac);
        }
    }
    if tried.is_empty() {
        return Err(err(format!(
            "encrypted layer {digest} carries no wrapped key"
        )));
    }
    Err(err(format!(
        "no configured key unwraps layer {digest} (wrapped for {}); give the right --decryption-key or KBS key",
        tried.join(" and ")
    )))
}

fn unwrap_a256gcm(kek: &[u8], p: &AnnotationPacket) -> Result<Zeroizing<Vec<u8>>, Error> {
    let iv = STANDARD
        .decode(&p.iv)
        .map_err(|_| err("the KBS key annotation iv is not base64"))?;
    let mut data = Zeroizing::new(
        STANDARD
            .decode(&p.wrapped_data)
            .map_err(|_| err("the KBS key annotation data is not base64"))?,
    );
    let key = LessSafeKey::new(
        UnboundKey::new(&aead::AES_256_GCM, kek)
            .map_err(|_| err(format!("the key {} is not a 32-byte AES key", p.kid)))?,
    );
    let nonce = Nonce::try_assume_unique_for_key(&iv).map_err(|_| err("bad GCM nonce length"))?;
    let n = key
        .open_in_place(nonce, Aad::empty(), &mut data)
        .map_err(|_| {
            err(format!(
                "the key {} does not unwrap this layer's key",
                p.kid
            ))
        })?
        .len();
    data.truncate(n);
    Ok(data)
}

/// Decrypts a layer stream: AES-256-CTR, HMAC-SHA256 of the ciphertext checked at the end.
pub struct DecryptReader<R> {
    inner: R,
    cipher: Option<StreamingDecryptingKey>,
    mac: hmac::Context,
    expected: Vec<u8>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    len: usize,
}

impl<R: Read> DecryptReader<R> {
    /// Decrypts `inner` with `key`.
    pub fn new(inner: R, key: &LayerKey) -> Result<Self, Error> {
        let k = UnboundCipherKey::new(&AES_256, key.key.as_ref())
            .map_err(|_| err("AES key rejected"))?;
        let cipher =
            StreamingDecryptingKey::ctr(k, DecryptionContext::Iv128(FixedLength::from(key.nonce)))
                .map_err(|_| err("AES-CTR setup failed"))?;
        Ok(Self {
            inner,
            cipher: Some(cipher),
            mac: hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key.key.as_ref())),
            expected: key.hmac.clone(),
            inbuf: vec![0; 256 << 10],
            out: vec![0; (256 << 10) + 16],
            pos: 0,
            len: 0,
        })
    }
}

impl<R> DecryptReader<R> {
    /// The reader of ciphertext.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.len {
            let Some(cipher) = self.cipher.as_mut() else {
                return Ok(0);
            };
            // As much ciphertext as the caller's buffer takes whole (below), or a full buffer.
            let want = match buf.len().checked_sub(16) {
                Some(room) if room >= 4096 => room.min(self.inbuf.len()),
                _ => self.inbuf.len(),
            };
            let n = self.inner.read(&mut self.inbuf[..want])?;
            if n == 0 {
                let cipher = self.cipher.take().expect("present");
                let rest = cipher
                    .finish(&mut self.out)
                    .map_err(|_| std::io::Error::other("AES-CTR finish failed"))?;
                self.len = rest.written().len();
                self.pos = 0;
                let mac = std::mem::replace(
                    &mut self.mac,
                    hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &[])),
                )
                .sign();
                if constant_time::verify_slices_are_equal(mac.as_ref(), &self.expected).is_err() {
                    return Err(std::io::Error::other(
                        "layer HMAC mismatch: the layer was altered or the key is wrong",
                    ));
                }
                if self.len == 0 {
                    return Ok(0);
                }
                break;
            }
            self.mac.update(&self.inbuf[..n]);
            // AES-CTR may write up to a block more than it reads: a caller's buffer with room
            // for that takes the plaintext directly, without the copy through `out`.
            if buf.len() >= n + 16 {
                let w = cipher
                    .update(&self.inbuf[..n], buf)
                    .map_err(|_| std::io::Error::other("AES-CTR failed"))?
                    .written()
                    .len();
                if w > 0 {
                    return Ok(w);
                }
                continue;
            }
            let w = cipher
                .update(&self.inbuf[..n], &mut self.out)
                .map_err(|_| std::io::Error::other("AES-CTR failed"))?
                .written()
                .len();
            self.pos = 0;
            self.len = w;
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What encrypting a layer produced: the annotations to put on its descriptor.
pub struct Encrypted {
    /// `…enc.pubopts`, `…keys.jwe` and/or `…keys.provider.attestation-agent`.
    pub annotations: BTreeMap<String, String>,
}

/// How to wrap the layer keys of an image being encrypted.
pub struct WrapWith<'a> {
    /// JWE recipients.
    pub recipients: &'a [RecipientPublicKey],
    /// A KBS key-encryption key and its `kid` (`kbs:///repo/type/tag`).
    pub kbs: Option<(&'a str, &'a [u8])>,
}

/// Encrypts a layer blob read from `input` into `output`; `plain_digest` is its digest.
pub fn encrypt_layer<R: Read, W: std::io::Write>(
    mut input: R,
    mut output: W,
    plain_digest: &str,
    wrap: &WrapWith<'_>,
) -> Result<Encrypted, Error> {
    let rng = SystemRandom::new();
    let mut key = Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; 16];
    rng.fill(key.as_mut()).map_err(|_| err("random"))?;
    rng.fill(&mut nonce).map_err(|_| err("random"))?;
    let k = UnboundCipherKey::new(&AES_256, key.as_ref()).map_err(|_| err("AES key"))?;
    let mut cipher = StreamingEncryptingKey::less_safe_ctr(
        k,
        EncryptionContext::Iv128(FixedLength::from(nonce)),
    )
    .map_err(|_| err("AES-CTR setup failed"))?;
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()));
    let mut inbuf = vec![0u8; 256 << 10];
    let mut out = vec![0u8; (256 << 10) + 16];
    let io = |e: std::io::Error| Error::Io {
        context: "encrypting a layer".into(),
        source: e,
    };
    loop {
        let n = input.read(&mut inbuf).map_err(io)?;
        if n == 0 {
            break;
        }
        let u = cipher
            .update(&inbuf[..n], &mut out)
            .map_err(|_| err("AES-CTR failed"))?;
        let w = u.written();
        mac.update(w);
        output.write_all(w).map_err(io)?;
    }
    let (_, rest) = cipher.finish(&mut out).map_err(|_| err("AES-CTR failed"))?;
    mac.update(rest.written());
    output.write_all(rest.written()).map_err(io)?;
    let hmac = mac.sign();

    let private = PrivateOptions {
        symkey: STANDARD.encode(key.as_ref()),
        cipheroptions: [("nonce".to_string(), STANDARD.encode(nonce))].into(),
        digest: plain_digest.to_string(),
    };
    let private_json =
        Zeroizing::new(serde_json::to_vec(&private).map_err(|e| err(e.to_string()))?);
    let mut annotations = BTreeMap::new();
    let pubopts = PublicOptions {
        cipher: CIPHER.into(),
        hmac: STANDARD.encode(hmac.as_ref()),
        cipheroptions: BTreeMap::new(),
    };
    annotations.insert(
        ANNOTATION_PUBOPTS.to_string(),
        STANDARD.encode(serde_json::to_vec(&pubopts).map_err(|e| err(e.to_string()))?),
    );
    if !wrap.recipients.is_empty() {
        let jwe = coffer_jose::json::encrypt_json(&private_json, wrap.recipients)
            .map_err(|e| err(e.to_string()))?;
        annotations.insert(ANNOTATION_JWE.to_string(), STANDARD.encode(jwe));
    }
    if let Some((kid, kek)) = wrap.kbs {
        let mut iv = [0u8; 12];
        rng.fill(&mut iv).map_err(|_| err("random"))?;
        let k = LessSafeKey::new(
            UnboundKey::new(&aead::AES_256_GCM, kek)
                .map_err(|_| err("the key-encryption key must be 32 bytes"))?,
        );
        let mut data = private_json.to_vec();
        k.seal_in_place_append_tag(Nonce::assume_unique_for_key(iv), Aad::empty(), &mut data)
            .map_err(|_| err("AES-GCM failed"))?;
        let packet = AnnotationPacket {
            kid: kid.to_string(),
            wrapped_data: STANDARD.encode(&data),
            iv: STANDARD.encode(iv),
            wrap_type: "A256GCM".into(),
        };
        annotations.insert(
            ANNOTATION_KBS.to_string(),
            STANDARD.encode(serde_json::to_vec(&packet).map_err(|e| err(e.to_string()))?),
        );
    }
    if annotations.len() == 1 {
        return Err(err("no recipient: give --recipient or --kbs-kek"));
    }
    Ok(Encrypted { annotations })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kbs_wrapped_layers_round_trip_and_fail_cleanly() {
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let digest = crate::digest::of(&plain);
        let kek = [7u8; 32];
        let mut enc = Vec::new();
        let e = encrypt_layer(
            &plain[..],
            &mut enc,
            &digest,
            &WrapWith {
                recipients: &[],
                kbs: Some(("kbs:///default/key/layer", &kek)),
            },
        )
        .unwrap();
        assert_ne!(enc[..64], plain[..64]);
        let a = Some(&e.annotations);
        assert_eq!(
            kbs_kid(a).unwrap().as_deref(),
            Some("kbs:///default/key/layer")
        );

        let mut keys = Keyring::default();
        let none = layer_key("sha256:x", a, &keys).unwrap_err().to_string();
        assert!(none.contains("no configured key"), "{none}");
        keys.kbs_keks.insert(
            "kbs:///default/key/layer".into(),
            Zeroizing::new(vec![8u8; 32]),
        );
        let wrong = layer_key("sha256:x", a, &keys).unwrap_err().to_string();
        assert!(wrong.contains("does not unwrap"), "{wrong}");
        keys.kbs_keks.insert(
            "kbs:///default/key/layer".into(),
            Zeroizing::new(kek.to_vec()),
        );
        let k = layer_key("sha256:x", a, &keys).unwrap();
        assert_eq!(k.plain_digest, digest);
        let mut out = Vec::new();
        DecryptReader::new(&enc[..], &k)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, plain);

        // One flipped ciphertext bit: the HMAC check at the end fails.
        enc[1000] ^= 1;
        let err = DecryptReader::new(&enc[..], &k)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("HMAC mismatch"), "{err}");
    }
}
