//! A whole pull: resolve the manifest (picking the platform from an index), fetch and verify the
//! config, fetch the layers concurrently, and apply them in order into a temporary directory
//! that becomes the rootfs only when everything succeeded.

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use oci_client::manifest::{OciDescriptor, OciImageIndex, OciImageManifest};
use serde::Deserialize;
use serde_json::Value;

pub use crate::broker::{KeyBroker, KeyFuture};
use crate::{
    cache::BlobCache,
    crypt::{DecryptReader, Keyring, LayerKey},
    digest::{self, HashingReader, LimitedReader},
    source::{Fetched, Source, SourceOptions},
    stream::{self, ChunkReader, ChunkWriter, EndGuard, FollowReader, Growing},
    unpack::{LayerUnpacker, Limits, Totals},
    Error, ImageRef,
};

/// The platform to pick from an image index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `v8`, … (matched only when set).
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = Error;

    /// `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(Error::Unsupported(format!(
                "platform {s:?}; use OS/ARCH[/VARIANT], e.g. linux/amd64"
            ))),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Progress of a pull, reported as it happens (the CLI draws bars from it).
pub trait Progress: Send + Sync {
    /// The layers are known (digest and compressed size of each).
    fn layers(&self, _layers: &[(String, u64)]) {}
    /// A layer's blob is local (downloaded, or found in the cache).
    fn fetched(&self, _index: usize, _from_cache: bool) {}
    /// A layer has been applied.
    fn applied(&self, _index: usize) {}
}

/// How to pull.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// The signature policy; `None` accepts any image (the report says so).
    pub policy: Option<Arc<crate::signature::Policy>>,
    /// Where simple-signing signatures are looked up.
    pub registries_d: Arc<crate::signature::RegistriesD>,
    /// Keys for encrypted layers.
    pub keys: Arc<Keyring>,
    /// Where key-encryption keys named by layers come from.
    pub key_broker: Option<Arc<dyn KeyBroker>>,
    /// Registry access.
    pub source: SourceOptions,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// A blob cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Unpacking limits.
    pub limits: Limits,
    /// Layers fetched at once (0 means 3).
    pub concurrency: usize,
    /// Progress reports.
    pub progress: Option<Arc<dyn Progress>>,
    /// The gzip inflater; `None` is zlib-rs through flate2 (memory-safe Rust, which the pod VM's
    /// agent keeps: there the host controls the bytes it inflates).
    pub gzip: Option<Arc<dyn GzipInflater>>,
}

/// Decompresses gzip layers in place of zlib-rs (the host's `coffer image pull` plugs in ISA-L's
/// igzip, `coffer-isal`).
pub trait GzipInflater: Send + Sync {
    /// A reader of what the gzip stream `compressed` inflates to: every member in turn, each
    /// one's trailer (CRC-32, size) checked; a stream that ends inside a member is an error.
    fn inflate(&self, compressed: Box<dyn std::io::BufRead>) -> std::io::Result<Box<dyn Read>>;
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct PullReport {
    /// The digest of the image manifest applied.
    pub manifest_digest: String,
    /// The digest of the index it was picked from, when the reference named an index.
    pub index_digest: Option<String>,
    /// The image config's digest.
    pub config_digest: String,
    /// The image config (`config` section of the OCI image configuration: Env, Cmd, …).
    pub config: Value,
    /// Layers applied.
    pub layers: usize,
    /// Blobs found in the cache.
    pub cached_layers: usize,
    /// Entries and bytes unpacked.
    pub totals: Totals,
    /// What the signature policy decided (`None`: no policy was given).
    pub policy: Option<crate::signature::Decision>,
}

#[derive(Deserialize)]
struct ConfigDoc {
    rootfs: RootFs,
    #[serde(default)]
    config: Value,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// How a layer is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// The compression of a layer media type (after its `+encrypted` suffix, if any); foreign and
/// unknown types are refused.
pub fn layer_compression(media_type: &str) -> Result<Compression, Error> {
    match media_type.strip_suffix("+encrypted").unwrap_or(media_type) {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        other => Err(Error::Unsupported(format!("layer media type {other}"))),
    }
}

/// A top-level manifest document as parsed by [`parse_root_manifest`].
#[derive(Debug)]
pub enum RootManifest {
    /// An image manifest.
    Manifest(Box<OciImageManifest>),
    /// An image index; the digest of its image manifest for the platform asked for.
    Index(String),
}

/// Parses the manifest document a reference resolves to (`digest` names it in errors), exactly
/// as bytes from a registry or layout: an image index, from which the entry for `platform` is
/// picked, or an image manifest. Docker schema 1 is refused.
pub fn parse_root_manifest(
    bytes: &[u8],
    digest: &str,
    platform: &Platform,
) -> Result<RootManifest, Error> {
    let kind: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::Manifest(format!("manifest {digest} is not JSON: {e}")))?;
    if kind.get("manifests").is_some() {
        let index: OciImageIndex = serde_json::from_value(kind)
            .map_err(|e| Error::Manifest(format!("image index {digest}: {e}")))?;
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform.as_ref().is_some_and(|p| {
                    p.os.to_string() == platform.os
                        && p.architecture.to_string() == platform.architecture
                        && (platform.variant.is_none() || p.variant == platform.variant)
                })
            })
            .ok_or_else(|| Error::Platform(platform.to_string()))?;
        return Ok(RootManifest::Index(entry.digest.clone()));
    }
    if kind.get("fsLayers").is_some() {
        return Err(Error::Unsupported(
            "Docker image manifest schema 1; push the image again with a current tool".into(),
        ));
    }
    parse_manifest(bytes, digest).map(|m| RootManifest::Manifest(Box::new(m)))
}

/// The image manifest for `platform`, resolving an index; returns (manifest, index digest).
pub(crate) async fn resolve(
    source: &Source,
    platform: &Platform,
) -> Result<(Fetched, OciImageManifest, Option<String>), Error> {
    let root = source.root_manifest().await?;
    match parse_root_manifest(&root.bytes, &root.digest, platform)? {
        RootManifest::Index(entry) => {
            let fetched = source.manifest(&entry).await?;
            let manifest = parse_manifest(&fetched.bytes, &fetched.digest)?;
            Ok((fetched, manifest, Some(root.digest)))
        }
        RootManifest::Manifest(manifest) => Ok((root, *manifest, None)),
    }
}

/// Parses an image manifest (`digest` names it in errors).
pub fn parse_manifest(bytes: &[u8], digest: &str) -> Result<OciImageManifest, Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Manifest(format!("image manifest {digest}: {e}")))
}

/// Parses an image config (`bytes`) for `manifest` and checks them against each other before
/// any layer is fetched: rootfs type `layers`, one `diff_id` per layer, every layer's media type
/// supported and every digest a SHA-256 one. Returns the `diff_id`s and the config's `config`
/// section.
pub fn check_config(
    bytes: &[u8],
    manifest: &OciImageManifest,
) -> Result<(Vec<String>, Value), Error> {
    let config: ConfigDoc = serde_json::from_slice(bytes)
        .map_err(|e| Error::Manifest(format!("image config {}: {e}", manifest.config.digest)))?;
    if config.rootfs.kind != "layers" {
        return Err(Error::Manifest(format!(
            "image config rootfs type is {:?}, not \"layers\"",
            config.rootfs.kind
        )));
    }
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(Error::Manifest(format!(
            "the manifest has {} layers but the config lists {} diff_ids",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        layer_compression(&layer.media_type)?;
        digest::sha256_hex(&layer.digest)?;
        digest::sha256_hex(diff_id)?;
    }
    Ok((config.rootfs.diff_ids, config.config))
}

/// Resolves `image` and reads its config without fetching any layer: returns the digest of the
/// manifest the reference names (the image index's when it names one, which pins every
/// platform's manifest by digest; else the image manifest's) and the image config's `config`
/// section (Entrypoint, Cmd, Env, WorkingDir, User). The manifest for `platform` is resolved and
/// its config fetched, verified against its digest and checked against the manifest as a pull
/// does.
pub async fn inspect(
    image: &ImageRef,
    source: &SourceOptions,
    platform: &Platform,
) -> Result<(String, Value), Error> {
    let source = Source::new(image, source)?;
    let (fetched, manifest, index_digest) = resolve(&source, platform).await?;
    let config_bytes = source.small_blob(&manifest.config).await?;
    let (_, config) = check_config(&config_bytes, &manifest)?;
    Ok((index_digest.unwrap_or(fetched.digest), config))
}

/// A download of one layer blob into a file that its layer's reader follows.
struct Download {
    /// The file, opened for reading behind the writer.
    reader: fs::File,
    growing: Arc<Growing>,
    /// Ends with the cache's temporary file to commit once the layer verified (`None` without
    /// a cache: the scratch file is unlinked and vanishes with its handles).
    task: tokio::task::JoinHandle<Result<Option<tempfile::TempPath>, Error>>,
}

/// Where a layer's blob comes from.
enum LayerBlob {
    /// A whole local file (an image layout's blob, or the cache's), hashed as it is read.
    File { path: PathBuf, from_cache: bool },
    /// A registry download under way; its stream is checked against the digest as it ends.
    Download(Download),
}

/// Starts the download of a layer blob (or finds it locally).
fn start_layer(
    source: &Arc<Source>,
    cache: Option<&BlobCache>,
    scratch: &Path,
    permits: &Arc<tokio::sync::Semaphore>,
    progress: Option<Arc<dyn Progress>>,
    index: usize,
    desc: &OciDescriptor,
) -> Result<LayerBlob, Error> {
    if let Some(path) = source.local_blob(&desc.digest) {
        return Ok(LayerBlob::File {
            path,
            from_cache: false,
        });
    }
    let (writer, reader, commit) = match cache {
        Some(cache) if cache.has(&desc.digest) => {
            return Ok(LayerBlob::File {
                path: cache.path(&desc.digest)?,
                from_cache: true,
            })
        }
        Some(cache) => {
            let tmp = cache.temp_file()?;
            let writer = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&tmp)
                .map_err(Error::io("cannot open a file in the cache"))?;
            let reader =
                fs::File::open(&tmp).map_err(Error::io("cannot open a file in the cache"))?;
            (writer, reader, Some(tmp))
        }
        None => {
            let writer = tempfile::tempfile_in(scratch)
                .map_err(Error::io("cannot create a scratch file for a layer"))?;
            let reader = writer
                .try_clone()
                .map_err(Error::io("cannot open a scratch file for a layer"))?;
            (writer, reader, None)
        }
    };
    // A cache's blob is synced before it is committed; an unlinked scratch file needs no sync.
    let sync = commit.is_some();
    let growing = Arc::new(Growing::default());
    let (source, permits, desc, g) = (
        source.clone(),
        permits.clone(),
        desc.clone(),
        growing.clone(),
    );
    let task = tokio::spawn(async move {
        let guard = EndGuard(g);
        let _permit = permits.acquire_owned().await;
        let r = source.blob_into(&desc, writer, &guard.0, sync).await;
        if let Err(e) = &r {
            guard.0.end(Err(e.to_string()));
        }
        r?;
        if let Some(p) = &progress {
            p.fetched(index, false);
        }
        Ok(commit)
    });
    Ok(LayerBlob::Download(Download {
        reader,
        growing,
        task,
    }))
}

/// A layer blob's bytes as the reading side gets them.
struct BlobBytes {
    src: Box<dyn Read + Send>,
    /// Hash them (a local file) or only count them (a download checks its own digest).
    hash: bool,
}

/// What the reading side of a layer found.
struct ReadDone {
    /// `sha256:` of the blob (`None` when its download checked it).
    blob: Option<String>,
    size: u64,
}

/// Copies `from` into `to` until `from` ends or `to` is gone (the next stage stopped, with its
/// own error).
fn pump(from: &mut impl Read, to: &mut ChunkWriter) -> std::io::Result<()> {
    loop {
        match to.fill_from(from) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    match to.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
        _ => Ok(()),
    }
}

/// The reading side of a layer: the blob (hashed unless its download checks it), decrypted
/// (its HMAC checked) when a key is given, into `to`. Whatever the next stages leave unread is
/// read to its end all the same, for the blob's digest and, in an encrypted layer, the HMAC's
/// verdict (garbage there usually means tampering).
fn read_layer(
    blob: BlobBytes,
    key: Option<&LayerKey>,
    digest: &str,
    mut to: ChunkWriter,
) -> Result<ReadDone, Error> {
    let read_err = |e: std::io::Error| {
        if e.to_string().contains("HMAC") {
            Error::Decrypt(format!("layer {digest}: {e}"))
        } else {
            Error::io(format!("cannot read layer {digest}"))(e)
        }
    };
    // Unbuffered: the decrypting reader and the chunks read whole blocks of it at a time.
    let src = blob.src;
    let stored = if blob.hash {
        HashingReader::new(src)
    } else {
        HashingReader::counting(src)
    };
    match key {
        None => {
            let mut stored = stored;
            pump(&mut stored, &mut to).map_err(read_err)?;
            drop(to);
            let (blob, size, _) = stored.finish_into_inner().map_err(read_err)?;
            Ok(ReadDone { blob, size })
        }
        // The plaintext's digest that ocicrypt records beside the key is not computed: the
        // HMAC authenticates the ciphertext under the key from the same JWE, so the plaintext
        // is fixed once the HMAC holds, and the `diff_id` check covers what it inflates to
        // (docs/images.md).
        Some(k) => {
            let mut decrypting = DecryptReader::new(stored, k)?;
            pump(&mut decrypting, &mut to).map_err(read_err)?;
            drop(to);
            // What the next stages left unread still goes through the HMAC.
            std::io::copy(&mut decrypting, &mut std::io::sink()).map_err(read_err)?;
            let (blob, size, _) = decrypting
                .into_inner()
                .finish_into_inner()
                .map_err(read_err)?;
            Ok(ReadDone { blob, size })
        }
    }
}

/// The inflating side of a layer (a thread of its own for compressed layers): `from` inflated
/// into `to`.
fn inflate_layer(
    from: ChunkReader,
    compression: Compression,
    gzip: Option<&dyn GzipInflater>,
    digest: &str,
    mut to: ChunkWriter,
) -> Result<(), Error> {
    let err = |e: std::io::Error| Error::Unpack {
        path: digest.to_string(),
        reason: format!("cannot decompress: {e}"),
    };
    let mut decoder: Box<dyn Read> = match compression {
        Compression::None => Box::new(from),
        // The decoders read the chunks in place (`BufRead`), without a buffer of their own.
        Compression::Gzip => match gzip {
            Some(g) => g.inflate(Box::new(from)).map_err(err)?,
            None => Box::new(flate2::bufread::MultiGzDecoder::new(from)),
        },
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(from).map_err(err)?),
    };
    pump(&mut decoder, &mut to).map_err(err)
}

/// The unpacking side of a layer: the tar stream's `diff_id`, unpacked onto `root`.
fn unpack_layer(
    tar: ChunkReader,
    desc: &OciDescriptor,
    diff_id: &str,
    root: &Path,
    limits: Limits,
    totals: &mut Totals,
) -> Result<(), Error> {
    // The whole layer may expand to the byte limit plus tar's per-entry overhead.
    let expand_limit = limits
        .max_bytes
        .saturating_add(limits.max_entries.saturating_mul(1536));
    let mut tar = HashingReader::new(LimitedReader::new(tar, expand_limit));
    LayerUnpacker::new(root, limits, totals).apply(&mut tar)?;
    let (actual, _) = tar.finish().map_err(|e| Error::Unpack {
        path: desc.digest.clone(),
        reason: format!("cannot decompress: {e}"),
    })?;
    if actual != diff_id {
        return Err(Error::Digest {
            what: "layer diff_id",
            expected: diff_id.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Applies one layer blob: digest of the blob, decryption, decompression, `diff_id`, unpack —
/// one pass, on three threads joined by bounded channels: reading and decrypting, inflating
/// (compressed layers), hashing and unpacking.
#[allow(clippy::too_many_arguments)]
fn apply_layer(
    blob: BlobBytes,
    desc: &OciDescriptor,
    key: Option<&LayerKey>,
    gzip: Option<&dyn GzipInflater>,
    diff_id: &str,
    root: &Path,
    limits: Limits,
    totals: &mut Totals,
) -> Result<(), Error> {
    let compression = layer_compression(&desc.media_type)?;
    let (to, from) = stream::chunks(4);
    let digest = desc.digest.as_str();
    let (read, inflated, unpacked) = std::thread::scope(|s| {
        let reading = std::thread::Builder::new()
            .name("coffer-layer-read".into())
            .spawn_scoped(s, || read_layer(blob, key, digest, to))
            .map_err(Error::io("cannot start a layer thread"))?;
        let (inflating, tar) = if compression == Compression::None {
            (None, from)
        } else {
            let (to_tar, tar) = stream::chunks(4);
            let t = std::thread::Builder::new()
                .name("coffer-layer-gunzip".into())
                .spawn_scoped(s, move || {
                    inflate_layer(from, compression, gzip, digest, to_tar)
                })
                .map_err(Error::io("cannot start a layer thread"))?;
            (Some(t), tar)
        };
        let unpacked = unpack_layer(tar, desc, diff_id, root, limits, totals);
        let panicked = |_| Error::Unpack {
            path: digest.to_string(),
            reason: "a layer thread panicked".into(),
        };
        let inflated = match inflating {
            Some(t) => t.join().map_err(panicked)?,
            None => Ok(()),
        };
        let read = reading.join().map_err(panicked)?;
        Ok::<_, Error>((read, inflated, unpacked))
    })?;
    // A reading failure (download, HMAC: tampering) explains whatever the later stages made of
    // the stream, and a decompression failure what the unpacker made of it: the first comes
    // first.
    let read = read?;
    inflated?;
    unpacked?;
    if let Some(actual) = read.blob {
        if actual != desc.digest {
            return Err(Error::Digest {
                what: "blob",
                expected: desc.digest.clone(),
                actual,
            });
        }
    }
    if desc.size >= 0 && read.size != desc.size as u64 {
        return Err(Error::Manifest(format!(
            "blob {} is {} bytes, the manifest says {}",
            desc.digest, read.size, desc.size
        )));
    }
    Ok(())
}

/// Aborts the spawned downloads when a pull ends early.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Waits for the rest of an applied layer's download task (the sync of its file) and moves the
/// blob into the cache, when there is one.
async fn commit_download(
    cache: Option<&BlobCache>,
    digest: &str,
    task: tokio::task::JoinHandle<Result<Option<tempfile::TempPath>, Error>>,
) -> Result<(), Error> {
    let commit = task
        .await
        .map_err(|e| Error::Registry(format!("layer download task failed: {e}")))??;
    if let (Some(c), Some(tmp)) = (cache, commit) {
        c.commit(tmp, digest)?;
    }
    Ok(())
}

/// Checks the target: absent, or an empty directory.
fn check_target(rootfs: &Path) -> Result<(), Error> {
    let err = |reason: &str| Error::Rootfs {
        path: rootfs.display().to_string(),
        reason: reason.to_string(),
    };
    match fs::symlink_metadata(rootfs) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => {
            let mut entries =
                fs::read_dir(rootfs).map_err(|e| err(&format!("cannot read: {e}")))?;
            if entries.next().is_some() {
                Err(err("exists and is not empty; give a new directory"))
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(err("exists and is not a directory")),
    }
}

/// Pulls `image` into the new directory `rootfs` (which must not exist or be empty).
pub async fn pull(
    image: &ImageRef,
    rootfs: &Path,
    opts: &PullOptions,
) -> Result<PullReport, Error> {
    check_target(rootfs)?;
    let parent = match rootfs.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)
        .map_err(Error::io(format!("cannot create {}", parent.display())))?;
    // Everything lands here first; dropped (removed) unless the pull succeeds.
    let work = tempfile::Builder::new()
        .prefix(".coffer-pull-")
        .tempdir_in(&parent)
        .map_err(Error::io(format!(
            "cannot create a directory in {}",
            parent.display()
        )))?;
    let staged = work.path().join("rootfs");
    let scratch = work.path().join("blobs");
    fs::create_dir(&staged).map_err(Error::io("cannot create the staging rootfs"))?;
    fs::create_dir(&scratch).map_err(Error::io("cannot create the staging blob directory"))?;

    let source = Arc::new(Source::new(image, &opts.source)?);
    let (manifest_fetched, manifest, index_digest) = resolve(&source, &opts.platform).await?;
    tracing::info!(image = %image, manifest = %manifest_fetched.digest, "manifest resolved");

    // The policy decides on the top-level manifest digest (an index's, when the reference names
    // one: it binds the platform manifest by digest) before any blob is requested.
    let decision = match &opts.policy {
        Some(policy) => {
            let top = index_digest.as_deref().unwrap_or(&manifest_fetched.digest);
            let d = crate::signature::check(
                policy,
                &opts.registries_d,
                image,
                &source,
                top,
                opts.key_broker.as_deref(),
            )
            .await?;
            tracing::info!(image = %image, scope = %d.scope, satisfied = ?d.satisfied, "signature policy satisfied");
            Some(d)
        }
        None => None,
    };

    let config_bytes = source.small_blob(&manifest.config).await?;
    let (diff_ids, image_config) = check_config(&config_bytes, &manifest)?;
    // Keys for encrypted layers, before any layer is fetched: KBS-held key-encryption keys
    // named by the layers are fetched (after attestation) when a key broker is configured.
    let mut keks = opts.keys.kbs_keks.clone();
    for layer in manifest
        .layers
        .iter()
        .filter(|l| l.media_type.ends_with("+encrypted"))
    {
        if let Some(kid) = crate::crypt::kbs_kid(layer.annotations.as_ref())? {
            if let (false, Some(broker)) = (keks.contains_key(&kid), &opts.key_broker) {
                let kek = broker
                    .get(&kid)
                    .await
                    .map_err(|e| Error::Decrypt(format!("cannot get {kid} from the KBS: {e}")))?;
                keks.insert(kid, kek);
            }
        }
    }
    let mut layer_keys = Vec::new();
    for layer in &manifest.layers {
        layer_keys.push(if layer.media_type.ends_with("+encrypted") {
            Some(Arc::new(crate::crypt::layer_key_with(
                &layer.digest,
                layer.annotations.as_ref(),
                &opts.keys.private_keys,
                &keks,
            )?))
        } else {
            None
        });
    }
    drop(keks);

    if let Some(p) = &opts.progress {
        p.layers(
            &manifest
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size.max(0) as u64))
                .collect::<Vec<_>>(),
        );
    }

    let cache = opts.cache_dir.as_deref().map(BlobCache::open).transpose()?;
    let permits = Arc::new(tokio::sync::Semaphore::new(if opts.concurrency == 0 {
        3
    } else {
        opts.concurrency
    }));
    let mut downloads = AbortOnDrop(Vec::new());
    let mut blobs = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let blob = start_layer(
            &source,
            cache.as_ref(),
            &scratch,
            &permits,
            opts.progress.clone(),
            i,
            layer,
        )?;
        if let LayerBlob::Download(d) = &blob {
            downloads.0.push(d.task.abort_handle());
        }
        blobs.push(blob);
    }

    let mut totals = Totals::default();
    let mut cached_layers = 0;
    // Applied layers whose download task is still syncing the blob's file.
    let mut syncing = Vec::new();
    for (i, blob) in blobs.into_iter().enumerate() {
        let desc = manifest.layers[i].clone();
        let (bytes, from_cache, download) = match blob {
            LayerBlob::File { path, from_cache } => {
                let f = fs::File::open(&path)
                    .map_err(Error::io(format!("cannot open {}", path.display())))?;
                if let Some(p) = &opts.progress {
                    p.fetched(i, from_cache);
                }
                let src = Box::new(f);
                (BlobBytes { src, hash: true }, from_cache, None)
            }
            LayerBlob::Download(d) => (
                BlobBytes {
                    src: Box::new(FollowReader::new(d.reader, d.growing)),
                    hash: false,
                },
                false,
                Some(d.task),
            ),
        };
        cached_layers += usize::from(from_cache);
        let (root, limits, diff_id, key, gzip) = (
            staged.clone(),
            opts.limits,
            diff_ids[i].clone(),
            layer_keys[i].clone(),
            opts.gzip.clone(),
        );
        let (result, t) = tokio::task::spawn_blocking(move || {
            let mut t = totals;
            let r = apply_layer(
                bytes,
                &desc,
                key.as_deref(),
                gzip.as_deref(),
                &diff_id,
                &root,
                limits,
                &mut t,
            );
            (r, t)
        })
        .await
        .map_err(|e| Error::Unpack {
            path: manifest.layers[i].digest.clone(),
            reason: format!("unpack task failed: {e}"),
        })?;
        match (result, download) {
            // The layer applied, so its download ended well: the reader saw the stream's end,
            // which comes after the digest check. What is left of the task, syncing the blob's
            // file for the cache, goes on while the next layers apply.
            (Ok(()), Some(task)) => syncing.push((i, task)),
            (Ok(()), None) => {}
            // The layer was unpacked from a stream whose digest is only known at its end: a
            // download that fails its digest (or fails at all) explains the failed layer, so it
            // is awaited and its own error, when it has one, is the one reported.
            (Err(e), Some(task)) => {
                if let Ok(Err(download)) = task.await {
                    return Err(download);
                }
                return Err(e);
            }
            (Err(e), None) => {
                if from_cache {
                    if let (Some(c), Error::Digest { .. }) = (&cache, &e) {
                        c.remove(&manifest.layers[i].digest);
                    }
                }
                return Err(e);
            }
        }
        totals = t;
        // Downloads whose sync ended meanwhile go into the cache now, so that a later layer's
        // failure keeps them.
        let (done, pending): (Vec<_>, Vec<_>) = syncing
            .into_iter()
            .partition(|(_, task)| task.is_finished());
        syncing = pending;
        for (j, task) in done {
            commit_download(cache.as_ref(), &manifest.layers[j].digest, task).await?;
        }
        if let Some(p) = &opts.progress {
            p.applied(i);
        }
        tracing::debug!(layer = %manifest.layers[i].digest, "layer applied");
    }

    for (j, task) in syncing {
        commit_download(cache.as_ref(), &manifest.layers[j].digest, task).await?;
    }

    // Into place: an empty target directory is replaced.
    if rootfs.exists() {
        fs::remove_dir(rootfs)
            .map_err(Error::io(format!("cannot replace {}", rootfs.display())))?;
    }
    fs::rename(&staged, rootfs).map_err(Error::io(format!(
        "cannot move the rootfs to {}",
        rootfs.display()
    )))?;
    if let Ok(d) = fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(PullReport {
        manifest_digest: manifest_fetched.digest,
        index_digest,
        config_digest: manifest.config.digest.clone(),
        config: image_config,
        layers: manifest.layers.len(),
        cached_layers,
        totals,
        policy: decision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYER: &str = "sha256:0a63aec1ce927267c6bda844ec602d14c17209ad0a63aec1ce927267c6bda844";

    fn manifest(layers: usize) -> String {
        let layer = format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{LAYER}","size":1}}"#
        );
        format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{LAYER}","size":1}},"layers":[{}]}}"#,
            vec![layer; layers].join(",")
        )
    }

    #[test]
    fn root_manifests_indexes_pick_the_platform_and_schema_1_is_refused() {
        let linux = Platform::default();
        let m = manifest(1);
        assert!(matches!(
            parse_root_manifest(m.as_bytes(), "sha256:m", &linux),
            Ok(RootManifest::Manifest(x)) if x.layers.len() == 1
        ));
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:arm","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":1,"platform":{{"architecture":"{}","os":"linux"}}}}]}}"#,
            "ab".repeat(32),
            linux.architecture
        );
        match parse_root_manifest(index.as_bytes(), "sha256:i", &linux).unwrap() {
            RootManifest::Index(d) => assert_eq!(d, format!("sha256:{}", "ab".repeat(32))),
            other => panic!("{other:?}"),
        }
        let riscv: Platform = "linux/riscv64".parse().unwrap();
        assert!(matches!(
            parse_root_manifest(index.as_bytes(), "sha256:i", &riscv),
            Err(Error::Platform(_))
        ));
        assert!(matches!(
            parse_root_manifest(br#"{"fsLayers":[]}"#, "sha256:s", &linux),
            Err(Error::Unsupported(_))
        ));
        assert!(parse_root_manifest(b"[", "sha256:x", &linux).is_err());
    }

    #[test]
    fn configs_must_match_their_manifest() {
        let m = parse_manifest(manifest(2).as_bytes(), "sha256:m").unwrap();
        let config = |ids: &[&str]| {
            serde_json::json!({"rootfs": {"type": "layers", "diff_ids": ids}, "config": {"Cmd": ["sh"]}})
                .to_string()
        };
        let (ids, cfg) = check_config(config(&[LAYER, LAYER]).as_bytes(), &m).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(cfg["Cmd"][0], "sh");
        assert!(check_config(config(&[LAYER]).as_bytes(), &m).is_err());
        assert!(check_config(config(&[LAYER, "md5:00"]).as_bytes(), &m).is_err());
        assert!(check_config(br#"{"rootfs":{"type":"other","diff_ids":[]}}"#, &m).is_err());
    }
}
