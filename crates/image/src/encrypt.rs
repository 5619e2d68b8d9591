//! `coffer image encrypt`: copy an image, encrypting every layer with ocicrypt
//! (AES-256-CTR + HMAC-SHA256), its key wrapped for JWE recipients and/or a KBS-held
//! key-encryption key. The config (and so the `diff_id`s) is unchanged; encrypted layers get the
//! `+encrypted` media type and the key annotations.

use std::{fs, io::BufReader, path::Path};

use oci_client::{
    client::ClientConfig, manifest::OciImageManifest, secrets::RegistryAuth, Client, Reference,
    RegistryOperation,
};
use serde_json::{json, Value};

use crate::{
    crypt::{encrypt_layer, WrapWith},
    digest,
    pull::Platform,
    source::{Source, SourceOptions},
    Error, ImageRef,
};

/// Where an image is written.
pub(crate) enum Sink {
    Registry {
        client: Client,
        reference: Reference,
        auth: RegistryAuth,
    },
    Layout {
        dir: std::path::PathBuf,
        tag: Option<String>,
    },
}

impl Sink {
    pub(crate) async fn new(image: &ImageRef, opts: &SourceOptions) -> Result<Self, Error> {
        Ok(match image {
            ImageRef::Docker(reference) => {
                let client = Client::new(ClientConfig {
                    protocol: if opts.plain_http {
                        oci_client::client::ClientProtocol::Http
                    } else {
                        oci_client::client::ClientProtocol::Https
                    },
                    ..Default::default()
                });
                let auth = opts.auth.auth_for(reference)?;
                client
                    .auth(reference, &auth, RegistryOperation::Push)
                    .await
                    .map_err(|e| Error::Registry(e.to_string()))?;
                Self::Registry {
                    client,
                    reference: reference.clone(),
                    auth,
                }
            }
            ImageRef::Layout { dir, name } => {
                fs::create_dir_all(dir.join("blobs/sha256"))
                    .map_err(Error::io(format!("cannot create {}", dir.display())))?;
                let layout = dir.join("oci-layout");
                if !layout.exists() {
                    write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
                }
                Self::Layout {
                    dir: dir.clone(),
                    tag: name.clone(),
                }
            }
        })
    }

    pub(crate) async fn put_blob(&self, bytes: Vec<u8>, digest_str: &str) -> Result<(), Error> {
        match self {
            Self::Registry {
                client,
                reference,
                auth,
            } => {
                client
                    .store_auth_if_needed(reference.resolve_registry(), auth)
                    .await;
                client
                    .push_blob(reference, bytes, digest_str)
                    .await
                    .map_err(|e| Error::Registry(e.to_string()))?;
            }
            Self::Layout { dir, .. } => {
                let p = dir
                    .join("blobs/sha256")
                    .join(digest::sha256_hex(digest_str)?);
                write_atomic(&p, &bytes)?;
            }
        }
        Ok(())
    }

    pub(crate) async fn put_manifest(&self, bytes: Vec<u8>, media_type: &str) -> Result<(), Error> {
        let d = digest::of(&bytes);
        match self {
            Self::Registry {
                client, reference, ..
            } => {
                let ct = http::HeaderValue::from_str(media_type)
                    .map_err(|_| Error::Manifest(format!("media type {media_type:?}")))?;
                client
                    .push_manifest_raw(reference, bytes, ct)
                    .await
                    .map_err(|e| Error::Registry(e.to_string()))?;
            }
            Self::Layout { dir, tag } => {
                let size = bytes.len();
                put_layout_blob(dir, &bytes, &d)?;
                let index_path = dir.join("index.json");
                let mut index: Value = match fs::read(&index_path) {
                    Ok(b) => serde_json::from_slice(&b)
                        .map_err(|e| Error::Manifest(format!("{}: {e}", index_path.display())))?,
                    Err(_) => json!({"schemaVersion": 2, "manifests": []}),
                };
                let mut desc = json!({"mediaType": media_type, "digest": d, "size": size});
                if let Some(t) = tag {
                    desc["annotations"] = json!({"org.opencontainers.image.ref.name": t});
                }
                let list = index["manifests"]
                    .as_array_mut()
                    .ok_or_else(|| Error::Manifest("index.json has no manifests list".into()))?;
                list.retain(|m| {
                    tag.is_none()
                        || m["annotations"]["org.opencontainers.image.ref.name"].as_str()
                            != tag.as_deref()
                });
                list.push(desc);
                write_atomic(
                    &index_path,
                    &serde_json::to_vec(&index).map_err(|e| Error::Manifest(e.to_string()))?,
                )?;
            }
        }
        Ok(())
    }
}

fn put_layout_blob(dir: &Path, bytes: &[u8], d: &str) -> Result<(), Error> {
    write_atomic(
        &dir.join("blobs/sha256").join(digest::sha256_hex(d)?),
        bytes,
    )
}

/// Writes `path` durably (synced temporary file renamed into place), mode 0644.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    coffer_fsutil::write_atomic(path, bytes, 0o644)
        .map_err(Error::io(format!("cannot write {}", path.display())))
}

/// Copies `src` to `dst`, encrypting every layer not yet encrypted. Returns the new manifest's
/// digest.
///
/// The source and destination may be registries (`docker://…`) or OCI layouts (`oci:DIR:TAG`);
/// the default [`SourceOptions`] and [`Platform`] (`linux/amd64`) fit most uses:
///
/// ```
/// # use std::path::Path;
/// # /// Writes an OCI image layout tagged `v1` at `dir`: one plain tar layer holding
/// # /// `etc/greeting`. Returns the layer's digest.
/// # fn write_layout(dir: &Path) -> Result<String, Box<dyn std::error::Error>> {
/// #     use sha2::{Digest, Sha256};
/// #     let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
/// #     std::fs::create_dir_all(dir.join("blobs/sha256"))?;
/// #     let blob = |b: &[u8]| -> std::io::Result<String> {
/// #         let d = digest(b);
/// #         std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b)?;
/// #         Ok(d)
/// #     };
/// #     let mut tar = tar::Builder::new(Vec::new());
/// #     let mut h = tar::Header::new_gnu();
/// #     h.set_entry_type(tar::EntryType::Directory);
/// #     h.set_mode(0o755);
/// #     h.set_size(0);
/// #     tar.append_data(&mut h, "etc", &[][..])?;
/// #     let mut h = tar::Header::new_gnu();
/// #     h.set_entry_type(tar::EntryType::Regular);
/// #     h.set_mode(0o644);
/// #     h.set_size(6);
/// #     tar.append_data(&mut h, "etc/greeting", &b"hello\n"[..])?;
/// #     let layer = tar.into_inner()?;
/// #     let config = serde_json::to_vec(&serde_json::json!({
/// #         "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
/// #         "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]}}))?;
/// #     let layer_digest = blob(&layer)?;
/// #     let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
/// #         "mediaType": "application/vnd.oci.image.manifest.v1+json",
/// #         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
/// #                    "digest": blob(&config)?, "size": config.len()},
/// #         "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
/// #                     "digest": layer_digest, "size": layer.len()}]}))?;
/// #     let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
/// #         "mediaType": "application/vnd.oci.image.manifest.v1+json",
/// #         "digest": blob(&manifest)?, "size": manifest.len(),
/// #         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
/// #     std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
/// #     std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
/// #     Ok(layer_digest)
/// # }
/// use std::{collections::BTreeMap, sync::Arc};
///
/// use coffer_image::{
///     crypt::{Keyring, WrapWith},
///     encrypt::encrypt_image,
///     pull, Error, ImageRef, PullOptions,
/// };
/// use zeroize::Zeroizing;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// write_layout(&dir.path().join("plain"))?;
/// let plain = ImageRef::parse(&format!("oci:{}:v1", dir.path().join("plain").display()))?;
/// let encrypted = ImageRef::parse(&format!("oci:{}:v1", dir.path().join("enc").display()))?;
///
/// // The layer key is wrapped with a key-encryption key that a KBS will hold under `kid`.
/// let kid = "kbs:///default/image-key/app";
/// let kek = [0x42u8; 32];
/// let wrap = WrapWith { recipients: &[], kbs: Some((kid, &kek)) };
/// encrypt_image(&plain, &encrypted, &Default::default(), &Default::default(), &wrap).await?;
///
/// // Without the key the image cannot be pulled.
/// let refused = pull(&encrypted, &dir.path().join("r1"), &PullOptions::default()).await;
/// assert!(matches!(refused, Err(Error::Decrypt(_))));
///
/// // With it (in a guest, fetched from the KBS after attestation) the layer decrypts.
/// let keys = Keyring {
///     kbs_keks: BTreeMap::from([(kid.to_string(), Zeroizing::new(kek.to_vec()))]),
///     ..Keyring::default()
/// };
/// let opts = PullOptions { keys: Arc::new(keys), ..PullOptions::default() };
/// let rootfs = dir.path().join("r2");
/// pull(&encrypted, &rootfs, &opts).await?;
/// assert_eq!(std::fs::read_to_string(rootfs.join("etc/greeting"))?, "hello\n");
/// # Ok(())
/// # }
/// ```
pub async fn encrypt_image(
    src: &ImageRef,
    dst: &ImageRef,
    opts: &SourceOptions,
    platform: &Platform,
    wrap: &WrapWith<'_>,
) -> Result<String, Error> {
    let source = Source::new(src, opts)?;
    let (fetched, manifest, _) = crate::pull::resolve(&source, platform).await?;
    let sink = Sink::new(dst, opts).await?;
    let config = source.small_blob(&manifest.config).await?;
    sink.put_blob(config, &manifest.config.digest).await?;

    let scratch = tempfile::tempdir().map_err(Error::io("cannot create a scratch directory"))?;
    let mut layers = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let plain = scratch.path().join(format!("plain-{i}"));
        source.blob_to_file(layer, &plain).await?;
        let bytes = fs::read(&plain).map_err(Error::io("cannot read a layer"))?;
        digest::verify("blob", &layer.digest, &bytes)?;
        if layer.media_type.ends_with("+encrypted") {
            sink.put_blob(bytes, &layer.digest).await?;
            layers.push(layer.clone());
            continue;
        }
        crate::pull::layer_compression(&layer.media_type)?;
        let mut out = Vec::with_capacity(bytes.len());
        let enc = encrypt_layer(BufReader::new(&bytes[..]), &mut out, &layer.digest, wrap)?;
        let d = digest::of(&out);
        let mut desc = layer.clone();
        desc.media_type = format!("{}+encrypted", layer.media_type);
        desc.size = out.len() as i64;
        desc.digest = d.clone();
        let mut annotations = layer.annotations.clone().unwrap_or_default();
        annotations.extend(enc.annotations);
        desc.annotations = Some(annotations);
        sink.put_blob(out, &d).await?;
        layers.push(desc);
    }
    // The new manifest keeps every field of the old one but the layers.
    let mut doc: Value = serde_json::from_slice(&fetched.bytes)
        .map_err(|e| Error::Manifest(format!("manifest: {e}")))?;
    doc["layers"] = serde_json::to_value(&layers).map_err(|e| Error::Manifest(e.to_string()))?;
    let media_type = doc["mediaType"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_string());
    let _: OciImageManifest = serde_json::from_value(doc.clone())
        .map_err(|e| Error::Manifest(format!("new manifest: {e}")))?;
    let bytes = serde_json::to_vec(&doc).map_err(|e| Error::Manifest(e.to_string()))?;
    let d = digest::of(&bytes);
    sink.put_manifest(bytes, &media_type).await?;
    Ok(d)
}
