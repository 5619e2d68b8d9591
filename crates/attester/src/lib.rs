//! `coffer-attester`: evidence from the TEE a confidential guest runs in.
//!
//! The guest asks its own hardware for a report over the runtime-data digest the KBS protocol
//! binds ([`tsm`]: the kernel's configfs-tsm report interface). [`probe`] chooses the attester by
//! what the guest has; it never falls back to the emulated TEE, which a launcher must enable
//! explicitly (`coffer_kbs_client::PspChannelAttester`).
//!
//! What is gathered, from where, and what binds the nonce is tabled in docs/attestation.md.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod certs;
// The uvdevice's ioctls pass raw pointers to the kernel.
#[allow(unsafe_code)]
pub mod se;
// The one ioctl of `/dev/sev-guest` passes raw pointers to the kernel.
#[allow(unsafe_code)]
pub mod sevguest;
pub mod tsm;
#[cfg(target_arch = "x86_64")]
pub mod vtpm;

use std::path::{Path, PathBuf};

pub use sevguest::{SevGuestAttester, SEV_GUEST_DEVICE};
pub use tsm::{TsmReport, TsmSnpAttester, TsmTdxAttester, CCEL_TABLE, TSM_REPORT_ROOT};
#[cfg(target_arch = "x86_64")]
pub use vtpm::{AzSnpVtpmAttester, AzTdxVtpmAttester, Vtpm};

/// The vTPM as a Linux guest sees it: the kernel's resource manager device.
pub const TPM_DEVICE_TCTI: &str = "device:/dev/tpmrm0";
/// Azure's instance metadata service, reachable from inside the VM only.
pub const AZURE_IMDS: &str = "http://169.254.169.254";

/// Why evidence could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum AttesterError {
    /// This guest offers no TEE interface Coffer can use.
    #[error("no TEE found in this guest: {0}")]
    NoTee(String),
    /// The interface refused or failed a request.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// Another writer used the same report entry while this one did (configfs-tsm's
    /// `generation` changed): the report may not be the one asked for.
    #[error("the report at {0} was changed by another writer while it was read; ask again")]
    Race(String),
    /// What the TEE returned is not what was expected.
    #[error("{0}")]
    Invalid(String),
}

/// `report_data` zero-padded to the 64 bytes of a report-data field, or an error naming `tee`
/// when it is longer.
pub(crate) fn padded_report_data(report_data: &[u8], tee: &str) -> Result<[u8; 64], AttesterError> {
    if report_data.len() > 64 {
        return Err(AttesterError::Invalid(format!(
            "report data of {} bytes; {tee} takes at most 64",
            report_data.len()
        )));
    }
    let mut rd = [0u8; 64];
    rd[..report_data.len()].copy_from_slice(report_data);
    Ok(rd)
}

/// The KBS client takes an attester's failure as its message.
impl From<AttesterError> for coffer_kbs_client::AttesterError {
    fn from(e: AttesterError) -> Self {
        coffer_kbs_client::AttesterError(e.to_string())
    }
}

/// Where [`probe`] looks for a TEE. [`Guest::default`] is a real guest's layout; tests point
/// it at emulated interfaces.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The configfs-tsm report directory ([`TSM_REPORT_ROOT`]).
    pub tsm_root: PathBuf,
    /// The SEV guest device ([`SEV_GUEST_DEVICE`]).
    pub sev_guest: PathBuf,
    /// IBM Z's Ultravisor device ([`se::UV_DEVICE`]).
    pub uv: PathBuf,
    /// The TDX firmware's CC event log ([`CCEL_TABLE`]).
    pub ccel: PathBuf,
    /// The vTPM's TCTI ([`TPM_DEVICE_TCTI`]); `None`: do not look for a vTPM.
    pub tpm: Option<String>,
    /// Azure's instance metadata service ([`AZURE_IMDS`]).
    pub imds: String,
}

impl Default for Guest {
    fn default() -> Self {
        Self {
            tsm_root: TSM_REPORT_ROOT.into(),
            sev_guest: SEV_GUEST_DEVICE.into(),
            uv: se::UV_DEVICE.into(),
            ccel: CCEL_TABLE.into(),
            tpm: Path::new("/dev/tpmrm0")
                .exists()
                .then(|| TPM_DEVICE_TCTI.to_string()),
            imds: AZURE_IMDS.into(),
        }
    }
}

impl Guest {
    /// A real guest's layout with the configfs-tsm directory at `tsm_root`.
    pub fn with_tsm_root(tsm_root: &Path) -> Self {
        Self {
            tsm_root: tsm_root.to_path_buf(),
            ..Self::default()
        }
    }
}

/// The attester for the TEE this guest runs in, tried in this order:
/// 1. configfs-tsm: provider `sev_guest` gives SEV-SNP evidence, `tdx_guest` TDX evidence (with
///    the CCEL event log when present);
/// 2. `/dev/sev-guest` (SEV-SNP on kernels without configfs-tsm);
/// 3. `/dev/uv` whose device and Ultravisor support attestation (IBM Secure Execution);
/// 4. a vTPM holding an Azure HCL report: `az-snp-vtpm` or `az-tdx-vtpm` by the report's type.
///
/// Anything else is an error naming what was looked for; the emulated TEE is never chosen here.
pub fn probe(guest: &Guest) -> Result<Box<dyn coffer_kbs_client::Attester>, AttesterError> {
    let tsm_root = guest.tsm_root.as_path();
    match tsm::provider(tsm_root)? {
        Some(p) if p == "sev_guest" => return Ok(Box::new(TsmSnpAttester::new(tsm_root))),
        Some(p) if p == "tdx_guest" => {
            return Ok(Box::new(TsmTdxAttester::new(tsm_root, &guest.ccel)))
        }
        Some(p) => {
            return Err(AttesterError::NoTee(format!(
                "configfs-tsm at {} is provided by {p:?}, which this build does not gather evidence from (it does: sev_guest, tdx_guest)",
                tsm_root.display()
            )))
        }
        None => {}
    }
    if guest.sev_guest.exists() {
        return Ok(Box::new(SevGuestAttester::new(&guest.sev_guest)));
    }
    let mut uv = format!(
        ", no {} (IBM Secure Execution's Ultravisor device)",
        guest.uv.display()
    );
    if guest.uv.exists() {
        let se = se::SeAttester::new(&guest.uv);
        match se.supports_attestation() {
            Ok(true) => return Ok(Box::new(se)),
            Ok(false) => {
                uv = format!(
                    "; {} does not offer attestation (not an SE guest)",
                    guest.uv.display()
                )
            }
            Err(e) => uv = format!("; {e}"),
        }
    }
    #[cfg(target_arch = "x86_64")]
    let vtpm = match &guest.tpm {
        Some(tcti) => match vtpm::probe(tcti, &guest.imds) {
            Ok(a) => return Ok(a),
            Err(e) => format!("; the vTPM: {e}"),
        },
        None => String::new(),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let vtpm = match &guest.tpm {
        Some(_) => "; a vTPM (Azure's confidential VMs are x86_64: no vTPM attester in this build)"
            .to_string(),
        None => String::new(),
    };
    Err(AttesterError::NoTee(format!(
        "no configfs-tsm report interface at {} (Linux 6.7 or later with the sev-guest or tdx-guest driver, and configfs mounted), no {}{uv}{vtpm}",
        tsm_root.display(),
        guest.sev_guest.display()
    )))
}
