//! `coffer-snapshotter`: serves the `coffer` snapshotter to containerd (a proxy plugin:
//! `[proxy_plugins.coffer] type = "snapshot"`, `address` = the socket).

use std::path::PathBuf;

use clap::Parser;

/// The `coffer` containerd snapshotter: image layers stay off the node.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The socket containerd connects to.
    #[arg(long, default_value = "/run/coffer/snapshotter.sock")]
    socket: PathBuf,
    /// The snapshotter's state (snapshot metadata).
    #[arg(long, default_value = "/var/lib/coffer/snapshotter")]
    root: PathBuf,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let run = async {
        let s = coffer_snapshotter::CofferSnapshotter::open(&args.root)?;
        tracing::info!(socket = %args.socket.display(), "serving the coffer snapshotter");
        coffer_snapshotter::serve(s, &args.socket).await
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
