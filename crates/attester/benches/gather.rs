//! Evidence gathering through configfs-tsm, as the guest does it (make an entry, read
//! `generation`, write `inblob`, read `outblob` and `auxblob`, read `generation`, parse the
//! report and the certificate table), against the emulated interface of `coffer-testkit`: the
//! figure includes the emulated PSP's P-384 signature and the emulation's FIFO hand-off, not a
//! real PSP's firmware time.
//!
//! `cargo bench -p coffer-attester --bench gather [-- REQUESTS]` (default 200).

use std::time::Instant;

use coffer_attester::TsmSnpAttester;
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
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "SEV-SNP evidence through configfs-tsm (emulated interface and PSP): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({requests} requests)",
        at(0.5),
        at(0.99),
        ms[ms.len() - 1]
    );
}
