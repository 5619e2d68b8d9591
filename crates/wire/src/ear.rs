//! Claims of the attestation token: an EAT Attestation Result (EAR, draft-fv-rats-ear) carried in
//! an ES256 JWT, laid out as upstream Trustee lays it out so that upstream resource policies apply
//! unchanged (`input["submods"]["cpu0"]["ear.status"]`).

use std::collections::BTreeMap;

use kbs_types::TeePubKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The EAR profile identifier.
pub const EAR_PROFILE: &str = "tag:github.com,2024:confidential-containers/Trustee";

/// Name of the submodule that holds the appraisal of the primary (CPU) TEE evidence.
pub const PRIMARY_SUBMOD: &str = "cpu0";

/// Trust tier of one appraisal (the `ear.status` claim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The verifier makes no claim about the evidence.
    None,
    /// The evidence is acceptable.
    Affirming,
    /// The evidence is acceptable but some checks raised a warning.
    Warning,
    /// The evidence contradicts the reference values or policy.
    Contraindicated,
}

impl Status {
    /// Parses the lowercase string form used in EAR and in Rego policies.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "affirming" => Some(Self::Affirming),
            "warning" => Some(Self::Warning),
            "contraindicated" => Some(Self::Contraindicated),
            _ => None,
        }
    }

    /// The lowercase string form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Affirming => "affirming",
            Self::Warning => "warning",
            Self::Contraindicated => "contraindicated",
        }
    }
}

/// Who produced the token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifierId {
    /// The verifier's developer.
    pub developer: String,
    /// The verifier's build.
    pub build: String,
}

/// The appraisal of one piece of evidence.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Appraisal {
    /// The trust tier.
    #[serde(rename = "ear.status")]
    pub status: Status,
    /// AR4SI trustworthiness vector produced by the policy, when it produced one.
    #[serde(
        rename = "ear.trustworthiness-vector",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub trust_vector: BTreeMap<String, i64>,
    /// Identifier (digest) of the appraisal policy that produced the status.
    #[serde(rename = "ear.appraisal-policy-id")]
    pub policy_id: String,
    /// The claims the verifier extracted from the evidence, in the upstream layout:
    /// `{"<tee>": {claims}, "runtime_data_claims": {"tee-pubkey", "nonce", …},
    /// "init_data": "<hex digest>", "init_data_claims": {…}}`.
    #[serde(rename = "ear.veraison.annotated-evidence")]
    pub evidence: Value,
}

/// The claims of a Coffer attestation token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EarClaims {
    /// Always [`EAR_PROFILE`].
    pub eat_profile: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Verifier identity.
    #[serde(rename = "ear.verifier-id")]
    pub verifier_id: VerifierId,
    /// The TEE type that produced the primary evidence (`sample`, `snp`, …).
    pub tee: String,
    /// One appraisal per submodule: `cpu0` for the primary evidence, others for additional
    /// evidence (`gpu0`, …).
    pub submods: BTreeMap<String, Appraisal>,
}

impl EarClaims {
    /// The TEE public key bound into the primary evidence.
    pub fn tee_pubkey(&self) -> Option<TeePubKey> {
        self.submods
            .get(PRIMARY_SUBMOD)
            .and_then(|a| a.evidence.get("runtime_data_claims"))
            .and_then(|r| r.get("tee-pubkey"))
            .and_then(|k| serde_json::from_value(k.clone()).ok())
    }

    /// True when every submodule's status is affirming.
    pub fn all_affirming(&self) -> bool {
        !self.submods.is_empty() && self.submods.values().all(|a| a.status == Status::Affirming)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_as_lowercase() {
        for s in [
            Status::None,
            Status::Affirming,
            Status::Warning,
            Status::Contraindicated,
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("Affirming"), None);
    }
}
