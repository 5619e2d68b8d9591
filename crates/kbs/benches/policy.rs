//! Policy decisions per second on one core (this thread): the default attestation policy's
//! appraisal of sample and SEV-SNP claims, and the default resource policy's decision on a
//! token's claims, as the KBS makes them for each handshake.
//! Run: `cargo bench -p coffer-kbs --bench policy`.

use std::time::{Duration, Instant};

use coffer_kbs::{
    policy::{Compiled, DEFAULT_ATTESTATION_POLICY, DEFAULT_RESOURCE_POLICY},
    store::PolicyKind,
};
use serde_json::json;

fn rate(name: &str, mut f: impl FnMut()) {
    f();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        f();
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name}: {:.0}/s ({:.1} µs each)",
        n as f64 / secs,
        secs * 1e6 / n as f64
    );
}

fn main() {
    let measurement = "ab".repeat(48);
    let init_data = "cd".repeat(32);
    let refs = json!({"reference": {
        "measurement": [measurement],
        "init_data": [init_data],
        "snp_tcb_min": [{"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}],
    }});
    let attestation =
        Compiled::new(PolicyKind::Attestation, DEFAULT_ATTESTATION_POLICY, refs).unwrap();
    let tee_pubkey = json!({"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
        "x": "x".repeat(43), "y": "y".repeat(43)});
    let runtime = json!({"tee-pubkey": tee_pubkey, "nonce": "n".repeat(43)});
    let sample = json!({"tee": "sample", "sample": {"svn": "1", "report_data": "ef".repeat(64)},
        "report_data": "ef".repeat(64), "runtime_data_claims": runtime.clone(),
        "init_data": init_data});
    rate("appraisal, sample claims", || {
        attestation.appraise(&sample).unwrap();
    });
    let snp = json!({"tee": "snp", "snp": {
            "measurement": measurement, "policy_debug_allowed": false, "policy_smt_allowed": true,
            "reported_tcb_bootloader": 3, "reported_tcb_tee": 0, "reported_tcb_snp": 8,
            "reported_tcb_microcode": 115, "report_data": "ef".repeat(64),
            "host_data": init_data, "chip_id": "00".repeat(64), "platform_smt_enabled": true},
        "report_data": "ef".repeat(64), "runtime_data_claims": runtime.clone(),
        "init_data": init_data});
    rate("appraisal, SEV-SNP claims", || {
        attestation.appraise(&snp).unwrap();
    });
    let resource = Compiled::new(PolicyKind::Resource, DEFAULT_RESOURCE_POLICY, json!({})).unwrap();
    let claims = json!({"eat_profile": "tag:github.com,2023:veraison/ear", "iat": 1, "exp": 2,
        "ear.verifier-id": {"developer": "coffer", "build": "0"}, "tee": "snp",
        "submods": {"cpu0": {"ear.status": "affirming", "ear.appraisal-policy-id": "sha256:00",
            "ear.veraison.annotated-evidence": snp}}});
    rate("resource decision, SEV-SNP token claims", || {
        assert!(resource
            .allow_resource(&claims, ["default", "test", "key"])
            .unwrap());
    });
}
