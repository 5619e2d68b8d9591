//! Signature policy with containers-policy.json semantics, decided on the manifest digest before
//! any layer blob is requested.
//!
//! * Requirements: `insecureAcceptAnything`, `reject`, `signedBy` (GPG simple signing, `keyType`
//!   `GPGKeys`, `keyPath`/`keyPaths`/`keyData`), `sigstoreSigned` (cosign key-based signatures,
//!   `keyPath`/`keyPaths`/`keyData`). Every requirement of the scope that applies must hold.
//! * Scopes (`transports.docker`): `host[:port]/repo:tag` or `@digest`, then the repository, then
//!   each parent namespace, then the host, then `*.domain` wildcards from the most specific; then
//!   the transport's `""` entry, then `default`. `transports.oci` scopes are layout directories.
//! * `signedIdentity`: `matchExact`, `matchRepoDigestOrExact` (the default), `matchRepository`,
//!   `exactReference`, `exactRepository`, `remapIdentity`.
//! * Simple-signing signatures come from the lookaside store a registries.d file names
//!   (`<lookaside>/<repository path>@sha256=<hex>/signature-<n>`, n from 1 until one is missing),
//!   or from the registry's signature extension API (`/extensions/v2/<repo>/signatures/<digest>`).
//!   Cosign signatures come from the `sha256-<hex>.sig` tag of the repository.
//!
//! Unknown requirement types, unknown fields and features not supported here (Fulcio, Rekor)
//! are errors, never ignored: the policy fails closed.

use std::{collections::BTreeMap, io::Read as _, path::Path};

use base64::{engine::general_purpose::STANDARD, Engine};
use serde::Deserialize;
use serde_json::Value;

use crate::{source::Source, Error, ImageRef};

/// A containers-policy.json document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Requirements when no transport scope matches.
    default: Vec<Requirement>,
    /// Per transport (`docker`, `oci`), per scope.
    #[serde(default)]
    transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

/// One requirement.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Requirement {
    /// Anything goes.
    #[serde(rename = "insecureAcceptAnything")]
    InsecureAcceptAnything,
    /// Nothing goes.
    #[serde(rename = "reject")]
    Reject,
    /// A GPG simple-signing signature by one of the keys.
    #[serde(rename = "signedBy", rename_all = "camelCase")]
    SignedBy {
        /// Must be `GPGKeys`.
        key_type: String,
        /// A keyring file (binary or armored), or `kbs:///…`.
        #[serde(default)]
        key_path: Option<String>,
        /// Several keyring files.
        #[serde(default)]
        key_paths: Option<Vec<String>>,
        /// A keyring, base64.
        #[serde(default)]
        key_data: Option<String>,
        /// How the signed identity must relate to the image.
        #[serde(default)]
        signed_identity: Option<Identity>,
    },
    /// A cosign (sigstore) signature by one of the public keys.
    #[serde(rename = "sigstoreSigned", rename_all = "camelCase")]
    SigstoreSigned {
        /// A PEM public key file, or `kbs:///…`.
        #[serde(default)]
        key_path: Option<String>,
        /// Several PEM public key files.
        #[serde(default)]
        key_paths: Option<Vec<String>>,
        /// A PEM public key, base64.
        #[serde(default)]
        key_data: Option<String>,
        /// How the signed identity must relate to the image.
        #[serde(default)]
        signed_identity: Option<Identity>,
    },
}

/// `signedIdentity`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Identity {
    /// The signed reference equals the pulled one (tag or digest included).
    #[serde(rename = "matchExact")]
    MatchExact,
    /// As `matchExact`, or only the repository when pulling by digest.
    #[serde(rename = "matchRepoDigestOrExact")]
    MatchRepoDigestOrExact,
    /// The repositories are equal.
    #[serde(rename = "matchRepository")]
    MatchRepository,
    /// The signed reference is this one.
    #[serde(rename = "exactReference", rename_all = "camelCase")]
    ExactReference {
        /// The reference.
        docker_reference: String,
    },
    /// The signed reference's repository is this one.
    #[serde(rename = "exactRepository", rename_all = "camelCase")]
    ExactRepository {
        /// The repository.
        docker_repository: String,
    },
    /// `prefix` of the pulled reference is replaced by `signedPrefix`, then as
    /// `matchRepoDigestOrExact`.
    #[serde(rename = "remapIdentity", rename_all = "camelCase")]
    RemapIdentity {
        /// The prefix of the pulled reference.
        prefix: String,
        /// What the signature names instead.
        signed_prefix: String,
    },
}

fn deny(why: impl Into<String>) -> Error {
    Error::Policy(why.into())
}

impl Policy {
    /// Parses policy.json.
    pub fn parse(json: &[u8]) -> Result<Self, Error> {
        let p: Self = serde_json::from_slice(json)
            .map_err(|e| Error::Policy(format!("policy.json is not valid: {e}")))?;
        for (transport, scopes) in &p.transports {
            if transport != "docker" && transport != "oci" {
                return Err(deny(format!(
                    "policy.json: transport {transport:?} is not supported"
                )));
            }
            for (scope, reqs) in scopes {
                if reqs.is_empty() {
                    return Err(deny(format!(
                        "policy.json: scope {scope:?} has no requirements"
                    )));
                }
            }
        }
        if p.default.is_empty() {
            return Err(deny("policy.json: default has no requirements"));
        }
        Ok(p)
    }

    /// The requirements that apply to `image`, and the scope they came from.
    pub fn requirements(&self, image: &ImageRef) -> (&[Requirement], String) {
        let (transport, candidates) = match image {
            ImageRef::Docker(r) => ("docker", docker_scopes(r)),
            ImageRef::Layout { dir, name } => {
                let dir = dir.canonicalize().unwrap_or(dir.clone());
                let mut c = Vec::new();
                if let Some(n) = name {
                    c.push(format!("{}:{n}", dir.display()));
                }
                let mut d = Some(dir.as_path());
                while let Some(p) = d {
                    c.push(p.display().to_string());
                    d = p.parent();
                }
                ("oci", c)
            }
        };
        if let Some(scopes) = self.transports.get(transport) {
            for c in candidates.iter().chain(std::iter::once(&String::new())) {
                if let Some(r) = scopes.get(c) {
                    return (r, format!("transports.{transport}.{c:?}"));
                }
            }
        }
        (&self.default, "default".into())
    }
}

/// Scopes for a registry reference, most specific first.
fn docker_scopes(r: &oci_client::Reference) -> Vec<String> {
    let mut out = Vec::new();
    let repo = format!("{}/{}", r.registry(), r.repository());
    if let Some(d) = r.digest() {
        out.push(format!("{repo}@{d}"));
    }
    if let Some(t) = r.tag() {
        out.push(format!("{repo}:{t}"));
    }
    let mut scope = repo.as_str();
    out.push(scope.to_string());
    while let Some((parent, _)) = scope.rsplit_once('/') {
        out.push(parent.to_string());
        scope = parent;
    }
    let host = r.registry().split(':').next().unwrap_or_default();
    let mut parts: Vec<&str> = host.split('.').collect();
    while parts.len() > 1 {
        parts.remove(0);
        out.push(format!("*.{}", parts.join(".")));
    }
    out
}

/// The registries.d configuration: where simple-signing signatures are looked up.
#[derive(Debug, Default)]
pub struct RegistriesD {
    default_lookaside: Option<String>,
    by_scope: BTreeMap<String, String>,
    default_staging: Option<String>,
    staging_by_scope: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct RegistriesDFile {
    #[serde(default)]
    default_docker: Option<LookasideEntry>,
    #[serde(default)]
    docker: BTreeMap<String, LookasideEntry>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "kebab-case")]
struct LookasideEntry {
    #[serde(default)]
    lookaside: Option<String>,
    #[serde(default)]
    lookaside_staging: Option<String>,
    /// The older name of `lookaside`.
    #[serde(default)]
    sigstore: Option<String>,
    #[serde(default)]
    sigstore_staging: Option<String>,
    #[serde(default)]
    use_sigstore_attachments: Option<bool>,
}

impl RegistriesD {
    /// Reads every `*.yaml` file in `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let mut out = Self::default();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(Error::io(format!("cannot read {}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for f in files {
            let text =
                std::fs::read(&f).map_err(Error::io(format!("cannot read {}", f.display())))?;
            let doc: RegistriesDFile = serde_yaml_ng::from_slice(&text)
                .map_err(|e| Error::Policy(format!("{}: {e}", f.display())))?;
            if let Some(d) = doc.default_docker {
                out.default_lookaside = d.lookaside.or(d.sigstore).or(out.default_lookaside);
                out.default_staging = d
                    .lookaside_staging
                    .or(d.sigstore_staging)
                    .or(out.default_staging);
            }
            for (scope, e) in doc.docker {
                if let Some(l) = e.lookaside.clone().or(e.sigstore.clone()) {
                    out.by_scope.insert(scope.clone(), l);
                }
                if let Some(l) = e.lookaside_staging.or(e.sigstore_staging) {
                    out.staging_by_scope.insert(scope, l);
                }
                let _ = e.use_sigstore_attachments;
            }
        }
        Ok(out)
    }

    fn pick<'a>(
        scoped: &'a BTreeMap<String, String>,
        default: &'a Option<String>,
        r: &oci_client::Reference,
    ) -> Option<&'a String> {
        docker_scopes(r)
            .iter()
            .find_map(|s| scoped.get(s))
            .or(default.as_ref())
    }

    /// The lookaside base URL for `r`, if any.
    pub fn lookaside(&self, r: &oci_client::Reference) -> Option<&String> {
        Self::pick(&self.by_scope, &self.default_lookaside, r)
    }

    /// Where new signatures for `r` are written (`lookaside-staging`, else `lookaside`).
    pub fn staging(&self, r: &oci_client::Reference) -> Option<&String> {
        Self::pick(&self.staging_by_scope, &self.default_staging, r).or(self.lookaside(r))
    }
}

/// The lookaside URL of signature `n` (from 1) of a manifest.
pub fn lookaside_url(base: &str, r: &oci_client::Reference, digest: &str, n: usize) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!(
        "{}/{}@sha256={hex}/signature-{n}",
        base.trim_end_matches('/'),
        r.repository()
    )
}

/// Reads a lookaside URL: `file://` paths and `http(s)://`; `None` when absent.
async fn fetch_url(url: &str) -> Result<Option<Vec<u8>>, Error> {
    if let Some(path) = url.strip_prefix("file://") {
        return match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                context: format!("cannot read signature {path}"),
                source: e,
            }),
        };
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(deny(format!(
            "lookaside {url}: only file://, http:// and https:// are supported"
        )));
    }
    let resp = reqwest::get(url)
        .await
        .map_err(|e| Error::Registry(format!("cannot fetch signature {url}: {e}")))?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !resp.status().is_success() {
        return Err(Error::Registry(format!(
            "signature {url}: HTTP {}",
            resp.status()
        )));
    }
    let b = resp
        .bytes()
        .await
        .map_err(|e| Error::Registry(format!("cannot fetch signature {url}: {e}")))?;
    Ok(Some(b.to_vec()))
}

async fn key_material(
    path: &Option<String>,
    paths: &Option<Vec<String>>,
    data: &Option<String>,
    kbs: Option<&dyn crate::broker::KeyBroker>,
) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    let mut all: Vec<&String> = path.iter().collect();
    all.extend(paths.iter().flatten());
    for p in all {
        if p.starts_with("kbs:///") {
            let broker = kbs.ok_or_else(|| deny(format!("policy key {p} needs a KBS (--kbs)")))?;
            out.push(
                broker
                    .get(p)
                    .await
                    .map_err(|e| deny(format!("cannot get policy key {p} from the KBS: {e}")))?
                    .to_vec(),
            );
        } else {
            out.push(std::fs::read(p).map_err(Error::io(format!("cannot read policy key {p}")))?);
        }
    }
    if let Some(d) = data {
        out.push(
            STANDARD
                .decode(d.trim())
                .map_err(|_| deny("policy keyData is not base64"))?,
        );
    }
    if out.is_empty() {
        return Err(deny("a signature requirement names no key"));
    }
    Ok(out)
}

/// The claims of a simple-signing payload that a policy checks.
struct Payload {
    reference: String,
    digest: String,
}

fn parse_payload(json: &[u8], want_type: &str) -> Result<Payload, String> {
    let v: Value = serde_json::from_slice(json).map_err(|_| "payload is not JSON".to_string())?;
    let c = &v["critical"];
    let ty = c["type"].as_str().unwrap_or_default();
    if ty != want_type {
        return Err(format!("payload type {ty:?} is not {want_type:?}"));
    }
    Ok(Payload {
        reference: c["identity"]["docker-reference"]
            .as_str()
            .ok_or("payload has no docker-reference")?
            .to_string(),
        digest: c["image"]["docker-manifest-digest"]
            .as_str()
            .ok_or("payload has no docker-manifest-digest")?
            .to_string(),
    })
}

/// `repo` of `reg/repo:tag` or `reg/repo@sha256:…`.
fn repo_of(reference: &str) -> &str {
    if let Some((r, _)) = reference.split_once('@') {
        return r;
    }
    match reference.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => r,
        _ => reference,
    }
}

fn identity_ok(id: &Identity, pulled: &oci_client::Reference, signed: &str) -> bool {
    let whole = pulled.whole();
    let repo = format!("{}/{}", pulled.registry(), pulled.repository());
    let by_digest_only = pulled.tag().is_none() && pulled.digest().is_some();
    match id {
        Identity::MatchExact => signed == whole,
        Identity::MatchRepoDigestOrExact => {
            if by_digest_only {
                repo_of(signed) == repo
            } else {
                signed == whole
            }
        }
        Identity::MatchRepository => repo_of(signed) == repo,
        Identity::ExactReference { docker_reference } => signed == docker_reference,
        Identity::ExactRepository { docker_repository } => repo_of(signed) == docker_repository,
        Identity::RemapIdentity {
            prefix,
            signed_prefix,
        } => {
            let remapped = |s: &str| match s.strip_prefix(prefix.as_str()) {
                Some(rest) => format!("{signed_prefix}{rest}"),
                None => s.to_string(),
            };
            if by_digest_only {
                repo_of(signed) == remapped(&repo)
            } else {
                signed == remapped(&whole)
            }
        }
    }
}

/// Verifies one simple-signing signature with the keyrings; the payload on success.
fn verify_gpg(sig: &[u8], keyrings: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    use pgp::composed::{Deserializable, Message, SignedPublicKey};
    let mut keys: Vec<SignedPublicKey> = Vec::new();
    for ring in keyrings {
        let parsed: Vec<SignedPublicKey> = if ring.starts_with(b"-----BEGIN PGP") {
            SignedPublicKey::from_armor_many(&ring[..])
                .map_err(|e| format!("keyring: {e}"))?
                .0
                .filter_map(Result::ok)
                .collect()
        } else {
            SignedPublicKey::from_bytes_many(&ring[..])
                .map_err(|e| format!("keyring: {e}"))?
                .filter_map(Result::ok)
                .collect()
        };
        keys.extend(parsed.into_iter().filter(|k| k.verify_bindings().is_ok()));
    }
    if keys.is_empty() {
        return Err("the keyring holds no usable OpenPGP key".into());
    }
    let msg = Message::from_bytes(sig).map_err(|e| format!("not an OpenPGP message: {e}"))?;
    let mut msg = msg
        .decompress()
        .map_err(|e| format!("cannot decompress: {e}"))?;
    let mut payload = Vec::new();
    std::io::Read::take(&mut msg, 1 << 20)
        .read_to_end(&mut payload)
        .map_err(|e| format!("cannot read the signed payload: {e}"))?;
    for k in &keys {
        if msg.verify(k).is_ok() {
            return Ok(payload);
        }
        for sub in &k.public_subkeys {
            if msg.verify(&sub.key).is_ok() {
                return Ok(payload);
            }
        }
    }
    Err("not signed by a key in the policy's keyring".into())
}

/// Verifies a cosign signature (base64 ASN.1 ECDSA P-256/P-384 with SHA-256/384, RSA PKCS#1
/// v1.5 SHA-256, or Ed25519) over `payload` with a PEM public key.
fn verify_cosign(payload: &[u8], sig_b64: &str, pem_text: &[u8]) -> bool {
    STANDARD
        .decode(sig_b64.trim())
        .is_ok_and(|sig| verify_pem(pem_text, payload, &sig))
}

/// Verifies `sig` over `payload` with a PEM SubjectPublicKeyInfo: ECDSA P-256/SHA-256 or
/// P-384/SHA-384 (ASN.1 signatures), RSA PKCS#1 v1.5 SHA-256, or Ed25519.
pub fn verify_pem(pem_text: &[u8], payload: &[u8], sig: &[u8]) -> bool {
    use aws_lc_rs::signature::{self, UnparsedPublicKey};
    let Ok(block) = pem::parse(pem_text) else {
        return false;
    };
    let Ok(spki) = x509_cert::spki::SubjectPublicKeyInfoRef::try_from(block.contents()) else {
        return false;
    };
    let point = spki.subject_public_key.raw_bytes();
    let algs: &[&'static dyn signature::VerificationAlgorithm] =
        match spki.algorithm.oid.to_string().as_str() {
            "1.2.840.10045.2.1" => &[
                &signature::ECDSA_P256_SHA256_ASN1,
                &signature::ECDSA_P384_SHA384_ASN1,
            ],
            "1.2.840.113549.1.1.1" => &[&signature::RSA_PKCS1_2048_8192_SHA256],
            "1.3.101.112" => &[&signature::ED25519],
            _ => return false,
        };
    // EC: the point; RSA: the PKCS#1 RSAPublicKey; Ed25519: the raw key — all the bit string.
    algs.iter().any(|alg| {
        UnparsedPublicKey::new(*alg, point)
            .verify(payload, sig)
            .is_ok()
    })
}

/// What a policy check found, for the pull report.
#[derive(Clone, Debug)]
pub struct Decision {
    /// The scope whose requirements applied.
    pub scope: String,
    /// One line per requirement that held.
    pub satisfied: Vec<String>,
}

/// Checks `image`, whose top-level manifest has `digest`, against `policy`. Nothing but
/// signatures (and the `.sig` manifest) is fetched.
pub async fn check(
    policy: &Policy,
    registries: &RegistriesD,
    image: &ImageRef,
    source: &Source,
    digest: &str,
    kbs: Option<&dyn crate::broker::KeyBroker>,
) -> Result<Decision, Error> {
    let (reqs, scope) = policy.requirements(image);
    let mut satisfied = Vec::new();
    for req in reqs {
        match req {
            Requirement::InsecureAcceptAnything => {
                satisfied.push("insecureAcceptAnything".into());
            }
            Requirement::Reject => {
                return Err(deny(format!("{image} is rejected by policy ({scope})")));
            }
            Requirement::SignedBy {
                key_type,
                key_path,
                key_paths,
                key_data,
                signed_identity,
            } => {
                if key_type != "GPGKeys" {
                    return Err(deny(format!("signedBy keyType {key_type:?}; only GPGKeys")));
                }
                let ImageRef::Docker(r) = image else {
                    return Err(deny(format!(
                        "{image}: signedBy needs a registry image (no signature store for layouts)"
                    )));
                };
                let rings = key_material(key_path, key_paths, key_data, kbs).await?;
                let id = signed_identity
                    .clone()
                    .unwrap_or(Identity::MatchRepoDigestOrExact);
                let sigs = simple_signatures(registries, r, source, digest).await?;
                if sigs.is_empty() {
                    return Err(deny(format!(
                        "{image} has no signature (policy {scope} requires signedBy)"
                    )));
                }
                let payloads = sigs.iter().map(|s| {
                    verify_gpg(s, &rings)
                        .and_then(|p| parse_payload(&p, "atomic container signature"))
                });
                if let Err(why) = first_valid(payloads, digest, &id, r) {
                    return Err(deny(format!(
                        "{image}: no valid signature ({why}; policy {scope})"
                    )));
                }
                satisfied.push("signedBy".into());
            }
            Requirement::SigstoreSigned {
                key_path,
                key_paths,
                key_data,
                signed_identity,
            } => {
                let ImageRef::Docker(r) = image else {
                    return Err(deny(format!(
                        "{image}: sigstoreSigned needs a registry image"
                    )));
                };
                let keys = key_material(key_path, key_paths, key_data, kbs).await?;
                let id = signed_identity
                    .clone()
                    .unwrap_or(Identity::MatchRepoDigestOrExact);
                let sigs = cosign_signatures(source, r, digest).await?;
                if sigs.is_empty() {
                    return Err(deny(format!(
                        "{image} has no cosign signature (policy {scope} requires sigstoreSigned)"
                    )));
                }
                let payloads = sigs.iter().map(|(payload, sig)| {
                    if keys.iter().any(|k| verify_cosign(payload, sig, k)) {
                        parse_payload(payload, "cosign container image signature")
                    } else {
                        Err("a signature does not verify with the policy's keys".to_string())
                    }
                });
                if let Err(why) = first_valid(payloads, digest, &id, r) {
                    return Err(deny(format!(
                        "{image}: no valid cosign signature ({why}; policy {scope})"
                    )));
                }
                satisfied.push("sigstoreSigned".into());
            }
        }
    }
    Ok(Decision { scope, satisfied })
}

/// Succeeds at the first cryptographically valid payload that names `digest` and an identity
/// `id` accepts for `r`; otherwise says why each failed.
fn first_valid(
    payloads: impl Iterator<Item = Result<Payload, String>>,
    digest: &str,
    id: &Identity,
    r: &oci_client::Reference,
) -> Result<(), String> {
    let mut why = Vec::new();
    for p in payloads {
        match p {
            Ok(p) if p.digest != digest => why.push(format!(
                "a signature is for manifest {}, not {digest}",
                p.digest
            )),
            Ok(p) if !identity_ok(id, r, &p.reference) => why.push(format!(
                "a signature names {}, which does not match {}",
                p.reference,
                r.whole()
            )),
            Ok(_) => return Ok(()),
            Err(e) => why.push(e),
        }
    }
    Err(why.join("; "))
}

/// Simple-signing signatures: the lookaside store when one is configured, else the registry's
/// signature extension API.
async fn simple_signatures(
    registries: &RegistriesD,
    r: &oci_client::Reference,
    source: &Source,
    digest: &str,
) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    if let Some(base) = registries.lookaside(r) {
        for n in 1..=64 {
            match fetch_url(&lookaside_url(base, r, digest, n)).await? {
                Some(s) => out.push(s),
                None => break,
            }
        }
        return Ok(out);
    }
    source.extension_signatures(digest).await
}

/// Cosign signatures at the `sha256-<hex>.sig` tag: (payload, base64 signature) pairs.
async fn cosign_signatures(
    source: &Source,
    r: &oci_client::Reference,
    digest: &str,
) -> Result<Vec<(Vec<u8>, String)>, Error> {
    let tag = format!("{}.sig", digest.replace(':', "-"));
    let Some(manifest) = source.tag_manifest(&tag).await? else {
        return Ok(Vec::new());
    };
    let m: oci_client::manifest::OciImageManifest = serde_json::from_slice(&manifest)
        .map_err(|e| Error::Manifest(format!("{}:{tag}: {e}", r.repository())))?;
    let mut out = Vec::new();
    for l in &m.layers {
        let Some(sig) = l
            .annotations
            .as_ref()
            .and_then(|a| a.get("dev.cosignproject.cosign/signature"))
        else {
            continue;
        };
        let payload = source.small_blob(l).await?;
        out.push((payload, sig.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> oci_client::Reference {
        s.parse().unwrap()
    }

    #[test]
    fn scopes_pick_the_most_specific_entry() {
        let p = Policy::parse(
            br#"{"default": [{"type": "reject"}],
                 "transports": {"docker": {
                    "reg.example.com:5000/team/app": [{"type": "insecureAcceptAnything"}],
                    "reg.example.com:5000/team": [{"type": "reject"}],
                    "*.example.com": [{"type": "insecureAcceptAnything"}, {"type": "reject"}]}}}"#,
        )
        .unwrap();
        let img = |s: &str| ImageRef::parse(&format!("docker://{s}")).unwrap();
        assert!(p
            .requirements(&img("reg.example.com:5000/team/app:v1"))
            .1
            .contains("team/app"));
        assert!(p
            .requirements(&img("reg.example.com:5000/team/other:v1"))
            .1
            .ends_with("team\""));
        assert!(p
            .requirements(&img("other.example.com/x:v1"))
            .1
            .contains("*.example.com"));
        assert_eq!(p.requirements(&img("elsewhere.org/x:v1")).1, "default");
        assert!(Policy::parse(br#"{"default": []}"#).is_err());
        assert!(Policy::parse(br#"{"default": [{"type": "trustMe"}]}"#).is_err());
        assert!(
            Policy::parse(br#"{"default": [{"type": "sigstoreSigned", "fulcio": {}}]}"#).is_err()
        );
    }

    #[test]
    fn identities_match_as_containers_policy_describes() {
        let tagged = r("reg:5000/team/app:v1");
        let by_digest = r(&format!("reg:5000/team/app@sha256:{}", "a".repeat(64)));
        let signed = "reg:5000/team/app:v1";
        assert!(identity_ok(&Identity::MatchExact, &tagged, signed));
        assert!(!identity_ok(
            &Identity::MatchExact,
            &tagged,
            "reg:5000/team/app:v2"
        ));
        assert!(identity_ok(
            &Identity::MatchRepoDigestOrExact,
            &by_digest,
            signed
        ));
        assert!(!identity_ok(
            &Identity::MatchRepoDigestOrExact,
            &tagged,
            "reg:5000/team/app:v2"
        ));
        assert!(identity_ok(
            &Identity::MatchRepository,
            &tagged,
            "reg:5000/team/app:v2"
        ));
        assert!(!identity_ok(
            &Identity::MatchRepository,
            &tagged,
            "reg:5000/team/evil:v1"
        ));
        assert!(identity_ok(
            &Identity::ExactRepository {
                docker_repository: "reg:5000/team/app".into()
            },
            &tagged,
            "reg:5000/team/app:v9"
        ));
        assert!(identity_ok(
            &Identity::RemapIdentity {
                prefix: "reg:5000/team".into(),
                signed_prefix: "upstream.example/team".into()
            },
            &tagged,
            "upstream.example/team/app:v1"
        ));
    }
}
