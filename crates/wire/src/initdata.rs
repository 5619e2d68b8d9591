//! Initdata: the TOML document a pod VM is launched with, whose digest the TEE binds into its
//! evidence (SNP HOST_DATA, TDX MRCONFIGID, vTPM PCR8).
//!
//! ```toml
//! version = "0.1.0"
//! algorithm = "sha384"
//! [data]
//! "aa.toml" = '''…'''
//! "policy.rego" = '''…'''
//! ```
//! The digest is the named hash over the raw bytes of the document, exactly as transmitted.

use std::collections::BTreeMap;

use kbs_types::HashAlgorithm;
use serde::Deserialize;

/// The only initdata version understood.
pub const INITDATA_VERSION: &str = "0.1.0";

/// Format name of TOML initdata in the KBS protocol's `init-data` field.
pub const INITDATA_FORMAT: &str = "toml";

/// A parsed initdata document.
#[derive(Clone, Debug, PartialEq)]
pub struct Initdata {
    /// Hash algorithm of the digest.
    pub algorithm: HashAlgorithm,
    /// The named entries (`aa.toml`, `cdh.toml`, `policy.rego`, …).
    pub data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: String,
    algorithm: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// Error reading initdata.
#[derive(Debug, thiserror::Error)]
pub enum InitdataError {
    /// Not TOML of the initdata shape.
    #[error("initdata is not valid TOML of the expected shape: {0}")]
    Parse(String),
    /// Unsupported `version`.
    #[error("unsupported initdata version {0:?}; expected \"0.1.0\"")]
    Version(String),
    /// Unsupported `algorithm`.
    #[error("unsupported initdata algorithm {0:?}; use sha256, sha384 or sha512")]
    Algorithm(String),
}

impl Initdata {
    /// Parses an initdata document.
    pub fn parse(text: &str) -> Result<Self, InitdataError> {
        let raw: Raw = toml::from_str(text).map_err(|e| InitdataError::Parse(e.to_string()))?;
        if raw.version != INITDATA_VERSION {
            return Err(InitdataError::Version(raw.version));
        }
        let algorithm = match raw.algorithm.as_str() {
            "sha256" => HashAlgorithm::Sha256,
            "sha384" => HashAlgorithm::Sha384,
            "sha512" => HashAlgorithm::Sha512,
            other => return Err(InitdataError::Algorithm(other.to_string())),
        };
        Ok(Self {
            algorithm,
            data: raw.data,
        })
    }
}

/// Parses `text` and returns the digest of its raw bytes under its declared algorithm.
pub fn digest(text: &str) -> Result<Vec<u8>, InitdataError> {
    let parsed = Initdata::parse(text)?;
    Ok(parsed.algorithm.digest(text.as_bytes()))
}

/// What [`build`] writes into an initdata document: the guest components' configuration and
/// the agent policy.
#[derive(Clone, Debug, Default)]
pub struct InitdataSpec {
    /// The KBS the guest attests to (`aa.toml` `token_configs.kbs.url`, `cdh.toml` `kbc.url`).
    pub kbs_url: String,
    /// KBS resources holding image decryption keys (`kbs:///repo/type/tag`).
    pub image_keys: Vec<String>,
    /// The agent policy (Rego, package `agent_policy`).
    pub policy: String,
    /// The workload owner's public key (PEM), for owner-signed exec.
    pub owner_key: Option<String>,
    /// The X25519 public key (PEM) container output is sealed to.
    pub log_recipient: Option<String>,
    /// KBS resource with the registry credentials the agent pulls with.
    pub registry_auth: Option<String>,
    /// KBS resource with the image signature policy the agent enforces.
    pub signature_policy: Option<String>,
    /// Digest algorithm: `sha256`, `sha384` or `sha512`.
    pub algorithm: String,
    /// The KBS resource keying each encrypted block volume, by the container path it is given
    /// at (`cdh.toml` `[block_volumes]`).
    pub block_volumes: BTreeMap<String, String>,
    /// The attested mesh's settings (`mesh.toml`, [`crate::mesh::MeshConfig`]), when the
    /// workload is in the mesh.
    pub mesh: Option<String>,
}

/// Writes the initdata document for `spec` (version [`INITDATA_VERSION`]): `aa.toml` with the
/// KBS, `cdh.toml` with the `cc_kbc` client and image settings (the upstream confidential data
/// hub's key names), `policy.rego`, and the owner's and log recipient's keys when given. The
/// values are written as given (callers check URIs and keys); the text is checked to parse as
/// initdata, which checks the algorithm.
pub fn build(spec: &InitdataSpec) -> Result<String, InitdataError> {
    use toml::{Table, Value};
    let ser = |t: &Table| toml::to_string(t).map_err(|e| InitdataError::Parse(e.to_string()));
    let mut aa = Table::new();
    aa.insert(
        "token_configs".into(),
        Value::Table(Table::from_iter([(
            "kbs".to_string(),
            Value::Table(Table::from_iter([(
                "url".to_string(),
                Value::String(spec.kbs_url.clone()),
            )])),
        )])),
    );
    let mut cdh = Table::new();
    cdh.insert(
        "kbc".into(),
        Value::Table(Table::from_iter([
            ("name".to_string(), Value::String("cc_kbc".into())),
            ("url".to_string(), Value::String(spec.kbs_url.clone())),
        ])),
    );
    let mut image = Table::new();
    if !spec.image_keys.is_empty() {
        image.insert(
            "decryption_keys".into(),
            Value::Array(spec.image_keys.iter().cloned().map(Value::String).collect()),
        );
    }
    if let Some(u) = &spec.registry_auth {
        image.insert(
            "authenticated_registry_credentials_uri".into(),
            Value::String(u.clone()),
        );
    }
    if let Some(u) = &spec.signature_policy {
        image.insert("image_security_policy_uri".into(), Value::String(u.clone()));
    }
    if !image.is_empty() {
        cdh.insert("image".into(), Value::Table(image));
    }
    if !spec.block_volumes.is_empty() {
        cdh.insert(
            "block_volumes".into(),
            Value::Table(
                spec.block_volumes
                    .iter()
                    .map(|(p, u)| (p.clone(), Value::String(u.clone())))
                    .collect(),
            ),
        );
    }
    let mut data = Table::new();
    data.insert("aa.toml".into(), Value::String(ser(&aa)?));
    data.insert("cdh.toml".into(), Value::String(ser(&cdh)?));
    data.insert("policy.rego".into(), Value::String(spec.policy.clone()));
    if let Some(k) = &spec.owner_key {
        data.insert("owner-key.pem".into(), Value::String(k.clone()));
    }
    if let Some(k) = &spec.log_recipient {
        data.insert("log-recipient.pem".into(), Value::String(k.clone()));
    }
    if let Some(m) = &spec.mesh {
        data.insert(crate::mesh::MESH_TOML.into(), Value::String(m.clone()));
    }
    let mut doc = Table::new();
    doc.insert("version".into(), Value::String(INITDATA_VERSION.into()));
    doc.insert("algorithm".into(), Value::String(spec.algorithm.clone()));
    doc.insert("data".into(), Value::Table(data));
    let text = ser(&doc)?;
    Initdata::parse(&text)?;
    Ok(text)
}

/// Encodes initdata as the value of the pod annotation
/// `io.katacontainers.config.hypervisor.cc_init_data`: base64 (standard, padded) of the gzip
/// (best compression) of the text.
pub fn encode_annotation(text: &str) -> String {
    use base64::Engine;
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(text.as_bytes());
    let bytes = gz.finish().unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = \"package agent_policy\"\n";

    #[test]
    fn digest_is_over_raw_bytes() {
        use sha2::{Digest, Sha256};
        assert_eq!(
            digest(DOC).unwrap(),
            Sha256::digest(DOC.as_bytes()).to_vec()
        );
        let parsed = Initdata::parse(DOC).unwrap();
        assert_eq!(parsed.data["policy.rego"], "package agent_policy");
    }

    #[test]
    fn build_writes_the_documented_shape() {
        let spec = InitdataSpec {
            kbs_url: "http://127.0.0.1:8080".into(),
            image_keys: vec!["kbs:///default/key/1".into()],
            policy: "package agent_policy\n".into(),
            algorithm: "sha384".into(),
            ..Default::default()
        };
        let text = build(&spec).unwrap();
        let parsed = Initdata::parse(&text).unwrap();
        assert_eq!(parsed.algorithm, HashAlgorithm::Sha384);
        assert_eq!(parsed.data["policy.rego"], "package agent_policy\n");
        let aa: toml::Table = toml::from_str(&parsed.data["aa.toml"]).unwrap();
        assert_eq!(
            aa["token_configs"]["kbs"]["url"].as_str(),
            Some("http://127.0.0.1:8080")
        );
        let cdh: toml::Table = toml::from_str(&parsed.data["cdh.toml"]).unwrap();
        assert_eq!(cdh["kbc"]["name"].as_str(), Some("cc_kbc"));
        assert_eq!(
            cdh["image"]["decryption_keys"][0].as_str(),
            Some("kbs:///default/key/1")
        );
        assert!(!parsed.data.contains_key("owner-key.pem"));
        assert!(cdh.get("block_volumes").is_none());
        let with_volume = InitdataSpec {
            block_volumes: BTreeMap::from([("/dev/xvda".into(), "kbs:///default/pv/data".into())]),
            ..spec.clone()
        };
        let cdh: toml::Table = toml::from_str(
            &Initdata::parse(&build(&with_volume).unwrap()).unwrap().data["cdh.toml"],
        )
        .unwrap();
        assert_eq!(
            cdh["block_volumes"]["/dev/xvda"].as_str(),
            Some("kbs:///default/pv/data")
        );
        let bad = InitdataSpec {
            algorithm: "md5".into(),
            ..spec
        };
        assert!(matches!(build(&bad), Err(InitdataError::Algorithm(_))));
    }

    #[test]
    fn the_annotation_is_base64_of_gzip() {
        use base64::Engine;
        use std::io::Read;
        let encoded = encode_annotation(DOC);
        let gz = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, DOC);
    }

    #[test]
    fn rejects_bad_version_and_algorithm() {
        assert!(matches!(
            Initdata::parse("version = \"9\"\nalgorithm = \"sha256\"\n"),
            Err(InitdataError::Version(_))
        ));
        assert!(matches!(
            Initdata::parse("version = \"0.1.0\"\nalgorithm = \"md5\"\n"),
            Err(InitdataError::Algorithm(_))
        ));
        assert!(matches!(
            Initdata::parse("not toml ="),
            Err(InitdataError::Parse(_))
        ));
    }
}
