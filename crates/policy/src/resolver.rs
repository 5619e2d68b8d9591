//! Where image digests and configs come from: a registry ([`RegistryResolver`]) or a file
//! prepared beforehand ([`OfflineImages`]).

use std::{collections::BTreeMap, future::Future, pin::Pin};

use serde::Deserialize;
use serde_json::Value;

use crate::PolicyGenError;

/// What the generator needs of an image.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedImage {
    /// The digest of the manifest the reference names (an image index's when it names one),
    /// `sha256:<hex>`: what the policy pins and the agent pulls.
    pub digest: String,
    /// The image config's `config` section: `Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`.
    pub config: Value,
}

/// The future [`ImageResolver::resolve`] returns.
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ResolvedImage, PolicyGenError>> + Send + 'a>>;

/// Resolves image references to a pinned digest and the image's config.
pub trait ImageResolver: Send + Sync {
    /// Resolves `image` (`docker://` and the reference as the pod spec writes it).
    fn resolve<'a>(&'a self, image: &'a str) -> ResolveFuture<'a>;
}

/// Checks a digest's form (`sha256:` and 64 lower-case hex digits, or sha384/sha512).
pub(crate) fn check_digest(digest: &str) -> Result<(), String> {
    let ok = match digest.split_once(':') {
        Some(("sha256", h)) => h.len() == 64,
        Some(("sha384", h)) => h.len() == 96,
        Some(("sha512", h)) => h.len() == 128,
        _ => false,
    } && digest.split_once(':').is_some_and(|(_, h)| {
        h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{digest:?} is not a digest (sha256:<64 lower-case hex digits>)"
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OfflineEntry {
    digest: String,
    #[serde(default)]
    config: Value,
}

/// Images from a file (`--offline-digests`), YAML or JSON:
/// `{"<image as the pod spec writes it>": {"digest": "sha256:…", "config": {"Entrypoint": …,
/// "Cmd": …, "Env": …, "WorkingDir": …, "User": …}}}`. An image is found by the text as
/// written, or else by the reference it normalizes to (`busybox` and
/// `docker.io/library/busybox:latest` are the same image).
#[derive(Clone, Debug, Default)]
pub struct OfflineImages {
    images: BTreeMap<String, ResolvedImage>,
}

fn normalized(image: &str) -> Option<String> {
    coffer_image::reference::docker_reference(image)
        .ok()
        .map(|r| r.whole())
}

impl OfflineImages {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, PolicyGenError> {
        let raw: BTreeMap<String, OfflineEntry> = serde_yaml_ng::from_str(text)
            .map_err(|e| PolicyGenError::Input(format!("offline digests: {e}")))?;
        let mut images = BTreeMap::new();
        for (image, e) in raw {
            check_digest(&e.digest)
                .map_err(|m| PolicyGenError::Input(format!("offline digests: {image}: {m}")))?;
            if !(e.config.is_object() || e.config.is_null()) {
                return Err(PolicyGenError::Input(format!(
                    "offline digests: {image}: config is not an object"
                )));
            }
            images.insert(
                image
                    .strip_prefix("docker://")
                    .unwrap_or(&image)
                    .to_string(),
                ResolvedImage {
                    digest: e.digest,
                    config: if e.config.is_null() {
                        Value::Object(Default::default())
                    } else {
                        e.config
                    },
                },
            );
        }
        Ok(Self { images })
    }

    /// Adds (or replaces) one image.
    pub fn insert(&mut self, image: &str, resolved: ResolvedImage) {
        self.images.insert(image.to_string(), resolved);
    }

    fn find(&self, image: &str) -> Option<&ResolvedImage> {
        if let Some(r) = self.images.get(image) {
            return Some(r);
        }
        let want = normalized(image)?;
        self.images
            .iter()
            .find(|(k, _)| normalized(k).as_deref() == Some(want.as_str()))
            .map(|(_, v)| v)
    }
}

impl ImageResolver for OfflineImages {
    fn resolve<'a>(&'a self, image: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            let written = image.strip_prefix("docker://").unwrap_or(image);
            self.find(written)
                .cloned()
                .ok_or_else(|| PolicyGenError::Image {
                    image: written.to_string(),
                    message: "not in the offline digests file".into(),
                })
        })
    }
}

/// Images from their registries, with the same options as `coffer image pull`: only the
/// manifest (or index) and the config are fetched, never a layer.
#[derive(Clone, Default)]
pub struct RegistryResolver {
    /// Registry access (plain HTTP, credentials, proxy).
    pub source: coffer_image::source::SourceOptions,
    /// The platform whose config is read from an image index.
    pub platform: coffer_image::pull::Platform,
}

impl ImageResolver for RegistryResolver {
    fn resolve<'a>(&'a self, image: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            let err = |message: String| PolicyGenError::Image {
                image: image.strip_prefix("docker://").unwrap_or(image).to_string(),
                message,
            };
            let reference = coffer_image::ImageRef::parse(image).map_err(|e| err(e.to_string()))?;
            let (digest, config) = coffer_image::inspect(&reference, &self.source, &self.platform)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok(ResolvedImage { digest, config })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn offline_images_resolve_by_text_or_reference() {
        let d = format!("sha256:{}", "a".repeat(64));
        let images = OfflineImages::parse(&format!(
            "busybox:1.36:\n  digest: {d}\n  config: {{Cmd: [sh]}}\n\"docker://127.0.0.1:5000/app:v1\":\n  digest: {d}\n"
        ))
        .unwrap();
        let r = images.resolve("docker://busybox:1.36").await.unwrap();
        assert_eq!(r.digest, d);
        assert_eq!(r.config["Cmd"][0], "sh");
        let r = images
            .resolve("docker://docker.io/library/busybox:1.36")
            .await
            .unwrap();
        assert_eq!(r.digest, d);
        let r = images
            .resolve("docker://127.0.0.1:5000/app:v1")
            .await
            .unwrap();
        assert!(r.config.is_object());
        assert!(images.resolve("docker://busybox:1.37").await.is_err());
        assert!(OfflineImages::parse("x:\n  digest: sha256:abc\n").is_err());
        assert!(OfflineImages::parse(&format!("x:\n  digest: {d}\n  extra: 1\n")).is_err());
    }
}
