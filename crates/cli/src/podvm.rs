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
        /// Where downloaded package files and TEE firmware built from source are kept (and
        /// reused) [default: ~/.cache/coffer/debs].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Also make the pod VM launchable as this TEE's guest: `snp` (firmware-snp.fd, OVMF's
        /// AmdSev build) or `tdx` (firmware-tdx.fd, a TDVF, and its MRTD/RTMR reference values
        /// in measurements.json). Without `--firmware`, the firmware is built from Debian's
        /// edk2 source package (about a minute, once; kept in the cache).
        #[arg(long)]
        tee: Option<String>,
        /// The firmware of `--tee`, instead of building it: for `snp`, OVMF with SEV metadata
        /// and the SNP kernel-hashes table; for `tdx`, a TDVF (firmware without them is
        /// refused).
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
    /// Build (or find in the cache) a TEE's firmware from Debian's edk2 source package and
    /// print its path, SHA-256 and source version: `snp` (OVMF's AmdSev build), `tdx` (TDVF).
    Firmware {
        /// The TEE: `snp` or `tdx`.
        #[arg(long)]
        tee: String,
        /// The cache [default: ~/.cache/coffer/debs].
        #[arg(long)]
        cache: Option<PathBuf>,
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
            use coffer_podvm::build::FirmwareFrom;
            let from = || match &firmware {
                Some(f) => FirmwareFrom::File(f.clone()),
                None => FirmwareFrom::DebianSource,
            };
            let (snp_firmware, tdx_firmware) = match tee.as_deref() {
                None => (None, None),
                Some("snp") => (Some(from()), None),
                Some("tdx") => (None, Some(from())),
                Some(other) => anyhow::bail!("--tee {other}: use snp or tdx"),
            };
            if tee.is_some() && firmware.is_none() {
                eprintln!("coffer: the {} firmware comes from Debian's edk2 source package: built once (about two minutes), then kept in the cache", tee.as_deref().unwrap_or_default());
            }
            let agent = crate::measure::agent_path(&agent)?;
            let manifest = coffer_podvm::build::build(&coffer_podvm::build::BuildOptions {
                out: out.clone(),
                agent,
                debs,
                cache: cache.unwrap_or_else(default_cache),
                snp_firmware,
                tdx_firmware,
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
        PodvmCommand::Firmware { tee, cache } => {
            let kind = match tee.as_str() {
                "snp" => coffer_podvm::firmware::Kind::AmdSev,
                "tdx" => coffer_podvm::firmware::Kind::IntelTdx,
                other => anyhow::bail!("--tee {other}: use snp or tdx"),
            };
            let built = coffer_podvm::firmware::build(
                kind,
                &coffer_podvm::firmware::Source::debian(&cache.unwrap_or_else(default_cache)),
            )?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "path": built.path,
                    "sha256": built.sha256,
                    "edk2_source": built.version,
                }))?
            );
            Ok(())
        }
    }
}
