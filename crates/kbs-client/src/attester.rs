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

    /// Evidence for a challenge whose `extra-params` carry what the TEE needs (IBM SE: the
    /// attestation request, `arcb`). The default ignores them.
    fn evidence_for_challenge(
        &self,
        extra_params: &Value,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, AttesterError> {
        let _ = extra_params;
        self.evidence(report_data, init_data_digest)
    }
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

/// The emulated SEV-SNP attester, in process: it plays both the launcher (which sets HOST_DATA
/// to the initdata digest on the emulated PSP) and the guest (which asks for a report over the
/// runtime-data digest). Development only: a KBS accepts it only with `--allow-emulated` and the
/// PSP's roots.
pub struct EmulatedSnpAttester {
    psp: std::sync::Mutex<coffer_psp::EmulatedPsp>,
    measurement: [u8; 48],
}

impl EmulatedSnpAttester {
    /// An attester over `psp`, reporting `measurement` as the launch measurement.
    pub fn new(psp: coffer_psp::EmulatedPsp, measurement: [u8; 48]) -> Self {
        Self {
            psp: std::sync::Mutex::new(psp),
            measurement,
        }
    }
}

impl Attester for EmulatedSnpAttester {
    fn tee(&self) -> Tee {
        Tee::Snp
    }

    fn evidence(
        &self,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, AttesterError> {
        if report_data.len() > 64 {
            return Err(AttesterError("report data longer than 64 bytes".into()));
        }
        let mut rd = [0u8; 64];
        rd[..report_data.len()].copy_from_slice(report_data);
        let mut host_data = [0u8; 32];
        if let Some(d) = init_data_digest {
            let n = d.len().min(32);
            host_data[..n].copy_from_slice(&d[..n]);
        }
        let mut psp = self.psp.lock().unwrap_or_else(|p| p.into_inner());
        psp.set_launch(coffer_psp::Launch {
            measurement: self.measurement,
            host_data,
            ..coffer_psp::Launch::default()
        });
        psp.evidence(&rd).map_err(|e| AttesterError(e.to_string()))
    }
}

/// The emulated SEV-SNP attester inside a sandbox: reports come from the PSP channel the launcher
/// provides (a unix socket), which already holds MEASUREMENT and HOST_DATA; the guest supplies
/// only REPORT_DATA. Development only, like every emulated TEE.
pub struct PspChannelAttester {
    socket: std::path::PathBuf,
}

impl PspChannelAttester {
    /// An attester asking the PSP at `socket`.
    pub fn new(socket: std::path::PathBuf) -> Self {
        Self { socket }
    }
}

impl Attester for PspChannelAttester {
    fn tee(&self) -> Tee {
        Tee::Snp
    }

    fn evidence(
        &self,
        report_data: &[u8],
        _init_data_digest: Option<&[u8]>,
    ) -> Result<Value, AttesterError> {
        if report_data.len() > 64 {
            return Err(AttesterError("report data longer than 64 bytes".into()));
        }
        let mut rd = [0u8; 64];
        rd[..report_data.len()].copy_from_slice(report_data);
        coffer_psp::channel::request_evidence(&self.socket, &rd).map_err(AttesterError)
    }
}
