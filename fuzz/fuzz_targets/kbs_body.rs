//! The JSON bodies coffer-kbs parses from the network, each through what the KBS does with it
//! after parsing: `/auth` (`Request`), `/attest` (`Attestation`: init-data, tee-pubkey, the
//! runtime-data binding, additional device evidence) and the admin reference-values upload; also
//! resource paths. Every parser sees every input (they are cheap).
#![no_main]
use std::time::{Duration, UNIX_EPOCH};

use coffer_wire::{binding, initdata, reference, Attestation, HashAlgorithm, Request};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let _ = req.version == coffer_wire::PROTOCOL_VERSION;
        let _ = req.tee.to_string();
    }
    if let Ok(att) = serde_json::from_slice::<Attestation>(data) {
        attest(&att);
    }
    let _ = reference::parse(data);
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = coffer_kbs::api::resource_path(path);
    }
});

/// What `POST /attest` does with a parsed body before the evidence verifier runs.
fn attest(att: &Attestation) {
    if let Some(d) = &att.init_data {
        if let Ok(parsed) = initdata::Initdata::parse(&d.body) {
            let _ = parsed.algorithm.digest(d.body.as_bytes());
        }
    }
    let _ = coffer_jose::validate_public_key(&att.runtime_data.tee_pubkey);
    for alg in [HashAlgorithm::Sha384, HashAlgorithm::Sha512] {
        let _ = binding::runtime_data_digest(
            &att.runtime_data.tee_pubkey,
            &att.runtime_data.nonce,
            &att.tee_evidence.additional_evidence,
            alg,
        );
    }
    // Additional (device) evidence: `{"<tee>": [class, evidence]}`, bound to key and nonce.
    let raw = att.tee_evidence.additional_evidence.trim();
    let Ok(map) = serde_json::from_str::<serde_json::Map<String, Value>>(raw) else {
        return;
    };
    let Ok(bind) =
        binding::device_binding_digest(&att.runtime_data.tee_pubkey, &att.runtime_data.nonce)
    else {
        return;
    };
    for (tee, entry) in map {
        if let (Value::Array(pair), "nvidia") = (&entry, tee.as_str()) {
            if pair.len() == 2 {
                let _ = coffer_verifier::nvidia::verify_device_evidence(
                    &pair[1],
                    &bind,
                    UNIX_EPOCH + Duration::from_secs(1_767_225_600),
                );
            }
        }
    }
}
