//! `coffer run --sandbox process` end to end: a real coffer-kbs (in this process) trusting the
//! emulated PSP, reference values from `coffer measure`, an image encrypted with a key only the
//! KBS holds, and the agent running the container on runc inside its namespaces.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The agent binary beside the CLI's (built with the workspace; built here when missing).
fn agent_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_coffer")).with_file_name("coffer-agent");
    if !p.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", "coffer-agent", "--bin", "coffer-agent"])
            .status()
            .unwrap()
            .success();
        assert!(ok && p.exists(), "cannot build coffer-agent");
    }
    p
}

async fn cli(args: Vec<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_coffer"))
            .args(&args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_run_prints_the_output_of_an_image_only_the_kbs_can_open() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = agent_binary();
    let psp_dir = d.join("psp");
    coffer_psp::EmulatedPsp::load_or_generate(&psp_dir).unwrap();

    let kbs = coffer_testkit::start_kbs(d, |c| {
        c.allow_emulated = true;
        c.emulated_root = Some(psp_dir.join("roots.pem"));
    })
    .await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);

    // The image, encrypted under a key the KBS holds.
    coffer_testkit::busybox_layout(&d.join("plain"));
    let kek: Vec<u8> = (0..32u8).collect();
    std::fs::write(d.join("kek.bin"), &kek).unwrap();
    let image = format!("oci:{}:v1", d.join("enc").display());
    let (code, _, stderr) = cli(vec![
        "image".into(),
        "encrypt".into(),
        "--kbs-kek".into(),
        "kbs:///default/image-keys/app".into(),
        "--kek-file".into(),
        d.join("kek.bin").display().to_string(),
        format!("oci:{}:v1", d.join("plain").display()),
        image.clone(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    admin
        .set_resource("default/image-keys/app", kek)
        .await
        .unwrap();

    // initdata, and its reference values.
    let (code, init, stderr) = cli(s(&[
        "initdata",
        "new",
        "--kbs-url",
        &url,
        "--image-key",
        "kbs:///default/image-keys/app",
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::write(d.join("initdata.toml"), &init).unwrap();
    let (code, refs, stderr) = cli(vec![
        "measure".into(),
        "--sandbox".into(),
        "process".into(),
        "--initdata".into(),
        d.join("initdata.toml").display().to_string(),
        "--agent".into(),
        agent.display().to_string(),
        "--psp-dir".into(),
        psp_dir.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    admin.set_reference_values(refs.as_bytes()).await.unwrap();

    let state = d.join("sandboxes");
    let run = |initdata: &Path, name: &str, kbs: &str| {
        vec![
            "run".to_string(),
            "--sandbox".into(),
            "process".into(),
            "--kbs".into(),
            kbs.to_string(),
            "--initdata".into(),
            initdata.display().to_string(),
            "--name".into(),
            name.into(),
            "--psp-dir".into(),
            psp_dir.display().to_string(),
            "--agent".into(),
            agent.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            image.clone(),
            "--".into(),
            "/bin/sh".into(),
            "-c".into(),
            "echo hello from the sandbox; echo to stderr >&2; exit 7".into(),
        ]
    };
    let (code, stdout, stderr) = cli(run(&d.join("initdata.toml"), "r1", &url)).await;
    assert_eq!(code, Some(7), "{stderr}");
    assert_eq!(stdout, "hello from the sandbox\n");
    assert!(
        stderr.contains("to stderr") && stderr.contains("EMULATED TEE"),
        "{stderr}"
    );
    assert!(!state.join("r1").exists(), "the sandbox was cleaned up");

    // A permissive initdata nobody registered: the agent starts, the KBS releases nothing.
    std::fs::write(d.join("open.rego"), "package agent_policy\ndefault CreateContainerRequest := true\ndefault ExecProcessRequest := true\n").unwrap();
    let (_, open, _) = cli(s(&[
        "initdata",
        "new",
        "--kbs-url",
        &url,
        "--policy",
        d.join("open.rego").to_str().unwrap(),
    ]))
    .await;
    std::fs::write(d.join("open.toml"), &open).unwrap();
    let (code, stdout, stderr) = cli(run(&d.join("open.toml"), "r2", &url)).await;
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty());
    assert!(stderr.contains("kbs:///default/image-keys/app"), "{stderr}");
    assert!(!state.join("r2").exists());

    // The initdata names another KBS than --kbs: refused before anything starts.
    let (code, _, stderr) = cli(run(&d.join("initdata.toml"), "r3", "http://127.0.0.1:1")).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("the initdata names KBS"), "{stderr}");
}
