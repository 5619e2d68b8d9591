//! Append-only audit log: one JSON object per line for every admin change, every attestation
//! outcome and every resource release decision. Lines go to the audit file (opened for append;
//! admin changes are fsynced) and to the `audit` tracing target.
//!
//! Each line is one `write(2)` on a file opened with `O_APPEND`, which the kernel appends
//! atomically (the offset is taken and advanced under the inode's lock), so concurrent handlers
//! write without a lock of ours and lines never interleave. A lock here was the KBS's one point
//! of contention under load: handlers slept on it while another wrote.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
};

use serde_json::{json, Value};

use crate::store::now_secs;

/// The audit log.
pub struct AuditLog {
    file: Option<File>,
}

impl AuditLog {
    /// Opens `path` for appending (creating it with mode 0600), or logs to tracing only.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let file =
            match path {
                Some(p) => {
                    let mut opts = OpenOptions::new();
                    opts.create(true).append(true);
                    #[cfg(unix)]
                    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                    Some(opts.open(p).map_err(|e| {
                        anyhow::anyhow!("cannot open audit log {}: {e}", p.display())
                    })?)
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
            let mut buf = line.into_bytes();
            buf.push(b'\n');
            // `write_all` on `&File`: one `write(2)` for a line on a regular file (a short
            // write, which only a full disk causes, continues with the rest).
            let mut out = f;
            let res = out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_records_are_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = std::sync::Arc::new(AuditLog::open(Some(&path)).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    // Long reasons, so that a line spans several of a writer's buffers.
                    let reason = format!("{t}").repeat(3000);
                    for i in 0..200 {
                        log.release("sample", &format!("{t}/{i}"), "/a/b/c", "deny", &reason);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        log.admin("k", "set-resource", "/a/b/c", "ok");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8 * 200 + 1);
        let mut seen = std::collections::HashSet::new();
        for line in &lines[..8 * 200] {
            let v: Value = serde_json::from_str(line).expect("an interleaved line");
            let digest = v["claims_digest"].as_str().unwrap().to_string();
            let t = digest.split('/').next().unwrap();
            assert_eq!(v["reason"].as_str().unwrap(), t.repeat(3000));
            assert!(seen.insert(digest));
        }
        assert_eq!(
            serde_json::from_str::<Value>(lines[8 * 200]).unwrap()["event"],
            "admin"
        );
    }
}
