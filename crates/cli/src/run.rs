//! `coffer run --sandbox vm|process …`: the launcher. It checks the initdata against
//! `--kbs`, starts the sandbox's keeper ([`coffer_keeper`]: emulated PSP with HOST_DATA =
//! initdata digest and MEASUREMENT of what it launches — a pod VM's kernel, initrd and command
//! line ([`coffer_keeper::vm`], QEMU), or the agent binary and launch configuration of a process
//! sandbox (`coffer-agent` under `unshare`)), asks the agent for the container, and then either streams the output and
//! exits with the container's status, tearing the sandbox down (the default), or prints the
//! name and leaves the sandbox running (`-d`; see `coffer exec|logs|ps|rm`). The emulated TEE
//! gives no confidentiality; every run says so.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context};
use clap::Args;
use coffer_agent::api::proto::{
    CreateContainerRequest, DestroySandboxRequest, StartContainerRequest, WaitProcessRequest,
};
use coffer_keeper::{Keeper, KeeperArgs, KeeperError, SandboxDir};

use crate::ctl::{attach, OwnerKeys};

/// `coffer run` arguments.
#[derive(Args)]
pub struct RunArgs {
    /// The sandbox: `vm` (a pod VM, with --podvm), `remote` (a peer pod: a pod VM that the
    /// `coffer-cloud` daemon at --cloud creates through its provider, with --podvm) or
    /// `process` (development).
    #[arg(long)]
    sandbox: String,
    /// The pod VM (`coffer podvm build --out DIR`), for `--sandbox vm` and `remote`.
    #[arg(long)]
    podvm: Option<PathBuf>,
    /// The `coffer-cloud` daemon's socket, for `--sandbox remote`.
    #[arg(long, default_value = coffer_cloud::DEFAULT_SOCKET)]
    cloud: PathBuf,
    /// The pod VM's accelerator: kvm, tcg, or auto (KVM when a guest runs under it here).
    #[arg(long, default_value = "auto")]
    accel: String,
    /// The TEE: `emulated` (the emulated PSP: no confidentiality, development only), or for a
    /// pod VM on such a host under KVM `snp` (AMD SEV-SNP), `tdx` (Intel TDX) or, for an s390x
    /// pod VM built with its SE image, `se` (IBM Secure Execution).
    #[arg(long, default_value = "emulated")]
    tee: String,
    /// The firmware a hardware TEE boots [default: the pod VM's firmware-snp.fd or
    /// firmware-tdx.fd].
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// An SEV-SNP pod VM's vCPU model (QEMU `-cpu`), which its launch digest covers: what
    /// `coffer measure --tee snp --cpu` must name.
    #[arg(long, default_value = "EPYC-Milan")]
    snp_cpu: String,
    /// The pod VM's memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Seconds the pod VM's agent has to become ready before the VM is stopped and the start
    /// fails with its console [default: 60 under KVM, 180 under TCG].
    #[arg(long, default_value_t = 0)]
    ready_timeout: u64,
    /// The pod VM's virtual CPUs [default: 2 under KVM, 1 under TCG].
    #[arg(long, default_value_t = 0)]
    cpus: u32,
    /// The sandbox's network: `none` (the containers have only their loopback; the sandbox's
    /// own traffic, to the KBS and registries, goes through a forwarder on this host that logs
    /// each destination), `host` (a process sandbox's containers share this host's network) or
    /// `cni` (a network namespace of the sandbox's own from the CNI plugins of
    /// --cni-conf-dir, as a pod gets one; a pod VM takes its interfaces over and its own traffic
    /// goes there).
    #[arg(long, default_value = "none")]
    network: String,
    /// Where `--network cni` finds its network configuration (the first by name).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where `--network cni` finds the CNI plugins (`:`-separated).
    #[arg(long, default_value = "/usr/lib/cni:/opt/cni/bin")]
    cni_bin_dir: String,
    /// The KBS; must be the one the initdata names.
    #[arg(long)]
    kbs: String,
    /// The initdata the sandbox is launched with.
    #[arg(long)]
    initdata: PathBuf,
    /// Pull over plain HTTP (development registries).
    #[arg(long)]
    plain_http: bool,
    /// The container's (and sandbox's) name [default: a random one].
    #[arg(long)]
    name: Option<String>,
    /// Leave the container running in the background and print its name.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Pass this program's stdin to the container (subject to the agent policy).
    #[arg(short, long, conflicts_with = "detach")]
    interactive: bool,
    /// Give the container a terminal (sized like this one; with -i this terminal goes raw).
    #[arg(short, long)]
    tty: bool,
    /// Private key(s) (PEM) that open output sealed to the initdata's log recipient.
    #[arg(long)]
    owner_key: Option<PathBuf>,
    /// The emulated PSP's directory.
    #[arg(long, default_value = "coffer-psp")]
    psp_dir: PathBuf,
    /// The agent binary [default: coffer-agent beside this program].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Where sandboxes keep their state.
    #[arg(long, default_value = coffer_keeper::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Cache of verified image blobs shared by sandboxes [default: STATE_DIR/../image-cache].
    #[arg(long)]
    image_cache: Option<PathBuf>,
    /// The image: docker://REG/REPO:TAG or oci:DIR or oci:DIR:TAG.
    image: String,
    /// The command and its arguments [default: the image's].
    #[arg(last = true)]
    command: Vec<String>,
}

/// Runs `coffer run`; returns the container's exit status (0 once started with `-d`).
pub async fn run(a: RunArgs) -> anyhow::Result<i32> {
    let podvm = match (a.sandbox.as_str(), &a.podvm) {
        ("vm" | "remote", Some(dir)) => {
            // Fails early, naming what is missing.
            coffer_podvm::PodVm::open(dir)?;
            Some(std::fs::canonicalize(dir)?)
        }
        ("vm" | "remote", None) => bail!(
            "--sandbox {} needs --podvm DIR (coffer podvm build --out DIR)",
            a.sandbox
        ),
        ("process", None) => None,
        ("process", Some(_)) => bail!("--podvm belongs to --sandbox vm or remote"),
        (other, _) => bail!("--sandbox {other}: use `vm`, `remote` or `process`"),
    };
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
    match parsed.data.get("policy.rego").map(String::as_str) {
        None | Some(coffer_agent::policy::DEFAULT_POLICY) => eprintln!(
            "coffer: this initdata's policy is the built-in development policy: whoever runs this host can create any container in the sandbox, with the keys the KBS releases to it; pin this one with `coffer initdata new --container IMAGE --name NAME -- COMMAND…`"
        ),
        Some(_) => {}
    }
    let keys = a.owner_key.as_deref().map(OwnerKeys::load).transpose()?;
    let agent_bin = crate::measure::agent_path(&a.agent)?;
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("coffer-{}", crate::ctl::random_hex(6)));
    let sandbox = SandboxDir::new(&a.state_dir, &name)?;
    match (a.tee.as_str(), podvm.is_some()) {
        ("emulated", true) => eprintln!("coffer: EMULATED TEE (pod VM without TEE hardware): no confidentiality from this host, development only"),
        ("emulated", false) => eprintln!("coffer: EMULATED TEE (process sandbox): no confidentiality, development only"),
        ("snp" | "tdx" | "se", true) => {}
        ("snp" | "tdx" | "se", false) => bail!("--tee {} needs --sandbox vm: a process sandbox has no TEE", a.tee),
        (other, _) => bail!("--tee {other}: use emulated, snp, tdx or se"),
    }
    let remote = a.sandbox == "remote";
    if remote && matches!(a.tee.as_str(), "tdx" | "se") {
        bail!("--sandbox remote --tee {}: peer pods launch SEV-SNP (on a libvirt host that has it) or the emulated TEE; TDX and SE peer pods are not built", a.tee);
    }
    match (a.network.as_str(), podvm.is_some()) {
        ("none" | "cni", _) | ("host", false) => {}
        ("host", true) => {
            bail!("--network host: a pod VM cannot share this host's network; use none or cni")
        }
        (other, _) => bail!("--network {other}: use none, host or cni"),
    }

    if sandbox.dir.exists() {
        if sandbox.alive() {
            bail!("a sandbox named {name} is running; pick another --name or `coffer rm {name}`");
        }
        sandbox.reap()?;
    }
    std::fs::create_dir_all(&sandbox.dir)
        .with_context(|| format!("cannot create {}", sandbox.dir.display()))?;
    let cache = a.image_cache.clone().unwrap_or_else(|| {
        a.state_dir
            .parent()
            .unwrap_or(&a.state_dir)
            .join("image-cache")
    });
    let initdata = std::fs::canonicalize(&a.initdata)?;
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let mut args = KeeperArgs::new(
        sandbox.dir.clone(),
        &name,
        agent_bin,
        initdata,
        a.psp_dir.clone(),
    );
    args.image_cache = Some(cache);
    args.plain_http = a.plain_http;
    args.watch_stdin = !a.detach;
    args.network = a.network.clone();
    args.cni_conf_dir = a.cni_conf_dir.clone();
    args.cni_bin_dir = a.cni_bin_dir.clone();
    if let Some(dir) = &podvm {
        // A pod VM on a CNI network resolves names as this host does.
        if a.network == "cni" && std::path::Path::new("/etc/resolv.conf").is_file() {
            args.resolv_conf = Some("/etc/resolv.conf".into());
        }
        args.podvm = Some(dir.clone());
        args.accel = a.accel.clone();
        args.tee = a.tee.clone();
        args.firmware = a.firmware.clone();
        args.snp_cpu = a.snp_cpu.clone();
        args.memory = a.memory;
        args.ready_timeout = a.ready_timeout;
        args.cpus = a.cpus;
        if remote {
            args.cloud = Some(std::path::absolute(&a.cloud)?);
        }
    }
    // Its own process group: a terminal's ^C reaches this process, whose exit closes the
    // keeper's stdin, and the keeper tears down.
    let mut keeper = Keeper::spawn(&me, &args, !a.detach)?;

    let started = async {
        // A pod VM boots first (seconds under KVM, tens of seconds under TCG).
        let wait = if podvm.is_some() {
            Duration::from_secs(600)
        } else {
            Duration::from_secs(3)
        };
        match keeper.ready(wait).await {
            // The socket may lag behind the agent's start by a moment: the connect below says.
            Ok(()) | Err(KeeperError::Timeout { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut c = sandbox.connect().await?;
        if let Some(address) = coffer_keeper::cni::address(&sandbox.dir) {
            eprintln!("coffer: sandbox {name} is on the CNI network at {address}");
        }
        c.create_container(CreateContainerRequest {
            container_id: name.clone(),
            image: a.image.clone(),
            args: a.command.clone(),
            stdin: a.interactive,
            tty: a.tty,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!("the agent could not create the container: {}", e.message())
        })?;
        c.start_container(StartContainerRequest {
            container_id: name.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("the agent could not start the container: {}", e.message()))?;
        Ok(c)
    }
    .await;
    let mut c = match started {
        Ok(c) => c,
        Err(e) => {
            // The keeper tears the sandbox down once asked.
            if let Ok(mut c) = sandbox.connect().await {
                let _ = c.destroy_sandbox(DestroySandboxRequest {}).await;
            }
            drop(keeper.take_stdin());
            let _ = keeper.child().start_kill();
            let _ = keeper.child().wait().await;
            let _ = sandbox.reap();
            return Err(e);
        }
    };
    if a.detach {
        println!("{name}");
        return Ok(0);
    }

    let streamed = attach(&c, &name, "", a.interactive, a.tty, keys.as_ref()).await;
    let status = match streamed {
        Ok(()) => c
            .wait_process(WaitProcessRequest {
                container_id: name.clone(),
                exec_id: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
            .map_err(|e| anyhow::anyhow!("waiting for the container: {}", e.message())),
        Err(e) => Err(e),
    };
    // Closing the keeper's stdin ends the sandbox; wait for the teardown.
    drop(keeper.take_stdin());
    let _ = keeper.child().wait().await;
    if sandbox.dir.exists() {
        sandbox.reap()?;
    }
    status.map_err(|e| {
        if sandbox.agent_error().is_empty() {
            e
        } else {
            e.context("the sandbox's agent is gone")
        }
    })
}
