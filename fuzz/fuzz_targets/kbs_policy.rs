//! The KBS's default policies evaluated on arbitrary input (the policy text is fixed, the input
//! fuzzed): the attestation policy appraising annotated evidence (with reference values for SNP,
//! TDX and the sample TEE), and the resource policy deciding on token claims. The input is JSON.
#![no_main]
use coffer_kbs::{
    policy::{Compiled, DEFAULT_ATTESTATION_POLICY, DEFAULT_RESOURCE_POLICY},
    store::PolicyKind,
};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

struct Policies {
    attestation: Compiled,
    resource: Compiled,
}

fn policies() -> Policies {
    // What `coffer kbs set-reference-values` stores, as the KBS hands it to the policy.
    let refs = coffer_wire::reference::parse(include_bytes!("../fixtures/reference-values.json"))
        .expect("reference values");
    Policies {
        attestation: Compiled::new(
            PolicyKind::Attestation,
            DEFAULT_ATTESTATION_POLICY,
            json!({ "reference": refs }),
        )
        .expect("default attestation policy"),
        resource: Compiled::new(PolicyKind::Resource, DEFAULT_RESOURCE_POLICY, json!({}))
            .expect("default resource policy"),
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local!(static P: Policies = policies());
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    P.with(|p| {
        let _ = p.attestation.appraise(&input);
        let _ = p.resource.allow_resource(&input, ["default", "key", "app"]);
    });
});
