//! `coffer run --sandbox process …`: the process-sandbox launcher. It sets the emulated PSP's
//! launch (MEASUREMENT of the agent binary and launch configuration, HOST_DATA = initdata
//! digest), serves the PSP channel to the sandbox alone, starts `coffer-agent` under `unshare`
//! in new mount, PID, UTS and IPC namespaces, asks it for the container, streams the output and
//! exits with the container's status, removing everything it created. The emulated TEE gives no
//! confidentiality; every run says so.

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Args;
use coffer_agent::api::proto::{
    agent_client::AgentClient, CreateContainerRequest, ReadStreamRequest, RemoveContainerRequest,
    StartContainerRequest, WaitProcessRequest,
};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

/// `coffer run` arguments.
#[derive(Args)]
pub struct RunArgs {
    /// The sandbox: `process` (development; pod VMs come later).
    #[arg(long)]
    sandbox: String,
    /// The KBS; must be the one the initdata names.
    #[arg(long)]
    kbs: String,
    /// The initdata the sandbox is launched with.
    #[arg(long)]
    initdata: PathBuf,
    /// Pull over plain HTTP (development registries).
    #[arg(long)]
    plain_http: bool,
    /// The container's name [default: a random one].
    #[arg(long)]
    name: Option<String>,
    /// The emulated PSP's directory.
    #[arg(long, default_value = "coffer-psp")]
    psp_dir: PathBuf,
    /// The agent binary [default: coffer-agent beside this program].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Where sandboxes keep their state.
    #[arg(long, default_value = "/run/coffer/sandboxes")]
    state_dir: PathBuf,
    /// The image: docker://REG/REPO:TAG or oci:DIR[:TAG].
    image: String,
    /// The command and its arguments [default: the image's].
    #[arg(last = true)]
    command: Vec<String>,
}

async fn connect(sock: &Path) -> anyhow::Result<AgentClient<Channel>> {
    coffer_agent::api::connect_unix(sock)
        .await
        .context("cannot connect to the agent")
}

/// The sandbox's processes and files, removed on drop.
struct Sandbox {
    dir: PathBuf,
    agent: Option<tokio::process::Child>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().last().map(str::to_string))
        .unwrap_or_default()
}

/// Runs `coffer run`; returns the container's exit status.
pub async fn run(a: RunArgs) -> anyhow::Result<i32> {
    if a.sandbox != "process" {
        bail!(
            "--sandbox {}: only `process` is built yet (pod VMs come later)",
            a.sandbox
        );
    }
    let text = std::fs::read_to_string(&a.initdata)
        .with_context(|| format!("cannot read {}", a.initdata.display()))?;
    let parsed = coffer_wire::initdata::Initdata::parse(&text)?;
    let named = coffer_agent::keys::kbs_config(&parsed).map_err(anyhow::Error::msg)?;
    if named.url.as_deref().map(|u| u.trim_end_matches('/')) != Some(a.kbs.trim_end_matches('/')) {
        bail!(
            "the initdata names KBS {}, not --kbs {}; the agent attests only to its initdata's KBS",
            named.url.as_deref().unwrap_or("(none)"),
            a.kbs
        );
    }
    let digest = coffer_wire::initdata::digest(&text)?;
    let agent = crate::measure::agent_path(&a.agent)?;
    let binary =
        std::fs::read(&agent).with_context(|| format!("cannot read {}", agent.display()))?;
    let name = a.name.clone().unwrap_or_else(|| {
        let mut r = [0u8; 6];
        let _ = getrandom_fill(&mut r);
        format!("coffer-{}", hex::encode(r))
    });
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("--name {name:?}: use 1-64 ASCII letters, digits, '-' or '_'");
    }
    eprintln!("coffer: EMULATED TEE (process sandbox): no confidentiality, development only");

    let dir = a.state_dir.join(&name);
    if dir.exists() {
        bail!(
            "a sandbox named {name} exists ({}); pick another --name",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut sandbox = Sandbox {
        dir: dir.clone(),
        agent: None,
    };

    // The launch the PSP reports, and its channel for this sandbox only.
    let mut psp = coffer_psp::EmulatedPsp::load_or_generate(&a.psp_dir)?;
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(&digest, 32));
    psp.set_launch(coffer_psp::Launch {
        measurement: coffer_agent::sandbox::process_measurement(&binary),
        host_data,
        ..coffer_psp::Launch::default()
    });
    let psp_sock = dir.join("psp.sock");
    let listener = UnixListener::bind(&psp_sock)?;
    let psp = Arc::new(psp);
    std::thread::spawn(move || coffer_psp::channel::serve(psp, listener));

    // The agent, in its namespaces; killed with this process (--kill-child).
    let agent_sock = dir.join("agent.sock");
    let log = dir.join("agent.log");
    let mut cmd = tokio::process::Command::new("unshare");
    for ns in coffer_agent::sandbox::PROCESS_NAMESPACES {
        cmd.arg(format!("--{ns}"));
    }
    // A /proc of the new PID namespace, so that the runtime inside sees its own processes.
    cmd.arg("--mount-proc")
        .arg("--kill-child")
        .arg(&agent)
        .arg("--listen")
        .arg(format!("unix:{}", agent_sock.display()))
        .arg("--initdata")
        .arg(&a.initdata)
        .arg("--psp-socket")
        .arg(&psp_sock)
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl"))
        .arg("--state-dir")
        .arg(dir.join("bundles"));
    if a.plain_http {
        cmd.arg("--plain-http");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the agent with unshare")?;
    sandbox.agent = Some(child);
    for _ in 0..500 {
        if agent_sock.exists() {
            break;
        }
        if let Some(Ok(Some(_))) = sandbox.agent.as_mut().map(|c| c.try_wait()) {
            bail!("the agent did not start: {}", last_line(&log));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = connect(&agent_sock).await?;

    let id = name.clone();
    c.create_container(CreateContainerRequest {
        container_id: id.clone(),
        image: a.image.clone(),
        args: a.command.clone(),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("the agent could not create the container: {}", e.message()))?;
    c.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .map_err(|e| anyhow::anyhow!("the agent could not start the container: {}", e.message()))?;

    // Stream both outputs until the process ends and they are drained.
    let pump = |stream: &'static str, c: AgentClient<Channel>, id: String| async move {
        let mut c = c;
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if stream == "stdout" {
            Box::new(tokio::io::stdout())
        } else {
            Box::new(tokio::io::stderr())
        };
        loop {
            let r = c
                .read_stream(ReadStreamRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                    stream: stream.into(),
                    len: 64 << 10,
                })
                .await;
            match r {
                Ok(d) if !d.get_ref().data.is_empty() => {
                    let _ = out.write_all(&d.get_ref().data).await;
                    let _ = out.flush().await;
                }
                Ok(_) => return Ok(()),
                Err(e) => return Err(anyhow::anyhow!("reading {stream}: {}", e.message())),
            }
        }
    };
    let (o, e) = tokio::join!(
        pump("stdout", c.clone(), id.clone()),
        pump("stderr", c.clone(), id.clone())
    );
    o?;
    e?;
    let status = c
        .wait_process(WaitProcessRequest {
            container_id: id.clone(),
            exec_id: String::new(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("waiting for the container: {}", e.message()))?
        .into_inner()
        .status;
    let _ = c
        .remove_container(RemoveContainerRequest { container_id: id })
        .await;
    drop(sandbox);
    Ok(status)
}

fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}
