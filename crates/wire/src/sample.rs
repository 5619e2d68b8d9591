//! Evidence of the `sample` TEE: a format for testing attestation servers, with no security at
//! all. It is what upstream guest components' sample attester sends:
//! `{"svn": "1", "report_data": "<standard base64 of the runtime-data digest>"}`, optionally with
//! `measure_register` (hex) and `cc_eventlog`. Coffer's sample attester also sends `init_data`
//! (standard base64 of the initdata digest) when it was launched with initdata.

use serde::{Deserialize, Serialize};

/// Evidence produced by a sample attester.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleEvidence {
    /// Security version number, as a string.
    pub svn: String,
    /// Standard base64 of the report data.
    pub report_data: String,
    /// Standard base64 of the initdata digest, when the guest has initdata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_data: Option<String>,
    /// Hex of a 32-byte measurement register (newer upstream attesters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure_register: Option<String>,
}
