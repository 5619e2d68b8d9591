//! The emulated SEV-SNP TEE end to end: a KBS that trusts the emulated PSP's roots, a TEE client
//! whose evidence the PSP signs, and the default SNP appraisal with reference values.

mod common;

use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs_client::{http_client, EmulatedSnpAttester, KbsClient};
use coffer_psp::{EmulatedPsp, Tcb};
use coffer_wire::error::ErrorKind;
use common::TestKbs;
use serde_json::json;

const INITDATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = \"package agent_policy\"\n";

fn client(kbs: &TestKbs, psp_dir: &std::path::Path, measurement: [u8; 48]) -> KbsClient {
    let psp = EmulatedPsp::load(psp_dir).unwrap();
    KbsClient::new(
        &kbs.url,
        http_client(None).unwrap(),
        Box::new(EmulatedSnpAttester::new(psp, measurement)),
        TeeKeyAlgorithm::EcP256,
    )
    .unwrap()
    .with_initdata(INITDATA.to_string())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn emulated_snp_releases_only_to_the_registered_measurement_and_initdata() {
    let psp_dir = tempfile::tempdir().unwrap();
    EmulatedPsp::load_or_generate(psp_dir.path()).unwrap();
    let root = psp_dir.path().join("roots.pem");
    let kbs = TestKbs::start_with(|c| {
        c.allow_sample = false;
        c.allow_emulated = true;
        c.emulated_root = Some(root.clone());
    })
    .await;
    let admin = kbs.admin();
    admin
        .set_resource("default/image/key", b"image key".to_vec())
        .await
        .unwrap();
    let good = [0x11u8; 48];

    // Nothing registered: the default SNP appraisal contraindicates, nothing is released.
    let err = client(&kbs, psp_dir.path(), good)
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
    assert!(kbs
        .audit()
        .contains("measurement is not in reference value measurement"));

    let tcb = Tcb::default();
    let refs = json!({
        "measurement": [hex(&good)],
        "init_data": [hex(&coffer_wire::initdata::digest(INITDATA).unwrap())],
        "snp_tcb_min": [{"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp, "microcode": tcb.microcode}],
    });
    admin
        .set_reference_values(refs.to_string().as_bytes())
        .await
        .unwrap();
    let tee = client(&kbs, psp_dir.path(), good);
    assert_eq!(
        tee.get_resource("default/image/key")
            .await
            .unwrap()
            .as_slice(),
        b"image key"
    );
    // The token says the evidence was emulated.
    let token = tee.attest().await.unwrap();
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let snp = &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["snp"];
    assert_eq!(snp["emulated"], true);
    assert_eq!(snp["measurement"], hex(&good));

    // Another measurement (a changed image) gets nothing.
    let err = client(&kbs, psp_dir.path(), [0x22; 48])
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
}

#[tokio::test(flavor = "multi_thread")]
async fn emulated_evidence_is_refused_unless_emulation_is_allowed() {
    let psp_dir = tempfile::tempdir().unwrap();
    EmulatedPsp::load_or_generate(psp_dir.path()).unwrap();
    let kbs = TestKbs::start().await;
    let err = client(&kbs, psp_dir.path(), [0x11; 48])
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::AttestationError));
    assert!(err.to_string().contains("not signed"), "{err}");

    // And a KBS refuses to start with an emulated root it was not told to allow.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path(), None);
    cfg.emulated_root = Some(psp_dir.path().join("roots.pem"));
    let err = coffer_kbs::Kbs::new(cfg).await.err().unwrap();
    assert!(err.to_string().contains("--allow-emulated"), "{err}");
}
