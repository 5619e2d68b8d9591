//! Signature policies against real signatures: GPG simple signing by skopeo (`--sign-by`, lookaside
//! store from a registries.d file) and by `coffer image sign --gpg-key`, cosign signatures by
//! `coffer image sign --cosign-key`, images on the real `docker-registry`.

mod common;

use std::{fs, path::Path, process::Command};

use common::*;
use serde_json::Value;

/// A private GNUPGHOME with one signing key; returns (home, fingerprint).
fn gpg_key(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let home = dir.join(format!("gnupg-{name}"));
    fs::create_dir_all(&home).unwrap();
    fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        let out = Command::new("gpg")
            .env("GNUPGHOME", &home)
            .args(["--batch", "--no-tty", "--passphrase", ""])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    gpg(&[
        "--quick-gen-key",
        &format!("{name} <{name}@example.com>"),
        "ed25519",
        "sign",
        "never",
    ]);
    let listing = String::from_utf8(gpg(&["--list-keys", "--with-colons"])).unwrap();
    let fpr = listing
        .lines()
        .find(|l| l.starts_with("fpr:"))
        .and_then(|l| l.split(':').nth(9))
        .unwrap()
        .to_string();
    fs::write(dir.join(format!("{name}.gpg")), gpg(&["--export", &fpr])).unwrap();
    (home, fpr)
}

fn pull(w: &Path, image: &str, rootfs: &str, extra: &[&str]) -> (bool, String, String) {
    let rootfs = w.join(rootfs).display().to_string();
    let mut args = vec!["image", "pull", "--quiet", "--plain-http"];
    args.extend(extra);
    args.extend([image, "--rootfs", &rootfs]);
    coffer(&args)
}

#[test]
fn signed_by_policies_accept_only_images_signed_by_the_trusted_key() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (home, fpr) = gpg_key(w, "trusted");
    let (other_home, other_fpr) = gpg_key(w, "other");
    let sigs = w.join("sigs");
    let regd = w.join("registries.d");
    fs::create_dir_all(&regd).unwrap();
    fs::write(
        regd.join("default.yaml"),
        format!(
            "default-docker:\n  lookaside: file://{0}\n  lookaside-staging: file://{0}\n",
            sigs.display()
        ),
    )
    .unwrap();
    let policy = w.join("policy.json");
    fs::write(
        &policy,
        format!(
            r#"{{"default": [{{"type": "reject"}}],
                "transports": {{"docker": {{"{}/signed": [{{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "{}"}}]}}}}}}"#,
            reg.addr,
            w.join("trusted.gpg").display()
        ),
    )
    .unwrap();

    let mut layout = Layout::new(&w.join("layout"));
    let img = layout.image(&[tar(&[("app", "v1", 'f')])], "amd64", None);
    layout.tag(img, "v1");
    let src = format!("oci:{}:v1", layout.dir.display());
    let push = |dest: &str, gnupg: Option<(&Path, &str)>| {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        cmd.arg("--registries.d").arg(&regd);
        if let Some((home, fpr)) = gnupg {
            cmd.env("GNUPGHOME", home).args(["--sign-by", fpr]);
        }
        let out = cmd.args([&src, dest]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let good = format!("docker://{}/signed/app:v1", reg.addr);
    let unsigned = format!("docker://{}/signed/plain:v1", reg.addr);
    let foreign = format!("docker://{}/signed/foreign:v1", reg.addr);
    push(&good, Some((&home, &fpr)));
    push(&unsigned, None);
    push(&foreign, Some((&other_home, &other_fpr)));
    let regd_s = regd.display().to_string();
    let policy_s = policy.display().to_string();
    let with_policy = [
        "--policy",
        policy_s.as_str(),
        "--registries-d",
        regd_s.as_str(),
    ];

    // Signed by the trusted key: accepted, and the report names the requirement.
    let (ok, stdout, stderr) = pull(w, &good, "good", &with_policy);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["policy"]["satisfied"][0], "signedBy");
    assert_eq!(fs::read_to_string(w.join("good/app")).unwrap(), "v1");

    // Unsigned and foreign-signed: refused before any blob is requested.
    let before = reg.blob_gets();
    let (ok, _, stderr) = pull(w, &unsigned, "unsigned", &with_policy);
    assert!(!ok && stderr.contains("has no signature"), "{stderr}");
    let (ok, _, stderr) = pull(w, &foreign, "foreign", &with_policy);
    assert!(
        !ok && stderr.contains("not signed by a key in the policy"),
        "{stderr}"
    );
    assert_eq!(
        reg.blob_gets(),
        before,
        "no blob of a refused image was requested"
    );
    assert!(!w.join("unsigned").exists() && !w.join("foreign").exists());

    // A signature moved to another repository does not carry over (identity check).
    let moved = format!("docker://{}/signed/moved:v1", reg.addr);
    push(&moved, None);
    let digest = {
        let (ok, stdout, _) = pull(w, &good, "probe", &[]);
        assert!(ok);
        serde_json::from_str::<Value>(&stdout).unwrap()["manifest_digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let hex = digest.trim_start_matches("sha256:");
    let from = sigs.join(format!("signed/app@sha256={hex}"));
    let to = sigs.join(format!("signed/moved@sha256={hex}"));
    fs::create_dir_all(&to).unwrap();
    fs::copy(from.join("signature-1"), to.join("signature-1")).unwrap();
    let (ok, _, stderr) = pull(w, &moved, "moved", &with_policy);
    assert!(!ok && stderr.contains("does not match"), "{stderr}");

    // Outside the signed scope the default applies: reject.
    let elsewhere = format!("docker://{}/elsewhere/app:v1", reg.addr);
    push(&elsewhere, Some((&home, &fpr)));
    let (ok, _, stderr) = pull(w, &elsewhere, "elsewhere", &with_policy);
    assert!(!ok && stderr.contains("rejected by policy"), "{stderr}");

    // coffer signs with GPG; both coffer and skopeo accept the signature under the policy.
    let (ok, _, stderr) = {
        let out = Command::new(env!("CARGO_BIN_EXE_coffer"))
            .env("GNUPGHOME", &home)
            .args([
                "image",
                "sign",
                "--plain-http",
                "--gpg-key",
                &fpr,
                "--registries-d",
                &regd_s,
            ])
            .arg(&unsigned)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::new(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = pull(w, &unsigned, "now-signed", &with_policy);
    assert!(ok, "{stderr}");
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--remove-signatures",
            "--src-tls-verify=false",
        ])
        .args(["--policy", &policy_s])
        .arg("--registries.d")
        .arg(&regd)
        .arg(&unsigned)
        .arg(format!("oci:{}:x", w.join("skopeo-out").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo rejects coffer's signature: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same skopeo check refuses the foreign-signed image: the acceptance above is real.
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--remove-signatures",
            "--src-tls-verify=false",
        ])
        .args(["--policy", &policy_s])
        .arg("--registries.d")
        .arg(&regd)
        .arg(&foreign)
        .arg(format!("oci:{}:y", w.join("skopeo-out2").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn sigstore_signed_policies_accept_cosign_signatures_by_the_trusted_key() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    openssl(
        w,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "cosign.key",
        ],
    );
    openssl(
        w,
        &["ec", "-in", "cosign.key", "-pubout", "-out", "cosign.pub"],
    );
    openssl(
        w,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "other.key",
        ],
    );
    let mut layout = Layout::new(&w.join("layout"));
    let img = layout.image(&[tar(&[("app", "cosigned", 'f')])], "amd64", None);
    layout.tag(img, "v1");
    let src = format!("oci:{}:v1", layout.dir.display());
    let image = format!("docker://{}/cosign/app:v1", reg.addr);
    let other = format!("docker://{}/cosign/other:v1", reg.addr);
    skopeo_push(&src, &image, false);
    skopeo_push(&src, &other, false);
    let policy = w.join("policy.json");
    fs::write(
        &policy,
        format!(
            r#"{{"default": [{{"type": "sigstoreSigned", "keyPath": "{}"}}]}}"#,
            w.join("cosign.pub").display()
        ),
    )
    .unwrap();
    let policy_s = policy.display().to_string();

    let before = reg.blob_gets();
    let (ok, _, stderr) = pull(w, &image, "unsigned", &["--policy", &policy_s]);
    assert!(
        !ok && stderr.contains("has no cosign signature"),
        "{stderr}"
    );
    assert_eq!(
        reg.blob_gets(),
        before,
        "no blob of a refused image was requested"
    );

    let sign = |key: &str, target: &str| {
        coffer(&[
            "image",
            "sign",
            "--plain-http",
            "--cosign-key",
            w.join(key).to_str().unwrap(),
            target,
        ])
    };
    let (ok, stdout, stderr) = sign("cosign.key", &image);
    assert!(ok, "{stderr}");
    assert!(stdout.trim().ends_with(".sig"), "{stdout}");
    let (ok, stdout, stderr) = pull(w, &image, "signed", &["--policy", &policy_s]);
    assert!(ok, "{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["policy"]["satisfied"][0],
        "sigstoreSigned"
    );

    // Signed by another key only: refused.
    let (ok, _, stderr) = sign("other.key", &other);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = pull(w, &other, "other", &["--policy", &policy_s]);
    assert!(!ok && stderr.contains("does not verify"), "{stderr}");

    // A key pair in cosign's encrypted format (what cosign and skopeo read), then signed with it.
    fs::write(w.join("pass"), "hunter2\n").unwrap();
    let prefix = w.join("ck").display().to_string();
    let pass = w.join("pass").display().to_string();
    let (ok, _, stderr) = coffer(&[
        "image",
        "generate-cosign-key",
        "--output-prefix",
        &prefix,
        "--passphrase-file",
        &pass,
    ]);
    assert!(ok, "{stderr}");
    assert!(fs::read_to_string(w.join("ck.key"))
        .unwrap()
        .contains("ENCRYPTED SIGSTORE PRIVATE KEY"));
    fs::write(w.join("wrong"), "nope").unwrap();
    let wrong = w.join("wrong").display().to_string();
    let key = w.join("ck.key").display().to_string();
    let (ok, _, stderr) = coffer(&[
        "image",
        "sign",
        "--plain-http",
        "--cosign-key",
        &key,
        "--passphrase-file",
        &wrong,
        &other,
    ]);
    assert!(!ok && stderr.contains("wrong passphrase"), "{stderr}");
    let (ok, _, stderr) = coffer(&[
        "image",
        "sign",
        "--plain-http",
        "--cosign-key",
        &key,
        "--passphrase-file",
        &pass,
        &other,
    ]);
    assert!(ok, "{stderr}");
    let policy2 = w.join("policy2.json");
    fs::write(
        &policy2,
        format!(
            r#"{{"default": [{{"type": "sigstoreSigned", "keyPath": "{}"}}]}}"#,
            w.join("ck.pub").display()
        ),
    )
    .unwrap();
    let (ok, _, stderr) = pull(
        w,
        &other,
        "other2",
        &["--policy", policy2.to_str().unwrap()],
    );
    assert!(ok, "{stderr}");
}
