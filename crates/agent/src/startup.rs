//! What the agent checks before it serves anything: the initdata it was given must be the
//! initdata its TEE was launched with.
//!
//! - SEV-SNP (and the emulated PSP): the digest (under the initdata's declared algorithm,
//!   fitted to 32 bytes) must equal HOST_DATA in a fresh report from its own TEE, which the
//!   launcher set.
//! - An Azure confidential VM's vTPM (`az-snp-vtpm`, `az-tdx-vtpm`), where the platform sets no
//!   HOST_DATA: the guest measures the initdata itself, before anything reads it — the attester
//!   extends PCR 8 with the digest when it is still zero, and refuses when it holds anything
//!   else — and the KBS checks PCR 8 in the TPM quote.
//! - IBM Secure Execution, which sets nothing at launch for it: no check here; every
//!   attestation's user data (covered by the Ultravisor's measurement) carries the digest, and
//!   the KBS checks it against the initdata presented.

use coffer_wire::{binding::fit_report_data, initdata::Initdata, Tee};
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

/// The initdata text parsed, and its digest under its declared algorithm.
pub fn parse_initdata(text: &str) -> Result<(Initdata, Vec<u8>), StartupError> {
    let parsed = Initdata::parse(text).map_err(|e| StartupError::Initdata(e.to_string()))?;
    let digest = parsed.algorithm.digest(text.as_bytes());
    Ok((parsed, digest))
}

/// The initdata, checked against the `evidence` of a `tee` attester asked with its digest
/// (which a vTPM attester binds into PCR 8 as it answers); returns the parsed initdata and its
/// full digest.
pub fn check_initdata(
    text: &str,
    tee: Tee,
    evidence: &Value,
) -> Result<(Initdata, Vec<u8>), StartupError> {
    let (parsed, digest) = parse_initdata(text)?;
    if matches!(tee, Tee::AzSnpVtpm | Tee::AzTdxVtpm) {
        // Bound into PCR 8 by the attester that made this evidence (it refuses another value);
        // the TPM quote in the evidence covers PCR 8 for the KBS.
        if evidence["tpm_quote"].is_null() {
            return Err(StartupError::Report(
                "vTPM evidence without a TPM quote".into(),
            ));
        }
        return Ok((parsed, digest));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const INITDATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n";

    #[test]
    fn host_data_must_carry_the_digest_and_a_vtpm_binds_it_itself() {
        let (_, digest) = parse_initdata(INITDATA).unwrap();
        let mut psp = coffer_psp::EmulatedPsp::generate(coffer_psp::Tcb::default()).unwrap();
        let mut host_data = [0u8; 32];
        host_data.copy_from_slice(&fit_report_data(&digest, 32));
        psp.set_launch(coffer_psp::Launch {
            host_data,
            ..coffer_psp::Launch::default()
        });
        let good = psp.evidence(&[0u8; 64]).unwrap();
        assert!(check_initdata(INITDATA, Tee::Snp, &good).is_ok());
        psp.set_launch(coffer_psp::Launch::default());
        let other = psp.evidence(&[0u8; 64]).unwrap();
        let e = check_initdata(INITDATA, Tee::Snp, &other).unwrap_err();
        assert!(e.to_string().contains("does not match HOST_DATA"), "{e}");
        // A vTPM's evidence has no SNP report to read HOST_DATA from: its attester bound the
        // digest into PCR 8 (tested with swtpm in coffer-attester); what it made must be there.
        let vtpm =
            serde_json::json!({"tpm_quote": {"signature": "00", "message": "00", "pcrs": []}});
        assert!(check_initdata(INITDATA, Tee::AzSnpVtpm, &vtpm).is_ok());
        let e = check_initdata(INITDATA, Tee::AzSnpVtpm, &serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("without a TPM quote"), "{e}");
        // SNP evidence is read as an SNP report, never taken on the vTPM's word.
        assert!(check_initdata(INITDATA, Tee::Snp, &vtpm).is_err());
    }
}
