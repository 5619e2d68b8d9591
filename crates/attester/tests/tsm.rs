//! configfs-tsm against a directory laid out like the kernel's interface, served by a helper
//! thread that writes real-format SEV-SNP reports (signed by the emulated PSP) and a host
//! certificate table: the attester gathers evidence, a KBS that trusts the emulated roots
//! verifies it and releases a resource; a concurrent writer (`generation` moved twice), another
//! provider and a missing interface are each refused, naming what was wrong.

#![cfg(target_arch = "x86_64")]

mod common;

use std::path::{Path, PathBuf};

use coffer_attester::{AttesterError, TsmSnpAttester};
use coffer_psp::{EmulatedPsp, Launch};
use coffer_testkit::tsm::FakeTsm;
use common::INITDATA;

const MEASUREMENT: [u8; 48] = [0x5a; 48];

/// This test's guest: only the configfs-tsm tree under `root`, no device, no vTPM.
fn guest(root: &Path) -> coffer_attester::Guest {
    coffer_attester::Guest {
        tsm_root: root.to_path_buf(),
        sev_guest: root.join("no-sev-guest"),
        uv: root.join("no-uv"),
        ccel: root.join("no-ccel"),
        tpm: None,
        imds: "http://127.0.0.1:9".into(),
    }
}

fn psp(dir: &Path) -> EmulatedPsp {
    let mut psp = EmulatedPsp::load_or_generate(dir).unwrap();
    let digest = coffer_wire::initdata::digest(INITDATA).unwrap();
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&digest[..32]);
    psp.set_launch(Launch {
        measurement: MEASUREMENT,
        host_data,
        ..Launch::default()
    });
    psp
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configfs_tsm_report_attests_to_the_kbs() {
    let d = tempfile::tempdir().unwrap();
    let psp_dir = d.path().join("psp");
    let root = d.path().join("tsm/report");
    let _tsm = FakeTsm::start(&root, psp(&psp_dir), "sev_guest", false);

    // The probe finds it.
    let attester = coffer_attester::probe(&guest(&root)).expect("the probe");
    assert_eq!(attester.tee(), kbs_types::Tee::Snp);

    let kbs = common::emulated_snp_kbs(d.path(), &psp_dir, &MEASUREMENT, b"from the kbs").await;
    let client = coffer_kbs_client::KbsClient::new(
        &kbs.url,
        coffer_kbs_client::http_client(None).unwrap(),
        Box::new(TsmSnpAttester::new(&root)),
        coffer_jose::TeeKeyAlgorithm::EcP256,
    )
    .unwrap()
    .with_initdata(INITDATA.to_string());
    assert_eq!(
        client
            .get_resource("default/app/secret")
            .await
            .expect("released")
            .as_slice(),
        b"from the kbs"
    );

    // The evidence: the report over the asked data, the VCEK from the host's table.
    let ev = TsmSnpAttester::new(&root).gather(&[7u8; 48]).unwrap();
    assert_eq!(ev["cert_chain"][0]["cert_type"], "VCEK");
    let rd: Vec<u8> =
        serde_json::from_value(ev["attestation_report"]["report_data"].clone()).unwrap();
    assert_eq!(rd.len(), 64);
    assert_eq!((&rd[..48], &rd[48..]), (&[7u8; 48][..], &[0u8; 16][..]));
    assert!(TsmSnpAttester::new(&root).gather(&[0u8; 65]).is_err());
}

#[test]
fn a_concurrent_writer_another_provider_or_no_interface_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let raced: PathBuf = d.path().join("raced");
    let _a = FakeTsm::start(&raced, psp(&d.path().join("psp")), "sev_guest", true);
    let e = TsmSnpAttester::new(&raced).gather(&[1u8; 32]).unwrap_err();
    assert!(matches!(e, AttesterError::Race(_)), "{e}");
    assert!(
        e.to_string()
            .contains("generation 0 before the request, 2 after"),
        "{e}"
    );

    let other = d.path().join("other");
    let _b = FakeTsm::start(&other, psp(&d.path().join("psp")), "arm_cca_guest", false);
    let e = coffer_attester::probe(&guest(&other))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("provided by \"arm_cca_guest\""), "{e}");
    let e = TsmSnpAttester::new(&other)
        .gather(&[1u8; 32])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not sev_guest"), "{e}");

    let e = coffer_attester::probe(&guest(&d.path().join("absent")))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no TEE found in this guest: no configfs-tsm report interface"),
        "{e}"
    );

    // A `/dev/uv` that is no Ultravisor device (here a plain file) is not taken for SE: the
    // probe names it and why.
    let uv = d.path().join("not-a-uv-device");
    std::fs::write(&uv, b"").unwrap();
    let e = coffer_attester::probe(&coffer_attester::Guest {
        uv,
        ..guest(&d.path().join("absent"))
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not-a-uv-device") && e.contains("ioctl"), "{e}");
}

/// A TD quote through configfs-tsm (`tdx_guest`): here a real quote captured from TDX hardware,
/// served as `outblob`; the evidence the attester writes is what the TDX verifier takes, and
/// it verifies with the quote's collateral. The CCEL event log goes with it when present.
#[test]
fn a_configfs_tsm_td_quote_is_evidence_the_tdx_verifier_takes() {
    use coffer_verifier::Verifier;
    const QUOTE: &[u8] = include_bytes!("../../verifier/testdata/tdx/dcapqvl_tdx_quote");
    const COLLATERAL: &[u8] =
        include_bytes!("../../verifier/testdata/tdx/dcapqvl_tdx_quote_collateral.json");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("tsm/report");
    let _tsm = FakeTsm::serving(
        &root,
        "tdx_guest",
        false,
        std::sync::Arc::new(|_: &[u8; 64]| (QUOTE.to_vec(), Vec::new())),
    );
    let attester = coffer_attester::probe(&guest(&root)).expect("the probe");
    assert_eq!(attester.tee(), kbs_types::Tee::Tdx);

    let ev = coffer_attester::TsmTdxAttester::new(&root, &d.path().join("no-ccel"))
        .gather(&[3u8; 48])
        .unwrap();
    assert!(ev.get("cc_eventlog").is_none());
    let verifier = coffer_verifier::dcap::DcapVerifier::new(
        kbs_types::Tee::Tdx,
        vec![coffer_verifier::dcap::parse_collateral(COLLATERAL).unwrap()],
    );
    // Inside the collateral's validity window (July 2025).
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_751_328_000);
    let claims = verifier
        .verify(
            &ev,
            &coffer_verifier::Expected {
                report_data: None,
                init_data_digest: None,
                now,
            },
        )
        .expect("the TDX verifier takes it");
    assert_eq!(claims["mr_td"].as_str().unwrap().len(), 96);

    std::fs::write(d.path().join("CCEL"), b"event log bytes").unwrap();
    let ev = coffer_attester::TsmTdxAttester::new(&root, &d.path().join("CCEL"))
        .gather(&[3u8; 48])
        .unwrap();
    assert_eq!(ev["cc_eventlog"], "ZXZlbnQgbG9nIGJ5dGVz");

    // A short outblob is not a quote.
    let short = d.path().join("short");
    let _s = FakeTsm::serving(
        &short,
        "tdx_guest",
        false,
        std::sync::Arc::new(|_: &[u8; 64]| (vec![0u8; 100], Vec::new())),
    );
    let e = coffer_attester::TsmTdxAttester::new(&short, &d.path().join("no-ccel"))
        .gather(&[3u8; 48])
        .unwrap_err()
        .to_string();
    assert!(e.contains("too short"), "{e}");
}
