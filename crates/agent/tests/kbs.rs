//! The agent attests with its own TEE (the emulated PSP a launcher set up: MEASUREMENT of the
//! agent binary and launch configuration, HOST_DATA = initdata digest) to the KBS its initdata
//! names, gets the key of an encrypted image only when the KBS holds reference values for that
//! launch, and runs the container on runc.

#![cfg(target_arch = "x86_64")]

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use coffer_agent::api::proto::{
    agent_client::AgentClient, CreateContainerRequest, ReadStreamRequest, StartContainerRequest,
    WaitProcessRequest,
};
use coffer_psp::{EmulatedPsp, Launch, Tcb};
use coffer_wire::binding::fit_report_data;
use serde_json::json;
use tonic::Code;

fn initdata(kbs_url: &str, marker: &str) -> String {
    format!(
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = \"[token_configs.kbs]\\nurl = \\\"{kbs_url}\\\"\\n\"\n\"policy.rego\" = \"\"\"{}# {marker}\n\"\"\"\n",
        coffer_agent::policy::DEFAULT_POLICY
    )
}

struct Agent {
    child: Child,
    sock: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a launcher does: set the PSP's launch, serve its channel, start the agent.
async fn launch(dir: &Path, name: &str, psp_dir: &Path, initdata: &str) -> Agent {
    let agent_bin = env!("CARGO_BIN_EXE_coffer-agent");
    let mut psp = EmulatedPsp::load(psp_dir).unwrap();
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&fit_report_data(
        &coffer_wire::initdata::digest(initdata).unwrap(),
        32,
    ));
    psp.set_launch(Launch {
        measurement: coffer_agent::sandbox::process_measurement(&std::fs::read(agent_bin).unwrap()),
        host_data,
        ..Launch::default()
    });
    let psp_sock = dir.join(format!("{name}-psp.sock"));
    let listener = UnixListener::bind(&psp_sock).unwrap();
    let psp = Arc::new(psp);
    std::thread::spawn(move || coffer_psp::channel::serve(psp, listener));
    let init_path = dir.join(format!("{name}.toml"));
    std::fs::write(&init_path, initdata).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let child = Command::new(agent_bin)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--initdata")
        .arg(&init_path)
        .arg("--psp-socket")
        .arg(&psp_sock)
        .arg("--audit-log")
        .arg(dir.join(format!("{name}-audit.jsonl")))
        .arg("--state-dir")
        .arg(dir.join(format!("{name}-bundles")))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}-stderr.log"))).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..250 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Agent { child, sock }
}

async fn client(sock: &Path) -> AgentClient<tonic::transport::Channel> {
    coffer_agent::api::connect_unix(sock).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_images_run_only_in_a_registered_launch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psp_dir = d.join("psp");
    EmulatedPsp::load_or_generate(&psp_dir).unwrap();

    // The KBS trusts the emulated PSP and holds the image key.
    let kbs = coffer_testkit::start_kbs(d, |c| {
        c.allow_emulated = true;
        c.emulated_root = Some(psp_dir.join("roots.pem"));
    })
    .await;
    let (url, admin) = (kbs.url.clone(), &kbs.admin);
    let kek: Vec<u8> = (0..32u8).map(|i| i ^ 0x5a).collect();
    admin
        .set_resource("default/image-keys/app", kek.clone())
        .await
        .unwrap();

    // An image encrypted with that key (ocicrypt, attestation-agent annotation).
    coffer_testkit::busybox_layout(&d.join("plain"));
    let plain =
        coffer_image::ImageRef::parse(&format!("oci:{}:v1", d.join("plain").display())).unwrap();
    let enc =
        coffer_image::ImageRef::parse(&format!("oci:{}:v1", d.join("enc").display())).unwrap();
    coffer_image::encrypt::encrypt_image(
        &plain,
        &enc,
        &Default::default(),
        &Default::default(),
        &coffer_image::crypt::WrapWith {
            recipients: &[],
            kbs: Some(("kbs:///default/image-keys/app", &kek)),
        },
    )
    .await
    .unwrap();

    // Reference values for the launch (what `coffer measure` prints).
    let good = initdata(&url, "registered");
    let tcb = Tcb::default();
    let agent_bin = std::fs::read(env!("CARGO_BIN_EXE_coffer-agent")).unwrap();
    admin
        .set_reference_values(
            json!({
                "measurement": [hex::encode(coffer_agent::sandbox::process_measurement(&agent_bin))],
                "init_data": [hex::encode(coffer_wire::initdata::digest(&good).unwrap())],
                "snp_tcb_min": [{"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp, "microcode": tcb.microcode}],
            })
            .to_string()
            .as_bytes(),
        )
        .await
        .unwrap();

    let create = |id: &str| CreateContainerRequest {
        container_id: id.into(),
        image: format!("oci:{}:v1", d.join("enc").display()),
        args: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo ran from an encrypted image".into(),
        ],
        ..Default::default()
    };
    // Unique across the test cells that run at once (the cgroup /coffer/ID is the machine's).
    let suffix = d
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches('.')
        .to_string();

    // The registered launch: attests, gets the key, decrypts, runs.
    let agent = launch(d, "good", &psp_dir, &good).await;
    let mut c = client(&agent.sock).await;
    let id = format!("kbs-test-{suffix}");
    if let Err(e) = c.create_container(create(&id)).await {
        panic!(
            "{e:?}\n{}",
            std::fs::read_to_string(d.join("good-stderr.log")).unwrap()
        );
    }
    c.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    let status = c
        .wait_process(WaitProcessRequest {
            container_id: id.clone(),
            exec_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 0);
    let out = c
        .read_stream(ReadStreamRequest {
            container_id: id.clone(),
            exec_id: String::new(),
            stream: "stdout".into(),
            len: 4096,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .data;
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "ran from an encrypted image\n"
    );
    c.remove_container(coffer_agent::api::proto::RemoveContainerRequest { container_id: id })
        .await
        .unwrap();
    drop(agent);

    // An initdata that was not registered (its launch is consistent, so the agent starts): the
    // KBS releases nothing, the container is not created, and the error says why.
    let other = initdata(&url, "not registered");
    let agent = launch(d, "other", &psp_dir, &other).await;
    let mut c = client(&agent.sock).await;
    let e = c
        .create_container(create(&format!("kbs-test-{suffix}-2")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("kbs:///default/image-keys/app"),
        "{}",
        e.message()
    );
}
