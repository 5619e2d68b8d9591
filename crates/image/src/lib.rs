//! The guest's image pipeline: pull an OCI image from a registry or an OCI layout directory,
//! verify every blob against its digest and every layer against the image config's `diff_id`,
//! and unpack the layers safely into a new root filesystem.
//!
//! A pull is all or nothing: layers are unpacked into a temporary directory beside the target
//! and renamed into place only when every layer verified and applied; any failure removes it.
//! Blobs may be kept in a content-addressed cache (`blobs/sha256/<hex>`), written atomically and
//! re-verified each time they are used.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod cache;
pub mod cosign_key;
pub mod crypt;
pub mod digest;
pub mod encrypt;
pub mod pull;
pub mod reference;
pub mod sign;
pub mod signature;
pub mod source;
pub mod unpack;

pub use pull::{pull, PullOptions, PullReport};
pub use reference::ImageRef;

/// A failed image operation. Messages name the image, blob or path and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The registry refused or failed a request.
    #[error("registry: {0}")]
    Registry(String),
    /// A manifest, index or config is not what the OCI and Docker specifications describe.
    #[error("{0}")]
    Manifest(String),
    /// No manifest in the image index matches the requested platform.
    #[error("the image has no manifest for platform {0}")]
    Platform(String),
    /// Content does not hash to the digest that names it.
    #[error("{what} {expected}: content hashes to {actual}")]
    Digest {
        /// Which object (blob, manifest, layer diff_id).
        what: &'static str,
        /// The digest expected.
        expected: String,
        /// The digest computed.
        actual: String,
    },
    /// A media type or feature this pipeline does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A layer cannot be applied.
    #[error("cannot unpack {path}: {reason}")]
    Unpack {
        /// The path in the archive or rootfs.
        path: String,
        /// Why.
        reason: String,
    },
    /// The signature policy refuses the image (or cannot be evaluated).
    #[error("signature policy: {0}")]
    Policy(String),
    /// An encrypted layer cannot be decrypted (no key fits, wrong key, altered layer).
    #[error("decryption: {0}")]
    Decrypt(String),
    /// A configured limit was reached.
    #[error("limit reached: {0}")]
    Limit(String),
    /// The target root filesystem cannot be used.
    #[error("rootfs {path}: {reason}")]
    Rootfs {
        /// The rootfs directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// A local I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
