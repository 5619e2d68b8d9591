//! TPM 2.0 TPMS_ATTEST quote messages.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = coffer_verifier::tpm::parse_quote(data);
});
