//! Append-only audit log: one JSON object per line for every admin change, every attestation
//! outcome and every resource release decision. Lines go to the audit file (opened for append;
//! admin changes are fsynced) and to the `audit` tracing target.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    sync::Mutex,
};

use serde_json::{json, Value};

use crate::store::now_secs;

/// The audit log.
pub struct AuditLog {
    file: Option<Mutex<File>>,
}

impl AuditLog {
    /// Opens `path` for appending (creating it with mode 0600), or logs to tracing only.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let file = match path {
            Some(p) => {
                let mut opts = OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                Some(Mutex::new(opts.open(p).map_err(|e| {
                    anyhow::anyhow!("cannot open audit log {}: {e}", p.display())
                })?))
            }
            None => None,
        };
        Ok(Self { file })
    }

    fn write(&self, mut record: Value, sync: bool) {
        record["ts"] = json!(now_secs());
        let line = record.to_string();
        tracing::info!(target: "audit", "{line}");
        if let Some(f) = &self.file {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let mut buf = line.into_bytes();
            buf.push(b'\n');
            let res = f
                .write_all(&buf)
                .and_then(|_| if sync { f.sync_data() } else { Ok(()) });
            if let Err(e) = res {
                tracing::error!(error = %e, "audit log write failed");
            }
        }
    }

    /// Records an admin change.
    pub fn admin(&self, key: &str, action: &str, target: &str, outcome: &str) {
        self.write(
            json!({"event": "admin", "admin_key": key, "action": action, "target": target, "outcome": outcome}),
            true,
        );
    }

    /// Records the appraisal of one token submodule (`cpu0`, `gpu0`, …), with the policy's
    /// reason, which the client never sees.
    pub fn attestation(
        &self,
        submodule: &str,
        tee: &str,
        status: &str,
        reason: Option<&str>,
        claims_digest: &str,
    ) {
        self.write(
            json!({"event": "attestation", "submodule": submodule, "tee": tee, "status": status,
                "reason": reason, "claims_digest": claims_digest}),
            false,
        );
    }

    /// Records a resource release decision.
    pub fn release(
        &self,
        tee: &str,
        claims_digest: &str,
        path: &str,
        decision: &str,
        reason: &str,
    ) {
        self.write(
            json!({"event": "release", "tee": tee, "claims_digest": claims_digest, "path": path, "decision": decision, "reason": reason}),
            false,
        );
    }
}
