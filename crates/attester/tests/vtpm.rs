//! The Azure vTPM attesters against a real TPM 2.0 simulator (Debian's `swtpm`, started here)
//! provisioned as Azure's paravisor provisions a confidential VM's vTPM (the AK at 0x81000003,
//! the HCL report at NV 0x01400001), with Azure's metadata service answered on loopback.
//! SEV-SNP: the guest attests to a KBS that trusts the emulated PSP (whose report stands in the
//! HCL report), initdata bound through PCR 8; a wrong nonce, another initdata and an HCL report
//! of the other TEE are refused. TDX: the evidence carries the TD quote IMDS made from the HCL
//! report's TDREPORT, and its TPM quote verifies with the AK the HCL report binds.

#![cfg(target_arch = "x86_64")]

mod common;

use std::path::Path;

use base64::Engine;
use coffer_attester::{vtpm, AzSnpVtpmAttester, AzTdxVtpmAttester, Guest};
use coffer_kbs_client::Attester;
use coffer_psp::{EmulatedPsp, Launch};
use coffer_testkit::vtpm::{provision_az_snp, provision_az_tdx, Imds, Swtpm};
use common::{hex, INITDATA};
use serde_json::Value;

const MEASUREMENT: [u8; 48] = [0x3c; 48];

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn guest(dir: &Path, tpm: &Swtpm, imds: &str) -> Guest {
    Guest {
        tsm_root: dir.join("no-tsm"),
        sev_guest: dir.join("no-sev-guest"),
        uv: dir.join("no-uv"),
        ccel: dir.join("no-ccel"),
        tpm: Some(tpm.tcti.clone()),
        imds: imds.into(),
    }
}

/// An attester that lies: another nonce than the KBS asked for, or no initdata binding.
struct Lying {
    inner: AzSnpVtpmAttester,
    nonce: Option<Vec<u8>>,
}

impl Attester for Lying {
    fn tee(&self) -> kbs_types::Tee {
        kbs_types::Tee::AzSnpVtpm
    }
    fn evidence(
        &self,
        report_data: &[u8],
        _init: Option<&[u8]>,
    ) -> Result<Value, coffer_kbs_client::AttesterError> {
        let rd = self.nonce.as_deref().unwrap_or(report_data);
        self.inner
            .gather(rd, None)
            .map_err(|e| coffer_kbs_client::AttesterError(e.to_string()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_azure_snp_vtpm_attests_to_the_kbs_and_a_wrong_nonce_or_initdata_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let psp_dir = d.path().join("psp");
    let mut psp = EmulatedPsp::load_or_generate(&psp_dir).unwrap();
    psp.set_launch(Launch {
        measurement: MEASUREMENT,
        ..Launch::default()
    });
    let tpm = Swtpm::start(d.path());
    let hcl = provision_az_snp(&tpm, &psp);
    let imds = Imds::start(pem("CERTIFICATE", psp.vcek_der()), psp.roots_pem(), vec![]).await;

    // The probe finds the vTPM and reads the report type.
    let found = coffer_attester::probe(&guest(d.path(), &tpm, &imds.url)).expect("the probe");
    assert_eq!(found.tee(), kbs_types::Tee::AzSnpVtpm);

    let kbs =
        common::emulated_snp_kbs(d.path(), &psp_dir, &MEASUREMENT, b"for the azure guest").await;
    let client = |a: Box<dyn Attester>, initdata: &str| {
        coffer_kbs_client::KbsClient::new(
            &kbs.url,
            coffer_kbs_client::http_client(None).unwrap(),
            a,
            coffer_jose::TeeKeyAlgorithm::EcP256,
        )
        .unwrap()
        .with_initdata(initdata.to_string())
    };
    let attester = || AzSnpVtpmAttester::new(&tpm.tcti, &imds.url);

    // The right guest: released, twice (PCR 8 bound once, accepted as bound the second time).
    for _ in 0..2 {
        let got = client(Box::new(attester()), INITDATA)
            .get_resource("default/app/secret")
            .await
            .expect("released to the attested vTPM guest");
        assert_eq!(got.as_slice(), b"for the azure guest");
    }

    // The evidence: Azure's v1 format; the HCL report read back from NV; the quote over the
    // asked nonce; PCR 8 holds the initdata extension.
    let ev = attester().gather(&[9u8; 48], None).unwrap();
    assert_eq!(ev["version"], "1");
    let b64 = base64::engine::general_purpose::URL_SAFE;
    assert_eq!(b64.decode(ev["hcl_report"].as_str().unwrap()).unwrap(), hcl);
    assert!(ev["vcek"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let pcrs: Vec<Vec<u8>> = ev["tpm_quote"]["pcrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| hex::decode(p.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(pcrs.len(), 24);
    let digest = coffer_wire::initdata::digest(INITDATA).unwrap();
    assert_eq!(pcrs[8], vtpm::extend_value(&[0u8; 32], &digest));
    let message = hex::decode(ev["tpm_quote"]["message"].as_str().unwrap()).unwrap();
    let info = coffer_verifier::tpm::parse_quote(&message).unwrap();
    assert_eq!(info.extra_data, vec![9u8; 48]);

    // A wrong nonce: the KBS refuses.
    let e = client(
        Box::new(Lying {
            inner: attester(),
            nonce: Some(vec![0xAA; 48]),
        }),
        INITDATA,
    )
    .get_resource("default/app/secret")
    .await
    .expect_err("a quote over another nonce must not be accepted");
    assert!(e.to_string().contains("report data does not match"), "{e}");

    // Another initdata than PCR 8 binds: the attester will not bind it, and evidence sent
    // without binding is refused by the KBS.
    let other = INITDATA.replace("agent_policy", "agent_policy_other");
    let e = attester()
        .gather(
            &[1u8; 48],
            Some(&coffer_wire::initdata::digest(&other).unwrap()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("PCR 8 already holds another value"), "{e}");
    let e = client(
        Box::new(Lying {
            inner: attester(),
            nonce: None,
        }),
        &other,
    )
    .get_resource("default/app/secret")
    .await
    .expect_err("evidence whose PCR 8 binds other initdata must not be accepted");
    assert!(e.to_string().contains("initdata"), "{e}");

    // The TDX attester on an SNP HCL report says so.
    let e = AzTdxVtpmAttester::new(&tpm.tcti, &imds.url)
        .gather(&[1u8; 48], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not TDX"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_azure_tdx_vtpm_sends_the_td_quote_imds_made_and_a_quote_by_the_bound_ak() {
    let d = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(d.path());
    let (hcl, td_report) = provision_az_tdx(&tpm);
    let rd_at = coffer_testkit::vtpm::TD_REPORT_DATA_OFFSET;
    let td_quote = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../verifier/testdata/tdx/dcapqvl_tdx_quote"),
    )
    .unwrap();
    let imds = Imds::start(String::new(), String::new(), td_quote.clone()).await;

    let found = coffer_attester::probe(&guest(d.path(), &tpm, &imds.url)).expect("the probe");
    assert_eq!(found.tee(), kbs_types::Tee::AzTdxVtpm);

    let digest = coffer_wire::initdata::digest(INITDATA).unwrap();
    let rd = [5u8; 48];
    let ev = AzTdxVtpmAttester::new(&tpm.tcti, &imds.url)
        .gather(&rd, Some(&digest))
        .unwrap();
    // IMDS was asked to quote exactly the TDREPORT in the HCL report; its quote is sent on.
    assert_eq!(*imds.td_reports.lock().unwrap(), vec![td_report.clone()]);
    let b64 = base64::engine::general_purpose::URL_SAFE;
    assert_eq!(
        b64.decode(ev["td_quote"].as_str().unwrap()).unwrap(),
        td_quote
    );
    assert_eq!(b64.decode(ev["hcl_report"].as_str().unwrap()).unwrap(), hcl);

    // The vTPM part verifies: AK bound by the TDREPORT's REPORTDATA, the quote's signature by
    // it, the nonce, the PCR digest and initdata in PCR 8; a wrong nonce fails.
    let q = &ev["tpm_quote"];
    let bytes = |v: &Value| hex::decode(v.as_str().unwrap()).unwrap();
    let pcrs: Vec<Vec<u8>> = q["pcrs"].as_array().unwrap().iter().map(bytes).collect();
    let check = |nonce: &[u8]| {
        coffer_verifier::az_tdx::verify_vtpm_binding(
            &hcl,
            &td_report[rd_at..rd_at + 64],
            &bytes(&q["message"]),
            &bytes(&q["signature"]),
            &pcrs,
            &coffer_verifier::Expected {
                report_data: Some(nonce),
                init_data_digest: Some(&digest),
                now: std::time::SystemTime::now(),
            },
        )
    };
    let claims = check(&rd).expect("the vTPM evidence verifies");
    assert_eq!(
        claims["tpm"]["pcr08"],
        hex(&vtpm::extend_value(&[0u8; 32], &digest))
    );
    assert!(matches!(
        check(&[6u8; 48]),
        Err(coffer_verifier::VerifyError::ReportData)
    ));
}

#[test]
fn a_tpm_without_an_hcl_report_is_not_an_azure_guest() {
    let d = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(d.path());
    let e = coffer_attester::probe(&guest(d.path(), &tpm, "http://127.0.0.1:9"))
        .err()
        .expect("no TEE")
        .to_string();
    assert!(
        e.contains("holds no HCL report at NV index 0x1400001"),
        "{e}"
    );
    let e = vtpm::Vtpm::new(&tpm.tcti)
        .bind_init_data(&[0u8; 48])
        .unwrap_err()
        .to_string();
    assert!(e.contains("must use algorithm sha256"), "{e}");
}
