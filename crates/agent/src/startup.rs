//! What the agent checks before it serves anything: the initdata it was given must be the
//! initdata its TEE was launched with — the digest (under the initdata's declared algorithm,
//! fitted to 32 bytes) must equal HOST_DATA in a fresh report from its own TEE.

use coffer_wire::{binding::fit_report_data, initdata::Initdata};
use serde_json::Value;

/// Why the agent refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The initdata is not valid.
    #[error("initdata: {0}")]
    Initdata(String),
    /// The TEE did not produce a usable report.
    #[error("cannot get this TEE's report: {0}")]
    Report(String),
    /// The digest does not match.
    #[error("the initdata digest {digest} does not match HOST_DATA {host_data} in this TEE's report: refusing to start")]
    Mismatch {
        /// The initdata's digest (fitted to 32 bytes), hex.
        digest: String,
        /// HOST_DATA, hex.
        host_data: String,
    },
}

/// The initdata, checked against SNP `evidence` (`{"attestation_report": …}`); returns the
/// parsed initdata and its full digest.
pub fn check_initdata(text: &str, evidence: &Value) -> Result<(Initdata, Vec<u8>), StartupError> {
    let parsed = Initdata::parse(text).map_err(|e| StartupError::Initdata(e.to_string()))?;
    let digest = parsed.algorithm.digest(text.as_bytes());
    let report: sev::firmware::guest::AttestationReport =
        serde_json::from_value(evidence["attestation_report"].clone())
            .map_err(|e| StartupError::Report(format!("not an SNP report: {e}")))?;
    let want = fit_report_data(&digest, 32);
    if report.host_data[..] != want[..] {
        return Err(StartupError::Mismatch {
            digest: hex::encode(want),
            host_data: hex::encode(report.host_data),
        });
    }
    Ok((parsed, digest))
}
