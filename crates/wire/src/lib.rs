//! Wire types shared by every Coffer component.
//!
//! This crate is the single home of the data that crosses a process or trust boundary:
//! the KBS attestation protocol (version [`PROTOCOL_VERSION`], the request and response bodies of
//! which come from the `kbs-types` crate so that upstream Confidential Containers clients and
//! Coffer interoperate), the runtime-data binding rule, error bodies, EAR token claims and the
//! reference-value document. Nothing here performs I/O.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod binding;
pub mod capabilities;
pub mod ear;
pub mod error;
pub mod hcl;
pub mod initdata;
pub mod mesh;
pub mod reference;
pub mod rego;
pub mod sample;
pub mod sealed;

pub use kbs_types::{
    Attestation, Challenge, CompositeEvidence, ErrorInformation, HashAlgorithm, InitData,
    ProtectedHeader, Request, Response as JweResponse, RuntimeData, Tee, TeePubKey,
};

/// Version of the KBS attestation protocol spoken by Coffer (and by upstream Trustee).
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// Path prefix of every KBS endpoint.
pub const BASE_PATH: &str = "/kbs/v0";

/// Name of the cookie that carries the KBS session identifier.
pub const SESSION_COOKIE: &str = "kbs-session-id";

/// Length in bytes of the challenge nonce before base64 encoding.
pub const NONCE_LEN: usize = 32;
