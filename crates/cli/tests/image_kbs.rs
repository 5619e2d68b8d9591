//! What the guest gets from the KBS after attestation: layer keys of encrypted images
//! (`coffer image encrypt --kbs-kek`, `coffer image pull --kbs`), registry credentials
//! (`--authfile kbs:///…` against a registry requiring basic auth) and sealed secrets
//! (`coffer secret seal` / `unseal`); and `coffer kbs bench`, which measures full handshakes. A
//! real coffer-kbs on loopback (sample TEE).

mod common;

use std::{fs, io::Write, path::Path, process::Command};

use serde_json::json;

use common::{coffer, sha};

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

/// A coffer-kbs (sample TEE allowed) in this process.
async fn start_kbs(w: &Path) -> coffer_testkit::TestKbs {
    coffer_testkit::start_kbs(w, |c| c.allow_sample = true).await
}

/// The CLI runs beside the in-process KBS, off the runtime's threads.
async fn run(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        coffer(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn layer_keys_come_from_the_kbs_after_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().to_path_buf();
    let kbs = start_kbs(&w).await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);

    layout(&w.join("plain"));
    let kek: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
    fs::write(w.join("kek.bin"), &kek).unwrap();
    let kid = "kbs:///default/image-key/app";
    let image = format!("oci:{}:v1", w.join("enc").display());
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

    // A JWE recipient whose private key only the KBS holds: --key fetches it after attestation.
    common::openssl(
        &w,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "r.pem",
        ],
    );
    common::openssl(&w, &["ec", "-in", "r.pem", "-pubout", "-out", "r.pub"]);
    let jwe_image = format!("oci:{}:v1", w.join("enc-jwe").display());
    let (ok, _, stderr) = run(vec![
        "image".into(),
        "encrypt".into(),
        "--recipient".into(),
        format!("jwe:{}", w.join("r.pub").display()),
        format!("oci:{}:v1", w.join("plain").display()),
        jwe_image.clone(),
    ])
    .await;
    assert!(ok, "{stderr}");
    admin
        .set_resource("default/image-key/priv", fs::read(w.join("r.pem")).unwrap())
        .await
        .unwrap();
    let (ok, _, stderr) = run(vec![
        "image".into(),
        "pull".into(),
        "--quiet".into(),
        "--kbs".into(),
        url.clone(),
        "--attester".into(),
        "sample".into(),
        "--key".into(),
        "kbs:///default/image-key/priv".into(),
        jwe_image,
        "--rootfs".into(),
        w.join("r5").display().to_string(),
    ])
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(
        fs::read_to_string(w.join("r5/secret/data")).unwrap(),
        "confidential"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials_from_a_file_or_the_kbs() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().to_path_buf();
    let hash = bcrypt::hash("s3cret-pass", 4).unwrap();
    let reg = common::Registry::start_with_auth(Some(&format!("puller:{hash}")));
    layout(&w.join("plain"));
    let image = format!("docker://{}/private/app:v1", reg.addr);
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            "puller:s3cret-pass",
        ])
        .arg(format!("oci:{}:v1", w.join("plain").display()))
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let auth_json = json!({"auths": {reg.addr.clone(): {"auth": base64_of("puller:s3cret-pass")}}});
    fs::write(w.join("auth.json"), auth_json.to_string()).unwrap();
    let pull = |rootfs: &str, extra: &[&str]| {
        let mut v: Vec<String> = ["image", "pull", "--quiet", "--plain-http"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend([
            image.clone(),
            "--rootfs".into(),
            w.join(rootfs).display().to_string(),
        ]);
        v
    };

    // Anonymous: refused by the registry, one clear line.
    let (ok, _, stderr) = run(pull("anon", &[])).await;
    assert!(!ok && stderr.trim_end().lines().count() == 1, "{stderr}");
    assert!(!w.join("anon").exists());
    // From a file.
    let authfile = w.join("auth.json").display().to_string();
    let (ok, _, stderr) = run(pull("file", &["--authfile", &authfile])).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        fs::read_to_string(w.join("file/secret/data")).unwrap(),
        "confidential"
    );
    // From the KBS, released after attestation.
    let kbs = start_kbs(&w).await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);
    admin
        .set_resource("default/registry/auth", auth_json.to_string().into_bytes())
        .await
        .unwrap();
    let (ok, _, stderr) = run(pull(
        "via-kbs",
        &[
            "--kbs",
            &url,
            "--attester",
            "sample",
            "--authfile",
            "kbs:///default/registry/auth",
        ],
    ))
    .await;
    assert!(ok, "{stderr}");
    assert!(w.join("via-kbs/secret/data").exists());
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread")]
async fn sealed_secrets_open_only_with_the_kbs_key() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().to_path_buf();
    let kbs = start_kbs(&w).await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);
    let kek: Vec<u8> = (0..32u8).collect();
    fs::write(w.join("kek.bin"), &kek).unwrap();
    fs::write(w.join("secret.txt"), "db-password").unwrap();
    let (ok, sealed, stderr) = run(vec![
        "secret".into(),
        "seal".into(),
        "--key-id".into(),
        "kbs:///default/sealing/k1".into(),
        "--kek-file".into(),
        w.join("kek.bin").display().to_string(),
        "--file".into(),
        w.join("secret.txt").display().to_string(),
    ])
    .await;
    assert!(ok, "{stderr}");
    let sealed = sealed.trim().to_string();
    assert!(sealed.starts_with("sealed.") && !sealed.contains("db-password"));
    let unseal = |s: String| {
        vec![
            "secret".to_string(),
            "unseal".into(),
            "--kbs".into(),
            url.clone(),
            "--attester".into(),
            "sample".into(),
            s,
        ]
    };
    // The KBS does not hold the key: refused.
    let (ok, _, stderr) = run(unseal(sealed.clone())).await;
    assert!(
        !ok && stderr.contains("kbs:///default/sealing/k1"),
        "{stderr}"
    );
    admin.set_resource("default/sealing/k1", kek).await.unwrap();
    let (ok, plain, stderr) = run(unseal(sealed.clone())).await;
    assert!(ok, "{stderr}");
    assert_eq!(plain, "db-password");
    // Vault secrets are the resource itself.
    admin
        .set_resource("default/secret/api", b"api-token".to_vec())
        .await
        .unwrap();
    let (ok, vault, _) = run(vec![
        "secret".into(),
        "seal".into(),
        "--vault".into(),
        "kbs:///default/secret/api".into(),
    ])
    .await;
    assert!(ok);
    let (ok, plain, stderr) = run(unseal(vault.trim().to_string())).await;
    assert!(ok, "{stderr}");
    assert_eq!(plain, "api-token");
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_keys_can_be_kbs_resources() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().to_path_buf();
    let reg = common::Registry::start();
    layout(&w.join("plain"));
    let image = format!("docker://{}/team/app:v1", reg.addr);
    common::skopeo_push(
        &format!("oci:{}:v1", w.join("plain").display()),
        &image,
        false,
    );
    common::openssl(
        &w,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "c.key",
        ],
    );
    common::openssl(&w, &["ec", "-in", "c.key", "-pubout", "-out", "c.pub"]);
    let (ok, _, stderr) = run(vec![
        "image".into(),
        "sign".into(),
        "--plain-http".into(),
        "--cosign-key".into(),
        w.join("c.key").display().to_string(),
        image.clone(),
    ])
    .await;
    assert!(ok, "{stderr}");
    fs::write(
        w.join("policy.json"),
        r#"{"default": [{"type": "sigstoreSigned", "keyPath": "kbs:///default/keys/cosign-pub"}]}"#,
    )
    .unwrap();
    let kbs = start_kbs(&w).await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);
    let pull = |rootfs: &str| {
        vec![
            "image".to_string(),
            "pull".into(),
            "--quiet".into(),
            "--plain-http".into(),
            "--policy".into(),
            w.join("policy.json").display().to_string(),
            "--kbs".into(),
            url.clone(),
            "--attester".into(),
            "sample".into(),
            image.clone(),
            "--rootfs".into(),
            w.join(rootfs).display().to_string(),
        ]
    };
    // The KBS does not hold the key: fail closed.
    let (ok, _, stderr) = run(pull("r1")).await;
    assert!(
        !ok && stderr.contains("kbs:///default/keys/cosign-pub"),
        "{stderr}"
    );
    admin
        .set_resource(
            "default/keys/cosign-pub",
            fs::read(w.join("c.pub")).unwrap(),
        )
        .await
        .unwrap();
    let (ok, _, stderr) = run(pull("r2")).await;
    assert!(ok, "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bench_runs_full_handshakes_and_fails_loudly_when_they_cannot_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().to_path_buf();
    let kbs = start_kbs(&w).await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);
    admin
        .set_resource("default/bench/key", b"0123456789abcdef".to_vec())
        .await
        .unwrap();
    let bench = |resource: &str| {
        [
            "kbs",
            "--url",
            url.as_str(),
            "bench",
            "--clients",
            "2",
            "--duration",
            "1",
            "--attester",
            "sample",
            "--resource",
            resource,
        ]
        .map(String::from)
        .to_vec()
    };
    let (ok, out, err) = run(bench("default/bench/key")).await;
    assert!(ok, "bench failed: {err}");
    let field = |name: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in the bench's output:\n{out}"))
            .parse()
            .unwrap()
    };
    assert_eq!(field("errors"), 0.0, "{out}");
    assert!(field("handshakes") >= 1.0, "{out}");
    assert!(field("handshakes/s") > 0.0, "{out}");
    let (p50, p90, p99, p999) = (
        field("p50_ms"),
        field("p90_ms"),
        field("p99_ms"),
        field("p99.9_ms"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= p999,
        "percentiles out of order:\n{out}"
    );
    // The server's memory comes from its metrics.
    assert!(field("server_rss_mib") > 0.0, "{out}");

    // A resource that does not exist: the first handshake fails, and says so, before any
    // rate is printed.
    let (ok, out, err) = run(bench("default/bench/missing")).await;
    assert!(!ok, "a bench whose handshakes cannot succeed passed: {out}");
    assert!(err.contains("first handshake failed"), "{err}");
    assert!(!out.contains("handshakes/s"), "{out}");
}
