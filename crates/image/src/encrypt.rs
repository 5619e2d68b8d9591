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
