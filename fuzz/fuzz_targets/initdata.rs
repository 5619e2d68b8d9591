//! Initdata TOML (from the host or the pod annotation): parsing, the digest, and what the agent
//! reads from its entries (`aa.toml` / `cdh.toml` KBS settings, `owner-key.pem`,
//! `log-recipient.pem`). The policy source (`policy.rego`) is not fuzzed here.
#![no_main]
use coffer_wire::initdata::{self, Initdata};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = initdata::digest(text);
    let Ok(parsed) = Initdata::parse(text) else {
        return;
    };
    let _ = coffer_agent::keys::kbs_config(&parsed);
    if let Some(k) = parsed.data.get("owner-key.pem") {
        let _ = coffer_agent::owner::validate_key(k);
    }
    if let Some(k) = parsed.data.get("log-recipient.pem") {
        let _ = coffer_agent::sealed::Recipient::from_pem(k);
    }
});
