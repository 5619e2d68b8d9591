//! Attestation verifiers.
//!
//! A [`Verifier`] takes the primary evidence a TEE sent, the report data it must carry (the
//! runtime-data digest, see `coffer_wire::binding`), the initdata digest it must carry when the
//! TEE presented initdata, and "now"; it returns a flat claims document or an error naming the
//! check that failed. [`Verifiers`] holds one verifier per TEE type and the trust switches
//! (`allow_sample`, `allow_emulated`) that an operator must turn on explicitly.
//!
//! Verifiers: AMD SEV-SNP ([`snp`], real AMD roots) and the upstream `sample` TEE, which has no
//! security at all and is only for testing. Further TEEs plug in behind the same trait.
//!
//! # Example
//!
//! Real SEV-SNP evidence from an AMD Genoa host (its VCEK in the certificate table), verified to
//! AMD's roots:
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//!
//! use coffer_verifier::{Expected, Trust, Verifiers, VerifyError};
//! use coffer_wire::Tee;
//!
//! let evidence: serde_json::Value = serde_json::from_str(include_str!(concat!(
//!     env!("CARGO_MANIFEST_DIR"),
//!     "/testdata/snp/genoa-evidence.json"
//! )))?;
//! // The report data this evidence carries. A KBS computes it from its nonce and the TEE's
//! // public key (`coffer_wire::binding`), so evidence made for another session cannot pass.
//! let report_data = hex::decode(
//!     "7e7320889600c7ac133aea7b896c51f41026002982292a7369559796999c1bf9\
//!      29eef3ff23c46e858f0b1982f9a92b17c51b578d958cde6b0c92978f150cf9b0",
//! )?;
//! let expected = Expected {
//!     report_data: Some(&report_data),
//!     init_data_digest: None,
//!     // 2026-01-01, inside the VCEK's validity.
//!     now: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
//! };
//!
//! // Hardware TEEs only: no sample TEE, no emulated PSP.
//! let verifiers = Verifiers::new(Trust::default());
//! let claims = verifiers.verify(Tee::Snp, &evidence, &expected)?;
//! assert_eq!(claims["generation"], "genoa");
//! assert_eq!(
//!     claims["measurement"],
//!     "6a6519d757e68c2e939c9dbbbc1828498e8de35d2766dd05f1a2cca5059d0cf4ae62a36d75c837974dd50b315506e73e"
//! );
//! assert_eq!(claims["policy_debug_allowed"], false);
//!
//! // The same evidence checked against another session's report data is refused…
//! let other = [0u8; 64];
//! let err = verifiers
//!     .verify(Tee::Snp, &evidence, &Expected { report_data: Some(&other), ..expected })
//!     .unwrap_err();
//! assert!(matches!(err, VerifyError::ReportData));
//!
//! // …and so is a report whose signed contents were altered.
//! let mut altered = evidence.clone();
//! altered["attestation_report"]["measurement"][0] = 0.into();
//! assert!(verifiers.verify(Tee::Snp, &altered, &expected).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod az_snp;
pub mod az_tdx;
pub mod dcap;
pub mod eventlog;
pub mod nvidia;
pub mod pccs;
mod sample;
#[cfg(feature = "se")]
pub mod se;
pub mod snp;
pub mod tpm;

use std::{collections::HashMap, time::SystemTime};

use coffer_wire::Tee;
use serde_json::{Map, Value};

pub use sample::SampleVerifier;

/// Flat claims extracted from verified evidence.
pub type Claims = Map<String, Value>;

/// What a verifier checks the evidence against.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// The runtime-data digest the evidence must carry in its report-data field (unpadded; each
    /// verifier fits it to its TEE's field size). `None` skips only the binding check, for
    /// offline inspection of evidence (`coffer attest verify` without `--report-data`); the KBS
    /// always sets it.
    pub report_data: Option<&'a [u8]>,
    /// The initdata digest the evidence must carry, when the TEE presented initdata.
    pub init_data_digest: Option<&'a [u8]>,
    /// The time at which certificates and collateral must be valid.
    pub now: SystemTime,
}

/// A failed verification. The message names the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The evidence is not in the TEE's format.
    #[error("evidence is malformed: {0}")]
    Malformed(String),
    /// The evidence's report data does not bind this challenge and TEE key.
    #[error("report data does not match the challenge nonce and TEE public key")]
    ReportData,
    /// The evidence's initdata digest does not match the initdata presented.
    #[error("initdata digest in the evidence does not match the initdata presented")]
    InitData,
    /// The TEE cannot bind initdata but initdata was presented.
    #[error("{0} evidence cannot bind initdata, but initdata was presented")]
    InitDataUnbound(Tee),
    /// The TEE type is known but not enabled on this server.
    #[error("{tee} evidence is refused: {why}")]
    NotAllowed {
        /// The TEE type.
        tee: Tee,
        /// Why, and how to enable it.
        why: &'static str,
    },
    /// No verifier exists for this TEE type.
    #[error("TEE type {0} is not supported by this server")]
    Unsupported(Tee),
    /// A signature, certificate or collateral check failed.
    #[error("{0}")]
    Check(String),
}

/// A verifier for one TEE type.
pub trait Verifier: Send + Sync {
    /// The TEE type this verifier handles.
    fn tee(&self) -> Tee;

    /// Verifies `evidence` against `expected` and returns its claims.
    fn verify(&self, evidence: &Value, expected: &Expected<'_>) -> Result<Claims, VerifyError>;
}

/// Which TEEs without hardware roots of trust an operator accepts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trust {
    /// Accept the upstream `sample` TEE (no security; testing only).
    pub allow_sample: bool,
    /// Accept evidence signed by the emulated PSP (no confidentiality; development only).
    pub allow_emulated: bool,
}

/// The set of verifiers a server uses, keyed by TEE type.
///
/// TEEs without a hardware root of trust are refused unless the operator turned on their
/// [`Trust`] switch:
///
/// ```
/// use std::time::SystemTime;
///
/// use coffer_verifier::{Expected, Trust, Verifiers, VerifyError};
/// use coffer_wire::Tee;
///
/// // Unsigned evidence from the upstream `sample` attester, over 32 bytes of report data
/// // (standard base64 of 32 times 0x07).
/// let evidence = serde_json::json!({
///     "svn": "1",
///     "report_data": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
/// });
/// let expected = Expected {
///     report_data: Some(&[7; 32]),
///     init_data_digest: None,
///     now: SystemTime::now(),
/// };
///
/// let strict = Verifiers::new(Trust::default());
/// let err = strict.verify(Tee::Sample, &evidence, &expected).unwrap_err();
/// assert!(matches!(err, VerifyError::NotAllowed { tee: Tee::Sample, .. }));
///
/// let testing = Verifiers::new(Trust { allow_sample: true, ..Trust::default() });
/// let claims = testing.verify(Tee::Sample, &evidence, &expected)?;
/// assert_eq!(claims["svn"], "1");
/// # Ok::<(), VerifyError>(())
/// ```
pub struct Verifiers {
    trust: Trust,
    by_tee: HashMap<Tee, Box<dyn Verifier>>,
    dcap: std::sync::Arc<dcap::CollateralSource>,
    dcap_files: Vec<dcap_qvl::QuoteCollateralV3>,
    pccs: Option<std::sync::Arc<pccs::PccsClient>>,
}

impl Verifiers {
    /// The built-in verifiers under the given trust switches.
    pub fn new(trust: Trust) -> Self {
        let mut v = Self {
            trust,
            by_tee: HashMap::new(),
            dcap: Default::default(),
            dcap_files: Vec::new(),
            pccs: None,
        };
        v.register(Box::new(SampleVerifier));
        v.register(Box::new(snp::SnpVerifier::default()));
        v.register(Box::new(az_snp::AzSnpVtpmVerifier::default()));
        v.rebuild_dcap();
        v
    }

    /// Adds (or replaces) the verifier for its TEE type.
    pub fn register(&mut self, verifier: Box<dyn Verifier>) {
        self.by_tee.insert(verifier.tee(), verifier);
    }

    /// Trusts the emulated PSP whose roots (ARK and ASK, PEM) are given, for SNP evidence (and
    /// the SNP report inside Azure vTPM evidence).
    /// Refused unless the trust switches allow emulation.
    pub fn trust_emulated_roots(&mut self, pem: &str) -> Result<(), VerifyError> {
        if !self.trust.allow_emulated {
            return Err(VerifyError::NotAllowed {
                tee: Tee::Snp,
                why: "emulated PSP roots given without allowing emulation (--allow-emulated)",
            });
        }
        tracing::warn!(
            "trusting the EMULATED PSP's roots: its evidence proves nothing about confidentiality"
        );
        self.register(Box::new(snp::SnpVerifier::with_emulated_roots(pem)?));
        // An emulated PSP's report may also stand inside an HCL report (Azure vTPM tests).
        self.register(Box::new(az_snp::AzSnpVtpmVerifier::with_snp(
            snp::SnpVerifier::with_emulated_roots(pem)?,
        )));
        Ok(())
    }

    /// Uses `dir` as the offline VCEK cache for SNP evidence without a certificate table (and for
    /// the emulated roots, when trusted, the same way).
    pub fn set_snp_vcek_dir(
        &mut self,
        dir: std::path::PathBuf,
        emulated_pem: Option<&str>,
    ) -> Result<(), VerifyError> {
        let base = match emulated_pem {
            Some(pem) => snp::SnpVerifier::with_emulated_roots(pem)?,
            None => snp::SnpVerifier::default(),
        };
        self.register(Box::new(base.with_vcek_dir(dir)));
        Ok(())
    }

    /// The DCAP collateral (one per platform FMSPC) that TDX and SGX quotes are verified with.
    /// Without any, TDX and SGX evidence is refused with a message saying so.
    pub fn set_dcap_collateral(&mut self, collateral: Vec<dcap_qvl::QuoteCollateralV3>) {
        self.dcap_files = collateral;
        self.rebuild_dcap();
    }

    /// Fetches DCAP collateral for TDX and SGX quotes (and Azure TD quotes) from this PCCS,
    /// beside any collateral files. Call [`Verifiers::prepare`] before [`Verifiers::verify`] so
    /// that the quote's platform is fetched.
    pub fn set_pccs(&mut self, client: pccs::PccsClient) {
        self.pccs = Some(std::sync::Arc::new(client));
        self.rebuild_dcap();
    }

    fn rebuild_dcap(&mut self) {
        self.dcap = std::sync::Arc::new(dcap::CollateralSource::new(
            self.dcap_files.clone(),
            self.pccs.clone(),
        ));
        for tee in [Tee::Tdx, Tee::Sgx] {
            self.register(Box::new(dcap::DcapVerifier::with_source(
                tee,
                self.dcap.clone(),
            )));
        }
        self.register(Box::new(az_tdx::AzTdxVtpmVerifier::with_source(
            self.dcap.clone(),
        )));
    }

    /// Fetches what verifying `evidence` of `tee` needs from the network before
    /// [`Verifiers::verify`] runs: today the DCAP collateral for a TDX, SGX or Azure TDX quote's
    /// platform when a PCCS is configured. A no-op for other TEEs or without a PCCS.
    pub async fn prepare(&self, tee: Tee, evidence: &Value) -> Result<(), VerifyError> {
        if self.dcap.pccs().is_none() {
            return Ok(());
        }
        let quote = match tee {
            Tee::Tdx | Tee::Sgx => dcap::evidence_quote(evidence)?,
            Tee::AzTdxVtpm => az_tdx::evidence_td_quote(evidence)?,
            _ => return Ok(()),
        };
        self.dcap.prefetch(&quote).await
    }

    /// The trust switches.
    pub fn trust(&self) -> Trust {
        self.trust
    }

    /// True when evidence of `tee` can be verified at all (used to refuse `/auth` early).
    pub fn check_enabled(&self, tee: Tee) -> Result<(), VerifyError> {
        if tee == Tee::Sample && !self.trust.allow_sample {
            return Err(VerifyError::NotAllowed {
                tee,
                why: "the sample TEE has no security; start the KBS with --allow-sample to accept it for testing",
            });
        }
        if self.by_tee.contains_key(&tee) {
            Ok(())
        } else {
            Err(VerifyError::Unsupported(tee))
        }
    }

    /// Verifies evidence of `tee`.
    pub fn verify(
        &self,
        tee: Tee,
        evidence: &Value,
        expected: &Expected<'_>,
    ) -> Result<Claims, VerifyError> {
        self.check_enabled(tee)?;
        let verifier = self.by_tee.get(&tee).ok_or(VerifyError::Unsupported(tee))?;
        verifier.verify(evidence, expected)
    }
}
