//! NVIDIA SPDM measurement reports.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = coffer_verifier::nvidia::parse_report(data);
});
