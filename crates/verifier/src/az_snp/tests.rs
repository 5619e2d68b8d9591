//! Azure SNP vTPM evidence from real Azure confidential VMs (see `testdata/README.md`).

use std::time::{Duration, UNIX_EPOCH};

use super::*;

const V0: &str = include_str!("../../testdata/az-snp-vtpm/evidence-v0.json");
const V1: &str = include_str!("../../testdata/az-snp-vtpm/evidence-v1.json");
const V2: &str = include_str!("../../testdata/az-snp-vtpm/evidence-v2.json");
const GENOA: &str = include_str!("../../testdata/az-snp-vtpm/evidence-genoa.json");
const V2_NONCE: &str = "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9aa398f647caa2338748cd0fd9f5f819ef";

fn at(nonce: Option<&[u8]>) -> Expected<'_> {
    Expected {
        report_data: nonce,
        init_data_digest: None,
        now: UNIX_EPOCH + Duration::from_secs(1_767_225_600), // 2026-01-01
    }
}

fn ev(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn real_azure_evidence_verifies_with_its_pcrs() {
    let v = AzSnpVtpmVerifier::default();
    for doc in [V0, V1] {
        let c = v.verify(&ev(doc), &at(Some(b"challenge"))).unwrap();
        assert_eq!(
            c["tpm"]["pcr00"],
            "e15c44796beabf46abcec7c57e590942041e47497e4ec27571c8b7664f48dced"
        );
        assert_eq!(c["snp"]["generation"], "milan");
    }
    let nonce = hex::decode(V2_NONCE).unwrap();
    let c = v.verify(&ev(V2), &at(Some(&nonce))).unwrap();
    assert_eq!(
        c["tpm"]["pcr00"],
        "84275b2f4312cd4fc6cbe6b152ad3c3683e513d9f1e23c34fca160c8cca7a6a7"
    );
    let c = v.verify(&ev(GENOA), &at(None)).unwrap();
    assert_eq!(
        c["tpm"]["pcr00"],
        "afd689d0bb1c5f36f023fbaf574135f555a28a10c1f6b938d2a25e70c7783338"
    );
}

#[test]
fn altered_parts_and_wrong_nonce_fail() {
    let v = AzSnpVtpmVerifier::default();
    let good = ev(V1);
    assert!(matches!(
        v.verify(&good, &at(Some(b"other"))),
        Err(VerifyError::ReportData)
    ));
    let hcl = URL_SAFE
        .decode(good["hcl_report"].as_str().unwrap())
        .unwrap();
    let with_hcl = |b: Vec<u8>| {
        let mut e = good.clone();
        e["hcl_report"] = json!(URL_SAFE.encode(b));
        e
    };
    // The SNP report inside the HCL report.
    let mut b = hcl.clone();
    b[0x20 + 0x90] ^= 1;
    let err = v.verify(&with_hcl(b), &at(Some(b"challenge"))).unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
    // The variable data (its SHA-256 is in the SNP REPORT_DATA).
    let mut b = hcl.clone();
    let n = b.len();
    b[hcl::REQUEST_DATA_OFFSET + 20 + 40.min(n - hcl::REQUEST_DATA_OFFSET - 21)] ^= 1;
    let err = v.verify(&with_hcl(b), &at(Some(b"challenge"))).unwrap_err();
    assert!(err.to_string().contains("variable data"), "{err}");
    // The quote's signature.
    let mut e = good.clone();
    let mut sig = hex::decode(e["tpm_quote"]["signature"].as_str().unwrap()).unwrap();
    sig[10] ^= 1;
    e["tpm_quote"]["signature"] = json!(hex::encode(sig));
    let err = v.verify(&e, &at(Some(b"challenge"))).unwrap_err();
    assert!(err.to_string().contains("quote signature"), "{err}");
    // A PCR value.
    let mut e = good.clone();
    e["tpm_quote"]["pcrs"][3] = json!("00".repeat(32));
    let err = v.verify(&e, &at(Some(b"challenge"))).unwrap_err();
    assert!(err.to_string().contains("PCR"), "{err}");
}

#[test]
fn initdata_is_checked_through_pcr8() {
    let v = AzSnpVtpmVerifier::default();
    let good = ev(V1);
    let c = v.verify(&good, &at(Some(b"challenge"))).unwrap();
    let pcr8 = c["tpm"]["pcr08"].as_str().unwrap().to_string();
    // Whatever digest was extended, a different one does not match PCR8.
    let err = v
        .verify(
            &good,
            &Expected {
                init_data_digest: Some(&[9u8; 32]),
                ..at(Some(b"challenge"))
            },
        )
        .unwrap_err();
    assert!(matches!(err, VerifyError::InitData), "{err} (pcr8 {pcr8})");
}

#[test]
fn quote_parser_rejects_garbage() {
    assert!(tpm::parse_quote(&[]).is_err());
    assert!(tpm::parse_quote(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x18, 0xff]).is_err());
    let msg = hex::decode(ev(V1)["tpm_quote"]["message"].as_str().unwrap()).unwrap();
    let info = tpm::parse_quote(&msg).unwrap();
    assert_eq!(info.extra_data, b"challenge");
    assert_eq!(info.sha256_pcrs, (0..24).collect::<Vec<u8>>());
    for cut in [1usize, 10, 60, msg.len() - 1] {
        assert!(tpm::parse_quote(&msg[..cut]).is_err());
    }
}
