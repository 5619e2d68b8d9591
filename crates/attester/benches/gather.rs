//! Evidence gathering through configfs-tsm, as the guest does it (make an entry, read
//! `generation`, write `inblob`, read `outblob` and `auxblob`, read `generation`, parse the
//! report and the certificate table), against the emulated interface of `coffer-testkit`: the
//! figure includes the emulated PSP's P-384 signature and the emulation's FIFO hand-off, not a
//! real PSP's firmware time.
//!
//!
//! Then the Azure SEV-SNP vTPM evidence against `swtpm` (a software TPM on loopback, provisioned
//! like Azure's paravisor) with the VCEK from a loopback IMDS: read the HCL report from NV, quote
//! the 24 SHA-256 PCRs with the nonce, read them back, fetch the VCEK. A real vTPM's quote takes
//! its own RSA signing time; swtpm's is the host CPU's.
//!
//! `cargo bench -p coffer-attester --bench gather [-- REQUESTS]` (default 200).

use std::time::Instant;

use coffer_attester::{AzSnpVtpmAttester, TsmSnpAttester};
use coffer_psp::{EmulatedPsp, Tcb};
use coffer_testkit::tsm::FakeTsm;

fn main() {
    let requests: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("tsm/report");
    let _tsm = FakeTsm::start(
        &root,
        EmulatedPsp::generate(Tcb::default()).unwrap(),
        "sev_guest",
        false,
    );
    let attester = TsmSnpAttester::new(&root);
    attester.gather(&[0u8; 48]).expect("a first report");
    let mut ms = Vec::with_capacity(requests);
    for i in 0..requests {
        let t = Instant::now();
        attester.gather(&[i as u8; 48]).unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(
        "SEV-SNP evidence through configfs-tsm (emulated interface and PSP)",
        ms,
    );

    let psp = EmulatedPsp::generate(Tcb::default()).unwrap();
    let tpm = coffer_testkit::vtpm::Swtpm::start(d.path());
    coffer_testkit::vtpm::provision_az_snp(&tpm, &psp);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let imds = rt.block_on(coffer_testkit::vtpm::Imds::start(
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
        String::new(),
        vec![],
    ));
    let attester = AzSnpVtpmAttester::new(&tpm.tcti, &imds.url);
    let digest = [7u8; 32];
    attester
        .gather(&[0u8; 48], Some(&digest))
        .expect("first vTPM evidence (binds PCR 8)");
    let mut ms = Vec::with_capacity(requests);
    for i in 0..requests {
        let t = Instant::now();
        attester.gather(&[i as u8; 48], Some(&digest)).unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(
        "Azure SEV-SNP vTPM evidence (swtpm quote over 24 PCRs, HCL report, IMDS VCEK)",
        ms,
    );
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests)",
        at(0.5),
        at(0.99),
        ms[ms.len() - 1],
        ms.len()
    );
}
