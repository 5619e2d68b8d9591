//! What a sandbox's launch measurement covers.
//!
//! The process sandbox (development, no confidentiality) runs `coffer-agent` as a child in new
//! mount, PID, network, UTS and IPC namespaces (its network is the launcher's forwarding channel,
//! [`crate::egress`]), with its state on a private tmpfs; the emulated PSP reports as
//! MEASUREMENT
//! `SHA-384("coffer process sandbox v1" ‖ 0 ‖ SHA-384(agent binary) ‖ launch configuration)`,
//! the configuration being the JSON below, so that a different agent binary or different
//! isolation measures differently.

use serde_json::json;
use sha2::{Digest, Sha384};

/// The namespaces a process sandbox creates (`unshare` options without the leading `--`).
pub const PROCESS_NAMESPACES: [&str; 5] = ["mount", "pid", "net", "uts", "ipc"];

/// The launch configuration that is measured.
pub fn process_launch_config() -> String {
    json!({
        "sandbox": "process",
        "namespaces": PROCESS_NAMESPACES,
        "private_state": true,
        "egress": "forwarding channel",
    })
    .to_string()
}

/// The MEASUREMENT of a process sandbox running `agent_binary`.
pub fn process_measurement(agent_binary: &[u8]) -> [u8; 48] {
    let mut h = Sha384::new();
    h.update(b"coffer process sandbox v1\0");
    h.update(Sha384::digest(agent_binary));
    h.update(process_launch_config().as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measurement_follows_the_agent_binary() {
        assert_eq!(process_measurement(b"agent"), process_measurement(b"agent"));
        assert_ne!(
            process_measurement(b"agent"),
            process_measurement(b"agent2")
        );
    }
}
