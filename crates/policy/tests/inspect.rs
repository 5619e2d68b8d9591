//! `coffer_image::inspect`, which [`coffer_policy::RegistryResolver`] calls: the digest of the
//! manifest a reference names (an index's when it names one) and the platform's image config,
//! with no layer fetched (the layer blob here does not even exist).

use std::path::Path;

use coffer_image::{pull::Platform, source::SourceOptions, ImageRef};
use serde_json::json;
use sha2::{Digest, Sha256};

fn blob(dir: &Path, bytes: &[u8]) -> String {
    let d = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
    d
}

/// A layout with tag `plain` (an image manifest) and tag `multi` (an index naming it for
/// linux/amd64); returns (manifest digest, index digest).
fn layout(dir: &Path) -> (String, String) {
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/entry"], "Env": ["A=1"], "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "1".repeat(64))]}}))
    .unwrap();
    let config_digest = blob(dir, &config);
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": format!("sha256:{}", "2".repeat(64)), "size": 1}]}))
    .unwrap();
    let md = blob(dir, &manifest);
    let index = serde_json::to_vec(&json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                       "size": manifest.len(), "platform": {"os": "linux", "architecture": "amd64"}}]}))
    .unwrap();
    let id = blob(dir, &index);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
             "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "plain"}},
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": id,
             "size": index.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
        .unwrap(),
    )
    .unwrap();
    (md, id)
}

#[tokio::test]
async fn inspect_reads_the_digest_and_config_without_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (manifest, index) = layout(dir.path());
    for (tag, want) in [("plain", &manifest), ("multi", &index)] {
        let image = ImageRef::parse(&format!("oci:{}:{tag}", dir.path().display())).unwrap();
        let (digest, config) =
            coffer_image::inspect(&image, &SourceOptions::default(), &Platform::default())
                .await
                .unwrap();
        assert_eq!(&digest, want, "{tag}");
        assert_eq!(config["Entrypoint"], json!(["/entry"]));
        assert_eq!(config["User"], json!("1000"));
    }
    // Another platform is not in the index.
    let image = ImageRef::parse(&format!("oci:{}:multi", dir.path().display())).unwrap();
    let arm: Platform = "linux/arm64".parse().unwrap();
    assert!(
        coffer_image::inspect(&image, &SourceOptions::default(), &arm)
            .await
            .is_err()
    );
}
