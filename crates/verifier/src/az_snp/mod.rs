//! Azure confidential VMs on SEV-SNP with a paravisor vTPM (`az-snp-vtpm`).
//!
//! Evidence: an HCL report (Azure's IGVM attestation report: a 32-byte header, the 1184-byte SNP
//! report at 0x20, then request data with the report type (2 = SNP), the hash type (1 = SHA-256)
//! and the variable data — JSON holding the vTPM attestation key `HCLAkPub`), the VCEK, and a TPM
//! quote. Checks: the SNP report as in [`crate::snp`], with REPORT_DATA = SHA-256 of the variable
//! data (so the AK is bound to the hardware); the quote signed by that AK, its nonce = the
//! runtime-data digest, its PCR digest over the given PCR values; initdata through PCR8 =
//! SHA-256(32 zero bytes ‖ digest).
//!
//! Formats: v0 `{"quote": {"message","pcrs","signature"} (byte arrays), "report": [bytes],
//! "vcek": PEM}` and v1/v2 `{"version", "tpm_quote": {…} (hex), "hcl_report": base64url,
//! "vcek": base64 DER}`.

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE},
    Engine,
};
use coffer_wire::{
    hcl::{self, HclReport},
    Tee,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{snp::SnpVerifier, tpm, Claims, Expected, Verifier, VerifyError};

/// HCL report type of an SNP report.
pub const HCL_REPORT_TYPE_SNP: u32 = hcl::REPORT_TYPE_SNP;
/// HCL report type of a TDX TD report.
pub const HCL_REPORT_TYPE_TDX: u32 = hcl::REPORT_TYPE_TDX;

fn bad(msg: impl Into<String>) -> VerifyError {
    VerifyError::Malformed(msg.into())
}

/// Parses an HCL report (layout: [`coffer_wire::hcl`]).
pub fn parse_hcl(b: &[u8]) -> Result<HclReport<'_>, VerifyError> {
    hcl::parse(b).map_err(|e| bad(e.to_string()))
}

#[derive(Deserialize)]
struct VarData {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: Option<String>,
    kty: String,
    n: Option<String>,
    e: Option<String>,
}

pub(crate) fn ak_pub(var_data: &[u8]) -> Result<(Vec<u8>, Vec<u8>), VerifyError> {
    let vd: VarData =
        serde_json::from_slice(var_data).map_err(|e| bad(format!("HCL variable data: {e}")))?;
    let ak = vd
        .keys
        .into_iter()
        .find(|k| k.kid.as_deref() == Some("HCLAkPub") && k.kty == "RSA")
        .ok_or_else(|| bad("HCL variable data has no RSA HCLAkPub"))?;
    let dec = |s: Option<String>| {
        s.and_then(|s| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s.trim_end_matches('='))
                .ok()
        })
        .ok_or_else(|| bad("HCLAkPub n/e are not base64url"))
    };
    Ok((dec(ak.n)?, dec(ak.e)?))
}

/// The vTPM checks shared by the Azure SNP and TDX verifiers: the AK from the HCL variable data
/// signed the quote; the quote's nonce and PCR digest; initdata through PCR8. Returns the claims
/// with `tpm.pcrNN`.
pub(crate) fn vtpm_claims(
    var_data: &[u8],
    message: &[u8],
    signature: &[u8],
    pcrs: &[Vec<u8>],
    expected: &Expected<'_>,
) -> Result<Claims, VerifyError> {
    let (n, e) = ak_pub(var_data)?;
    let pcrs = tpm::verify_quote(message, signature, pcrs, &n, &e, expected.report_data)?;
    if let Some(init) = expected.init_data_digest {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(&[0u8; 32]);
        ctx.update(init);
        let want = ctx.finish();
        match pcrs.iter().find(|(i, _)| *i == 8) {
            Some((_, v)) if v.as_slice() == want.as_ref() => {}
            Some(_) => return Err(VerifyError::InitData),
            None => {
                return Err(bad(
                    "the TPM quote does not cover PCR8, which binds initdata",
                ))
            }
        }
    }
    let mut tpm_claims = serde_json::Map::new();
    for (i, v) in &pcrs {
        tpm_claims.insert(format!("pcr{i:02}"), json!(hex::encode(v)));
    }
    let mut c = Claims::new();
    c.insert("tpm".into(), Value::Object(tpm_claims));
    Ok(c)
}

/// The evidence normalized from either format.
pub(crate) struct Normalized {
    hcl: Vec<u8>,
    vcek_der: Vec<u8>,
    message: Vec<u8>,
    signature: Vec<u8>,
    pcrs: Vec<Vec<u8>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Bytes {
    Hex(String),
    Raw(Vec<u8>),
}

impl Bytes {
    pub(crate) fn get(self, what: &str) -> Result<Vec<u8>, VerifyError> {
        match self {
            Bytes::Raw(v) => Ok(v),
            Bytes::Hex(h) => hex::decode(h).map_err(|_| bad(format!("{what} is not hex"))),
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct Quote {
    pub(crate) message: Bytes,
    pub(crate) signature: Bytes,
    pub(crate) pcrs: Vec<Bytes>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Evidence {
    V1 {
        /// `1` or `"2"`: the field is only a marker of the format.
        #[allow(dead_code)]
        version: Value,
        tpm_quote: Quote,
        hcl_report: String,
        vcek: String,
    },
    V0 {
        quote: Quote,
        report: Vec<u8>,
        vcek: String,
    },
}

fn vcek_der(s: &str) -> Result<Vec<u8>, VerifyError> {
    if s.trim_start().starts_with("-----BEGIN") {
        let cert =
            crate::snp::certs::parse_pem(s.as_bytes(), "VCEK").map_err(|e| bad(e.to_string()))?;
        crate::snp::certs::to_der(&cert).map_err(|e| bad(e.to_string()))
    } else {
        URL_SAFE
            .decode(s.trim())
            .or_else(|_| STANDARD.decode(s.trim()))
            .map_err(|_| bad("vcek is neither PEM nor base64 DER"))
    }
}

fn normalize(v: &Value) -> Result<Normalized, VerifyError> {
    let ev: Evidence = serde_json::from_value(v.clone())
        .map_err(|_| bad("az-snp-vtpm evidence is neither the v0 nor the v1/v2 format"))?;
    let (quote, hcl, vcek) = match ev {
        Evidence::V1 {
            tpm_quote,
            hcl_report,
            vcek,
            ..
        } => (
            tpm_quote,
            URL_SAFE
                .decode(hcl_report.trim())
                .or_else(|_| STANDARD.decode(hcl_report.trim()))
                .map_err(|_| bad("hcl_report is not base64"))?,
            vcek,
        ),
        Evidence::V0 {
            quote,
            report,
            vcek,
        } => (quote, report, vcek),
    };
    Ok(Normalized {
        hcl,
        vcek_der: vcek_der(&vcek)?,
        message: quote.message.get("quote message")?,
        signature: quote.signature.get("quote signature")?,
        pcrs: quote
            .pcrs
            .into_iter()
            .map(|p| p.get("PCR value"))
            .collect::<Result<_, _>>()?,
    })
}

/// Verifier of Azure SNP vTPM evidence.
#[derive(Default)]
pub struct AzSnpVtpmVerifier {
    snp: SnpVerifier,
}

impl AzSnpVtpmVerifier {
    /// A verifier whose SNP checks (the hardware report inside the HCL report) are `snp`'s:
    /// e.g. one that also trusts the emulated PSP's roots.
    pub fn with_snp(snp: SnpVerifier) -> Self {
        Self { snp }
    }

    /// Verifies normalized evidence.
    fn verify_parts(
        &self,
        ev: &Normalized,
        expected: &Expected<'_>,
    ) -> Result<Claims, VerifyError> {
        let hcl = parse_hcl(&ev.hcl)?;
        if hcl.report_type != HCL_REPORT_TYPE_SNP {
            return Err(bad("HCL report does not hold an SNP report"));
        }
        let var_digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, hcl.var_data);
        let snp = self.snp.verify_report(
            hcl.hw_report,
            &ev.vcek_der,
            &Expected {
                report_data: Some(var_digest.as_ref()),
                init_data_digest: None,
                now: expected.now,
            },
        )
        .map_err(|e| match e {
            VerifyError::ReportData => VerifyError::Check(
                "SNP REPORT_DATA is not the SHA-256 of the HCL variable data (the vTPM key is not bound)".into(),
            ),
            other => other,
        })?;
        let mut c = vtpm_claims(hcl.var_data, &ev.message, &ev.signature, &ev.pcrs, expected)?;
        c.insert("snp".into(), Value::Object(snp));
        c.insert(
            "hcl_var_data_sha256".into(),
            json!(hex::encode(var_digest.as_ref())),
        );
        Ok(c)
    }
}

impl Verifier for AzSnpVtpmVerifier {
    fn tee(&self) -> Tee {
        Tee::AzSnpVtpm
    }

    fn verify(&self, evidence: &Value, expected: &Expected<'_>) -> Result<Claims, VerifyError> {
        self.verify_parts(&normalize(evidence)?, expected)
    }
}

#[cfg(test)]
mod tests;
