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
