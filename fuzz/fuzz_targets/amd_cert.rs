//! VCEK/VLEK certificates: X.509 parsing, AMD extensions, chain verification.
#![no_main]
use std::time::{Duration, UNIX_EPOCH};

use coffer_verifier::snp::{certs, EndorsementKey, GenerationRoots};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local!(static ROOTS: Vec<GenerationRoots> = GenerationRoots::builtin());
    let Ok(cert) = certs::parse_der(data, "fuzz") else {
        return;
    };
    let _ = certs::tcb_extensions(&cert, "fuzz");
    ROOTS.with(|r| {
        let _ = certs::verify_endorsement(
            &cert,
            EndorsementKey::Vcek,
            r,
            UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        );
    });
});
