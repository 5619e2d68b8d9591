//! `coffer`: the user's command-line tool.

mod attest;
mod ctl;
mod doctor;
mod image;
mod initdata;
mod install;
mod kbs;
mod measure;
mod podvm;
mod policy;
mod run;
mod secret;

use clap::{Parser, Subcommand};

// The CLI keeps the system allocator: with one runtime worker it does not contend, and an image
// pull peaks at about 30 MiB with it against about 67 MiB with mimalloc, which holds on to the
// pages the download path frees (measured with scripts/bench-image; `coffer kbs bench` is the
// same within noise either way). The KBS server uses mimalloc (docs/kbs.md, "Performance").

/// Coffer: confidential containers.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check this host for what each sandbox kind and TEE needs; say what to install.
    Doctor(doctor::DoctorArgs),
    /// Talk to a Key Broker Service: admin changes, resource fetches as a TEE, benchmarks.
    Kbs(kbs::KbsArgs),
    /// Verify TEE evidence offline.
    Attest(attest::AttestArgs),
    /// Pull images into root filesystems.
    Image(image::ImageArgs),
    /// Seal and unseal secrets (upstream sealed-secret format).
    Secret(secret::SecretArgs),
    /// Write initdata and print its digest.
    Initdata(initdata::InitdataArgs),
    /// Generate agent policies and initdata that pin every container of Kubernetes workloads.
    Policy(policy::PolicyArgs),
    /// Print the reference values for a sandbox and initdata (set-reference-values format).
    Measure(measure::MeasureArgs),
    /// Build pod VM images.
    Podvm(podvm::PodvmArgs),
    /// Run a container in a sandbox; streams its output and exits with its status (or, with
    /// -d, prints its name and leaves it running).
    Run(Box<run::RunArgs>),
    /// Run a command in a running container (subject to the agent policy, or signed by the
    /// owner); exits with its status.
    Exec(ctl::ExecArgs),
    /// Print a container's output.
    Logs(ctl::LogsArgs),
    /// List the containers of the running sandboxes.
    Ps(ctl::PsArgs),
    /// Remove a container and its sandbox.
    Rm(ctl::RmArgs),
    /// Install Coffer into a container runtime on this node.
    Install(install::InstallArgs),
    /// Keep one process sandbox (started by `coffer run`).
    #[command(name = coffer_keeper::SUBCOMMAND, hide = true)]
    Sandbox(coffer_keeper::KeeperArgs),
    /// The emulated PSP (development machines without TEE hardware).
    Psp {
        #[command(subcommand)]
        command: PspCommand,
    },
}

#[derive(Subcommand)]
enum PspCommand {
    /// Create the emulated PSP's state in DIR (if absent) and print the roots a KBS trusts.
    Init {
        /// State directory.
        #[arg(long, default_value = "coffer-psp")]
        dir: std::path::PathBuf,
    },
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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // One worker thread: the CLI is a client. `coffer kbs bench` runs its many clients on a
    // thread per core: with one, the clients' own work (each decrypts its resource: an ECDH)
    // left the server waiting, and the 2-core machine about a fifth idle.
    let workers = match &cli.command {
        Command::Kbs(args) if args.is_bench() => std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1),
        _ => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Doctor(args) => runtime.block_on(doctor::run(args)),
        Command::Kbs(args) => runtime.block_on(kbs::run(args)),
        Command::Attest(args) => runtime.block_on(attest::run(args)),
        Command::Image(args) => runtime.block_on(image::run(args)),
        Command::Secret(args) => runtime.block_on(secret::run(args)),
        Command::Initdata(args) => initdata::run(args),
        Command::Policy(args) => runtime.block_on(policy::run(args)),
        Command::Measure(args) => measure::run(args),
        Command::Podvm(args) => podvm::run(args),
        Command::Run(args) => {
            let status = runtime.block_on(run::run(*args))?;
            std::process::exit(status.clamp(0, 255));
        }
        Command::Exec(args) => {
            let status = runtime.block_on(ctl::exec(args))?;
            std::process::exit(status.clamp(0, 255));
        }
        Command::Logs(args) => runtime.block_on(ctl::logs(args)),
        Command::Ps(args) => runtime.block_on(ctl::ps(args)),
        Command::Rm(args) => runtime.block_on(ctl::rm(args)),
        Command::Install(args) => install::run(args),
        // The keeper runs its own single-threaded runtime on the main thread: the agent's
        // parent-death signal is tied to the thread that started it.
        Command::Sandbox(args) => Ok(coffer_keeper::keep(args)?),
        Command::Psp {
            command: PspCommand::Init { dir },
        } => {
            coffer_psp::EmulatedPsp::load_or_generate(&dir)?;
            eprintln!("coffer: EMULATED PSP: no confidentiality (development only)");
            println!("{}", dir.join("roots.pem").display());
            Ok(())
        }
    }
}
