//! Attesters: the TEE side that turns report data into evidence.

use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_wire::{sample::SampleEvidence, Tee};
use serde_json::Value;

/// An attester failed to produce evidence.
#[derive(Debug, thiserror::Error)]
#[error("attester failed: {0}")]
pub struct AttesterError(pub String);

/// Produces evidence of one TEE type.
pub trait Attester: Send + Sync {
    /// The TEE type announced to the KBS.
    fn tee(&self) -> Tee;

    /// Evidence carrying `report_data` (the runtime-data digest) and, when the guest was
    /// launched with initdata, that initdata's digest.
    fn evidence(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, AttesterError>;
}

/// The upstream `sample` attester: unsigned evidence for testing a KBS. The KBS accepts it only
/// when started with `--allow-sample`.
#[derive(Clone, Debug)]
pub struct SampleAttester {
    /// The security version number it reports.
    pub svn: String,
}

impl Default for SampleAttester {
    fn default() -> Self {
        Self { svn: "1".into() }
    }
}

impl Attester for SampleAttester {
    fn tee(&self) -> Tee {
        Tee::Sample
    }

    fn evidence(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, AttesterError> {
        serde_json::to_value(SampleEvidence {
            svn: self.svn.clone(),
            report_data: STANDARD.encode(report_data),
            init_data: init_data_digest.map(|d| STANDARD.encode(d)),
            measure_register: None,
        })
        .map_err(|e| AttesterError(e.to_string()))
    }
}
