#![cfg_attr(
    not(any(
        feature = "libvirt",
        feature = "aws",
        feature = "azure",
        feature = "ibmcloud"
    )),
    allow(unused_imports, unreachable_code, unused_variables)
)]
//! `coffer-cloud`: the peer-pod daemon of one node (docs/peer-pods.md).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;

/// Creates this node's pod VMs through an infrastructure API and deletes those whose sandbox is
/// gone.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The configuration (TOML; docs/peer-pods.md).
    #[arg(long, default_value = "/etc/coffer/cloud.toml")]
    config: PathBuf,
    /// The unix socket to serve the local API on.
    #[arg(long, default_value = coffer_cloud::DEFAULT_SOCKET)]
    listen: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = coffer_cloud::Config::load(&args.config)?;
    let provider: Arc<dyn coffer_cloud::Provider> = match config.provider.as_str() {
        #[cfg(feature = "libvirt")]
        "libvirt" => {
            Arc::new(coffer_cloud::libvirt::Libvirt::open(&config).context("the libvirt provider")?)
        }
        #[cfg(feature = "aws")]
        "aws" => Arc::new(coffer_cloud::aws::Aws::open(&config).context("the aws provider")?),
        #[cfg(feature = "ibmcloud")]
        "ibmcloud" => Arc::new(
            coffer_cloud::ibmcloud::IbmCloud::open(&config).context("the ibmcloud provider")?,
        ),
        #[cfg(feature = "azure")]
        "azure" => {
            Arc::new(coffer_cloud::azure::Azure::open(&config).context("the azure provider")?)
        }
        other => anyhow::bail!("provider {other:?} is not in this build"),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(coffer_cloud::server::Daemon::new(config, provider).serve(&args.listen))
}
