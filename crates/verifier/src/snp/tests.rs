//! SNP verification against real reports and certificates (see `testdata/README.md`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

const REPORT: &[u8] = include_bytes!("../../testdata/snp/test-report.bin");
const VCEK: &[u8] = include_bytes!("../../testdata/snp/test-vcek.der");
const VLEK_REPORT: &[u8] = include_bytes!("../../testdata/snp/test-vlek-report.bin");
const VLEK: &[u8] = include_bytes!("../../testdata/snp/test-vlek.der");
const VCEK_LEGACY: &[u8] = include_bytes!("../../testdata/snp/test-vcek-invalid-legacy.der");
const VCEK_NEW: &[u8] = include_bytes!("../../testdata/snp/test-vcek-invalid-new.der");
const GENOA: &str = include_str!("../../testdata/snp/genoa-evidence.json");

/// 2026-01-01T00:00:00Z: inside the Milan VCEK's validity.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

/// 2025-06-01T00:00:00Z: inside the VLEK's validity.
fn vlek_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_748_736_000)
}

fn at(now: SystemTime) -> Expected<'static> {
    Expected {
        report_data: None,
        init_data_digest: None,
        now,
    }
}

fn verifier() -> SnpVerifier {
    SnpVerifier::default()
}

#[test]
fn milan_report_verifies_with_its_claims() {
    let c = verifier().verify_report(REPORT, VCEK, &at(now())).unwrap();
    assert_eq!(c["version"], 2);
    assert_eq!(c["vmpl"], 0);
    assert_eq!(c["policy"], 0x3001F);
    assert_eq!(c["policy_debug_allowed"], false);
    assert_eq!(c["policy_smt_allowed"], true);
    assert_eq!(c["reported_tcb"]["bootloader"], 3);
    assert_eq!(c["reported_tcb"]["tee"], 0);
    assert_eq!(c["reported_tcb"]["snp"], 8);
    assert_eq!(c["reported_tcb"]["microcode"], 115);
    assert!(c["report_data"].as_str().unwrap().starts_with("ec6c52d7"));
    assert!(c["report_data"]
        .as_str()
        .unwrap()
        .ends_with(&"0".repeat(64)));
    assert!(c["measurement"].as_str().unwrap().starts_with("a1f39304"));
    assert_eq!(c["generation"], "milan");
    assert_eq!(c["signing_key"], "vcek");
    assert_eq!(c["emulated"], false);
}

#[test]
fn flipped_signed_bytes_fail_the_signature() {
    for offset in [0usize, 42, 0x50, 0x90, 0x29F] {
        let mut r = REPORT.to_vec();
        r[offset] ^= 0x01;
        let err = verifier().verify_report(&r, VCEK, &at(now())).unwrap_err();
        assert!(
            err.to_string().contains("signature") || matches!(err, VerifyError::Malformed(_)),
            "offset {offset}: {err}"
        );
    }
    // The reported TCB (offset 384): signature and TCB consistency both guard it.
    let mut r = REPORT.to_vec();
    r[384] ^= 0x01;
    assert!(verifier().verify_report(&r, VCEK, &at(now())).is_err());
    // The signature itself.
    let mut r = REPORT.to_vec();
    r[SIGNED_LEN + 5] ^= 0x01;
    let err = verifier().verify_report(&r, VCEK, &at(now())).unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
}

#[test]
fn tampered_or_foreign_certificates_fail() {
    // A byte of the VCEK's signed part.
    let mut vcek = VCEK.to_vec();
    let len = vcek.len();
    vcek[len / 2] ^= 0x01;
    assert!(verifier().verify_report(REPORT, &vcek, &at(now())).is_err());
    // The certificate's signature.
    let mut vcek = VCEK.to_vec();
    vcek[len - 10] ^= 0x01;
    let err = verifier()
        .verify_report(REPORT, &vcek, &at(now()))
        .unwrap_err();
    assert!(err.to_string().contains("not signed"), "{err}");
    // VCEKs that did not sign this report (nor chain to a built-in root).
    for other in [VCEK_LEGACY, VCEK_NEW] {
        let err = verifier()
            .verify_report(REPORT, other, &at(now()))
            .unwrap_err();
        assert!(matches!(err, VerifyError::Check(_)), "{err}");
    }
    // The VCEK checked under the ASVK (as if it were a VLEK).
    let cert = certs::parse_der(VCEK, "VCEK").unwrap();
    let err = certs::verify_endorsement(
        &cert,
        EndorsementKey::Vlek,
        &GenerationRoots::builtin(),
        now(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("ASVK"), "{err}");
}

#[test]
fn legacy_and_new_vcek_extensions_parse() {
    for der in [VCEK, VCEK_LEGACY, VCEK_NEW] {
        let cert = certs::parse_der(der, "VCEK").unwrap();
        let ext = certs::tcb_extensions(&cert, "VCEK").unwrap();
        assert_eq!(ext.hwid.as_ref().map(Vec::len), Some(64));
    }
    let cert = certs::parse_der(VCEK, "VCEK").unwrap();
    let key = certs::verify_endorsement(
        &cert,
        EndorsementKey::Vcek,
        &GenerationRoots::builtin(),
        now(),
    )
    .unwrap();
    let t = &key.tcb;
    assert_eq!((t.bootloader, t.tee, t.snp, t.microcode), (3, 0, 8, 115));
    assert_eq!(&REPORT[0x1A0..0x1E0], t.hwid.as_deref().unwrap());
    assert_eq!(key.generation, Generation::Milan);
}

#[test]
fn certificate_validity_is_checked_at_now() {
    // 2031: after the VCEK's notAfter (2030-01-24).
    let later = UNIX_EPOCH + Duration::from_secs(1_924_992_000);
    let err = verifier()
        .verify_report(REPORT, VCEK, &at(later))
        .unwrap_err();
    assert!(err.to_string().contains("not valid"), "{err}");
    // A cached key is re-checked too.
    let v = verifier();
    v.verify_report(REPORT, VCEK, &at(now())).unwrap();
    assert!(v.verify_report(REPORT, VCEK, &at(later)).is_err());
}

#[test]
fn vlek_report_verifies_inside_its_validity() {
    let c = verifier()
        .verify_report(VLEK_REPORT, VLEK, &at(vlek_now()))
        .unwrap();
    assert_eq!(c["version"], 3);
    assert_eq!(c["vmpl"], 1);
    assert_eq!(c["signing_key"], "vlek");
    assert_eq!(c["chip_id"], "0".repeat(128));
    // At the pinned development date it has expired.
    let err = verifier()
        .verify_report(VLEK_REPORT, VLEK, &at(now()))
        .unwrap_err();
    assert!(err.to_string().contains("VLEK"), "{err}");
}

#[test]
fn report_data_and_host_data_binding() {
    let rd = &REPORT[0x50..0x70]; // the non-zero half; the rest is zero padding
    let ok = Expected {
        report_data: Some(rd),
        init_data_digest: Some(&[0u8; 32]),
        now: now(),
    };
    verifier().verify_report(REPORT, VCEK, &ok).unwrap();
    let wrong_rd = Expected {
        report_data: Some(&[1u8; 48]),
        ..ok
    };
    assert!(matches!(
        verifier().verify_report(REPORT, VCEK, &wrong_rd),
        Err(VerifyError::ReportData)
    ));
    let wrong_init = Expected {
        init_data_digest: Some(&[2u8; 32]),
        ..ok
    };
    assert!(matches!(
        verifier().verify_report(REPORT, VCEK, &wrong_init),
        Err(VerifyError::InitData)
    ));
}

#[test]
fn genoa_evidence_json_from_upstream_verifies() {
    let ev: Value = serde_json::from_str(GENOA).unwrap();
    let c = verifier().verify(&ev, &at(now())).unwrap();
    assert_eq!(c["generation"], "genoa");
    assert_eq!(c["version"], 3);
    assert_eq!(c["vmpl"], 0);
    assert_eq!(c["policy"], 0x30000);
    assert_eq!(c["reported_tcb"]["bootloader"], 10);
    assert_eq!(c["reported_tcb"]["tee"], 0);
    assert_eq!(c["reported_tcb"]["snp"], 23);
    assert_eq!(c["reported_tcb"]["microcode"], 25);
    // The same evidence with a changed measurement fails.
    let mut bad = ev.clone();
    bad["attestation_report"]["measurement"][0] = json!(0);
    assert!(verifier().verify(&bad, &at(now())).is_err());
    // Without the certificate table there is no key to check against.
    let mut bare = ev;
    bare["cert_chain"] = Value::Null;
    let err = verifier().verify(&bare, &at(now())).unwrap_err();
    assert!(err.to_string().contains("VCEK"), "{err}");
}

#[test]
fn raw_report_round_trips_through_the_json_form() {
    let report = AttestationReport::from_bytes(REPORT).unwrap();
    let json = serde_json::to_value(report).unwrap();
    let back: AttestationReport = serde_json::from_value(json).unwrap();
    assert_eq!(back.to_bytes().unwrap().as_ref(), REPORT);
}

#[test]
fn vcek_comes_from_the_offline_cache_when_the_evidence_has_none() {
    let mut ev: Value = serde_json::from_str(GENOA).unwrap();
    let vcek: Vec<u8> = serde_json::from_value(ev["cert_chain"][0]["data"].clone()).unwrap();
    ev["cert_chain"] = Value::Null;
    let dir = std::env::temp_dir().join(format!("coffer-vcek-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let v = SnpVerifier::default().with_vcek_dir(dir.clone());
    let err = v.verify(&ev, &at(now())).unwrap_err();
    assert!(err.to_string().contains("offline cache"), "{err}");
    let report: AttestationReport =
        serde_json::from_value(ev["attestation_report"].clone()).unwrap();
    std::fs::write(dir.join(SnpVerifier::vcek_file_name(&report)), &vcek).unwrap();
    let c = v.verify(&ev, &at(now())).unwrap();
    assert_eq!(c["generation"], "genoa");
    std::fs::remove_dir_all(&dir).unwrap();
}
