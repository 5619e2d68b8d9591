//! Where keys named by `kbs:///` URIs come from: the key broker (a KBS, after attestation) that
//! the pull asks for layer key-encryption keys and the signature policy for verification keys.
//! Also reachable as `pull::KeyBroker`.

/// A KBS (or other key broker) from which layer key-encryption keys are fetched by `kid`
/// (`kbs:///repo/type/tag`), after attestation.
pub trait KeyBroker: Send + Sync {
    /// The resource at `uri`.
    fn get<'a>(&'a self, uri: &'a str) -> KeyFuture<'a>;
}

/// What [`KeyBroker::get`] returns: the resource, or why it could not be had.
pub type KeyFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<zeroize::Zeroizing<Vec<u8>>, String>> + Send + 'a>,
>;
