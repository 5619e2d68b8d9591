//! Azure confidential VMs on Intel TDX with a paravisor vTPM (`az-tdx-vtpm`).
//!
//! Evidence: `{"version"?, "tpm_quote": {…}, "hcl_report": …, "td_quote": …}` (v0: byte arrays;
//! v1: hex quote fields, base64url reports). Checks: the TD quote with DCAP (see [`crate::dcap`];
//! needs collateral for the platform), whose REPORT_DATA must be the SHA-256 of the HCL report's
//! variable data (zero-padded), which binds the vTPM attestation key; then the vTPM checks of the
//! Azure SNP verifier (quote signature by the AK, nonce, PCR digest, initdata through PCR8).

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE},
    Engine,
};
use coffer_wire::Tee;
use dcap_qvl::QuoteCollateralV3;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    az_snp::{parse_hcl, vtpm_claims, Quote, HCL_REPORT_TYPE_TDX},
    dcap::DcapVerifier,
    Claims, Expected, Verifier, VerifyError,
};

fn bad(msg: impl Into<String>) -> VerifyError {
    VerifyError::Malformed(msg.into())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Blob {
    Text(String),
    Raw(Vec<u8>),
}

impl Blob {
    fn bytes(self, what: &str) -> Result<Vec<u8>, VerifyError> {
        match self {
            Blob::Raw(v) => Ok(v),
            Blob::Text(s) => URL_SAFE
                .decode(s.trim())
                .or_else(|_| STANDARD.decode(s.trim()))
                .map_err(|_| bad(format!("{what} is not base64"))),
        }
    }
}

#[derive(Deserialize)]
struct Evidence {
    tpm_quote: Quote,
    hcl_report: Blob,
    td_quote: Blob,
}

/// Verifier of Azure TDX vTPM evidence.
pub struct AzTdxVtpmVerifier {
    dcap: DcapVerifier,
}

impl AzTdxVtpmVerifier {
    /// A verifier using `collateral` for the TD quotes.
    pub fn new(collateral: Vec<QuoteCollateralV3>) -> Self {
        Self::with_source(std::sync::Arc::new(crate::dcap::CollateralSource::new(
            collateral, None,
        )))
    }

    /// A verifier taking the TD quotes' collateral from `source`.
    pub fn with_source(source: std::sync::Arc<crate::dcap::CollateralSource>) -> Self {
        Self {
            dcap: DcapVerifier::with_source(Tee::Tdx, source),
        }
    }
}

/// The binding and vTPM checks, given the REPORT_DATA of a TD quote already verified (or, for
/// inspection, parsed).
pub fn verify_vtpm_binding(
    hcl: &[u8],
    td_report_data: &[u8],
    message: &[u8],
    signature: &[u8],
    pcrs: &[Vec<u8>],
    expected: &Expected<'_>,
) -> Result<Claims, VerifyError> {
    let hcl = parse_hcl(hcl)?;
    if hcl.report_type != HCL_REPORT_TYPE_TDX {
        return Err(bad("HCL report does not hold a TD report"));
    }
    let var_digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, hcl.var_data);
    if td_report_data[..] != coffer_wire::binding::fit_report_data(var_digest.as_ref(), 64)[..] {
        return Err(VerifyError::Check(
            "TD REPORT_DATA is not the SHA-256 of the HCL variable data (the vTPM key is not bound)"
                .into(),
        ));
    }
    let mut c = vtpm_claims(hcl.var_data, message, signature, pcrs, expected)?;
    c.insert(
        "hcl_var_data_sha256".into(),
        json!(hex::encode(var_digest.as_ref())),
    );
    Ok(c)
}

struct Parts {
    hcl: Vec<u8>,
    td_quote: Vec<u8>,
    message: Vec<u8>,
    signature: Vec<u8>,
    pcrs: Vec<Vec<u8>>,
}

fn parts(evidence: &Value) -> Result<Parts, VerifyError> {
    let ev: Evidence = serde_json::from_value(evidence.clone())
        .map_err(|e| bad(format!("az-tdx-vtpm evidence: {e}")))?;
    Ok(Parts {
        hcl: ev.hcl_report.bytes("hcl_report")?,
        td_quote: ev.td_quote.bytes("td_quote")?,
        message: ev.tpm_quote.message.get("quote message")?,
        signature: ev.tpm_quote.signature.get("quote signature")?,
        pcrs: ev
            .tpm_quote
            .pcrs
            .into_iter()
            .map(|p| p.get("PCR value"))
            .collect::<Result<_, _>>()?,
    })
}

/// The TD quote inside Azure TDX vTPM evidence.
pub fn evidence_td_quote(evidence: &Value) -> Result<Vec<u8>, VerifyError> {
    Ok(parts(evidence)?.td_quote)
}

/// Offline inspection without DCAP collateral: every check except the TD quote's DCAP
/// signature chain (the TD report is only parsed). The claims say `tdx.dcap_verified: false`.
/// Never used by the KBS, which fails closed without collateral.
pub fn inspect_without_dcap(
    evidence: &Value,
    expected: &Expected<'_>,
) -> Result<Claims, VerifyError> {
    let p = parts(evidence)?;
    let quote =
        dcap_qvl::quote::Quote::parse(&p.td_quote).map_err(|e| bad(format!("TD quote: {e}")))?;
    let td = quote
        .report
        .as_td10()
        .ok_or_else(|| bad("TD quote has no TD report"))?;
    let mut c = verify_vtpm_binding(
        &p.hcl,
        &td.report_data,
        &p.message,
        &p.signature,
        &p.pcrs,
        expected,
    )?;
    let mut fields = crate::dcap::td_report_fields(td);
    fields.insert("dcap_verified".into(), json!(false));
    c.insert("tdx".into(), Value::Object(fields));
    Ok(c)
}

impl Verifier for AzTdxVtpmVerifier {
    fn tee(&self) -> Tee {
        Tee::AzTdxVtpm
    }

    fn verify(&self, evidence: &Value, expected: &Expected<'_>) -> Result<Claims, VerifyError> {
        let Parts {
            hcl,
            td_quote,
            message,
            signature,
            pcrs,
        } = parts(evidence)?;
        // The TD quote: DCAP, without the runtime binding (REPORT_DATA binds the HCL data here).
        let td = self.dcap.verify(
            &json!({"quote": STANDARD.encode(&td_quote)}),
            &Expected {
                report_data: None,
                init_data_digest: None,
                now: expected.now,
            },
        )?;
        let rd = td
            .get("report_data")
            .and_then(Value::as_str)
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| bad("TD quote claims lack report_data"))?;
        let mut c = verify_vtpm_binding(&hcl, &rd, &message, &signature, &pcrs, expected)?;
        let mut td = td;
        td.insert("dcap_verified".into(), json!(true));
        c.insert("tdx".into(), Value::Object(td));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const V0: &str = include_str!("../testdata/az-tdx-vtpm/evidence-v0.json");
    const V1: &str = include_str!("../testdata/az-tdx-vtpm/evidence-v1.json");
    const TD_QUOTE: &[u8] = include_bytes!("../testdata/az-tdx-vtpm/td-quote.bin");
    const HCL: &[u8] = include_bytes!("../testdata/az-tdx-vtpm/hcl-report.bin");

    fn at(nonce: Option<&[u8]>) -> Expected<'_> {
        Expected {
            report_data: nonce,
            init_data_digest: None,
            now: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        }
    }

    fn quote_report_data() -> Vec<u8> {
        let q = dcap_qvl::quote::Quote::parse(TD_QUOTE).unwrap();
        q.report.as_td10().unwrap().report_data.to_vec()
    }

    fn tpm_parts(doc: &str) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
        let v: Value = serde_json::from_str(doc).unwrap();
        let q: Quote = serde_json::from_value(v["tpm_quote"].clone()).unwrap();
        (
            q.message.get("m").unwrap(),
            q.signature.get("s").unwrap(),
            q.pcrs.into_iter().map(|p| p.get("p").unwrap()).collect(),
        )
    }

    #[test]
    fn vtpm_key_is_bound_to_the_td_quote_and_signs_the_tpm_quote() {
        let (m, s, p) = tpm_parts(V1);
        let c = verify_vtpm_binding(
            HCL,
            &quote_report_data(),
            &m,
            &s,
            &p,
            &at(Some(b"challenge")),
        )
        .unwrap();
        assert!(c["tpm"]["pcr00"].is_string());
        // Wrong nonce, other TD report data, altered variable data.
        assert!(matches!(
            verify_vtpm_binding(HCL, &quote_report_data(), &m, &s, &p, &at(Some(b"x"))),
            Err(VerifyError::ReportData)
        ));
        let mut rd = quote_report_data();
        rd[0] ^= 1;
        assert!(verify_vtpm_binding(HCL, &rd, &m, &s, &p, &at(None)).is_err());
        let mut hcl = HCL.to_vec();
        hcl[0x4D4 + 20] ^= 1;
        assert!(verify_vtpm_binding(&hcl, &quote_report_data(), &m, &s, &p, &at(None)).is_err());
    }

    #[test]
    fn inspection_without_collateral_checks_everything_but_dcap() {
        for doc in [V0, V1] {
            let ev: Value = serde_json::from_str(doc).unwrap();
            let c = inspect_without_dcap(&ev, &at(Some(b"challenge"))).unwrap();
            assert_eq!(c["tdx"]["dcap_verified"], false);
            assert!(c["tpm"]["pcr00"].is_string());
            assert!(matches!(
                inspect_without_dcap(&ev, &at(Some(b"nope"))),
                Err(VerifyError::ReportData)
            ));
        }
    }

    #[test]
    fn both_evidence_formats_parse_and_need_collateral_for_the_td_quote() {
        let v = AzTdxVtpmVerifier::new(Vec::new());
        for doc in [V0, V1] {
            let err = v
                .verify(&serde_json::from_str(doc).unwrap(), &at(Some(b"challenge")))
                .unwrap_err();
            assert!(err.to_string().contains("collateral"), "{err}");
        }
        // Collateral of another platform (FMSPC) does not verify it either.
        let other = crate::dcap::parse_collateral(include_bytes!(
            "../testdata/tdx/dcapqvl_tdx_quote_collateral.json"
        ))
        .unwrap();
        let err = AzTdxVtpmVerifier::new(vec![other])
            .verify(&serde_json::from_str(V1).unwrap(), &at(Some(b"challenge")))
            .unwrap_err();
        assert!(matches!(err, VerifyError::Check(_)), "{err}");
    }
}
