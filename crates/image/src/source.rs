//! Where manifests and blobs come from: a registry (OCI distribution API, through `oci-client`)
//! or an OCI image layout directory. Every manifest and blob is checked against its digest here.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine};
use oci_client::{
    client::{ClientConfig, ClientProtocol},
    errors::OciDistributionError,
    manifest::{
        OciDescriptor, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
        OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
    },
    secrets::RegistryAuth,
    Client, Reference,
};
use serde::Deserialize;

use crate::{digest, Error, ImageRef};

/// The manifest media types a pull accepts.
pub const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// The largest manifest or config accepted (bytes).
pub const MAX_JSON: usize = 4 << 20;

/// A manifest as fetched: its bytes and the digest they hash to.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The raw bytes (what signatures cover).
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
}

/// Registry credentials in the containers `auth.json` format
/// (`{"auths": {"registry[/repo]": {"auth": "<base64 user:password>"}}}`).
#[derive(Clone, Default, Deserialize)]
pub struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Clone, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    /// A bearer token for the registry itself.
    #[serde(default)]
    registrytoken: Option<String>,
}

impl std::fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials themselves.
        f.debug_struct("AuthFile")
            .field("registries", &self.auths.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl AuthFile {
    /// Parses `auth.json` text.
    pub fn parse(json: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(json)
            .map_err(|e| Error::Manifest(format!("auth.json is not valid: {e}")))
    }

    /// The credentials for `reference`: the most specific key among `registry/repo/…`,
    /// `registry/repo`, `registry` (with or without scheme or a `/v1/` suffix) gives a bearer
    /// token (`registrytoken`) or basic credentials (`auth`); anonymous when none matches.
    pub fn auth_for(&self, reference: &Reference) -> Result<RegistryAuth, Error> {
        let normalize = |k: &str| {
            k.trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_string()
        };
        let wanted = format!("{}/{}", reference.registry(), reference.repository());
        let best = self
            .auths
            .iter()
            .map(|(k, v)| (normalize(k), v))
            .filter(|(k, _)| wanted == *k || wanted.starts_with(&format!("{k}/")))
            .max_by_key(|(k, _)| k.len());
        let Some((key, entry)) = best else {
            return Ok(RegistryAuth::Anonymous);
        };
        if let Some(token) = &entry.registrytoken {
            return Ok(RegistryAuth::Bearer(token.clone()));
        }
        let Some(auth) = &entry.auth else {
            return Ok(RegistryAuth::Anonymous);
        };
        let decoded = STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Error::Manifest(format!(
                    "auth.json: entry {key:?} is not base64 of user:password"
                ))
            })?;
        let (user, pass) = decoded.split_once(':').ok_or_else(|| {
            Error::Manifest(format!(
                "auth.json: entry {key:?} is not base64 of user:password"
            ))
        })?;
        Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()))
    }
}

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// Plain HTTP instead of HTTPS (only when asked for).
    pub plain_http: bool,
    /// Credentials.
    pub auth: AuthFile,
    /// A proxy for every registry request (e.g. `socks5h://127.0.0.1:1080`: the process
    /// sandbox's forwarding channel).
    pub proxy: Option<String>,
}

/// A source of manifests and blobs.
pub enum Source {
    /// A registry.
    Registry {
        /// The client.
        client: Client,
        /// The image.
        reference: Reference,
        /// Its credentials.
        auth: RegistryAuth,
        /// Plain HTTP (for the requests made beside `oci-client`).
        plain_http: bool,
        /// The proxy (for the requests made beside `oci-client`).
        proxy: Option<String>,
    },
    /// An OCI image layout directory.
    Layout {
        /// The directory.
        dir: PathBuf,
        /// Tag or digest in it.
        name: Option<String>,
    },
}

#[derive(Deserialize)]
struct LayoutIndex {
    manifests: Vec<OciDescriptor>,
}

/// A registry failure with its causes (`error sending request …: client error (Connect): …:
/// Connection refused`): the outermost message alone rarely says what went wrong.
fn registry_err(e: OciDistributionError) -> Error {
    Error::Registry(with_causes(&e))
}

fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    msg
}

/// The pauses before the retries of a registry request that failed on the way (a connection
/// refused, reset or timed out, a gateway's 502/503/504). Every request retried is a `GET`,
/// idempotent; a registry that answers is never asked again.
const RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// How long connecting to the registry may take, and how long it may then stay silent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `e` is a failure on the way to the registry rather than its answer.
fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(e) => {
            e.is_timeout() || ((e.is_connect() || e.is_request()) && !refused_by_tls(e))
        }
        OciDistributionError::ServerError { code, .. } => matches!(code, 502..=504),
        _ => false,
    }
}

/// Whether the failure is the TLS handshake's (a certificate not trusted, a server that does not
/// speak TLS): trying again would get the same answer.
fn refused_by_tls(e: &reqwest::Error) -> bool {
    // TLS failures reach here as an `io::Error` of kind `InvalidData`, which the connector may
    // wrap in another `io::Error`; `source()` skips such a wrapped error, `get_ref()` does not.
    fn invalid(io: &std::io::Error) -> bool {
        matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
        ) || io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<std::io::Error>())
            .is_some_and(invalid)
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>().is_some_and(invalid) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Runs `request` (an idempotent `GET`) until it succeeds, fails for good, or the retries in
/// [`RETRY_PAUSES`] are spent; each retry is logged with its cause.
async fn retrying<T, F, Fut>(what: &str, mut request: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut pauses = RETRY_PAUSES.iter();
    loop {
        match request().await {
            Err(e) if transient(&e) => match pauses.next() {
                Some(pause) => {
                    tracing::warn!(
                        what,
                        error = %with_causes(&e),
                        retry_in_ms = pause.as_millis() as u64,
                        "registry request failed on the way; retrying"
                    );
                    tokio::time::sleep(*pause).await;
                }
                None => return Err(e),
            },
            done => return done,
        }
    }
}

impl Source {
    /// The source for `image`.
    pub fn new(image: &ImageRef, opts: &SourceOptions) -> Result<Self, Error> {
        Ok(match image {
            ImageRef::Docker(reference) => {
                let config = ClientConfig {
                    protocol: if opts.plain_http {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    https_proxy: opts.proxy.clone(),
                    http_proxy: opts.proxy.clone(),
                    connect_timeout: Some(CONNECT_TIMEOUT),
                    read_timeout: Some(READ_TIMEOUT),
                    ..Default::default()
                };
                Self::Registry {
                    client: Client::new(config),
                    reference: reference.clone(),
                    auth: opts.auth.auth_for(reference)?,
                    plain_http: opts.plain_http,
                    proxy: opts.proxy.clone(),
                }
            }
            ImageRef::Layout { dir, name } => Self::Layout {
                dir: dir.clone(),
                name: name.clone(),
            },
        })
    }

    fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, Error> {
        Ok(dir.join("blobs/sha256").join(digest::sha256_hex(digest)?))
    }

    /// The manifest (or index) the reference names.
    pub async fn root_manifest(&self) -> Result<Fetched, Error> {
        match self {
            Self::Registry {
                client,
                reference,
                auth,
                ..
            } => {
                let (bytes, _) = retrying("manifest", || {
                    client.pull_manifest_raw(reference, auth, MANIFEST_TYPES)
                })
                .await
                .map_err(registry_err)?;
                let fetched = Fetched {
                    digest: digest::of(&bytes),
                    bytes: bytes.to_vec(),
                };
                if let Some(d) = reference.digest() {
                    digest::verify("manifest", d, &fetched.bytes)?;
                }
                Ok(fetched)
            }
            Self::Layout { dir, name } => {
                let index_path = dir.join("index.json");
                let index: LayoutIndex = serde_json::from_slice(
                    &tokio::fs::read(&index_path)
                        .await
                        .map_err(Error::io(format!("cannot read {}", index_path.display())))?,
                )
                .map_err(|e| Error::Manifest(format!("{}: {e}", index_path.display())))?;
                let pick: Vec<&OciDescriptor> = match name {
                    Some(n) if n.starts_with("sha256:") => {
                        index.manifests.iter().filter(|m| &m.digest == n).collect()
                    }
                    Some(n) => index
                        .manifests
                        .iter()
                        .filter(|m| {
                            m.annotations
                                .as_ref()
                                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                                == Some(n)
                        })
                        .collect(),
                    None => index.manifests.iter().collect(),
                };
                match pick.as_slice() {
                    [one] => self.manifest(&one.digest).await,
                    [] => Err(Error::Manifest(format!(
                        "{} has no manifest named {}",
                        dir.display(),
                        name.as_deref().unwrap_or("(any)")
                    ))),
                    _ => Err(Error::Manifest(format!(
                        "{} holds several manifests; name one with oci:DIR:TAG",
                        dir.display()
                    ))),
                }
            }
        }
    }

    /// The manifest with `digest` (from an index), verified.
    pub async fn manifest(&self, digest_str: &str) -> Result<Fetched, Error> {
        let bytes = match self {
            Self::Registry {
                client,
                reference,
                auth,
                ..
            } => {
                let r = Reference::with_digest(
                    reference.registry().to_string(),
                    reference.repository().to_string(),
                    digest_str.to_string(),
                );
                retrying("manifest", || {
                    client.pull_manifest_raw(&r, auth, MANIFEST_TYPES)
                })
                .await
                .map_err(registry_err)?
                .0
                .to_vec()
            }
            Self::Layout { dir, .. } => {
                let p = Self::blob_path(dir, digest_str)?;
                tokio::fs::read(&p)
                    .await
                    .map_err(Error::io(format!("cannot read {}", p.display())))?
            }
        };
        if bytes.len() > MAX_JSON {
            return Err(Error::Limit(format!(
                "manifest {digest_str} is over {MAX_JSON} bytes"
            )));
        }
        digest::verify("manifest", digest_str, &bytes)?;
        Ok(Fetched {
            bytes,
            digest: digest_str.to_string(),
        })
    }

    /// A small blob (the image config), verified.
    pub async fn small_blob(&self, desc: &OciDescriptor) -> Result<Vec<u8>, Error> {
        if desc.size < 0 || desc.size as usize > MAX_JSON {
            return Err(Error::Limit(format!(
                "blob {} is {} bytes; at most {MAX_JSON} accepted here",
                desc.digest, desc.size
            )));
        }
        let bytes = match self {
            Self::Registry {
                client, reference, ..
            } => {
                // Each try writes into a buffer of its own: a failed one leaves nothing behind.
                retrying("blob", || async {
                    let mut out = Vec::new();
                    client.pull_blob(reference, desc, &mut out).await?;
                    Ok(out)
                })
                .await
                .map_err(registry_err)?
            }
            Self::Layout { dir, .. } => {
                let p = Self::blob_path(dir, &desc.digest)?;
                tokio::fs::read(&p)
                    .await
                    .map_err(Error::io(format!("cannot read {}", p.display())))?
            }
        };
        digest::verify("blob", &desc.digest, &bytes)?;
        Ok(bytes)
    }

    /// Writes a blob to `file`, synced; a registry's blob is checked against its digest as its
    /// stream ends.
    pub async fn blob_to_file(&self, desc: &OciDescriptor, file: &Path) -> Result<(), Error> {
        let ctx = || format!("cannot write {}", file.display());
        match self {
            Self::Registry { .. } => {
                let out = std::fs::File::create(file).map_err(Error::io(ctx()))?;
                // Nobody follows this download; its progress goes nowhere.
                self.blob_into(desc, out, &crate::stream::Growing::default(), true)
                    .await?;
            }
            Self::Layout { dir, .. } => {
                let p = Self::blob_path(dir, &desc.digest)?;
                tokio::fs::copy(&p, file)
                    .await
                    .map_err(Error::io(format!("cannot copy {}", p.display())))?;
            }
        }
        Ok(())
    }

    /// Downloads a registry blob into `file` (empty, opened for writing), publishing to `growing`
    /// each megabyte or so as it lands so that a reader can follow, ending `growing` once the
    /// last byte is in, then syncing the file when `sync` (a file that is kept; an unlinked
    /// scratch file is not). The stream is checked against the blob's digest as it ends (a
    /// mismatch is an error, reported to `growing` by the caller).
    pub(crate) async fn blob_into(
        &self,
        desc: &OciDescriptor,
        file: std::fs::File,
        growing: &crate::stream::Growing,
        sync: bool,
    ) -> Result<(), Error> {
        use futures_util::StreamExt;
        let Self::Registry {
            client, reference, ..
        } = self
        else {
            return Err(Error::Registry(
                "an image layout's blobs are read in place, not downloaded".into(),
            ));
        };
        // Only the request is retried: once bytes flow, a broken stream fails the pull (the
        // reader following `growing` has seen them).
        let mut stream = retrying("blob", || client.pull_blob_stream(reference, desc))
            .await
            .map_err(registry_err)?;
        const STEP: usize = 1 << 20;
        let mut file = Some(file);
        // The stream's buffers are kept as they come and written out together, a megabyte or
        // more at a time, by one vectored write on a blocking thread: no copy in between.
        async fn write_out<B: AsRef<[u8]> + Send + 'static>(
            file: &mut Option<std::fs::File>,
            parts: Vec<B>,
        ) -> Result<(), Error> {
            let mut f = file.take().expect("the file is back after each write");
            let (f, r) = tokio::task::spawn_blocking(move || {
                let r = write_all_vectored(&mut f, &parts);
                (f, r)
            })
            .await
            .map_err(|e| Error::Registry(format!("blob write task failed: {e}")))?;
            *file = Some(f);
            r.map_err(Error::io("cannot write a downloaded blob"))
        }
        let mut parts = Vec::new();
        let mut pending = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                // The stream checks the blob's digest as it ends.
                use oci_client::errors::DigestError;
                match e.get_ref().and_then(|i| i.downcast_ref::<DigestError>()) {
                    Some(DigestError::VerificationError { expected, actual }) => Error::Digest {
                        what: "blob",
                        expected: expected.clone(),
                        actual: actual.clone(),
                    },
                    _ => Error::Registry(format!("blob {}: {}", desc.digest, with_causes(&e))),
                }
            })?;
            pending += chunk.len() as u64;
            parts.push(chunk);
            if pending >= STEP as u64 {
                write_out(&mut file, std::mem::take(&mut parts)).await?;
                growing.advance(pending);
                pending = 0;
            }
        }
        if pending > 0 {
            write_out(&mut file, parts).await?;
            growing.advance(pending);
        }
        growing.end(Ok(()));
        let f = file.take().expect("the file is back after each write");
        if !sync {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || f.sync_all())
            .await
            .map_err(|e| Error::Registry(format!("blob sync task failed: {e}")))?
            .map_err(Error::io("cannot sync a downloaded blob"))
    }

    /// The manifest at `tag` of the same repository (cosign's `sha256-<hex>.sig`), or `None`
    /// when the tag does not exist. Layouts have none.
    pub async fn tag_manifest(&self, tag: &str) -> Result<Option<Vec<u8>>, Error> {
        let Self::Registry {
            client,
            reference,
            auth,
            ..
        } = self
        else {
            return Ok(None);
        };
        let r = Reference::with_tag(
            reference.registry().to_string(),
            reference.repository().to_string(),
            tag.to_string(),
        );
        match retrying("signature manifest", || {
            client.pull_manifest_raw(&r, auth, &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE])
        })
        .await
        {
            Ok((bytes, _)) => {
                if bytes.len() > MAX_JSON {
                    return Err(Error::Limit(format!(
                        "manifest {tag} is over {MAX_JSON} bytes"
                    )));
                }
                Ok(Some(bytes.to_vec()))
            }
            Err(OciDistributionError::ImageManifestNotFoundError(_)) => Ok(None),
            Err(OciDistributionError::RegistryError { envelope, .. })
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NotFound
                    )
                }) =>
            {
                Ok(None)
            }
            Err(e) => Err(registry_err(e)),
        }
    }

    /// Simple-signing signatures from the registry's signature extension API
    /// (`GET /extensions/v2/<repo>/signatures/<digest>`); none when the registry lacks it.
    pub async fn extension_signatures(&self, digest_str: &str) -> Result<Vec<Vec<u8>>, Error> {
        let Self::Registry {
            reference,
            plain_http,
            proxy,
            ..
        } = self
        else {
            return Ok(Vec::new());
        };
        let scheme = if *plain_http { "http" } else { "https" };
        let url = format!(
            "{scheme}://{}/extensions/v2/{}/signatures/{digest_str}",
            reference.resolve_registry(),
            reference.repository()
        );
        // Its own client, made for this one request (most pulls never make it), with the
        // registry client's proxy and timeouts.
        let mut http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT);
        if let Some(proxy) = proxy {
            http = http.proxy(reqwest::Proxy::all(proxy).map_err(|e| {
                Error::Registry(format!("the proxy {proxy:?} is not a valid URL: {e}"))
            })?);
        }
        let http = http
            .build()
            .map_err(|e| Error::Registry(format!("cannot make an HTTP client: {e}")))?;
        let resp = match http.get(&url).send().await {
            Ok(r) => r,
            Err(e) => return Err(Error::Registry(format!("{url}: {}", with_causes(&e)))),
        };
        if !resp.status().is_success() {
            return Ok(Vec::new());
        }
        #[derive(Deserialize)]
        struct Sigs {
            signatures: Vec<Sig>,
        }
        #[derive(Deserialize)]
        struct Sig {
            #[serde(default)]
            r#type: String,
            content: String,
        }
        let body: Sigs = resp
            .json()
            .await
            .map_err(|e| Error::Registry(format!("{url}: {e}")))?;
        Ok(body
            .signatures
            .into_iter()
            .filter(|s| s.r#type.is_empty() || s.r#type == "atomic")
            .filter_map(|s| STANDARD.decode(s.content).ok())
            .collect())
    }

    /// The local path of a blob when the source is a layout (no copy needed).
    pub fn local_blob(&self, digest_str: &str) -> Option<PathBuf> {
        match self {
            Self::Layout { dir, .. } => Self::blob_path(dir, digest_str).ok(),
            Self::Registry { .. } => None,
        }
    }
}

/// Writes all of `parts` to `file` with vectored writes.
fn write_all_vectored<B: AsRef<[u8]>>(
    file: &mut std::fs::File,
    parts: &[B],
) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p.as_ref())).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_json_picks_the_most_specific_entry() {
        let user = STANDARD.encode("u:p");
        let repo = STANDARD.encode("ru:rp");
        let a = AuthFile::parse(
            format!(
                r#"{{"auths": {{"https://reg.example:5000/v1/": {{"auth": "{user}"}},
                "reg.example:5000/team/app": {{"auth": "{repo}"}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let r: Reference = "reg.example:5000/team/app:v1".parse().unwrap();
        assert!(matches!(a.auth_for(&r).unwrap(), RegistryAuth::Basic(u, _) if u == "ru"));
        let r: Reference = "reg.example:5000/other:v1".parse().unwrap();
        assert!(matches!(a.auth_for(&r).unwrap(), RegistryAuth::Basic(u, _) if u == "u"));
        let r: Reference = "elsewhere.example/x:v1".parse().unwrap();
        assert!(matches!(a.auth_for(&r).unwrap(), RegistryAuth::Anonymous));
        assert!(!format!("{a:?}").contains(&user));
        let t = AuthFile::parse(br#"{"auths": {"reg.example:5000": {"registrytoken": "tok"}}}"#)
            .unwrap();
        let r: Reference = "reg.example:5000/x:v1".parse().unwrap();
        assert!(matches!(t.auth_for(&r).unwrap(), RegistryAuth::Bearer(b) if b == "tok"));
    }
}
