use std::time::SystemTime;

use coffer_verifier::{snp::SnpVerifier, Expected, Verifier, VerifyError};

use super::*;

fn expected<'a>(rd: &'a [u8], init: Option<&'a [u8]>) -> Expected<'a> {
    Expected {
        report_data: Some(rd),
        init_data_digest: init,
        now: SystemTime::now(),
    }
}

#[test]
fn emulated_reports_verify_on_the_snp_path_only_with_emulated_roots() {
    let mut psp = EmulatedPsp::generate(Tcb::default()).unwrap();
    psp.set_launch(Launch {
        measurement: [0xab; 48],
        host_data: [0xcd; 32],
        ..Launch::default()
    });
    let rd = [7u8; 64];
    let evidence = psp.evidence(&rd).unwrap();

    let trusting = SnpVerifier::with_emulated_roots(&psp.roots_pem()).unwrap();
    let claims = trusting
        .verify(&evidence, &expected(&rd, Some(&[0xcd; 32])))
        .unwrap();
    assert_eq!(claims["emulated"], true);
    assert_eq!(claims["generation"], "emulated");
    assert_eq!(claims["measurement"], "ab".repeat(48));
    assert_eq!(claims["host_data"], "cd".repeat(32));
    assert_eq!(claims["policy_debug_allowed"], false);
    assert_eq!(
        claims["reported_tcb"]["microcode"],
        Tcb::default().microcode
    );

    // The same evidence under AMD's roots only: refused on the chain.
    let err = SnpVerifier::default()
        .verify(&evidence, &expected(&rd, None))
        .unwrap_err();
    assert!(err.to_string().contains("not signed"), "{err}");

    // Binding checks are the SNP ones.
    assert!(matches!(
        trusting.verify(&evidence, &expected(&[8u8; 64], None)),
        Err(VerifyError::ReportData)
    ));
    assert!(matches!(
        trusting.verify(&evidence, &expected(&rd, Some(&[0u8; 32]))),
        Err(VerifyError::InitData)
    ));
    // A flipped byte of the signed report fails the signature.
    let mut raw = psp.report(&rd).unwrap();
    raw[0x90] ^= 1;
    let err = trusting
        .verify_report(&raw, psp.vcek_der(), &expected(&rd, None))
        .unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
}

#[test]
fn another_psp_is_not_trusted() {
    let a = EmulatedPsp::generate(Tcb::default()).unwrap();
    let b = EmulatedPsp::generate(Tcb::default()).unwrap();
    let rd = [1u8; 64];
    let err = SnpVerifier::with_emulated_roots(&a.roots_pem())
        .unwrap()
        .verify(&b.evidence(&rd).unwrap(), &expected(&rd, None))
        .unwrap_err();
    assert!(err.to_string().contains("not signed"), "{err}");
}

#[test]
fn saved_state_reloads_and_keeps_signing_with_the_same_chain() {
    let dir = tempfile::tempdir().unwrap();
    let psp = EmulatedPsp::load_or_generate(dir.path()).unwrap();
    let roots = std::fs::read_to_string(dir.path().join("roots.pem")).unwrap();
    assert_eq!(roots, psp.roots_pem());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("vcek-key.p8"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = EmulatedPsp::load_or_generate(dir.path()).unwrap();
    assert_eq!(again.vcek_der(), psp.vcek_der());
    let rd = [3u8; 64];
    SnpVerifier::with_emulated_roots(&roots)
        .unwrap()
        .verify(&again.evidence(&rd).unwrap(), &expected(&rd, None))
        .unwrap();
}
