//! Agent API messages from the host: the first byte picks the request type, the rest is its
//! protobuf encoding. Decoded requests become the policy input the way the agent builds it and
//! are judged by the default agent policy.
#![no_main]
use coffer_agent::policy::AgentPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local!(static P: AgentPolicy =
        AgentPolicy::new(None, std::sync::Arc::new(coffer_fuzz::NoAudit)).expect("default policy"));
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if let Some((name, input)) = coffer_fuzz::agent_request(selector, bytes) {
        P.with(|p| {
            let _ = p.check(name, &input);
        });
    }
});
