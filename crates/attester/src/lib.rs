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
pub mod tsm;

use std::path::Path;

pub use tsm::{TsmReport, TsmSnpAttester, TsmTdxAttester, CCEL_TABLE, TSM_REPORT_ROOT};

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

/// The attester for the TEE this guest runs in, found under `tsm_root` (normally
/// [`TSM_REPORT_ROOT`]): the configfs-tsm provider `sev_guest` gives SEV-SNP evidence, `tdx_guest`
/// TDX evidence (with the CCEL event log at [`CCEL_TABLE`] when present). Anything
/// else is an error naming what was looked for; the emulated TEE is never chosen here.
pub fn probe(tsm_root: &Path) -> Result<Box<dyn coffer_kbs_client::Attester>, AttesterError> {
    match tsm::provider(tsm_root)? {
        Some(p) if p == "sev_guest" => Ok(Box::new(TsmSnpAttester::new(tsm_root))),
        Some(p) if p == "tdx_guest" => Ok(Box::new(TsmTdxAttester::new(
            tsm_root,
            Path::new(CCEL_TABLE),
        ))),
        Some(p) => Err(AttesterError::NoTee(format!(
            "configfs-tsm at {} is provided by {p:?}, which this build does not gather evidence from (it does: sev_guest, tdx_guest)",
            tsm_root.display()
        ))),
        None => Err(AttesterError::NoTee(format!(
            "no configfs-tsm report interface at {} (Linux 6.7 or later with the sev-guest or tdx-guest driver, and configfs mounted)",
            tsm_root.display()
        ))),
    }
}
