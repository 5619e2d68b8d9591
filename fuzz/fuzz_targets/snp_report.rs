//! Raw SNP reports against a real VCEK: parsing, signature and TCB checks must never panic.
#![no_main]
use std::time::{Duration, UNIX_EPOCH};

use coffer_verifier::{snp::SnpVerifier, Expected};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local!(static V: SnpVerifier = SnpVerifier::default());
    let vcek = include_bytes!("../../crates/verifier/testdata/snp/test-vcek.der");
    let e = Expected {
        report_data: Some(&[0u8; 48]),
        init_data_digest: Some(&[0u8; 32]),
        now: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
    };
    V.with(|v| {
        let _ = v.verify_report(data, vcek, &e);
    });
});
