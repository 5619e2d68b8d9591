//! `coffer podvm build`: builds a pod VM image (see `coffer_podvm::build`).

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `coffer podvm` arguments.
#[derive(Args)]
pub struct PodvmArgs {
    #[command(subcommand)]
    command: PodvmCommand,
}

#[derive(Subcommand)]
enum PodvmCommand {
    /// Build a pod VM (kernel, initrd with the agent, dm-verity root, measurements.json) from
    /// Debian packages; the same inputs give the same bytes.
    Build {
        /// The output directory (replaced once the build succeeded).
        #[arg(long)]
        out: PathBuf,
        /// The agent binary [default: coffer-agent beside this program].
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Use the Debian package files in DIR instead of downloading them.
        #[arg(long)]
        debs: Option<PathBuf>,
        /// Where downloaded package files are kept (and reused) [default: ~/.cache/coffer/debs].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Also make the pod VM launchable as this TEE's guest (`snp`), with `--firmware`.
        #[arg(long, requires = "firmware")]
        tee: Option<String>,
        /// The firmware of `--tee snp`: OVMF's AmdSev build (SEV metadata and the SNP
        /// kernel-hashes table; firmware without them is refused), kept as firmware-snp.fd.
        #[arg(long, requires = "tee")]
        firmware: Option<PathBuf>,
        /// Also make a bootable disk (GPT: an EFI system partition with a unified kernel
        /// image, the verity root, a scratch partition) in FORMAT: `raw` (AWS), `qcow2`
        /// (libvirt `boot = "disk"`, IBM Cloud), `vhd` (Azure, fixed); repeatable.
        #[arg(long = "disk", value_name = "FORMAT")]
        disks: Vec<String>,
        /// The disk's scratch partition (MiB).
        #[arg(long, default_value_t = 1024)]
        disk_scratch_mib: u64,
    },
}

/// The default package cache.
fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("coffer/debs")
}

/// Runs `coffer podvm`.
pub fn run(a: PodvmArgs) -> anyhow::Result<()> {
    match a.command {
        PodvmCommand::Build {
            out,
            agent,
            debs,
            cache,
            tee,
            firmware,
            disks,
            disk_scratch_mib,
        } => {
            let disks = disks
                .iter()
                .map(|d| coffer_podvm::disk::DiskFormat::parse(d))
                .collect::<Result<Vec<_>, _>>()?;
            match tee.as_deref() {
                None | Some("snp") => {}
                Some("tdx") => anyhow::bail!(
                    "--tee tdx: pod VM builds for TDX are not built yet (TDVF and MRTD/RTMR reference values); use --tee snp"
                ),
                Some(other) => anyhow::bail!("--tee {other}: use snp"),
            }
            let agent = crate::measure::agent_path(&agent)?;
            let manifest = coffer_podvm::build::build(&coffer_podvm::build::BuildOptions {
                out: out.clone(),
                agent,
                debs,
                cache: cache.unwrap_or_else(default_cache),
                snp_firmware: firmware,
                disks,
                scratch_mib: disk_scratch_mib,
            })?;
            eprintln!(
                "coffer: pod VM in {} (measurement {}, verity root {})",
                out.display(),
                manifest["measurement"]["emulated"].as_str().unwrap_or(""),
                manifest["verity"]["root_hash"].as_str().unwrap_or("")
            );
            Ok(())
        }
    }
}
