//! CCEL / TCG crypto-agile event logs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = coffer_verifier::eventlog::parse(data) {
        let _ = coffer_verifier::eventlog::replay(&events);
    }
});
