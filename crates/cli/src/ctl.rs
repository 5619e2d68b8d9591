//! `coffer exec`, `logs`, `ps` and `rm`: the host side of a running sandbox, through its agent's
//! API (every request subject to the agent policy). Also the output streaming `coffer run`
//! shares, and the owner's keys: one PEM file may hold the owner's signing key (owner-signed
//! exec) and the private key logs are sealed to.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use base64::{engine::general_purpose::STANDARD, Engine};
use clap::Args;
use coffer_agent::{
    api::proto::{
        agent_client::AgentClient, CloseStdinRequest, ExecProcessRequest, IssueExecNonceRequest,
        ListContainersRequest, ReadStreamRequest, TtyWinResizeRequest, WaitProcessRequest,
        WriteStreamRequest,
    },
    sealed::{RecipientKey, RecordPlace},
};
use coffer_image::sign::PemSigner;
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

use coffer_keeper::{SandboxDir, SandboxError, DEFAULT_STATE_DIR};

/// `n` random bytes in hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    hex::encode(b)
}

/// Explains an agent error in one line.
fn refused(what: &str, e: tonic::Status) -> anyhow::Error {
    match e.code() {
        tonic::Code::PermissionDenied => {
            anyhow::anyhow!("{what}: the agent refused: {}", e.message())
        }
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            anyhow::anyhow!("{what}: the sandbox's agent is gone ({})", e.message())
        }
        _ => anyhow::anyhow!("{what}: {}", e.message()),
    }
}

/// The owner's private keys, from one PEM file holding one or more of them.
pub struct OwnerKeys {
    signer: Option<PemSigner>,
    log: Option<RecipientKey>,
    path: PathBuf,
}

impl OwnerKeys {
    /// Reads every PEM private key in `path`: an Ed25519 or EC key signs execs, an X25519 key
    /// opens sealed logs.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
        let blocks = pem::parse_many(text.as_bytes())
            .with_context(|| format!("{} is not PEM", path.display()))?;
        let mut keys = Self {
            signer: None,
            log: None,
            path: path.to_path_buf(),
        };
        for b in blocks {
            let one = zeroize::Zeroizing::new(pem::encode(&b));
            if keys.log.is_none() {
                if let Ok(k) = RecipientKey::from_pem(&one) {
                    keys.log = Some(k);
                    continue;
                }
            }
            if keys.signer.is_none() {
                if let Ok(k) = PemSigner::from_der(b.contents()) {
                    keys.signer = Some(k);
                }
            }
        }
        if keys.signer.is_none() && keys.log.is_none() {
            bail!(
                "{} holds no Ed25519, EC or X25519 private key in PEM",
                path.display()
            );
        }
        Ok(keys)
    }

    fn log_key(&self) -> anyhow::Result<&RecipientKey> {
        self.log.as_ref().with_context(|| {
            format!(
                "{} holds no X25519 private key to open sealed logs",
                self.path.display()
            )
        })
    }
}

/// Streams a process's stdout and stderr (following it until it exits when `follow`) to this
/// process's stdout and stderr; sealed output is opened with `keys` or printed as JSON lines.
pub async fn stream_output(
    c: &AgentClient<Channel>,
    id: &str,
    exec_id: &str,
    follow: bool,
    keys: Option<&OwnerKeys>,
) -> anyhow::Result<()> {
    let log_key = keys.and_then(|k| k.log.as_ref());
    let noted = std::sync::atomic::AtomicBool::new(false);
    let pump = |stream: &'static str| {
        let mut c = c.clone();
        let noted = &noted;
        async move {
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if stream == "stdout" {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(tokio::io::stderr())
            };
            let mut offset = 0u64;
            loop {
                let r = c
                    .read_stream(ReadStreamRequest {
                        container_id: id.into(),
                        exec_id: exec_id.into(),
                        stream: stream.into(),
                        len: 64 << 10,
                        offset,
                        follow,
                    })
                    .await
                    .map_err(|e| refused(&format!("reading {stream}"), e))?
                    .into_inner();
                if r.offset > offset {
                    eprintln!(
                        "coffer: {} bytes of {stream} were dropped by the agent (it keeps 4 MiB)",
                        r.offset - offset
                    );
                }
                if r.len == 0 && r.data.is_empty() {
                    if r.eof || !follow {
                        return Ok::<_, anyhow::Error>(());
                    }
                    continue;
                }
                let place = RecordPlace {
                    container_id: id,
                    exec_id,
                    stream,
                    offset: r.offset,
                };
                if !r.sealed {
                    out.write_all(&r.data).await?;
                } else if let Some(k) = log_key {
                    out.write_all(&k.open(&place, &r.data)?).await?;
                } else {
                    if !noted.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        eprintln!(
                            "coffer: the output is sealed to the initdata's log recipient; \
                             open it with --owner-key, or save these lines and use \
                             `coffer logs --owner-key KEY --sealed FILE`"
                        );
                    }
                    let line = serde_json::to_string(&coffer_wire::sealed::SealedLine {
                        container_id: id.into(),
                        exec_id: exec_id.into(),
                        stream: stream.into(),
                        offset: r.offset,
                        record: STANDARD.encode(&r.data),
                    })?;
                    let mut stdout = tokio::io::stdout();
                    stdout.write_all(format!("{line}\n").as_bytes()).await?;
                    stdout.flush().await?;
                }
                out.flush().await?;
                offset = r.offset + u64::from(r.len);
            }
        }
    };
    let (o, e) = tokio::join!(pump("stdout"), pump("stderr"));
    o.and(e)
}

/// `coffer exec` arguments.
#[derive(Args)]
pub struct ExecArgs {
    /// The container.
    name: String,
    /// The owner's private key(s) (PEM): sign the exec (Ed25519 or EC key), open sealed output
    /// (X25519 key).
    #[arg(long)]
    owner_key: Option<PathBuf>,
    /// Environment variables to add (VAR=VALUE).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Pass this program's stdin to the command (WriteStream; subject to the agent policy).
    #[arg(short, long)]
    interactive: bool,
    /// Give the command a terminal (sized like this one; with -i this terminal goes raw).
    #[arg(short, long)]
    tty: bool,
    /// Where sandboxes keep their state.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs `coffer exec`; returns the command's exit status.
pub async fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    let sandbox = SandboxDir::new(&a.state_dir, &a.name)?;
    let keys = a.owner_key.as_deref().map(OwnerKeys::load).transpose()?;
    let mut c = sandbox.connect().await?;
    let mut req = ExecProcessRequest {
        container_id: a.name.clone(),
        exec_id: format!("exec-{}", random_hex(6)),
        args: a.command.clone(),
        env: a.env.clone(),
        stdin: a.interactive,
        tty: a.tty,
        ..Default::default()
    };
    if let Some(signer) = keys.as_ref().and_then(|k| k.signer.as_ref()) {
        req.nonce = c
            .issue_exec_nonce(IssueExecNonceRequest {
                container_id: a.name.clone(),
            })
            .await
            .map_err(|e| refused("exec", e))?
            .into_inner()
            .nonce;
        req.owner_signature = signer.sign(&coffer_agent::owner::exec_message(&req))?;
    }
    let exec_id = req.exec_id.clone();
    c.exec_process(req).await.map_err(|e| refused("exec", e))?;
    attach(&c, &a.name, &exec_id, a.interactive, a.tty, keys.as_ref()).await?;
    let status = c
        .wait_process(WaitProcessRequest {
            container_id: a.name.clone(),
            exec_id,
        })
        .await
        .map_err(|e| refused("exec", e))?
        .into_inner()
        .status;
    Ok(status)
}

/// Streams a process's output here until it ends; with `interactive` sends this program's
/// stdin to it (ending its input when ours ends or a write is refused), with `tty` keeps its
/// terminal sized like ours (and ours raw when also interactive).
pub async fn attach(
    c: &AgentClient<Channel>,
    id: &str,
    exec_id: &str,
    interactive: bool,
    tty: bool,
    keys: Option<&OwnerKeys>,
) -> anyhow::Result<()> {
    let _raw = (tty && interactive).then(RawTerminal::enter).flatten();
    if tty {
        follow_window_size(c, id, exec_id).await;
    }
    let input = interactive.then(|| {
        let (c, id, exec_id) = (c.clone(), id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let r = pump_stdin(&c, &id, &exec_id).await;
            // End of input either way, so that the process is not left waiting.
            let _ = c
                .clone()
                .close_stdin(CloseStdinRequest {
                    container_id: id,
                    exec_id,
                })
                .await;
            r
        })
    });
    let output = stream_output(c, id, exec_id, true, keys).await;
    // Once the output ended, input still pending is abandoned (a terminal may never send EOF).
    if let Some(mut h) = input {
        match tokio::time::timeout(Duration::from_millis(500), &mut h).await {
            Ok(Ok(Err(e))) => {
                output?;
                return Err(e);
            }
            Ok(_) => {}
            Err(_) => h.abort(),
        }
    }
    output
}

/// This program's terminal in raw mode (keys go to the remote terminal as typed), restored on
/// drop; `None` when stdin is not a terminal.
struct RawTerminal(rustix::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

/// Sizes the process's terminal like this program's stdout, now and on every SIGWINCH.
async fn follow_window_size(c: &AgentClient<Channel>, id: &str, exec_id: &str) {
    let send = |mut c: AgentClient<Channel>, id: String, exec_id: String| async move {
        if let Ok(w) = rustix::termios::tcgetwinsize(std::io::stdout()) {
            let _ = c
                .tty_win_resize(TtyWinResizeRequest {
                    container_id: id,
                    exec_id,
                    rows: w.ws_row.into(),
                    columns: w.ws_col.into(),
                })
                .await;
        }
    };
    send(c.clone(), id.into(), exec_id.into()).await;
    if let Ok(mut winch) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
    {
        let (c, id, exec_id) = (c.clone(), id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                send(c.clone(), id.clone(), exec_id.clone()).await;
            }
        });
    }
}

/// Sends this program's stdin to a process until its end.
async fn pump_stdin(c: &AgentClient<Channel>, id: &str, exec_id: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut c = c.clone();
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let n = stdin.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        c.write_stream(WriteStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            data: buf[..n].to_vec(),
        })
        .await
        .map_err(|e| refused("stdin", e))?;
    }
}

/// `coffer logs` arguments.
#[derive(Args)]
pub struct LogsArgs {
    /// The container.
    #[arg(required_unless_present = "sealed")]
    name: Option<String>,
    /// Keep following the output until the container exits.
    #[arg(short, long)]
    follow: bool,
    /// The private key (X25519, PEM) that opens output sealed to the initdata's log recipient;
    /// the file may hold the owner's other keys too.
    #[arg(long)]
    owner_key: Option<PathBuf>,
    /// Open sealed lines saved from `coffer run`, `exec` or `logs` instead of asking an agent.
    #[arg(long, requires = "owner_key")]
    sealed: Option<PathBuf>,
    /// Where sandboxes keep their state.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Runs `coffer logs`.
pub async fn logs(a: LogsArgs) -> anyhow::Result<()> {
    let keys = a.owner_key.as_deref().map(OwnerKeys::load).transpose()?;
    if let Some(file) = &a.sealed {
        let key = keys
            .as_ref()
            .context("--sealed needs --owner-key")?
            .log_key()?;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let l: coffer_wire::sealed::SealedLine =
                serde_json::from_str(line).with_context(|| {
                    format!("{} line {}: not a sealed record", file.display(), n + 1)
                })?;
            if a.name.as_deref().is_some_and(|name| name != l.container_id) {
                continue;
            }
            let record = STANDARD
                .decode(&l.record)
                .with_context(|| format!("{} line {}: bad base64", file.display(), n + 1))?;
            let place = RecordPlace {
                container_id: &l.container_id,
                exec_id: &l.exec_id,
                stream: &l.stream,
                offset: l.offset,
            };
            let plain = key.open(&place, &record)?;
            let w: &mut dyn std::io::Write = if l.stream == "stderr" {
                &mut err
            } else {
                &mut out
            };
            w.write_all(&plain)?;
        }
        return Ok(());
    }
    let name = a.name.as_deref().unwrap_or_default();
    if let Some(k) = &keys {
        k.log_key()?;
    }
    let sandbox = SandboxDir::new(&a.state_dir, name)?;
    let c = sandbox.connect().await?;
    stream_output(&c, name, "", a.follow, keys.as_ref()).await
}

/// `coffer ps` arguments.
#[derive(Args)]
pub struct PsArgs {
    /// Where sandboxes keep their state.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// How long `coffer ps` waits for a sandbox's agent to list its containers.
const PS_ANSWER: Duration = Duration::from_secs(10);

/// Runs `coffer ps`: the containers of every running sandbox, and the sandboxes whose keeper
/// recorded a failure (until `coffer rm`); reaps sandboxes whose keeper was killed.
pub async fn ps(a: PsArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let entries = match std::fs::read_dir(&a.state_dir) {
        Ok(e) => e.filter_map(Result::ok).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", a.state_dir.display())),
    };
    for e in entries {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(sandbox) = SandboxDir::new(&a.state_dir, &name) else {
            continue;
        };
        if !sandbox.alive() {
            if let Some(record) = sandbox.failure() {
                let why = record.lines().next().unwrap_or_default().to_string();
                rows.push([name, "-".into(), format!("failed: {why}"), "-".into()]);
                continue;
            }
            if let Err(e) = sandbox.reap() {
                eprintln!("coffer: cannot clean up the dead sandbox {name}: {e:#}");
            }
            continue;
        }
        let listed = match sandbox.connect().await {
            // A guest that stopped answering shows as such instead of holding `ps`.
            Ok(mut c) => {
                match tokio::time::timeout(PS_ANSWER, c.list_containers(ListContainersRequest {}))
                    .await
                {
                    Ok(r) => r
                        .map(|r| r.into_inner().containers)
                        .map_err(|e| e.message().to_string()),
                    Err(_) => Err(format!(
                        "the agent did not answer within {}s (its console: {})",
                        PS_ANSWER.as_secs(),
                        sandbox.dir.join("agent.log").display()
                    )),
                }
            }
            Err(e) => Err(format!("{e:#}")),
        };
        match listed {
            Ok(list) => {
                for s in list {
                    let state = if s.state == "exited" {
                        format!("exited ({})", s.exit_status)
                    } else {
                        s.state
                    };
                    rows.push([s.id, s.image, state, ago(s.created)]);
                }
            }
            Err(e) => rows.push([name, "-".into(), format!("unreachable: {e}"), "-".into()]),
        }
    }
    rows.sort();
    let header = ["NAME", "IMAGE", "STATUS", "CREATED"].map(String::from);
    let width: Vec<usize> = (0..4)
        .map(|i| {
            std::iter::once(&header)
                .chain(&rows)
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in std::iter::once(&header).chain(&rows) {
        println!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2]
        );
    }
    Ok(())
}

fn ago(unix: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = (now - unix).max(0) as u64;
    format!("{} ago", humantime::format_duration(Duration::from_secs(s)))
}

/// `coffer rm` arguments.
#[derive(Args)]
pub struct RmArgs {
    /// The container.
    name: String,
    /// Remove it even while it runs (killing it).
    #[arg(short, long)]
    force: bool,
    /// Where sandboxes keep their state.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

/// Runs `coffer rm`: removes the container and tears its sandbox down.
pub async fn rm(a: RmArgs) -> anyhow::Result<()> {
    let sandbox = SandboxDir::new(&a.state_dir, &a.name)?;
    match sandbox.stop(a.force).await {
        Err(e @ (SandboxError::Unreachable { .. } | SandboxError::Agent { .. })) if !a.force => {
            Err(anyhow::Error::from(e).context("`coffer rm -f` tears it down anyway"))
        }
        r => Ok(r?),
    }
}
