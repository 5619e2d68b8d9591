//! Intel TDX and SGX DCAP quotes (v3, v4, v5), verified with `dcap-qvl` against Intel's SGX root
//! CA and the collateral (TCB info, QE identity, CRLs and their issuer chains) for the quote's
//! platform. The TCB status and advisories become claims: the policy decides what is acceptable.
//!
//! Evidence JSON (upstream attesters): `{"quote": "<standard base64>", "cc_eventlog": …}`.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_wire::{binding::fit_report_data, Tee};
use dcap_qvl::{
    quote::{EnclaveReport, Report, TDReport10},
    verify::VerifiedReport,
    QuoteCollateralV3,
};
use serde::Deserialize;
use serde_json::{json, Value};

pub use crate::pccs::CollateralKey;
use crate::{Claims, Expected, Verifier, VerifyError};

/// Parses collateral in the JSON form `dcap-qvl` and PCCS tooling write.
pub fn parse_collateral(json: &[u8]) -> Result<QuoteCollateralV3, VerifyError> {
    serde_json::from_slice(json)
        .map_err(|e| VerifyError::Malformed(format!("DCAP collateral: {e}")))
}

/// Where collateral comes from: files given at start (one per platform), and a PCCS whose
/// fetched collateral is cached per platform.
#[derive(Default)]
pub struct CollateralSource {
    files: Vec<Arc<QuoteCollateralV3>>,
    pccs: Option<Arc<crate::pccs::PccsClient>>,
}

impl CollateralSource {
    /// Collateral from `files` and, when given, `pccs`.
    pub fn new(files: Vec<QuoteCollateralV3>, pccs: Option<Arc<crate::pccs::PccsClient>>) -> Self {
        Self {
            files: files.into_iter().map(Arc::new).collect(),
            pccs,
        }
    }

    /// The PCCS client, when one is configured.
    pub fn pccs(&self) -> Option<&Arc<crate::pccs::PccsClient>> {
        self.pccs.as_ref()
    }

    /// The collateral to try for `quote`: what the PCCS gave for its platform, then the files.
    fn candidates(&self, quote: &[u8]) -> Vec<Arc<QuoteCollateralV3>> {
        let mut out = Vec::new();
        if let Some(pccs) = &self.pccs {
            if let Some(c) = CollateralKey::of_quote(quote)
                .ok()
                .and_then(|k| pccs.cached(&k))
            {
                out.push(c);
            }
        }
        out.extend(self.files.iter().cloned());
        out
    }

    /// Makes sure collateral for `quote`'s platform is in the PCCS cache (no-op without a PCCS).
    pub async fn prefetch(&self, quote: &[u8]) -> Result<(), VerifyError> {
        let Some(pccs) = &self.pccs else {
            return Ok(());
        };
        let key = CollateralKey::of_quote(quote)?;
        pccs.collateral(&key)
            .await
            .map(|_| ())
            .map_err(|e| VerifyError::Check(format!("DCAP collateral: {e}")))
    }
}

/// Verifier of TDX or SGX quotes with configured collateral.
pub struct DcapVerifier {
    tee: Tee,
    collateral: Arc<CollateralSource>,
}

/// The raw quote in TDX or SGX evidence.
pub fn evidence_quote(evidence: &Value) -> Result<Vec<u8>, VerifyError> {
    let quote = evidence
        .get("quote")
        .and_then(Value::as_str)
        .ok_or_else(|| VerifyError::Malformed("DCAP evidence has no quote".into()))?;
    STANDARD
        .decode(quote.trim())
        .map_err(|_| VerifyError::Malformed("quote is not base64".into()))
}

#[derive(Deserialize)]
struct DcapEvidence {
    quote: String,
    #[serde(default)]
    cc_eventlog: Option<String>,
}

/// Replays a CCEL event log against the RTMR claims; adds the events as `uefi_event_logs`.
fn apply_eventlog(claims: &mut Claims, log_b64: &str) -> Result<(), VerifyError> {
    let log = STANDARD
        .decode(log_b64.trim())
        .map_err(|_| VerifyError::Malformed("cc_eventlog is not base64".into()))?;
    let events = crate::eventlog::parse(&log)?;
    let rtmrs = crate::eventlog::replay(&events);
    for (i, r) in rtmrs.iter().enumerate() {
        let key = format!("rtmr{i}");
        if claims.get(&key).and_then(Value::as_str) != Some(hex::encode(r).as_str()) {
            return Err(VerifyError::Check(format!(
                "the event log does not replay to the quote's RTMR{i}"
            )));
        }
    }
    let list: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "index": e.index,
                "type": e.event_type,
                "type_name": crate::eventlog::type_name(e.event_type),
                "digest": hex::encode(&e.digest),
            })
        })
        .collect();
    claims.insert("uefi_event_logs".into(), Value::Array(list));
    Ok(())
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DcapVerifier {
    /// A verifier for `tee` (TDX or SGX) trying each of `collateral` (one per platform FMSPC).
    pub fn new(tee: Tee, collateral: Vec<QuoteCollateralV3>) -> Self {
        Self::with_source(tee, Arc::new(CollateralSource::new(collateral, None)))
    }

    /// A verifier for `tee` (TDX or SGX) with collateral from `source`.
    pub fn with_source(tee: Tee, source: Arc<CollateralSource>) -> Self {
        Self {
            tee,
            collateral: source,
        }
    }

    /// Verifies a raw quote with the collateral of this verifier's source: what the PCCS gave
    /// for the quote's platform, then each file.
    pub fn verify_raw(&self, quote: &[u8], expected: &Expected<'_>) -> Result<Claims, VerifyError> {
        let candidates = self.collateral.candidates(quote);
        if candidates.is_empty() {
            return Err(VerifyError::Check(match self.collateral.pccs() {
                Some(p) => format!(
                    "no DCAP collateral for this quote's platform (none fetched from the PCCS at {})",
                    p.url()
                ),
                None => "no DCAP collateral is configured for this server (give collateral files or a PCCS URL)".into(),
            }));
        }
        let mut last = None;
        for c in &candidates {
            match self.verify_quote(quote, c, expected) {
                Err(VerifyError::Check(e)) => last = Some(e),
                other => return other,
            }
        }
        Err(VerifyError::Check(last.unwrap_or_default()))
    }

    /// Verifies a raw quote with `collateral`.
    pub fn verify_quote(
        &self,
        quote: &[u8],
        collateral: &QuoteCollateralV3,
        expected: &Expected<'_>,
    ) -> Result<Claims, VerifyError> {
        let verified = dcap_qvl::verify::verify(quote, collateral, secs(expected.now))
            .map_err(|e| VerifyError::Check(format!("DCAP quote verification failed: {e:#}")))?;
        match (&verified.report, self.tee) {
            (Report::SgxEnclave(r), Tee::Sgx) => sgx_claims(&verified, r, expected),
            (Report::SgxEnclave(_), _) => Err(VerifyError::Malformed(
                "quote is an SGX quote, not a TDX quote".into(),
            )),
            (report, Tee::Tdx) => {
                let td = report
                    .as_td10()
                    .ok_or_else(|| VerifyError::Malformed("quote has no TD report".into()))?;
                let mut claims = td_claims(&verified, td, expected)?;
                if let Some(td15) = report.as_td15() {
                    claims.insert(
                        "mr_service_td".into(),
                        json!(hex::encode(td15.mr_service_td)),
                    );
                    claims.insert("tee_tcb_svn2".into(), json!(hex::encode(td15.tee_tcb_svn2)));
                }
                Ok(claims)
            }
            _ => Err(VerifyError::Malformed(
                "quote is a TDX quote, not an SGX quote".into(),
            )),
        }
    }
}

fn common(v: &VerifiedReport) -> Claims {
    let mut c = Claims::new();
    c.insert("tcb_status".into(), json!(v.status));
    c.insert("advisory_ids".into(), json!(v.advisory_ids));
    c
}

fn check_report_data(carried: &[u8; 64], expected: &Expected<'_>) -> Result<(), VerifyError> {
    match expected.report_data {
        Some(want) if carried[..] != fit_report_data(want, 64)[..] => Err(VerifyError::ReportData),
        _ => Ok(()),
    }
}

fn td_claims(
    v: &VerifiedReport,
    td: &TDReport10,
    expected: &Expected<'_>,
) -> Result<Claims, VerifyError> {
    check_report_data(&td.report_data, expected)?;
    if let Some(want) = expected.init_data_digest {
        if td.mr_config_id[..] != fit_report_data(want, 48)[..] {
            return Err(VerifyError::InitData);
        }
    }
    let mut c = common(v);
    c.extend(td_report_fields(td));
    Ok(c)
}

/// The fields of a TD report as claims (hex), with `debug` from TDATTRIBUTES bit 0.
pub fn td_report_fields(td: &TDReport10) -> Claims {
    let mut c = Claims::new();
    let h = |b: &[u8]| json!(hex::encode(b));
    for (k, val) in [
        ("tee_tcb_svn", h(&td.tee_tcb_svn)),
        ("mr_seam", h(&td.mr_seam)),
        ("mr_signer_seam", h(&td.mr_signer_seam)),
        ("seam_attributes", h(&td.seam_attributes)),
        ("td_attributes", h(&td.td_attributes)),
        ("xfam", h(&td.xfam)),
        ("mr_td", h(&td.mr_td)),
        ("mr_config_id", h(&td.mr_config_id)),
        ("mr_owner", h(&td.mr_owner)),
        ("mr_owner_config", h(&td.mr_owner_config)),
        ("rtmr0", h(&td.rt_mr0)),
        ("rtmr1", h(&td.rt_mr1)),
        ("rtmr2", h(&td.rt_mr2)),
        ("rtmr3", h(&td.rt_mr3)),
        ("report_data", h(&td.report_data)),
        // TDATTRIBUTES bit 0: the TD is debuggable.
        ("debug", json!(td.td_attributes[0] & 1 == 1)),
    ] {
        c.insert(k.into(), val);
    }
    c
}

fn sgx_claims(
    v: &VerifiedReport,
    r: &EnclaveReport,
    expected: &Expected<'_>,
) -> Result<Claims, VerifyError> {
    check_report_data(&r.report_data, expected)?;
    if expected.init_data_digest.is_some() {
        return Err(VerifyError::InitDataUnbound(Tee::Sgx));
    }
    let mut c = common(v);
    let h = |b: &[u8]| json!(hex::encode(b));
    for (k, val) in [
        ("cpu_svn", h(&r.cpu_svn)),
        ("misc_select", json!(r.misc_select)),
        ("attributes", h(&r.attributes)),
        ("mr_enclave", h(&r.mr_enclave)),
        ("mr_signer", h(&r.mr_signer)),
        ("isv_prod_id", json!(r.isv_prod_id)),
        ("isv_svn", json!(r.isv_svn)),
        ("report_data", h(&r.report_data)),
        // ATTRIBUTES.DEBUG is bit 1 of the first byte.
        ("debug", json!(r.attributes[0] & 2 == 2)),
    ] {
        c.insert(k.into(), val);
    }
    Ok(c)
}

impl Verifier for DcapVerifier {
    fn tee(&self) -> Tee {
        self.tee
    }

    fn verify(&self, evidence: &Value, expected: &Expected<'_>) -> Result<Claims, VerifyError> {
        let ev: DcapEvidence = serde_json::from_value(evidence.clone())
            .map_err(|e| VerifyError::Malformed(format!("{} evidence: {e}", self.tee)))?;
        let quote = STANDARD
            .decode(ev.quote.trim())
            .map_err(|_| VerifyError::Malformed("quote is not base64".into()))?;
        let mut claims = self.verify_raw(&quote, expected)?;
        if let (Tee::Tdx, Some(log)) = (self.tee, ev.cc_eventlog.as_deref()) {
            apply_eventlog(&mut claims, log)?;
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const TDX_QUOTE: &[u8] = include_bytes!("../testdata/tdx/dcapqvl_tdx_quote");
    const TDX_COLL: &[u8] = include_bytes!("../testdata/tdx/dcapqvl_tdx_quote_collateral.json");
    const TDX_OLD: &[u8] = include_bytes!("../testdata/tdx/dcapqvl_tdx_quote_outdated");
    const TDX_OLD_COLL: &[u8] =
        include_bytes!("../testdata/tdx/dcapqvl_tdx_quote_outdated_collateral.json");
    const SGX_QUOTE: &[u8] = include_bytes!("../testdata/sgx/dcapqvl_sgx_quote");
    const SGX_COLL: &[u8] = include_bytes!("../testdata/sgx/dcapqvl_sgx_quote_collateral.json");

    /// 2025-07-01T00:00:00Z: inside the TDX and SGX collateral windows.
    fn july_2025() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_751_328_000)
    }

    /// 2026-03-01T00:00:00Z: inside the outdated quote's collateral window.
    fn march_2026() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_772_323_200)
    }

    fn at(now: SystemTime) -> Expected<'static> {
        Expected {
            report_data: None,
            init_data_digest: None,
            now,
        }
    }

    fn tdx() -> DcapVerifier {
        DcapVerifier::new(Tee::Tdx, vec![])
    }

    #[test]
    fn tdx_quote_verifies_with_its_collateral() {
        let coll = parse_collateral(TDX_COLL).unwrap();
        let c = tdx()
            .verify_quote(TDX_QUOTE, &coll, &at(july_2025()))
            .unwrap();
        assert!(c["tcb_status"].is_string());
        assert_eq!(c["mr_td"].as_str().unwrap().len(), 96);
        assert!(c.contains_key("rtmr3"));
        // Through the evidence JSON path too.
        let v = DcapVerifier::new(Tee::Tdx, vec![coll]);
        let ev = json!({"quote": STANDARD.encode(TDX_QUOTE)});
        let c2 = v.verify(&ev, &at(july_2025())).unwrap();
        assert_eq!(c, c2);
    }

    #[test]
    fn tdx_quote_fails_outside_the_collateral_window_or_when_altered() {
        let coll = parse_collateral(TDX_COLL).unwrap();
        let later = UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        assert!(tdx().verify_quote(TDX_QUOTE, &coll, &at(later)).is_err());
        for offset in [60usize, 200, 600] {
            let mut q = TDX_QUOTE.to_vec();
            q[offset] ^= 1;
            assert!(
                tdx().verify_quote(&q, &coll, &at(july_2025())).is_err(),
                "offset {offset}"
            );
        }
        // Another platform's collateral.
        let other = parse_collateral(TDX_OLD_COLL).unwrap();
        assert!(tdx()
            .verify_quote(TDX_QUOTE, &other, &at(july_2025()))
            .is_err());
    }

    /// The "outdated" fixture's platform TCB is below every level of its TCB info: dcap-qvl
    /// 0.7 cannot appraise it and refuses it, naming the TCB (not a signature) as the reason.
    #[test]
    fn outdated_tdx_platform_is_refused_naming_the_tcb() {
        let coll = parse_collateral(TDX_OLD_COLL).unwrap();
        let err = tdx()
            .verify_quote(TDX_OLD, &coll, &at(march_2026()))
            .unwrap_err();
        assert!(err.to_string().contains("TCB level"), "{err}");
    }

    #[test]
    fn sgx_quote_has_its_expected_tcb_status() {
        let coll = parse_collateral(SGX_COLL).unwrap();
        let v = DcapVerifier::new(Tee::Sgx, vec![]);
        let c = v.verify_quote(SGX_QUOTE, &coll, &at(july_2025())).unwrap();
        assert_eq!(c["tcb_status"], "ConfigurationAndSWHardeningNeeded");
        assert_eq!(c["mr_enclave"].as_str().unwrap().len(), 64);
        // A TDX verifier refuses an SGX quote.
        assert!(tdx()
            .verify_quote(SGX_QUOTE, &coll, &at(july_2025()))
            .is_err());
    }

    #[test]
    fn an_event_log_that_does_not_replay_to_the_rtmrs_is_refused() {
        let v = DcapVerifier::new(Tee::Tdx, vec![parse_collateral(TDX_COLL).unwrap()]);
        let log = include_bytes!("../testdata/eventlog/CCEL_data_ovmf");
        let ev = json!({"quote": STANDARD.encode(TDX_QUOTE), "cc_eventlog": STANDARD.encode(log)});
        let err = v.verify(&ev, &at(july_2025())).unwrap_err();
        assert!(err.to_string().contains("RTMR"), "{err}");
        let garbage =
            json!({"quote": STANDARD.encode(TDX_QUOTE), "cc_eventlog": STANDARD.encode([1u8; 64])});
        assert!(matches!(
            v.verify(&garbage, &at(july_2025())),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn tdx_binding_checks() {
        let coll = parse_collateral(TDX_COLL).unwrap();
        let c = tdx()
            .verify_quote(TDX_QUOTE, &coll, &at(july_2025()))
            .unwrap();
        let rd = hex::decode(c["report_data"].as_str().unwrap()).unwrap();
        let cfg = hex::decode(c["mr_config_id"].as_str().unwrap()).unwrap();
        let ok = Expected {
            report_data: Some(&rd),
            init_data_digest: Some(&cfg),
            now: july_2025(),
        };
        tdx().verify_quote(TDX_QUOTE, &coll, &ok).unwrap();
        let mut bad_rd = rd.clone();
        bad_rd[0] ^= 1;
        assert!(matches!(
            tdx().verify_quote(
                TDX_QUOTE,
                &coll,
                &Expected {
                    report_data: Some(&bad_rd),
                    ..ok
                }
            ),
            Err(VerifyError::ReportData)
        ));
        let mut bad_cfg = cfg.clone();
        bad_cfg[0] ^= 1;
        assert!(matches!(
            tdx().verify_quote(
                TDX_QUOTE,
                &coll,
                &Expected {
                    init_data_digest: Some(&bad_cfg),
                    ..ok
                }
            ),
            Err(VerifyError::InitData)
        ));
    }
}
