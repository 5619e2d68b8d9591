//! `coffer image pull` against the real Debian `docker-registry` on loopback, with images pushed
//! by the real `skopeo` from OCI layouts this test writes.

mod common;

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command};

use common::*;
use serde_json::Value;

#[test]
fn images_pushed_by_skopeo_pull_into_a_correct_rootfs() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let base = tar(&[
        ("bin", "", 'd'),
        ("bin/hello", "#!/bin/sh\necho hello\n", 'x'),
        ("bin/hi", "hello", 'l'),
        ("etc/motd", "welcome", 'f'),
        ("tmp/junk", "junk", 'f'),
    ]);
    let top = tar(&[("tmp/.wh.junk", "", 'f'), ("etc/motd", "updated", 'f')]);
    let amd = layout.image(&[base.clone(), top], "amd64", None);
    let arm = layout.image(&[tar(&[("arch", "arm64", 'f')])], "arm64", None);
    layout.tag(amd.clone(), "v1");
    layout.tag_index(&[amd, arm], "multi");
    let src = format!("oci:{}", layout.dir.display());
    skopeo_push(
        &format!("{src}:v1"),
        &format!("docker://{}/test/app:v1", reg.addr),
        false,
    );
    skopeo_push(
        &format!("{src}:multi"),
        &format!("docker://{}/test/app:multi", reg.addr),
        true,
    );

    let rootfs = work.path().join("rootfs");
    let cache = work.path().join("cache");
    let image = format!("docker://{}/test/app:v1", reg.addr);
    let (ok, stdout, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--plain-http",
        "--cache-dir",
        cache.to_str().unwrap(),
        &image,
        "--rootfs",
        rootfs.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["layers"], 2);
    assert_eq!(report["cached_layers"], 0);
    assert_eq!(
        fs::read_to_string(rootfs.join("bin/hello")).unwrap(),
        "#!/bin/sh\necho hello\n"
    );
    assert_eq!(
        fs::metadata(rootfs.join("bin/hello"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        fs::read_link(rootfs.join("bin/hi")).unwrap(),
        Path::new("hello")
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/motd")).unwrap(),
        "updated"
    );
    assert!(!rootfs.join("tmp/junk").exists());
    assert!(rootfs.join("tmp").is_dir());

    // Again from the cache: no layer blob is requested a second time.
    let gets = reg.blob_gets().len();
    let rootfs2 = work.path().join("rootfs2");
    let (ok, stdout, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--plain-http",
        "--cache-dir",
        cache.to_str().unwrap(),
        &image,
        "--rootfs",
        rootfs2.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["cached_layers"], 2);
    assert_eq!(
        reg.blob_gets().len(),
        gets + 1,
        "only the config blob again"
    );

    // An index: amd64 by default, arm64 on request, no s390x.
    let multi = format!("docker://{}/test/app:multi", reg.addr);
    let r3 = work.path().join("r3");
    let (ok, stdout, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--plain-http",
        &multi,
        "--rootfs",
        r3.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(r3.join("bin/hello").exists());
    assert!(serde_json::from_str::<Value>(&stdout).unwrap()["index_digest"].is_string());
    let r4 = work.path().join("r4");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--plain-http",
        "--platform",
        "linux/arm64",
        &multi,
        "--rootfs",
        r4.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(fs::read_to_string(r4.join("arch")).unwrap(), "arm64");
    let r5 = work.path().join("r5");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--plain-http",
        "--platform",
        "linux/s390x",
        &multi,
        "--rootfs",
        r5.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("no manifest for platform linux/s390x"),
        "{stderr}"
    );
    assert!(!r5.exists());

    // Docker schema 2 media types (skopeo --format v2s2) and a zstd layer.
    let v2s2 = format!("docker://{}/test/docker:v1", reg.addr);
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--format",
            "v2s2",
        ])
        .args([&format!("{src}:v1"), &v2s2])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r7 = work.path().join("r7");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--plain-http",
        &v2s2,
        "--rootfs",
        r7.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(fs::read_to_string(r7.join("etc/motd")).unwrap(), "updated");
    let zst = layout.image_compressed(&[tar(&[("z", "zstd content", 'f')])], "amd64", None, true);
    layout.tag(zst, "zstd");
    let r8 = work.path().join("r8");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        &format!("{src}:zstd"),
        "--rootfs",
        r8.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(fs::read_to_string(r8.join("z")).unwrap(), "zstd content");

    // HTTPS is the default: a plain-HTTP registry is not silently accepted.
    let r6 = work.path().join("r6");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        &image,
        "--rootfs",
        r6.to_str().unwrap(),
    ]);
    assert!(!ok, "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    // A non-empty target is refused and left alone.
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--plain-http",
        &image,
        "--rootfs",
        rootfs.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("not empty"), "{stderr}");
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/motd")).unwrap(),
        "updated"
    );
}

#[test]
fn a_failed_pull_leaves_no_rootfs() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let good = tar(&[("a", "a", 'f')]);
    // The second layer's diff_id is wrong: the first layer is applied, then the pull fails.
    let bad = layout.image(
        &[good.clone(), tar(&[("b", "b", 'f')])],
        "amd64",
        Some(&sha(b"something else")),
    );
    layout.tag(bad, "bad");
    let ok_img = layout.image(&[good], "amd64", None);
    layout.tag(ok_img, "good");
    let parent = work.path().join("out");
    fs::create_dir(&parent).unwrap();
    let rootfs = parent.join("rootfs");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        &format!("oci:{}:bad", layout.dir.display()),
        "--rootfs",
        rootfs.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("diff_id"), "{stderr}");
    assert_eq!(
        fs::read_dir(&parent).unwrap().count(),
        0,
        "nothing left behind"
    );

    // A corrupted blob in the layout: decompression fails half-way, nothing is left.
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        &format!("oci:{}:good", layout.dir.display()),
        "--rootfs",
        rootfs.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    fs::remove_dir_all(&rootfs).unwrap();
    let idx: Value =
        serde_json::from_slice(&fs::read(layout.dir.join("index.json")).unwrap()).unwrap();
    let manifest_digest = idx["manifests"][1]["digest"].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(
        &fs::read(
            layout
                .dir
                .join("blobs/sha256")
                .join(manifest_digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = layout.dir.join("blobs/sha256").join(
        manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    let mut bytes = fs::read(&layer).unwrap();
    let n = bytes.len();
    bytes[n - 9] ^= 0xff; // the end of the deflate stream
    fs::write(&layer, bytes).unwrap();
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        &format!("oci:{}:good", layout.dir.display()),
        "--rootfs",
        rootfs.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("cannot decompress"), "{stderr}");
    assert_eq!(
        fs::read_dir(&parent).unwrap().count(),
        0,
        "nothing left behind"
    );
}

#[test]
fn a_layer_altered_in_the_registry_is_refused_when_its_stream_ends_and_leaves_nothing() {
    // Layers are unpacked while they download, so their digest is known only at the end: an
    // altered blob must still fail the pull, name the digest, and leave no rootfs and nothing in
    // the cache.
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    // 4 MiB of hex text (about 2 MiB gzip): several download steps, so unpacking has begun when
    // the altered byte arrives.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let text: String = (0..(4 << 20) / 16)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{x:016x}")
        })
        .collect();
    let img = layout.image(&[tar(&[("data", &text, 'f')])], "amd64", None);
    layout.tag(img, "v1");
    let image = format!("docker://{}/test/big:v1", reg.addr);
    skopeo_push(&format!("oci:{}:v1", layout.dir.display()), &image, false);
    let cache = work.path().join("cache");
    let pull = |rootfs: &Path| {
        coffer(&[
            "image",
            "pull",
            "--quiet",
            "--plain-http",
            "--cache-dir",
            cache.to_str().unwrap(),
            &image,
            "--rootfs",
            rootfs.to_str().unwrap(),
        ])
    };
    // Intact, it pulls.
    let out = work.path().join("out");
    fs::create_dir(&out).unwrap();
    let (ok, _, stderr) = pull(&out.join("good"));
    assert!(ok, "{stderr}");
    assert_eq!(fs::read_to_string(out.join("good/data")).unwrap(), text);
    fs::remove_dir_all(&cache).unwrap();

    // The layer is the largest blob in the registry's storage; one byte in its middle changes.
    let blobs = reg.storage().join("docker/registry/v2/blobs/sha256");
    let layer = fs::read_dir(&blobs)
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|d| d.unwrap().path().join("data"))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&layer).unwrap();
    assert!(bytes.len() > 3 << 20, "{} bytes", bytes.len());
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&layer, bytes).unwrap();

    let (ok, _, stderr) = pull(&out.join("bad"));
    assert!(!ok, "an altered layer was accepted");
    assert!(stderr.contains("content hashes to"), "{stderr}");
    assert!(!out.join("bad").exists(), "a rootfs was left behind");
    assert_eq!(
        fs::read_dir(&out).unwrap().count(),
        1,
        "nothing but the good rootfs in the target's directory"
    );
    for sub in ["blobs/sha256", "tmp"] {
        let left: Vec<_> = fs::read_dir(cache.join(sub)).unwrap().collect();
        assert!(left.is_empty(), "cache {sub} holds {left:?}");
    }
}

#[test]
fn encrypted_images_from_skopeo_and_coffer_decrypt_with_the_right_key_only() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    openssl(w, &["genrsa", "-out", "rsa.pem", "2048"]);
    openssl(w, &["rsa", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"]);
    openssl(
        w,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.pem",
        ],
    );
    openssl(w, &["ec", "-in", "ec.pem", "-pubout", "-out", "ec.pub"]);
    // skopeo 1.9 reads EC private keys only as PKCS#8; coffer reads SEC 1 and PKCS#8.
    openssl(
        w,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "ec.pem", "-out", "ec8.pem",
        ],
    );
    openssl(
        w,
        &[
            "ecparam",
            "-name",
            "secp384r1",
            "-genkey",
            "-noout",
            "-out",
            "other.pem",
        ],
    );
    let mut layout = Layout::new(&w.join("layout"));
    let img = layout.image(
        &[
            tar(&[("secret/data", "confidential", 'f')]),
            tar(&[("bin/app", "#!/bin/sh\n", 'x')]),
        ],
        "amd64",
        None,
    );
    layout.tag(img, "v1");
    let src = format!("oci:{}:v1", layout.dir.display());
    let pull = |image: &str, rootfs: &str, keys: &[&str]| {
        let mut args = vec!["image", "pull", "--quiet", "--plain-http"];
        for k in keys {
            args.extend(["--decryption-key", k]);
        }
        let rootfs = w.join(rootfs);
        let rootfs = rootfs.to_str().unwrap().to_string();
        let (ok, _, stderr) = coffer(&[&args[..], &[image, "--rootfs", &rootfs]].concat());
        (ok, stderr)
    };
    let key = |n: &str| w.join(n).to_str().unwrap().to_string();

    // skopeo encrypts for an RSA and an EC recipient.
    let skopeo_img = format!("docker://{}/enc/skopeo:v1", reg.addr);
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(["--encryption-key", &format!("jwe:{}", key("rsa.pub"))])
        .args(["--encryption-key", &format!("jwe:{}", key("ec.pub"))])
        .args([&src, &skopeo_img])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let before = reg.blob_gets().len();
    let (ok, stderr) = pull(&skopeo_img, "none", &[]);
    assert!(
        !ok && stderr.contains("no configured key unwraps layer"),
        "{stderr}"
    );
    let (ok, stderr) = pull(&skopeo_img, "wrong", &[&key("other.pem")]);
    assert!(
        !ok && stderr.contains("no configured key unwraps layer"),
        "{stderr}"
    );
    assert!(!w.join("none").exists() && !w.join("wrong").exists());
    assert_eq!(
        reg.blob_gets().len(),
        before + 2,
        "only the config blob was fetched, twice; no layer without a key"
    );
    for (k, dir) in [
        ("rsa.pem", "by-rsa"),
        ("ec.pem", "by-ec"),
        ("ec8.pem", "by-ec8"),
    ] {
        let (ok, stderr) = pull(&skopeo_img, dir, &[&key("other.pem"), &key(k)]);
        assert!(ok, "{stderr}");
        assert_eq!(
            fs::read_to_string(w.join(dir).join("secret/data")).unwrap(),
            "confidential"
        );
    }

    // coffer encrypts; skopeo decrypts it.
    let coffer_img = format!("docker://{}/enc/coffer:v1", reg.addr);
    let (ok, stdout, stderr) = coffer(&[
        "image",
        "encrypt",
        "--plain-http",
        "--recipient",
        &format!("jwe:{}", key("ec.pub")),
        &src,
        &coffer_img,
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.trim().starts_with("sha256:"));
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .args(["--decryption-key", &key("ec8.pem")])
        .args([
            &coffer_img,
            &format!("oci:{}:plain", w.join("decrypted").display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // skopeo without the key cannot.
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .args(["--decryption-key", &key("other.pem")])
        .args([
            &coffer_img,
            &format!("oci:{}:plain", w.join("nope").display()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The layout skopeo decrypted into holds the original layers: pull it without keys.
    let (ok, stderr) = pull(
        &format!("oci:{}:plain", w.join("decrypted").display()),
        "from-skopeo",
        &[],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        fs::read_to_string(w.join("from-skopeo/secret/data")).unwrap(),
        "confidential"
    );
    let (ok, stderr) = pull(&coffer_img, "by-coffer", &[&key("ec.pem")]);
    assert!(ok, "{stderr}");

    // An altered encrypted layer in a layout: the HMAC (or digest) check fails, nothing remains.
    let enc_layout = w.join("enc-layout");
    let (ok, _, stderr) = coffer(&[
        "image",
        "encrypt",
        "--recipient",
        &format!("jwe:{}", key("rsa.pub")),
        &src,
        &format!("oci:{}:v1", enc_layout.display()),
    ]);
    assert!(ok, "{stderr}");
    let idx: Value =
        serde_json::from_slice(&fs::read(enc_layout.join("index.json")).unwrap()).unwrap();
    let m: Value = serde_json::from_slice(
        &fs::read(
            enc_layout.join("blobs/sha256").join(
                idx["manifests"][0]["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(m["layers"][0]["mediaType"]
        .as_str()
        .unwrap()
        .ends_with("+gzip+encrypted"));
    let blob = enc_layout.join("blobs/sha256").join(
        m["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&blob, bytes).unwrap();
    let (ok, stderr) = pull(
        &format!("oci:{}:v1", enc_layout.display()),
        "altered",
        &[&key("rsa.pem")],
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("HMAC mismatch") || stderr.contains("hashes to"),
        "{stderr}"
    );
    assert!(!w.join("altered").exists());
}

#[test]
fn hostile_and_oversized_layers_are_refused_or_confined() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let victim = w.join("victim");
    fs::write(&victim, "intact").unwrap();
    let mut layout = Layout::new(&w.join("layout"));
    // A symlink out of the rootfs, then a file through it: lands inside.
    let escape = layout.image(
        &[tar(&[
            ("out", w.to_str().unwrap(), 'l'),
            ("out/victim", "owned", 'f'),
        ])],
        "amd64",
        None,
    );
    layout.tag(escape, "escape");
    // A gzip bomb: 64 MiB of zeros in one file.
    let zeros = "\0".repeat(64 << 20);
    let bomb = layout.image(&[tar(&[("zeros", &zeros, 'f')])], "amd64", None);
    layout.tag(bomb, "bomb");
    let src = |t: &str| format!("oci:{}:{t}", layout.dir.display());

    let r = w.join("r-escape");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        &src("escape"),
        "--rootfs",
        r.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "intact");
    assert_eq!(
        fs::read_to_string(r.join(w.strip_prefix("/").unwrap()).join("victim")).unwrap(),
        "owned"
    );

    let r = w.join("r-bomb");
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--max-bytes",
        "1048576",
        &src("bomb"),
        "--rootfs",
        r.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("limit reached"), "{stderr}");
    assert!(!r.exists());
    let (ok, _, stderr) = coffer(&[
        "image",
        "pull",
        "--quiet",
        "--max-entries",
        "0",
        &src("escape"),
        "--rootfs",
        r.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("limit reached"), "{stderr}");
}

/// A loopback front for the registry that closes its first `drop_first` connections as soon as
/// a request arrives (a registry restarting, a proxy cutting connections), then relays the rest.
/// Returns its `host:port` and the count of connections it accepted.
fn flaky_front(
    registry: &str,
    drop_first: usize,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::{
        io::Read,
        net::{TcpListener, TcpStream},
        sync::atomic::Ordering,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let registry = registry.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            if count.fetch_add(1, Ordering::SeqCst) < drop_first {
                let _ = client.read(&mut [0u8; 1024]);
                continue; // dropped: closed before any answer
            }
            let Ok(upstream) = TcpStream::connect(&registry) else {
                return;
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
                let _ = u2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut client, mut upstream) = (client, upstream);
                let _ = std::io::copy(&mut upstream, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, accepted)
}

#[test]
fn a_registry_connection_cut_on_the_way_is_retried_and_a_dead_one_is_named() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let img = layout.image(&[tar(&[("etc/motd", "welcome", 'f')])], "amd64", None);
    layout.tag(img, "v1");
    skopeo_push(
        &format!("oci:{}:v1", layout.dir.display()),
        &format!("docker://{}/test/app:v1", reg.addr),
        false,
    );
    let pull = |front: &str, rootfs: &Path| {
        coffer(&[
            "image",
            "pull",
            "--quiet",
            "--plain-http",
            &format!("docker://{front}/test/app:v1"),
            "--rootfs",
            rootfs.to_str().unwrap(),
        ])
    };

    // Two connections cut before any answer: the pull goes on and completes.
    let (front, accepted) = flaky_front(&reg.addr, 2);
    let rootfs = work.path().join("rootfs");
    let (ok, _, stderr) = pull(&front, &rootfs);
    assert!(ok, "{stderr}");
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/motd")).unwrap(),
        "welcome"
    );
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) > 2,
        "the cut connections were tried again"
    );

    // A registry that cuts every connection: the pull gives up after its retries, saying which
    // request failed and why, and leaves nothing.
    let (front, accepted) = flaky_front(&reg.addr, usize::MAX);
    let rootfs = work.path().join("never");
    let started = std::time::Instant::now();
    let (ok, _, stderr) = pull(&front, &rootfs);
    assert!(!ok, "a pull through a dead registry succeeded");
    assert!(
        stderr.contains(&format!("http://{front}/v2/")) && stderr.contains("closed"),
        "the error names the request and its cause: {stderr}"
    );
    // Four tries (the request and three retries after 0.25, 1 and 3 s), each of which may
    // first probe `/v2/` for the registry's authentication on a connection of its own.
    let tries = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!((4..=8).contains(&tries), "{tries} connections");
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(4250) && took < std::time::Duration::from_secs(30),
        "{took:?}"
    );
    assert!(!rootfs.exists(), "nothing left behind");
}
