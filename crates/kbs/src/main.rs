//! coffer-kbs: the Key Broker Service binary.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use coffer_kbs::{server, Config, Kbs};

// glibc's malloc contends across the runtime's worker threads under load; mimalloc keeps
// per-thread heaps (measured: see docs/kbs.md, "Performance").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Coffer Key Broker Service: releases secrets to TEEs after remote attestation.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Write a self-signed TLS certificate and key for development.
    GenTls {
        /// Certificate output (PEM).
        #[arg(long, default_value = "kbs-cert.pem")]
        cert: PathBuf,
        /// Private key output (PEM, mode 0600).
        #[arg(long, default_value = "kbs-key.pem")]
        key: PathBuf,
        /// Subject alternative names.
        #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
    },
}

/// Server flags; each has a same-named key in the TOML config file.
#[derive(Args)]
struct ServeArgs {
    /// TOML config file whose keys mirror these flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of the embedded store.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (shared store for several replicas).
    #[arg(long, env = "COFFER_KBS_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Serve plain HTTP instead of HTTPS (development only).
    #[arg(long)]
    insecure_http: bool,
    /// TLS certificate chain (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Ed25519 admin public key (PEM); repeat for several admins.
    #[arg(long)]
    admin_public_key: Vec<PathBuf>,
    /// Accept the sample TEE (NO security; testing only).
    #[arg(long)]
    allow_sample: bool,
    /// Accept the emulated TEE (NO confidentiality; development only).
    #[arg(long)]
    allow_emulated: bool,
    /// The emulated PSP's roots (PEM), trusted with --allow-emulated.
    #[arg(long)]
    emulated_root: Option<PathBuf>,
    /// Offline VCEK cache directory for SNP evidence without a certificate table.
    #[arg(long)]
    snp_vcek_dir: Option<PathBuf>,
    /// DCAP collateral (JSON) for TDX/SGX quotes; repeat for several platforms.
    #[arg(long)]
    dcap_collateral: Vec<PathBuf>,
    /// PCCS (or Intel PCS) URL to fetch DCAP collateral from for TDX/SGX quotes, cached per
    /// platform for an hour.
    #[arg(long)]
    pccs_url: Option<String>,
    /// Session lifetime in seconds [default: 300].
    #[arg(long)]
    session_ttl_secs: Option<u64>,
    /// Token lifetime in seconds [default: 300].
    #[arg(long)]
    token_ttl_secs: Option<u64>,
    /// Lifetime of a mesh workload certificate in seconds [default: 3600].
    #[arg(long)]
    mesh_cert_ttl_secs: Option<u64>,
    /// Bound on live sessions [default: 100000].
    #[arg(long)]
    max_sessions: Option<usize>,
    /// Audit log file [default: <data-dir>/audit.jsonl].
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// IBM Secure Execution: a host's host-key document (PEM or DER); repeat for several hosts.
    #[arg(long)]
    se_host_key_document: Vec<PathBuf>,
    /// IBM SE: IBM's host-key signing certificate or its intermediate CA (PEM); repeatable.
    #[arg(long)]
    se_signing_cert: Vec<PathBuf>,
    /// IBM SE: the root CA of the signing chain [default: the system's trust store].
    #[arg(long)]
    se_root_ca: Option<PathBuf>,
    /// IBM SE: a CRL of the signing chain or the host-key documents; repeatable.
    #[arg(long)]
    se_crl: Vec<PathBuf>,
    /// IBM SE: use host-key documents WITHOUT checking them against IBM's signing keys (tests).
    #[arg(long)]
    se_unverified_host_keys: bool,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        take!(
            listen,
            session_ttl_secs,
            token_ttl_secs,
            mesh_cert_ttl_secs,
            max_sessions
        );
        macro_rules! take_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f; } )* };
        }
        take_opt!(
            data_dir,
            database_url,
            tls_cert,
            tls_key,
            audit_log,
            emulated_root,
            snp_vcek_dir,
            pccs_url,
            se_root_ca
        );
        c.insecure_http |= self.insecure_http;
        c.allow_sample |= self.allow_sample;
        c.allow_emulated |= self.allow_emulated;
        c.admin_public_key.extend(self.admin_public_key);
        c.dcap_collateral.extend(self.dcap_collateral);
        c.se_host_key_document.extend(self.se_host_key_document);
        c.se_signing_cert.extend(self.se_signing_cert);
        c.se_crl.extend(self.se_crl);
        c.se_unverified_host_keys |= self.se_unverified_host_keys;
        Ok(c)
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, never a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::GenTls { cert, key, sans }) = cli.command {
        server::generate_self_signed(sans, &cert, &key)?;
        println!("wrote {} and {}", cert.display(), key.display());
        return Ok(());
    }
    let mut config = cli.serve.into_config()?;
    server::fit_file_limit(&mut config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listen = config.listen;
        let kbs = Kbs::new(config).await?;
        let listener =
            server::listen(listen).with_context(|| format!("cannot listen on {listen}"))?;
        tracing::info!(addr = %listener.local_addr()?, "coffer-kbs ready");
        server::serve(kbs, listener).await
    })
}
