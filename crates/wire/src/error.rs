//! Error bodies of the KBS protocol: `{"type": "<prefix><Kind>", "detail": "…"}`.
//!
//! The kinds reuse the names upstream Trustee uses wherever one exists, so upstream clients and
//! tooling that match on them keep working.

use kbs_types::ErrorInformation;

/// Prefix of every error `type` URI.
pub const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

/// The kind of a KBS error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Authentication or attestation of the TEE failed (bad evidence, nonce, session, …).
    AttestationError,
    /// The request body or parameters are malformed.
    InvalidRequest,
    /// The request path names no endpoint or is not a valid resource path.
    InvalidRequestPath,
    /// The requested resource does not exist.
    ResourceNotFound,
    /// The resource policy denied the release.
    PolicyDeny,
    /// A policy could not be parsed or evaluated.
    PolicyEngineError,
    /// No attestation token accompanied a request that needs one.
    TokenNotFound,
    /// The attestation token is invalid or expired.
    TokenVerifierError,
    /// Administrator authentication failed or no administrator key is configured.
    AdminAuthAccess,
    /// Encrypting the response to the TEE key failed.
    JweError,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// The storage backend failed.
    StorageError,
    /// The request body ended before its declared length (the client closed or sent less).
    IncompleteBody,
    /// The request body did not arrive within the server's body read timeout.
    RequestTimeout,
    /// The policy text exceeds a size or nesting limit, or took too long to compile.
    PolicyTooComplex,
}

impl ErrorKind {
    /// The kind's name as it appears at the end of the `type` URI.
    pub fn name(self) -> &'static str {
        match self {
            Self::AttestationError => "AttestationError",
            Self::InvalidRequest => "InvalidRequest",
            Self::InvalidRequestPath => "InvalidRequestPath",
            Self::ResourceNotFound => "ResourceNotFound",
            Self::PolicyDeny => "PolicyDeny",
            Self::PolicyEngineError => "PolicyEngineError",
            Self::TokenNotFound => "TokenNotFound",
            Self::TokenVerifierError => "TokenVerifierError",
            Self::AdminAuthAccess => "AdminAuthAccess",
            Self::JweError => "JweError",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::StorageError => "StorageError",
            Self::IncompleteBody => "IncompleteBody",
            Self::RequestTimeout => "RequestTimeout",
            Self::PolicyTooComplex => "PolicyTooComplex",
        }
    }

    /// The HTTP status code for this kind.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::IncompleteBody | Self::PolicyTooComplex => 400,
            Self::AttestationError
            | Self::TokenNotFound
            | Self::TokenVerifierError
            | Self::AdminAuthAccess
            | Self::JweError => 401,
            Self::PolicyDeny => 403,
            Self::InvalidRequestPath | Self::ResourceNotFound => 404,
            Self::RequestTimeout => 408,
            Self::PayloadTooLarge => 413,
            Self::PolicyEngineError | Self::StorageError => 500,
        }
    }

    /// Builds the wire error body.
    pub fn info(self, detail: impl Into<String>) -> ErrorInformation {
        ErrorInformation {
            error_type: format!("{ERROR_TYPE_PREFIX}{}", self.name()),
            detail: detail.into(),
        }
    }

    /// Recovers the kind from an error body's `type`, when it is one Coffer knows.
    pub fn from_type(error_type: &str) -> Option<Self> {
        let name = error_type.strip_prefix(ERROR_TYPE_PREFIX)?;
        ALL.iter().copied().find(|k| k.name() == name)
    }
}

const ALL: [ErrorKind; 15] = [
    ErrorKind::AttestationError,
    ErrorKind::InvalidRequest,
    ErrorKind::InvalidRequestPath,
    ErrorKind::ResourceNotFound,
    ErrorKind::PolicyDeny,
    ErrorKind::PolicyEngineError,
    ErrorKind::TokenNotFound,
    ErrorKind::TokenVerifierError,
    ErrorKind::AdminAuthAccess,
    ErrorKind::JweError,
    ErrorKind::PayloadTooLarge,
    ErrorKind::StorageError,
    ErrorKind::IncompleteBody,
    ErrorKind::RequestTimeout,
    ErrorKind::PolicyTooComplex,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_type_uri() {
        for k in ALL {
            let info = k.info("x");
            assert!(info.error_type.starts_with(ERROR_TYPE_PREFIX));
            assert_eq!(ErrorKind::from_type(&info.error_type), Some(k));
        }
        assert_eq!(
            ErrorKind::from_type("https://example/errors/PolicyDeny"),
            None
        );
    }
}
