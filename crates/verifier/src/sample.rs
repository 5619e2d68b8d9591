//! The upstream `sample` TEE: evidence `{"svn": "1", "report_data": "<base64>"}` with no
//! signature. Only for testing attestation servers; enabled by `Trust::allow_sample`.

use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_wire::{binding::fit_report_data, sample::SampleEvidence, Tee};
use serde_json::{json, Value};

use crate::{Claims, Expected, Verifier, VerifyError};

/// Size of the report-data field that Coffer's sample attester pads to.
const SAMPLE_REPORT_DATA_LEN: usize = 64;

/// Verifier of `sample` evidence.
#[derive(Debug, Default)]
pub struct SampleVerifier;

impl Verifier for SampleVerifier {
    fn tee(&self) -> Tee {
        Tee::Sample
    }

    fn verify(&self, evidence: &Value, expected: &Expected<'_>) -> Result<Claims, VerifyError> {
        let ev: SampleEvidence = serde_json::from_value(evidence.clone())
            .map_err(|e| VerifyError::Malformed(format!("sample evidence: {e}")))?;
        let report_data = STANDARD
            .decode(&ev.report_data)
            .map_err(|_| VerifyError::Malformed("report_data is not base64".into()))?;
        // Upstream sample attesters carry the bare digest; attesters that model a fixed-size
        // field carry it zero-padded. Both bind the same digest.
        if let Some(want) = expected.report_data {
            let padded = fit_report_data(want, SAMPLE_REPORT_DATA_LEN);
            if report_data != want && report_data != padded {
                return Err(VerifyError::ReportData);
            }
        }
        let mut claims = Claims::new();
        claims.insert("svn".into(), json!(ev.svn));
        claims.insert("report_data".into(), json!(hex::encode(&report_data)));
        if let Some(mr) = &ev.measure_register {
            let bytes = hex::decode(mr)
                .map_err(|_| VerifyError::Malformed("measure_register is not hex".into()))?;
            claims.insert("measure_register".into(), json!(hex::encode(bytes)));
        }
        match (expected.init_data_digest, &ev.init_data) {
            (Some(want), Some(got)) => {
                let got = STANDARD
                    .decode(got)
                    .map_err(|_| VerifyError::Malformed("init_data is not base64".into()))?;
                if got != want {
                    return Err(VerifyError::InitData);
                }
                claims.insert("init_data".into(), json!(hex::encode(got)));
            }
            (Some(_), None) => return Err(VerifyError::InitDataUnbound(Tee::Sample)),
            (None, Some(_)) => {
                return Err(VerifyError::Malformed(
                    "evidence carries an initdata digest but no initdata was presented".into(),
                ))
            }
            (None, None) => {}
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn expected<'a>(rd: &'a [u8], init: Option<&'a [u8]>) -> Expected<'a> {
        Expected {
            report_data: Some(rd),
            init_data_digest: init,
            now: SystemTime::now(),
        }
    }

    #[test]
    fn accepts_bare_and_padded_report_data() {
        let rd = [7u8; 48];
        for carried in [rd.to_vec(), fit_report_data(&rd, 64)] {
            let ev = json!({"svn": "1", "report_data": STANDARD.encode(&carried)});
            let claims = SampleVerifier.verify(&ev, &expected(&rd, None)).unwrap();
            assert_eq!(claims["svn"], "1");
        }
    }

    #[test]
    fn rejects_wrong_report_data_and_initdata() {
        let rd = [7u8; 48];
        let ev = json!({"svn": "1", "report_data": STANDARD.encode([8u8; 48])});
        assert!(matches!(
            SampleVerifier.verify(&ev, &expected(&rd, None)),
            Err(VerifyError::ReportData)
        ));
        let ev = json!({"svn": "1", "report_data": STANDARD.encode(rd), "init_data": STANDARD.encode([1u8; 32])});
        assert!(matches!(
            SampleVerifier.verify(&ev, &expected(&rd, Some(&[2u8; 32]))),
            Err(VerifyError::InitData)
        ));
        let claims = SampleVerifier
            .verify(&ev, &expected(&rd, Some(&[1u8; 32])))
            .unwrap();
        assert_eq!(claims["init_data"], hex::encode([1u8; 32]));
        let bare = json!({"svn": "1", "report_data": STANDARD.encode(rd)});
        assert!(matches!(
            SampleVerifier.verify(&bare, &expected(&rd, Some(&[1u8; 32]))),
            Err(VerifyError::InitDataUnbound(_))
        ));
        assert!(matches!(
            SampleVerifier.verify(&json!({"svn": 1}), &expected(&rd, None)),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn sample_needs_explicit_opt_in() {
        let rd = [7u8; 48];
        let ev = json!({"svn": "1", "report_data": STANDARD.encode(rd)});
        let off = crate::Verifiers::new(crate::Trust::default());
        assert!(matches!(
            off.verify(Tee::Sample, &ev, &expected(&rd, None)),
            Err(VerifyError::NotAllowed { .. })
        ));
        let on = crate::Verifiers::new(crate::Trust {
            allow_sample: true,
            allow_emulated: false,
        });
        on.verify(Tee::Sample, &ev, &expected(&rd, None)).unwrap();
        assert!(matches!(
            on.check_enabled(Tee::Csv),
            Err(VerifyError::Unsupported(Tee::Csv))
        ));
    }
}
