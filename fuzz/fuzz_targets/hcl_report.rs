//! Azure HCL reports.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = coffer_verifier::az_snp::parse_hcl(data);
});
