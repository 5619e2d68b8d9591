//! The agent policy evaluated on arbitrary input: the first byte picks the request (rule) name,
//! the rest is the JSON `input`; the policy is the built-in default (policy text is not fuzzed).
#![no_main]
use coffer_agent::policy::AgentPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local!(static P: AgentPolicy =
        AgentPolicy::new(None, std::sync::Arc::new(coffer_fuzz::NoAudit)).expect("default policy"));
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(json) else {
        return;
    };
    let name = coffer_fuzz::AGENT_REQUESTS[selector as usize % coffer_fuzz::AGENT_REQUESTS.len()];
    P.with(|p| {
        let _ = p.check(name, &input);
    });
});
