//! The guest's image pipeline: pull an OCI image from a registry or an OCI layout directory,
//! verify every blob against its digest and every layer against the image config's `diff_id`,
//! and unpack the layers safely into a new root filesystem.
//!
//! A pull is all or nothing: layers are unpacked into a temporary directory beside the target
//! and renamed into place only when every layer verified and applied; any failure removes it.
//! Blobs may be kept in a content-addressed cache (`blobs/sha256/<hex>`), written atomically and
//! re-verified each time they are used.
//!
//! # Example
//!
//! Pull an image from an OCI image layout directory into a new root filesystem:
//!
//! ```
//! # use std::path::Path;
//! # /// Writes an OCI image layout tagged `v1` at `dir`: one plain tar layer holding
//! # /// `etc/greeting`. Returns the layer's digest.
//! # fn write_layout(dir: &Path) -> Result<String, Box<dyn std::error::Error>> {
//! #     use sha2::{Digest, Sha256};
//! #     let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
//! #     std::fs::create_dir_all(dir.join("blobs/sha256"))?;
//! #     let blob = |b: &[u8]| -> std::io::Result<String> {
//! #         let d = digest(b);
//! #         std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b)?;
//! #         Ok(d)
//! #     };
//! #     let mut tar = tar::Builder::new(Vec::new());
//! #     let mut h = tar::Header::new_gnu();
//! #     h.set_entry_type(tar::EntryType::Directory);
//! #     h.set_mode(0o755);
//! #     h.set_size(0);
//! #     tar.append_data(&mut h, "etc", &[][..])?;
//! #     let mut h = tar::Header::new_gnu();
//! #     h.set_entry_type(tar::EntryType::Regular);
//! #     h.set_mode(0o644);
//! #     h.set_size(6);
//! #     tar.append_data(&mut h, "etc/greeting", &b"hello\n"[..])?;
//! #     let layer = tar.into_inner()?;
//! #     let config = serde_json::to_vec(&serde_json::json!({
//! #         "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
//! #         "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]}}))?;
//! #     let layer_digest = blob(&layer)?;
//! #     let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
//! #         "mediaType": "application/vnd.oci.image.manifest.v1+json",
//! #         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
//! #                    "digest": blob(&config)?, "size": config.len()},
//! #         "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
//! #                     "digest": layer_digest, "size": layer.len()}]}))?;
//! #     let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
//! #         "mediaType": "application/vnd.oci.image.manifest.v1+json",
//! #         "digest": blob(&manifest)?, "size": manifest.len(),
//! #         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
//! #     std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
//! #     std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
//! #     Ok(layer_digest)
//! # }
//! use coffer_image::{pull, Error, ImageRef, PullOptions};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let layout = dir.path().join("layout");
//! let layer_digest = write_layout(&layout)?;
//! let image = ImageRef::parse(&format!("oci:{}:v1", layout.display()))?;
//!
//! let rootfs = dir.path().join("rootfs");
//! let report = pull(&image, &rootfs, &PullOptions::default()).await?;
//! assert_eq!(report.layers, 1);
//! assert_eq!(report.config["Cmd"][0], "/bin/sh");
//! assert_eq!(std::fs::read_to_string(rootfs.join("etc/greeting"))?, "hello\n");
//! // No signature policy was given, and the report says so.
//! assert!(report.policy.is_none());
//!
//! // A layer that no longer hashes to its digest stops the pull, and no rootfs appears.
//! let blob = layout.join("blobs/sha256").join(&layer_digest["sha256:".len()..]);
//! let mut altered = std::fs::read(&blob)?;
//! altered[1024] ^= 1; // the file's "hello" becomes "iello"
//! std::fs::write(&blob, altered)?;
//! let other = dir.path().join("other");
//! let refused = pull(&image, &other, &PullOptions::default()).await;
//! assert!(matches!(refused, Err(Error::Digest { .. })));
//! assert!(!other.exists());
//! # Ok(())
//! # }
//! ```

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
mod stream;
pub mod unpack;

pub use pull::{inspect, pull, GzipInflater, PullOptions, PullReport};
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
