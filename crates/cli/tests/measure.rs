//! `coffer measure` gives the reference values under which a KBS releases secrets to a process
//! sandbox: the emulated PSP, set by the launcher (MEASUREMENT of the agent binary and launch
//! configuration, HOST_DATA = initdata digest), answering the guest over its channel.

mod common;

use std::{os::unix::net::UnixListener, path::Path, sync::Arc};

use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs_client::{http_client, KbsClient, PspChannelAttester};
use coffer_psp::{EmulatedPsp, Launch};
use coffer_wire::binding::fit_report_data;
use common::coffer;

const INITDATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"package agent_policy\\ndefault GetGuestDetailsRequest := true\\n\"\n";
const OTHER: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"package agent_policy\\ndefault ExecProcessRequest := true\\n\"\n";

/// What a launcher does: set MEASUREMENT and HOST_DATA, serve the channel.
fn launch(psp_dir: &Path, sock: &Path, agent: &[u8], initdata: &str) {
    let mut psp = EmulatedPsp::load(psp_dir).unwrap();
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&fit_report_data(
        &coffer_wire::initdata::digest(initdata).unwrap(),
        32,
    ));
    psp.set_launch(Launch {
        measurement: coffer_agent::sandbox::process_measurement(agent),
        host_data,
        ..Launch::default()
    });
    let listener = UnixListener::bind(sock).unwrap();
    let psp = Arc::new(psp);
    std::thread::spawn(move || coffer_psp::channel::serve(psp, listener));
}

#[tokio::test(flavor = "multi_thread")]
async fn measured_reference_values_release_to_the_launched_sandbox_only() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let psp_dir = w.join("psp");
    EmulatedPsp::load_or_generate(&psp_dir).unwrap();
    // Any file stands for the agent binary here: the measurement covers its bytes.
    let agent = w.join("coffer-agent");
    std::fs::write(&agent, b"agent build 1").unwrap();
    std::fs::write(w.join("initdata.toml"), INITDATA).unwrap();

    let (ok, refs, stderr) = coffer(&[
        "measure",
        "--sandbox",
        "process",
        "--initdata",
        w.join("initdata.toml").to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
        "--psp-dir",
        psp_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");

    let kbs = coffer_testkit::start_kbs(w, |c| {
        c.allow_emulated = true;
        c.emulated_root = Some(psp_dir.join("roots.pem"));
    })
    .await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);
    admin
        .set_resource("default/image-keys/app", b"k".to_vec())
        .await
        .unwrap();
    admin.set_reference_values(refs.as_bytes()).await.unwrap();

    let guest = |sock: &Path, initdata: &str| {
        KbsClient::new(
            &url,
            http_client(None).unwrap(),
            Box::new(PspChannelAttester::new(sock.to_path_buf())),
            TeeKeyAlgorithm::EcP256,
        )
        .unwrap()
        .with_initdata(initdata.to_string())
    };

    // The measured launch gets the key.
    let sock = w.join("psp-1.sock");
    launch(&psp_dir, &sock, b"agent build 1", INITDATA);
    let key = guest(&sock, INITDATA)
        .get_resource("default/image-keys/app")
        .await
        .unwrap();
    assert_eq!(&key[..], b"k");

    // Another agent binary: another measurement, nothing released.
    let sock = w.join("psp-2.sock");
    launch(&psp_dir, &sock, b"agent build 2", INITDATA);
    assert!(guest(&sock, INITDATA)
        .get_resource("default/image-keys/app")
        .await
        .is_err());

    // An initdata that was not registered (launched and presented consistently): nothing.
    let sock = w.join("psp-3.sock");
    launch(&psp_dir, &sock, b"agent build 1", OTHER);
    assert!(guest(&sock, OTHER)
        .get_resource("default/image-keys/app")
        .await
        .is_err());

    // The registered initdata presented by a sandbox launched with another: HOST_DATA differs.
    assert!(guest(&sock, INITDATA)
        .get_resource("default/image-keys/app")
        .await
        .is_err());
}

/// `coffer measure --tee se --se-image F --initdata F`: the reference values of an IBM Secure
/// Execution image (made by IBM's `pvimg`, see the verifier's testdata) are its header's tags as
/// `pvimg info` reports them, and the initdata digest; what is not an SE image is refused.
#[test]
fn an_se_images_reference_values_are_its_header_tags() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../verifier/testdata/se");
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("initdata.toml");
    std::fs::write(&init, INITDATA).unwrap();
    let (ok, out, stderr) = coffer(&[
        "measure",
        "--tee",
        "se",
        "--se-image",
        data.join("test-se.img").to_str().unwrap(),
        "--initdata",
        init.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let refs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want = std::fs::read_to_string(data.join("test-se.img.tags")).unwrap();
    assert_eq!(refs["se_image_tags"][0], want.trim());
    assert_eq!(
        refs["init_data"][0],
        hex::encode(coffer_wire::initdata::digest(INITDATA).unwrap())
    );
    let (ok, _, stderr) = coffer(&[
        "measure",
        "--tee",
        "se",
        "--se-image",
        init.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("not an SE image"), "{stderr}");
    let (ok, _, stderr) = coffer(&["measure", "--tee", "se"]);
    assert!(!ok);
    assert!(stderr.contains("--se-image"), "{stderr}");
}
