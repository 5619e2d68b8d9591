//! `coffer image sign`: GPG simple signing into the lookaside store a registries.d file names
//! (signature written with the `gpg` program, so the key stays in the user's keyring and agent),
//! and cosign key-based signatures pushed to the repository's `sha256-<hex>.sig` tag.
//!
//! Both sign the digest of the manifest the reference names, with the full reference (tag
//! included) as the signed identity, which the default `matchRepoDigestOrExact` accepts.

use std::{io::Write, path::PathBuf, process::Stdio};

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{
        EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
        ECDSA_P384_SHA384_ASN1_SIGNING,
    },
};
use base64::{engine::general_purpose::STANDARD, Engine};
use oci_client::Reference;
use serde_json::json;

use crate::{
    digest,
    encrypt::Sink,
    signature::{lookaside_url, RegistriesD},
    source::{Source, SourceOptions},
    Error, ImageRef,
};

/// The cosign layer media type.
pub const COSIGN_PAYLOAD_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The cosign signature annotation.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

fn payload(kind: &str, reference: &str, manifest_digest: &str) -> Vec<u8> {
    json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": kind,
        },
        "optional": {"creator": concat!("coffer ", env!("CARGO_PKG_VERSION"))},
    })
    .to_string()
    .into_bytes()
}

fn docker(image: &ImageRef) -> Result<&Reference, Error> {
    match image {
        ImageRef::Docker(r) => Ok(r),
        _ => Err(Error::Unsupported(format!(
            "{image}: only registry images (docker://…) are signed"
        ))),
    }
}

/// Signs with the GPG key `fingerprint` (from `gpg`'s keyring; `GNUPGHOME` applies) and writes
/// the signature into the lookaside staging store. Returns where it was written.
pub async fn sign_gpg(
    image: &ImageRef,
    opts: &SourceOptions,
    registries: &RegistriesD,
    fingerprint: &str,
) -> Result<PathBuf, Error> {
    let r = docker(image)?;
    let digest_str = Source::new(image, opts)?.root_manifest().await?.digest;
    let base = registries.staging(r).ok_or_else(|| {
        Error::Policy(format!(
            "no lookaside store is configured for {image}; give --registries-d with a lookaside-staging entry"
        ))
    })?;
    let Some(base_path) = base.strip_prefix("file://") else {
        return Err(Error::Unsupported(format!(
            "lookaside staging {base}: only file:// stores are written"
        )));
    };
    let data = payload("atomic container signature", &r.whole(), &digest_str);
    let mut child = std::process::Command::new("gpg")
        .args([
            "--batch",
            "--no-tty",
            "--yes",
            "--local-user",
            fingerprint,
            "--sign",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("cannot run gpg"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| Error::Policy("gpg stdin".into()))?
        .write_all(&data)
        .map_err(Error::io("cannot write to gpg"))?;
    let out = child
        .wait_with_output()
        .map_err(Error::io("cannot run gpg"))?;
    if !out.status.success() {
        return Err(Error::Policy(format!(
            "gpg could not sign with {fingerprint}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    for n in 1..=64 {
        let url = lookaside_url(&format!("file://{base_path}"), r, &digest_str, n);
        let path = PathBuf::from(url.trim_start_matches("file://"));
        if path.exists() {
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        }
        crate::encrypt::write_atomic(&path, &out.stdout)?;
        return Ok(path);
    }
    Err(Error::Limit(format!("{image} already has 64 signatures")))
}

/// Signs with a cosign key — an encrypted cosign/sigstore key file (opened with `passphrase`)
/// or a PEM EC P-256/P-384 private key (PKCS#8 or SEC 1) — and pushes the signature to
/// `sha256-<hex>.sig`, keeping signatures already there. Returns that tag.
pub async fn sign_cosign(
    image: &ImageRef,
    opts: &SourceOptions,
    key_pem: &[u8],
    passphrase: Option<&[u8]>,
) -> Result<String, Error> {
    let r = docker(image)?;
    let block =
        pem::parse(key_pem).map_err(|_| Error::Policy("the cosign key is not PEM".into()))?;
    let der = if [crate::cosign_key::LABEL, crate::cosign_key::OLD_LABEL].contains(&block.tag()) {
        let pass = passphrase.ok_or_else(|| {
            Error::Policy(
                "the cosign key is encrypted: give its passphrase (COSIGN_PASSWORD or --passphrase-file)"
                    .into(),
            )
        })?;
        crate::cosign_key::decrypt(key_pem, pass)?
    } else {
        zeroize::Zeroizing::new(block.contents().to_vec())
    };
    let key = PemSigner::from_der(&der).map_err(|_| {
        Error::Policy("the cosign key is not an EC P-256/P-384 or Ed25519 private key".into())
    })?;

    let source = Source::new(image, opts)?;
    let digest_str = source.root_manifest().await?.digest;
    let data = payload("cosign container image signature", &r.whole(), &digest_str);
    let sig = key.sign(&data)?;
    let tag = format!("{}.sig", digest_str.replace(':', "-"));

    let mut layers: Vec<serde_json::Value> = match source.tag_manifest(&tag).await? {
        Some(m) => serde_json::from_slice::<serde_json::Value>(&m)
            .ok()
            .and_then(|v| v["layers"].as_array().cloned())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let sig_ref = ImageRef::Docker(Reference::with_tag(
        r.registry().to_string(),
        r.repository().to_string(),
        tag.clone(),
    ));
    let sink = Sink::new(&sig_ref, opts).await?;
    let payload_digest = digest::of(&data);
    sink.put_blob(data.clone(), &payload_digest).await?;
    layers.push(json!({
        "mediaType": COSIGN_PAYLOAD_TYPE,
        "digest": payload_digest,
        "size": data.len(),
        "annotations": {COSIGN_SIGNATURE_ANNOTATION: STANDARD.encode(&sig)},
    }));
    let diff_ids: Vec<&str> = layers.iter().filter_map(|l| l["digest"].as_str()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "", "os": "", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .map_err(|e| Error::Manifest(e.to_string()))?;
    let config_digest = digest::of(&config);
    let config_len = config.len();
    sink.put_blob(config, &config_digest).await?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
        "config": {"mediaType": oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE,
                   "digest": config_digest, "size": config_len},
        "layers": layers,
    }))
    .map_err(|e| Error::Manifest(e.to_string()))?;
    sink.put_manifest(manifest, oci_client::manifest::OCI_IMAGE_MEDIA_TYPE)
        .await?;
    Ok(tag)
}

/// A private signing key read from PEM or DER: ECDSA P-256/SHA-256 or P-384/SHA-384 (PKCS#8 or
/// SEC 1; ASN.1 signatures) or Ed25519 (PKCS#8). What [`crate::signature::verify_pem`] checks.
pub enum PemSigner {
    /// ECDSA.
    Ecdsa(EcdsaKeyPair),
    /// Ed25519.
    Ed25519(Ed25519KeyPair),
}

impl PemSigner {
    /// Reads a PEM private key.
    pub fn from_pem(pem_text: &[u8]) -> Result<Self, Error> {
        let block =
            pem::parse(pem_text).map_err(|_| Error::Policy("the signing key is not PEM".into()))?;
        let der = zeroize::Zeroizing::new(block.contents().to_vec());
        Self::from_der(&der)
    }

    /// Reads a DER private key.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Ok(Self::Ed25519(k));
        }
        [
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &ECDSA_P384_SHA384_ASN1_SIGNING,
        ]
        .iter()
        .find_map(|alg| {
            EcdsaKeyPair::from_pkcs8(alg, der)
                .or_else(|_| EcdsaKeyPair::from_private_key_der(alg, der))
                .ok()
        })
        .map(Self::Ecdsa)
        .ok_or_else(|| {
            Error::Policy("the signing key is not an EC P-256/P-384 or Ed25519 private key".into())
        })
    }

    /// Signs `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, Error> {
        match self {
            Self::Ecdsa(k) => k
                .sign(&SystemRandom::new(), payload)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| Error::Policy("signing failed".into())),
            Self::Ed25519(k) => Ok(k.sign(payload).as_ref().to_vec()),
        }
    }
}
