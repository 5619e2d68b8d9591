//! The agent binary refuses to start when its initdata is not the one its TEE was launched with
//! (HOST_DATA in the emulated PSP's or configfs-tsm's report; PCR 8 of an Azure vTPM, which it
//! binds first), and serves when it is.

#![cfg(target_arch = "x86_64")]

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

/// An emulated PSP whose HOST_DATA is the digest of `launched_with`.
fn launched(launched_with: &str) -> EmulatedPsp {
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
    psp
}

/// Starts an emulated PSP channel whose HOST_DATA is the digest of `launched_with`.
fn psp(dir: &Path, launched_with: &str) -> std::path::PathBuf {
    let sock = dir.join("psp.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let psp = Arc::new(launched(launched_with));
    std::thread::spawn(move || coffer_psp::channel::serve(psp, listener));
    sock
}

/// The agent in `d` with initdata file `initdata` and its TEE given by `tee` (`--psp-socket
/// PATH` or `--tsm-root PATH`); stderr piped.
fn agent(d: &Path, initdata: &str, tee: [&std::ffi::OsStr; 2]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coffer-agent"));
    cmd.arg("--listen")
        .arg(format!("unix:{}", d.join("agent.sock").display()))
        .arg("--initdata")
        .arg(d.join(initdata))
        .args(tee)
        .arg("--audit-log")
        .arg(d.join("audit.jsonl"))
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The initdata digest the agent serving at `d/agent.sock` reports, once its socket appears.
async fn served_initdata(d: &Path) -> String {
    let sock = d.join("agent.sock");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    coffer_agent::api::connect_unix(&sock)
        .await
        .unwrap()
        .get_guest_details(GetGuestDetailsRequest {})
        .await
        .unwrap()
        .into_inner()
        .initdata_digest
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_serves_only_with_the_initdata_it_was_launched_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psp_sock = psp(d, INITDATA_A);
    std::fs::write(d.join("a.toml"), INITDATA_A).unwrap();
    std::fs::write(d.join("b.toml"), INITDATA_B).unwrap();
    let tee = ["--psp-socket".as_ref(), psp_sock.as_os_str()];

    // Initdata B was not launched: refused before serving anything.
    let out = agent(d, "b.toml", tee).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match HOST_DATA"), "{stderr}");
    assert!(!d.join("agent.sock").exists());

    // Initdata A: served, and the guest details name its digest and its policy.
    let mut child = agent(d, "a.toml", tee)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(
        served_initdata(d).await,
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
    let root = d.join("tsm/report");
    let _tsm = coffer_testkit::tsm::FakeTsm::start(&root, launched(INITDATA_A), "sev_guest", false);
    std::fs::write(d.join("a.toml"), INITDATA_A).unwrap();
    std::fs::write(d.join("b.toml"), INITDATA_B).unwrap();
    let no_tsm = d.join("no-tsm");
    let tsm = |root: &Path| -> [std::ffi::OsString; 2] { ["--tsm-root".into(), root.into()] };
    let run = |initdata: &str, root: &Path| {
        let [flag, value] = tsm(root);
        agent(d, initdata, [&flag, &value]).output().unwrap()
    };

    let out = run("a.toml", &no_tsm);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no TEE found in this guest"), "{stderr}");
    assert!(!stderr.contains("EMULATED"), "{stderr}");

    let out = run("b.toml", &root);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match HOST_DATA"), "{stderr}");

    let [flag, value] = tsm(&root);
    let mut child = agent(d, "a.toml", [&flag, &value]).spawn().unwrap();
    assert_eq!(
        served_initdata(d).await,
        hex::encode(Sha384::digest(INITDATA_A.as_bytes()))
    );
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("EMULATED"), "{stderr}");
}

/// An Azure confidential VM, where the platform sets no HOST_DATA: the agent asks its vTPM
/// (swtpm provisioned as Azure's paravisor leaves it) and binds the initdata into PCR 8 before
/// serving; a later agent with other initdata finds PCR 8 taken and refuses to start.
#[tokio::test(flavor = "multi_thread")]
async fn on_an_azure_vtpm_the_agent_binds_its_initdata_into_pcr8_before_serving() {
    use coffer_testkit::vtpm::{provision_az_snp, Imds, Swtpm};
    const SHA256_A: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = \"package agent_policy\\ndefault GetGuestDetailsRequest := true\\n\"\n";
    const SHA256_B: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = \"package agent_policy\\ndefault ExecProcessRequest := true\\n\"\n";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psp = EmulatedPsp::generate(Tcb::default()).unwrap();
    let tpm = Swtpm::start(d);
    provision_az_snp(&tpm, &psp);
    let pem = |label: &str, der: &[u8]| pem::encode(&pem::Pem::new(label, der.to_vec()));
    let imds = Imds::start(pem("CERTIFICATE", psp.vcek_der()), psp.roots_pem(), vec![]).await;
    std::fs::write(d.join("a.toml"), SHA256_A).unwrap();
    std::fs::write(d.join("b.toml"), SHA256_B).unwrap();
    let vtpm = |cmd: &mut Command| {
        cmd.arg("--tpm-tcti")
            .arg(&tpm.tcti)
            .arg("--imds")
            .arg(&imds.url);
    };
    // The TEE is the vTPM's (the flags below), not a PSP channel's or configfs-tsm's.
    let no_tsm = d.join("no-tsm");
    let none: [&std::ffi::OsStr; 2] = ["--tsm-root".as_ref(), no_tsm.as_os_str()];

    let mut cmd = agent(d, "a.toml", none);
    vtpm(&mut cmd);
    let log = std::fs::File::create(d.join("agent-a.log")).unwrap();
    let mut child = cmd.stderr(log).spawn().unwrap();
    let digest = coffer_wire::initdata::digest(SHA256_A).unwrap();
    for _ in 0..1500 {
        if d.join("agent.sock").exists() || child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        d.join("agent.sock").exists(),
        "the agent did not serve: {}",
        std::fs::read_to_string(d.join("agent-a.log")).unwrap()
    );
    assert_eq!(served_initdata(d).await, hex::encode(&digest));
    child.kill().unwrap();
    child.wait().unwrap();
    // PCR 8 holds the initdata's extension, as the KBS's Azure verifier expects.
    let ev = coffer_attester::vtpm::AzSnpVtpmAttester::new(&tpm.tcti, &imds.url)
        .gather(&[0u8; 32], None)
        .unwrap();
    let pcr8 = hex::decode(ev["tpm_quote"]["pcrs"][8].as_str().unwrap()).unwrap();
    assert_eq!(
        pcr8,
        coffer_attester::vtpm::extend_value(&[0u8; 32], &digest)
    );

    // Other initdata in the same VM: PCR 8 is taken, the agent refuses before serving.
    let _ = std::fs::remove_file(d.join("agent.sock"));
    let mut cmd = agent(d, "b.toml", none);
    vtpm(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PCR 8 already holds another value"),
        "{stderr}"
    );
    assert!(!d.join("agent.sock").exists());
}
