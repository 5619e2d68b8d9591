//! Encrypted images whose keys the KBS releases only after attestation: a real coffer-kbs on
//! loopback (sample TEE), `coffer image encrypt --kbs-kek`, and `coffer image pull --kbs`.

use std::{fs, io::Write, path::Path, process::Command};

use coffer_kbs::{server, Config, Kbs};
use coffer_kbs_client::{generate_admin_key, http_client, AdminClient};
use serde_json::json;
use sha2::{Digest, Sha256};

fn coffer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A one-layer OCI layout tagged `v1` holding `secret/data`.
fn layout(dir: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let blob = |b: &[u8]| {
        let d = sha(b);
        fs::write(dir.join("blobs/sha256").join(&d[7..]), b).unwrap();
        d
    };
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(12);
    h.set_mode(0o600);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, "secret/data", &b"confidential"[..])
        .unwrap();
    let tar = t.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&tar)]}}))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(&gz), "size": gz.len()}]}))
    .unwrap();
    let md = blob(&manifest);
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
        .unwrap(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn layer_keys_come_from_the_kbs_after_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().to_path_buf();
    let (admin_private, admin_public) = generate_admin_key().unwrap();
    fs::write(w.join("admin.pub"), admin_public).unwrap();
    let kbs = Kbs::new(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: Some(w.join("kbs")),
        insecure_http: true,
        admin_public_key: vec![w.join("admin.pub")],
        allow_sample: true,
        ..Config::default()
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = server::serve(kbs, listener).await;
    });
    let admin =
        AdminClient::new(&url, http_client(None).unwrap(), admin_private.as_bytes()).unwrap();

    layout(&w.join("plain"));
    let kek: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
    fs::write(w.join("kek.bin"), &kek).unwrap();
    let kid = "kbs:///default/image-key/app";
    let image = format!("oci:{}:v1", w.join("enc").display());
    // The CLI runs beside the in-process KBS, off the runtime's threads.
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            coffer(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let (ok, _, stderr) = run(vec![
        "image".into(),
        "encrypt".into(),
        "--kbs-kek".into(),
        kid.into(),
        "--kek-file".into(),
        w.join("kek.bin").display().to_string(),
        format!("oci:{}:v1", w.join("plain").display()),
        image.clone(),
    ])
    .await;
    assert!(ok, "{stderr}");
    let pull = |rootfs: &str| {
        vec![
            "image".to_string(),
            "pull".into(),
            "--quiet".into(),
            "--kbs".into(),
            url.clone(),
            "--attester".into(),
            "sample".into(),
            image.clone(),
            "--rootfs".into(),
            w.join(rootfs).display().to_string(),
        ]
    };

    // The KBS does not hold the key yet: a clear error, nothing unpacked.
    let (ok, _, stderr) = run(pull("r1")).await;
    assert!(!ok && stderr.contains(kid), "{stderr}");
    assert!(!w.join("r1").exists());

    // Stored: the pull attests, fetches the key named by the layer, decrypts.
    admin
        .set_resource("default/image-key/app", kek.clone())
        .await
        .unwrap();
    let (ok, _, stderr) = run(pull("r2")).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        fs::read_to_string(w.join("r2/secret/data")).unwrap(),
        "confidential"
    );

    // A resource policy that releases nothing: no key, no image.
    admin
        .set_resource_policy("package policy\n\ndefault allow := false\n")
        .await
        .unwrap();
    let (ok, _, stderr) = run(pull("r3")).await;
    assert!(!ok && stderr.contains("cannot get"), "{stderr}");
    assert!(!w.join("r3").exists());

    // A wrong key under that name: refused with the kid named.
    admin
        .set_resource_policy("package policy\n\ndefault allow := true\n")
        .await
        .unwrap();
    admin
        .set_resource("default/image-key/app", vec![9u8; 32])
        .await
        .unwrap();
    let (ok, _, stderr) = run(pull("r4")).await;
    assert!(!ok && stderr.contains("does not unwrap"), "{stderr}");
    server.abort();
}
