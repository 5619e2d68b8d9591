//! The KBS's request error: a protocol error kind and a detail, rendered as the upstream error
//! body. Details never include secrets, resource contents or key material.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use coffer_wire::error::ErrorKind;

use crate::{policy::PolicyError, store::StoreError};

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct KbsError {
    /// The protocol error kind.
    pub kind: ErrorKind,
    /// What went wrong, for the client.
    pub detail: String,
}

impl KbsError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

impl From<StoreError> for KbsError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        match e {
            StoreError::Full => Self::new(ErrorKind::AttestationError, e.to_string()),
            _ => Self::new(
                ErrorKind::StorageError,
                "the KBS store failed; see the server log",
            ),
        }
    }
}

impl From<PolicyError> for KbsError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Store(s) => s.into(),
            other => {
                tracing::error!(error = %other, "policy failure");
                Self::new(ErrorKind::PolicyEngineError, other.to_string())
            }
        }
    }
}

impl IntoResponse for KbsError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.kind.info(self.detail))).into_response()
    }
}
