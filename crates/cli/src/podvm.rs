//! `coffer podvm build`: builds a pod VM image (see `coffer_podvm::build`); `coffer podvm seal
//! --tee se`: seals an s390x kernel and initrd into an IBM Secure Execution image
//! (`coffer_se_image`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

/// The hosts an IBM Secure Execution image is sealed for, and how their host-key documents are
/// checked.
#[derive(Args, Default)]
struct HostKeyArgs {
    /// A host-key document (PEM or DER) of a host the image may run on; repeatable.
    #[arg(long = "host-key-document", value_name = "HKD")]
    host_key_documents: Vec<PathBuf>,
    /// IBM's host-key signing certificate and its intermediate CA; repeatable.
    #[arg(long = "se-signing-cert", value_name = "CERT")]
    signing_certs: Vec<PathBuf>,
    /// CRLs of the signing chain; repeatable.
    #[arg(long = "se-crl", value_name = "CRL")]
    crls: Vec<PathBuf>,
    /// The root CA of the signing chain [default: the system's trust store].
    #[arg(long = "se-root-ca", value_name = "CERT")]
    root_ca: Option<PathBuf>,
    /// Seal for host-key documents without checking them against IBM's signing chain
    /// (tests only: an unchecked document may be an attacker's key).
    #[arg(long, conflicts_with_all = ["signing_certs", "crls", "root_ca"])]
    no_verify_host_keys: bool,
}

impl HostKeyArgs {
    /// The hosts' public keys, each document checked against IBM's signing chain (unless
    /// `--no-verify-host-keys`, said loudly).
    fn load(&self) -> anyhow::Result<Vec<coffer_verifier::se::PublicKey>> {
        if self.host_key_documents.is_empty() {
            anyhow::bail!("an SE image is sealed for hosts: give at least one --host-key-document");
        }
        let chain = if self.no_verify_host_keys {
            eprintln!("coffer: WARNING: the host-key documents are NOT checked against IBM's signing chain (--no-verify-host-keys): for tests only");
            None
        } else {
            if self.signing_certs.is_empty() || self.crls.is_empty() {
                anyhow::bail!("the host-key documents must be checked against IBM's signing chain: give --se-signing-cert (the signing certificate and its intermediate CA) and --se-crl, or --no-verify-host-keys for a test");
            }
            Some(coffer_verifier::se::signing_chain(
                &self.signing_certs,
                &self.crls,
                self.root_ca.as_deref(),
            )?)
        };
        let documents = self
            .host_key_documents
            .iter()
            .map(|p| {
                std::fs::read(p)
                    .map(|b| (p.display().to_string(), b))
                    .with_context(|| format!("cannot read {}", p.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let hosts = coffer_verifier::se::HostKeys::load(&documents, chain.as_ref())?;
        Ok(hosts.keys().cloned().collect())
    }
}

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
        /// The machine: `x86_64` or `s390x` (IBM Z; give `--agent` built for it, and `--tee se`
        /// with the hosts' host-key documents for the Secure Execution image).
        #[arg(long, default_value = "x86_64")]
        arch: String,
        /// With `--tee se`: the hosts the SE image is sealed for.
        #[command(flatten)]
        hosts: HostKeyArgs,
    },
    /// Seal an s390x kernel, initrd and command line into an IBM Secure Execution image for
    /// the hosts whose host-key documents are given (IBM's image format, as `pvimg create`
    /// writes it); print its reference values (`se_image_tags`) and layout as JSON.
    Seal {
        /// The TEE: `se` (IBM Secure Execution).
        #[arg(long)]
        tee: String,
        /// The s390x kernel image (vmlinuz).
        #[arg(long)]
        kernel: PathBuf,
        /// The initrd.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// The hosts it is sealed for.
        #[command(flatten)]
        hosts: HostKeyArgs,
        /// The image to write (atomically).
        #[arg(long)]
        out: PathBuf,
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
            arch,
            hosts,
        } => {
            let arch = coffer_podvm::build::Arch::parse(&arch).map_err(anyhow::Error::msg)?;
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
                None | Some("se") => (None, None),
                Some("snp") => (Some(from()), None),
                Some("tdx") => (None, Some(from())),
                Some(other) => anyhow::bail!("--tee {other}: use snp, tdx or se"),
            };
            let finish = if tee.as_deref() == Some("se") {
                if arch != coffer_podvm::build::Arch::S390x {
                    anyhow::bail!(
                        "--tee se (IBM Secure Execution) builds an s390x pod VM: add --arch s390x"
                    );
                }
                if firmware.is_some() {
                    anyhow::bail!("--tee se has no firmware: --firmware does not apply");
                }
                Some(coffer_se_image::podvm_finish(hosts.load()?))
            } else {
                if !hosts.host_key_documents.is_empty() {
                    anyhow::bail!("--host-key-document belongs to --tee se");
                }
                None
            };
            if arch == coffer_podvm::build::Arch::S390x && agent.is_none() {
                anyhow::bail!("an s390x pod VM needs the agent built for s390x: give --agent (cargo build --target s390x-unknown-linux-gnu -p coffer-agent)");
            }
            if matches!(tee.as_deref(), Some("snp" | "tdx")) && firmware.is_none() {
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
                arch,
                finish,
            })?;
            match manifest["se"]["se_image_tags"][0].as_str() {
                Some(tags) => eprintln!(
                    "coffer: s390x pod VM in {} with its Secure Execution image {} (se_image_tags {tags}, verity root {})",
                    out.display(),
                    coffer_podvm::SE_IMAGE,
                    manifest["verity"]["root_hash"].as_str().unwrap_or("")
                ),
                None => eprintln!(
                    "coffer: pod VM in {} (measurement {}, verity root {})",
                    out.display(),
                    manifest["measurement"]["emulated"].as_str().unwrap_or("-"),
                    manifest["verity"]["root_hash"].as_str().unwrap_or("")
                ),
            }
            Ok(())
        }
        PodvmCommand::Seal {
            tee,
            kernel,
            initrd,
            cmdline,
            hosts,
            out,
        } => {
            if tee != "se" {
                anyhow::bail!("--tee {tee}: only se (IBM Secure Execution) images are sealed");
            }
            let keys = hosts.load()?;
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let kernel = read(&kernel)?;
            let initrd = initrd.as_ref().map(read).transpose()?;
            let loaders = coffer_se_image::Loaders::assemble()?;
            let t = std::time::Instant::now();
            let sealed = coffer_se_image::seal(
                &coffer_se_image::Inputs {
                    kernel: &kernel,
                    initrd: initrd.as_deref(),
                    cmdline: &cmdline,
                    host_keys: &keys,
                    pcf: coffer_se_image::DEFAULT_PCF,
                },
                &loaders,
            )?;
            let sealed_in = t.elapsed();
            coffer_fsutil::write_atomic(&out, &sealed.image, 0o644)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "se_image_tags": [hex::encode(&sealed.tags)],
                    "image": out,
                    "components": sealed.components,
                    "se_header": { "addr": sealed.header.0, "size": sealed.header.1 },
                    "ipib": { "addr": sealed.ipib.0, "size": sealed.ipib.1 },
                    "psw": { "mask": format!("{:#018x}", sealed.psw.0), "addr": format!("{:#x}", sealed.psw.1) },
                    "pages": sealed.pages,
                    "host_key_hashes": sealed.host_key_hashes.iter().map(hex::encode).collect::<Vec<_>>(),
                    "sealed_ms": sealed_in.as_secs_f64() * 1e3,
                }))?
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
