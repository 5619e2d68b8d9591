//! Sealed output as it leaves a sandbox without the owner's key: one JSON line per record, as
//! `coffer run`/`exec`/`logs` print it and the shim writes it to containerd's log, and as
//! `coffer logs --sealed FILE` reads it back to open it with the owner's key.

use serde::{Deserialize, Serialize};

/// One sealed record and where it belongs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedLine {
    /// The container.
    pub container_id: String,
    /// The exec'd process ("" for the container's own).
    pub exec_id: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The record's offset in the stream (bound into the seal).
    pub offset: u64,
    /// The record, base64 (standard alphabet).
    pub record: String,
}
