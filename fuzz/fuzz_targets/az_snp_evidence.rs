//! Azure SNP vTPM evidence JSON, end to end.
#![no_main]
use std::time::{Duration, UNIX_EPOCH};

use coffer_verifier::{az_snp::AzSnpVtpmVerifier, Expected, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local!(static V: AzSnpVtpmVerifier = AzSnpVtpmVerifier::default());
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let e = Expected {
        report_data: Some(b"challenge"),
        init_data_digest: None,
        now: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
    };
    V.with(|ver| {
        let _ = ver.verify(&v, &e);
    });
});
