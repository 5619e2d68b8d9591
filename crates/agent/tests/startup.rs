//! The agent binary refuses to start when its initdata does not match HOST_DATA in its TEE's
//! report (the emulated PSP over the launcher's channel), and serves when it does.

use std::{
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use coffer_agent::api::proto::GetGuestDetailsRequest;
use coffer_psp::{EmulatedPsp, Launch, Tcb};
use coffer_wire::binding::fit_report_data;
use sha2::{Digest, Sha384};

const INITDATA_A: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"package agent_policy\\ndefault GetGuestDetailsRequest := true\\n\"\n";
const INITDATA_B: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"package agent_policy\\ndefault ExecProcessRequest := true\\n\"\n";

/// Starts an emulated PSP channel whose HOST_DATA is the digest of `launched_with`.
fn psp(dir: &Path, launched_with: &str) -> std::path::PathBuf {
    let mut psp = EmulatedPsp::generate(Tcb::default()).unwrap();
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&fit_report_data(
        &Sha384::digest(launched_with.as_bytes()),
        32,
    ));
    psp.set_launch(Launch {
        host_data,
        ..Launch::default()
    });
    let sock = dir.join("psp.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let psp = Arc::new(psp);
    std::thread::spawn(move || coffer_psp::channel::serve(psp, listener));
    sock
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_serves_only_with_the_initdata_it_was_launched_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psp_sock = psp(d, INITDATA_A);
    std::fs::write(d.join("a.toml"), INITDATA_A).unwrap();
    std::fs::write(d.join("b.toml"), INITDATA_B).unwrap();
    let agent = |initdata: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coffer-agent"));
        cmd.arg("--listen")
            .arg(format!("unix:{}", d.join("agent.sock").display()))
            .arg("--initdata")
            .arg(d.join(initdata))
            .arg("--psp-socket")
            .arg(&psp_sock)
            .arg("--audit-log")
            .arg(d.join("audit.jsonl"))
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };

    // Initdata B was not launched: refused before serving anything.
    let out = agent("b.toml").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match HOST_DATA"), "{stderr}");
    assert!(!d.join("agent.sock").exists());

    // Initdata A: served, and the guest details name its digest and its policy.
    let mut child = agent("a.toml").stderr(Stdio::null()).spawn().unwrap();
    let sock = d.join("agent.sock");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let details = coffer_agent::api::connect_unix(&sock)
        .await
        .unwrap()
        .get_guest_details(GetGuestDetailsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        details.initdata_digest,
        hex::encode(Sha384::digest(INITDATA_A.as_bytes()))
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"GetGuestDetailsRequest\""), "{audit}");
}

/// Without the launcher's PSP channel the agent asks the TEE it runs in (configfs-tsm, here
/// emulated with real-format reports): it serves only with the initdata HOST_DATA names, and
/// refuses to start where there is no TEE at all, never falling back to the emulated one.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_psp_channel_the_agent_uses_its_own_tee_or_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut psp = EmulatedPsp::generate(Tcb::default()).unwrap();
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&fit_report_data(&Sha384::digest(INITDATA_A.as_bytes()), 32));
    psp.set_launch(Launch {
        host_data,
        ..Launch::default()
    });
    let root = d.join("tsm/report");
    let _tsm = coffer_testkit::tsm::FakeTsm::start(&root, psp, "sev_guest", false);
    std::fs::write(d.join("a.toml"), INITDATA_A).unwrap();
    std::fs::write(d.join("b.toml"), INITDATA_B).unwrap();
    let agent = |initdata: &str, tsm_root: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coffer-agent"));
        cmd.arg("--listen")
            .arg(format!("unix:{}", d.join("agent.sock").display()))
            .arg("--initdata")
            .arg(d.join(initdata))
            .arg("--tsm-root")
            .arg(tsm_root)
            .arg("--audit-log")
            .arg(d.join("audit.jsonl"))
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };

    let out = agent("a.toml", &d.join("no-tsm")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no TEE found in this guest"), "{stderr}");
    assert!(!stderr.contains("EMULATED"), "{stderr}");

    let out = agent("b.toml", &root).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match HOST_DATA"), "{stderr}");

    let mut child = agent("a.toml", &root).spawn().unwrap();
    let sock = d.join("agent.sock");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let details = coffer_agent::api::connect_unix(&sock)
        .await
        .unwrap()
        .get_guest_details(GetGuestDetailsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        details.initdata_digest,
        hex::encode(Sha384::digest(INITDATA_A.as_bytes()))
    );
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("EMULATED"), "{stderr}");
}
