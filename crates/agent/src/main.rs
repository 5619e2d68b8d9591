//! `coffer-agent`: checks its initdata against HOST_DATA in its TEE's report, then serves the
//! policy-gated agent API. It serves nothing when the check fails.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use coffer_agent::{
    api::{serve_streams, serve_unix, AgentService},
    container::Containers,
    policy::{AgentPolicy, FileAudit},
    startup::{check_initdata, parse_initdata},
};

/// The Coffer guest agent.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where to serve the agent API: unix:PATH, or serial:PATH (a pod VM's virtio-serial
    /// port, multiplexed; see coffer_podvm::mux).
    #[arg(long)]
    listen: String,
    /// The initdata (TOML) this guest was launched with.
    #[arg(long)]
    initdata: PathBuf,
    /// The PSP channel (unix socket) the launcher provides (emulated SEV-SNP, development
    /// only). Without it the agent uses the TEE it runs in, found by probing (configfs-tsm),
    /// and refuses to start when there is none.
    #[arg(long)]
    psp_socket: Option<PathBuf>,
    /// Where the kernel's configfs-tsm report interface is.
    #[arg(long, default_value = coffer_attester::TSM_REPORT_ROOT, hide = true)]
    tsm_root: PathBuf,
    /// The vTPM's TCTI, when it is not `/dev/tpmrm0` (a TPM simulator in tests).
    #[arg(long, hide = true)]
    tpm_tcti: Option<String>,
    /// Azure's instance metadata service, when it is not at its link-local address.
    #[arg(long, default_value = coffer_attester::AZURE_IMDS, hide = true)]
    imds: String,
    /// The pod's network namespace (a path, e.g. the CNI's), which containers join instead of
    /// one the agent makes.
    #[arg(long)]
    pod_netns: Option<PathBuf>,
    /// Audit log of policy decisions (JSON lines, appended).
    #[arg(long)]
    audit_log: PathBuf,
    /// Where container bundles are kept.
    #[arg(long, default_value = "/run/coffer-agent")]
    state_dir: PathBuf,
    /// The OCI runtime.
    #[arg(long, default_value = "runc")]
    runtime: PathBuf,
    /// Pull images over plain HTTP (development registries).
    #[arg(long)]
    plain_http: bool,
    /// The cgroup under which containers' cgroups are made.
    #[arg(long, default_value = "/coffer")]
    cgroup_parent: String,
    /// Mount a private tmpfs on the state directory first, so that bundles, root filesystems
    /// and the runtime's state vanish with the sandbox's mount namespace (process sandbox).
    #[arg(long)]
    private_state: bool,
    /// Cache of verified image blobs (content-addressed, re-verified on use).
    #[arg(long)]
    image_cache: Option<PathBuf>,
    /// Reach the network only through the launcher's forwarding socket (unix:PATH, SOCKS5),
    /// bringing up loopback in this network namespace first (process sandbox), or `port`:
    /// through streams of the serial port given to --listen (pod VM).
    #[arg(long)]
    egress: Option<String>,
    /// Take the pod VM's network configuration (SetNetwork) and apply it to this guest, whose
    /// network namespace the containers share (pod VM on a pod network).
    #[arg(long, hide = true)]
    pod_network: bool,
    /// A peer pod's agent channel (`--listen tls`): set by the pod VM's boot, never a flag.
    #[arg(skip)]
    remote: Option<coffer_podvm::remote::RemoteAgent>,
}

fn main() -> std::process::ExitCode {
    coffer_agent::policy::quiet_library_backtraces();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            // A pod VM's console is a terminal, but the host keeps it as a log file.
            !coffer_agent::vm::is_init() && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "coffer-agent starting");
    // The crypto library seeds its random generator once per process (tens of milliseconds);
    // do it beside the start-up work rather than on the first attestation.
    std::thread::spawn(|| {
        let _ = aws_lc_rs::rand::SecureRandom::fill(
            &aws_lc_rs::rand::SystemRandom::new(),
            &mut [0u8; 16],
        );
        tracing::debug!("random generator seeded");
    });
    if coffer_agent::vm::is_init() {
        // The init of a pod VM: boot it, serve, power off.
        if let Err(e) = vm_main() {
            eprintln!("coffer-agent: {e:#}");
        }
        coffer_agent::vm::power_off();
    }
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coffer-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn vm_main() -> anyhow::Result<()> {
    let boot = coffer_agent::vm::boot()?;
    let initdata = PathBuf::from("/run/initdata.toml");
    std::fs::write(&initdata, &boot.initdata).context("cannot keep the initdata")?;
    let scratch = PathBuf::from(coffer_agent::vm::SCRATCH);
    let (listen, remote) = match boot.channel {
        coffer_agent::vm::Channel::Serial(p) => (format!("serial:{}", p.display()), None),
        coffer_agent::vm::Channel::Tls(r) => ("tls".to_string(), Some(*r)),
    };
    run(Args {
        listen,
        remote,
        initdata,
        psp_socket: boot.psp_port,
        tsm_root: coffer_attester::TSM_REPORT_ROOT.into(),
        tpm_tcti: None,
        imds: coffer_attester::AZURE_IMDS.into(),
        // On a pod network the containers share the guest's namespace, which SetNetwork
        // configures; else they get one of their own with only a loopback interface.
        pod_netns: boot.pod_network.then(|| PathBuf::from("/proc/1/ns/net")),
        audit_log: scratch.join("audit.jsonl"),
        state_dir: scratch.join("state"),
        runtime: PathBuf::from("/usr/sbin/runc"),
        plain_http: boot.plain_http,
        cgroup_parent: "/coffer".into(),
        private_state: false,
        image_cache: Some(scratch.join("images")),
        // The guest's own traffic (the KBS, registries) takes the pod network when there is
        // one, else the host's forwarder over the agent port.
        egress: (!boot.pod_network).then(|| "port".into()),
        pod_network: boot.pod_network,
    })
}

/// What the attester is made from ([`Args`]' TEE options).
#[derive(Clone)]
struct TeeSource {
    psp_socket: Option<PathBuf>,
    tsm_root: PathBuf,
    tpm_tcti: Option<String>,
    imds: String,
}

impl TeeSource {
    fn of(args: &Args) -> Self {
        Self {
            psp_socket: args.psp_socket.clone(),
            tsm_root: args.tsm_root.clone(),
            tpm_tcti: args.tpm_tcti.clone(),
            imds: args.imds.clone(),
        }
    }
}

/// The attester: the launcher's emulated PSP channel when given, else this guest's own TEE.
fn attester(args: &TeeSource) -> anyhow::Result<Box<dyn coffer_kbs_client::Attester>> {
    Ok(match &args.psp_socket {
        Some(socket) => Box::new(coffer_kbs_client::PspChannelAttester::new(socket.clone())),
        None => {
            let mut guest = coffer_attester::Guest::with_tsm_root(&args.tsm_root);
            if args.tpm_tcti.is_some() {
                guest.tpm = args.tpm_tcti.clone();
            }
            guest.imds = args.imds.clone();
            coffer_attester::probe(&guest)?
        }
    })
}

fn run(args: Args) -> anyhow::Result<()> {
    enum Listen {
        Unix(PathBuf),
        Serial(PathBuf),
        /// A peer pod: mutual TLS on TCP, the multiplexer over it.
        Tls(coffer_podvm::remote::RemoteAgent),
    }
    let listen = if let Some(p) = args.listen.strip_prefix("unix:") {
        Listen::Unix(p.into())
    } else if let Some(p) = args.listen.strip_prefix("serial:") {
        Listen::Serial(p.into())
    } else if let (Some(r), "tls") = (&args.remote, args.listen.as_str()) {
        Listen::Tls(r.clone())
    } else {
        anyhow::bail!("--listen: use unix:PATH or serial:PATH");
    };
    let text = std::fs::read_to_string(&args.initdata)
        .with_context(|| format!("cannot read {}", args.initdata.display()))?;
    // Asked with the initdata's digest: a vTPM attester measures it into PCR 8 now, before
    // anything reads the initdata (SEV-SNP's HOST_DATA was set at launch).
    let (parsed, digest) = parse_initdata(&text)?;
    let tee = attester(&TeeSource::of(&args))?;
    let (initdata, digest) = if tee.tee() == coffer_wire::Tee::Se {
        // IBM SE sets nothing at launch that could carry the initdata: every attestation's user
        // data, which the Ultravisor's measurement covers, carries its digest instead, and the
        // KBS checks it (coffer_attester::se::user_data).
        tracing::info!("IBM SE: the initdata digest is bound into each attestation's user data");
        (parsed, digest)
    } else {
        let evidence = tee
            .evidence(&[0u8; 64], Some(&digest))
            .map_err(|e| anyhow::anyhow!("{}", e.0))?;
        tracing::debug!("evidence from the TEE");
        check_initdata(&text, tee.tee(), &evidence)?
    };
    drop(tee);
    if args.psp_socket.is_some() {
        eprintln!(
            "coffer-agent: EMULATED TEE: the emulated PSP gives no confidentiality (development only)"
        );
    }
    let audit = Arc::new(FileAudit::open(&args.audit_log)?);
    tracing::debug!("compiling the policy");
    let policy = Arc::new(AgentPolicy::new(
        initdata.data.get("policy.rego").map(String::as_str),
        audit,
    )?);
    tracing::info!(initdata = %hex::encode(&digest), policy = %policy.id(), "initdata bound to the attested launch; serving");
    if args.private_state {
        private_tmpfs(&args.state_dir)?;
        tracing::debug!("private state mounted");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A serial port (or a peer pod's TLS connection) carries the API and (with --egress port)
    // the network, multiplexed.
    let port = match &listen {
        Listen::Serial(p) => {
            let _guard = runtime.enter();
            let io = coffer_agent::port::open(p)
                .with_context(|| format!("cannot open {}", p.display()))?;
            Some(coffer_podvm::mux::start(io, coffer_podvm::mux::Side::Guest))
        }
        Listen::Tls(remote) => {
            let tls = runtime.block_on(coffer_agent::remote::accept(remote))?;
            let _guard = runtime.enter();
            Some(coffer_podvm::mux::start(
                tls,
                coffer_podvm::mux::Side::Guest,
            ))
        }
        Listen::Unix(_) => None,
    };
    let proxy = match (args.egress.as_deref(), &port) {
        (None, _) => None,
        (Some("port"), Some((opener, _))) => Some(runtime.block_on(
            coffer_agent::egress::start(coffer_agent::egress::Channel::Mux(opener.clone())),
        )?),
        (Some("port"), None) => anyhow::bail!("--egress port needs --listen serial:PATH"),

        (Some(e), _) => {
            let channel = e
                .strip_prefix("unix:")
                .map(PathBuf::from)
                .context("--egress: use unix:PATH or port")?;
            coffer_agent::egress::loopback_up().map_err(anyhow::Error::msg)?;
            tracing::debug!("loopback up");
            Some(runtime.block_on(coffer_agent::egress::start(
                coffer_agent::egress::Channel::Unix(channel),
            ))?)
        }
    };
    let pull = coffer_image::PullOptions {
        source: coffer_image::source::SourceOptions {
            plain_http: args.plain_http,
            proxy: proxy.clone(),
            ..Default::default()
        },
        cache_dir: args.image_cache.clone(),
        ..Default::default()
    };
    let owner_key = initdata.data.get("owner-key.pem").cloned();
    let log_recipient = initdata
        .data
        .get("log-recipient.pem")
        .map(|p| coffer_agent::sealed::Recipient::from_pem(p))
        .transpose()
        .context("initdata log-recipient.pem")?;
    if let Some(k) = &owner_key {
        coffer_agent::owner::validate_key(k)
            .map_err(|e| anyhow::anyhow!("initdata owner-key.pem: {e}"))?;
    }
    let mut containers = Containers::new(args.state_dir.clone(), args.runtime.clone(), pull)
        .with_cgroup_parent(&args.cgroup_parent);
    if let Some(ns) = &args.pod_netns {
        containers = containers.with_pod_netns(ns.clone());
    }
    let kbs = coffer_agent::keys::kbs_config(&initdata).map_err(anyhow::Error::msg)?;
    let kbs_address = kbs.url.as_deref().and_then(coffer_agent::net::kbs_address);
    if let Some(url) = kbs.url.clone() {
        // Attests with this TEE (the PSP channel) and the initdata, on first need. The client
        // (its trust roots: tens of milliseconds under TCG) is made once the agent serves.
        let (tee, proxy, text) = (TeeSource::of(&args), proxy.clone(), text.clone());
        let make = move || {
            let client = coffer_kbs_client::KbsClient::new(
                &url,
                coffer_kbs_client::http_client_via(None, proxy.as_deref())
                    .map_err(|e| e.to_string())?,
                attester(&tee).map_err(|e| format!("{e:#}"))?,
                coffer_jose::TeeKeyAlgorithm::EcP256,
            )
            .map_err(|e| e.to_string())?;
            Ok(client.with_initdata(text.clone()))
        };
        containers = containers.with_kbs(coffer_agent::container::KbsKeys::new(make, kbs));
    }
    let containers = Arc::new(containers);
    tracing::info!(
        owner_signed_exec = owner_key.is_some(),
        sealed_logs = log_recipient.is_some(),
        "initdata options"
    );
    let network = args
        .pod_network
        .then(|| coffer_agent::net::Network::pod_vm(kbs_address));
    let warm = containers.clone();
    let service = AgentService::new(policy, hex::encode(&digest), containers)
        .with_network(network)
        .with_owner_key(owner_key)
        .with_log_recipient(log_recipient);
    match (listen, port) {
        (Listen::Unix(path), _) => runtime
            .block_on(async {
                warm.warm_kbs();
                serve_unix(&path, service).await
            })
            .with_context(|| format!("cannot serve on {}", path.display())),
        (Listen::Serial(_) | Listen::Tls(_), Some((opener, streams))) => {
            runtime.block_on(async move {
                // Tell the host the API is served; its connections wait until then.
                let ready = async {
                    let mut s = opener.open().await?;
                    tokio::io::AsyncWriteExt::write_all(&mut s, &[coffer_podvm::mux::GUEST_READY])
                        .await?;
                    tokio::io::AsyncWriteExt::shutdown(&mut s).await?;
                    if coffer_agent::vm::booted() {
                        coffer_agent::vm::log_memory("agent ready");
                    }
                    coffer_agent::vm::start_later_modules();
                    warm.warm_kbs();
                    Ok::<(), std::io::Error>(())
                };
                let (served, _) = tokio::join!(serve_streams(streams, service), async {
                    if let Err(e) = ready.await {
                        tracing::warn!(error = %e, "cannot tell the host the agent is ready");
                    }
                });
                served.context("cannot serve on the host's channel")
            })
        }
        (Listen::Serial(_) | Listen::Tls(_), None) => {
            anyhow::bail!("the host's channel is not open")
        }
    }
}

/// Mounts a private tmpfs (mode 0700) on `dir` with mount(8); the agent runs in its own mount
/// namespace, so the host never sees it and it is gone when the namespace is.
fn private_tmpfs(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let out = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "mode=0700,nosuid,nodev",
            "coffer-state",
        ])
        .arg(dir)
        .output()
        .context("cannot run mount")?;
    if !out.status.success() {
        anyhow::bail!(
            "cannot mount a private tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
