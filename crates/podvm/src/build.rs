//! `coffer podvm build`: a pod VM image from Debian packages and the agent binary.
//!
//! * `vmlinuz` — the kernel of `linux-image-cloud-amd64` from bookworm-backports ([`KERNEL_SUITE`]:
//!   6.12, with the SEV-SNP and TDX guest drivers and configfs-tsm).
//! * `initrd.img` — `/init` is `coffer-agent` (debug info stripped) with the C libraries it links
//!   (`libc6`, `libgcc-s1`; the TPM 2.0 software stack for the Azure vTPM attesters: Debian's
//!   `libtss2-*` ESAPI, marshalling, TCTI loader and device TCTI, and `libssl3`'s libcrypto,
//!   which the ESAPI uses) and the kernel modules it loads (virtio, device-mapper targets,
//!   squashfs, fw_cfg, AES-XTS; compressed modules stored decompressed), listed in load order in
//!   `/etc/coffer/modules`, and those it loads only on hardware some guests have (the TEE guest
//!   drivers, a cloud's: [`Device`]) in one listing per device; e2fsprogs' `mke2fs` (the
//!   scratch's filesystem, made at boot) with the libraries it links.
//! * `root.img` — a squashfs (`mksquashfs`, all files root-owned and dated 0) holding `runc`,
//!   `libseccomp2`, `libc6`, `busybox-static`, `cryptsetup` (for encrypted block volumes: LUKS2
//!   with dm-integrity) and `xtables-nft-multi`
//!   (iptables, for the attested mesh) with the libraries they link and the iptables extensions
//!   the mesh uses, and the CA bundle of `ca-certificates` (the Mozilla roots, concatenated in
//!   name order), followed by its dm-verity hash tree.
//! * `cmdline` — the kernel command line; `coffer.verity=` carries the root hash.
//! * `measurements.json` — the inputs (package files and their SHA-256), the outputs' SHA-256,
//!   the verity parameters and the emulated launch measurement.
//!
//! Builds are reproducible: the same package files and agent give the same bytes (sorted
//! entries, fixed owners and times, a content-derived verity salt, no host paths). Package files
//! come from `--debs DIR` when given, else `apt-get download` into the cache directory, which
//! then pins them for later builds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::json;

use crate::{
    initrd::{Initrd, Node},
    launch::{launch_digest, sha256_file},
    verity,
};

/// The Debian packages a pod VM is made of (the kernel's meta package names the kernel).
pub const PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "libc6",
    "libgcc-s1",
    "runc",
    "libseccomp2",
    "busybox-static",
    "ca-certificates",
    "libtss2-esys-3.0.2-0",
    "libtss2-sys1",
    "libtss2-mu0",
    "libtss2-tctildr0",
    "libtss2-tcti-device0",
    "libssl3",
    // cryptsetup and the libraries it links (`DT_NEEDED`, transitively).
    "cryptsetup-bin",
    "libcryptsetup12",
    "libpopt0",
    "libuuid1",
    "libblkid1",
    "libdevmapper1.02.1",
    "libargon2-1",
    "libjson-c5",
    "libselinux1",
    "libpcre2-8-0",
    "libudev1",
    // e2fsprogs' mke2fs (the scratch filesystem, with lazily initialized inode tables) and the
    // libraries it links besides libblkid and libuuid.
    "e2fsprogs",
    "libext2fs2",
    "libcom-err2",
    // iptables (nft back end) for the attested mesh's redirect rules, and its extensions.
    "iptables",
    "libxtables12",
    "libnftnl11",
    "libmnl0",
];

/// The iptables extensions the mesh's rules use (`dlopen`ed from the xtables directory).
const XTABLES: &[&str] = &[
    "libxt_mark.so",
    "libxt_REDIRECT.so",
    "libxt_tcp.so",
    "libxt_standard.so",
    "libxt_cgroup.so",
];

/// The C runtime, each library from its package: in the initrd for the agent, in the root for
/// runc.
fn c_libs(arch: Arch) -> Vec<(&'static str, String)> {
    let t = arch.triplet();
    vec![
        ("libc6", format!("lib/{t}/{}", arch.loader().0)),
        ("libc6", format!("lib/{t}/libc.so.6")),
        ("libc6", format!("lib/{t}/libm.so.6")),
        ("libgcc-s1", format!("lib/{t}/libgcc_s.so.1")),
    ]
}

/// Where the initramfs holds e2fsprogs' `mke2fs`, which the agent runs to make the scratch's
/// filesystem.
pub const MKE2FS: &str = "usr/sbin/mke2fs";

pub use crate::apt::{s390x_apt, KERNEL_SUITE};
pub use crate::arch::Arch;

/// The kernel's meta package for `arch` (in [`KERNEL_SUITE`]).
pub fn kernel_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => PACKAGES[0],
        Arch::S390x => "linux-image-s390x",
    }
}

/// The kernel modules the agent loads at boot on `arch` ([`MODULES`], [`S390X_MODULES`]).
pub fn modules_for(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::X86_64 => MODULES,
        Arch::S390x => S390X_MODULES,
    }
}

/// The kernel command line on `arch` without the verity parameters ([`CMDLINE`],
/// [`S390X_CMDLINE`]).
pub fn cmdline_for(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => CMDLINE,
        Arch::S390x => S390X_CMDLINE,
    }
}

/// The packages of the TPM 2.0 stack ([`TSS_LIBS`]): x86 only, where the Azure vTPM attesters run.
const TSS_PACKAGES: &[&str] = &[
    "libtss2-esys-3.0.2-0",
    "libtss2-sys1",
    "libtss2-mu0",
    "libtss2-tctildr0",
    "libtss2-tcti-device0",
];

/// The TPM 2.0 stack the agent links (`DT_NEEDED`, transitively) and the TCTI the TSS loader
/// opens at run time for `/dev/tpmrm0`: initrd only.
const TSS_LIBS: &[(&str, &str)] = &[
    (
        "libtss2-esys-3.0.2-0",
        "usr/lib/x86_64-linux-gnu/libtss2-esys.so.0",
    ),
    ("libtss2-sys1", "usr/lib/x86_64-linux-gnu/libtss2-sys.so.1"),
    ("libtss2-mu0", "usr/lib/x86_64-linux-gnu/libtss2-mu.so.0"),
    (
        "libtss2-tctildr0",
        "usr/lib/x86_64-linux-gnu/libtss2-tctildr.so.0",
    ),
    (
        "libtss2-tcti-device0",
        "usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",
    ),
    ("libssl3", "usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
];

/// CPU-accelerated crypto: refused (ENODEV) by a CPU without the instructions (AES-NI; IBM Z's
/// CPACF functions, which QEMU's emulation lacks), where the generic code serves.
pub const CPU_CRYPTO_MODULES: &[&str] = &["aesni_intel", "aes_s390", "sha256_s390"];

/// The TEE guest drivers, which refuse to load (ENODEV) outside their TEE: loaded at boot only
/// where [`Device::SevSnp`] or [`Device::Tdx`] is seen; `uvdevice` (IBM Z's Ultravisor device) at
/// every s390x boot.
pub const TEE_MODULES: &[&str] = &["tsm", "sev_guest", "tdx_guest", "uvdevice"];

/// The clouds' device drivers for a disk-booted pod VM ([`Device::HyperV`], [`Device::Nitro`]),
/// which refuse to load (ENODEV, or their dependency missing) on other machines.
pub const CLOUD_MODULES: &[&str] = &["hv_vmbus", "hv_storvsc", "hv_netvsc", "sd_mod", "ena"];

/// The DHCP client's hook in the root filesystem (busybox `udhcpc -s`): a disk-booted pod VM in
/// a cloud takes its own interface's address by DHCP, and reaches the metadata service
/// (169.254.169.254, where its user data is) through the router the lease names. No default
/// route: the guest's and its containers' traffic goes through the node.
pub const UDHCPC_SCRIPT: &str = "#!/bin/sh
# coffer-agent runs udhcpc once, for the VM's own interface ($interface).
ip() { /bin/busybox ip \"$@\"; }
case \"$1\" in
deconfig)
    ip -4 addr flush dev \"$interface\"
    ip link set \"$interface\" up
    ;;
bound|renew)
    ip -4 addr flush dev \"$interface\"
    ip addr add \"$ip/${mask:-24}\" dev \"$interface\"
    if [ -n \"$router\" ]; then
        ip route replace 169.254.169.254/32 via \"${router%% *}\" dev \"$interface\"
    fi
    ;;
esac
exit 0
";

/// Kernel modules the agent loads at boot, before it serves (their dependencies are added, in
/// order): what the guest's disks, console channels, network and attestation need.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "qemu_fw_cfg",
    "squashfs",
    // SHA-256 with SHA-NI, AVX2 or SSSE3, for dm-verity's and dm-integrity's hashing: without it
    // both use the kernel's generic C SHA-256 (sha256-generic).
    "sha256_ssse3",
    "dm_verity",
    "dm_integrity",
    "dm_crypt",
    "xts",
    "aesni_intel",
];

/// Hardware only some x86-64 pod VMs have. The agent loads its drivers ([`Device::modules`],
/// listed in [`Device::listing`]) at boot only where the guest has it (elsewhere they refuse to
/// load), and removes the others' files unloaded, freeing the initramfs memory they held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// An AMD SEV-SNP guest, where the kernel registers the `sev-guest` platform device.
    SevSnp,
    /// An Intel TDX guest: the CPU feature `tdx_guest`.
    Tdx,
    /// Hyper-V (Azure): the hypervisor's CPUID signature `Microsoft Hv`.
    HyperV,
    /// AWS Nitro: a PCI device of Amazon's (vendor 0x1d0f: ENA network, NVMe disks).
    Nitro,
}

impl Device {
    /// Every device, in the order the agent checks them.
    pub const ALL: [Device; 4] = [Device::SevSnp, Device::Tdx, Device::HyperV, Device::Nitro];

    /// The device's short name, as in its listing's file name.
    pub fn name(self) -> &'static str {
        match self {
            Device::SevSnp => "sev-snp",
            Device::Tdx => "tdx",
            Device::HyperV => "hyperv",
            Device::Nitro => "nitro",
        }
    }

    /// The kernel modules its drivers are (their dependencies not loaded at boot anyway are
    /// added, in order): the TEE guest drivers with configfs-tsm; Hyper-V's VMBus with its
    /// SCSI disks and network; AWS's ENA network (its NVMe disks are built into the kernel).
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Device::SevSnp => &["tsm", "sev_guest"],
            Device::Tdx => &["tsm", "tdx_guest"],
            Device::HyperV => &["hv_vmbus", "hv_storvsc", "hv_netvsc", "sd_mod"],
            Device::Nitro => &["ena"],
        }
    }

    /// The initramfs file listing its modules in load order.
    pub fn listing(self) -> String {
        format!("/etc/coffer/modules.{}", self.name())
    }
}

/// Kernel modules the agent loads once it serves, on a thread of their own, and waits for only
/// where a feature needs them (their dependencies not loaded at boot are added, in order).
pub const LATER_MODULES: &[&str] = &[
    // LUKS2 with integrity: dm-crypt's AEAD (authenc of HMAC and XTS) and the kernel crypto
    // API's socket interface, which cryptsetup uses for its key slots.
    "authenc",
    "af_alg",
    "algif_skcipher",
    "algif_hash",
    // The attested mesh: iptables-nft's nat table with REDIRECT, mark and tcp matches, and the
    // connection tracking SO_ORIGINAL_DST reads.
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "xt_mark",
    "xt_REDIRECT",
    "xt_tcpudp",
    "xt_cgroup",
    // A peer pod's pod interfaces, carried over VXLAN from the node.
    "vxlan",
];

/// The kernel modules an s390x pod VM's agent loads at boot (virtio-ccw and the SCLP console are
/// built into Debian's s390x kernel): its disks and network, the verity root, the scratch
/// disk's integrity and encryption with the CPACF-backed AES and SHA-256, its ext4, and the
/// Ultravisor's device for Secure Execution attestation.
pub const S390X_MODULES: &[&str] = &[
    "virtio_blk",
    "virtio_net",
    "squashfs",
    "sha256_s390",
    "dm_verity",
    "dm_integrity",
    "dm_crypt",
    "xts",
    "aes_s390",
    "uvdevice",
    // The scratch filesystem and the CRC32C its metadata checksums (and libcrc32c, for the mesh's
    // netfilter modules) use: built into the x86 kernel; the softdep names an alias, which the
    // agent cannot resolve (no modprobe).
    "crc32c_generic",
    "ext4",
];

/// The s390x kernel command line (the SCLP console), without the verity parameters.
pub const S390X_CMDLINE: &str =
    "console=ttysclp0 panic=-1 quiet loglevel=4 rdinit=/init cryptomgr.notests";

/// The kernel command line, without the verity parameters; it is measured, so what it turns off
/// is attested.
///
/// * `cryptomgr.notests` skips the kernel's crypto self-tests (known-answer tests each algorithm
///   runs when first instantiated): 0.4 s of a TCG boot. They catch a broken implementation, as
///   FIPS mode requires, and defend nothing against the host.
/// * `initcall_blacklist=` skips built-in initializations of Debian's kernel that a pod VM never
///   uses, 0.25 s of a TCG boot: the jitter entropy source of the crypto API's DRBG (which goes
///   on without it outside FIPS mode; the kernel's own RNG never used it); the built-in
///   certificates of module signatures (the pod VM's modules are unsigned, vouched for by the
///   measured initramfs); BPF's TCP congestion-control functions and its test struct_ops; the
///   `encrypted` key type; hibernation's `/dev/snapshot`; tracefs's kprobe events and
///   `trace_printk` export; the BLAKE2s library's self-test (a known-answer test, as
///   `cryptomgr.notests` skips); and the trace events' enum maps (`trace_eval_init`: a pass
///   that rewrites the enum names in every trace event's print format to their values, for
///   tools that parse tracefs's `format` files, of which the pod VM has none; 0.25 s of a TCG
///   boot on its own).
/// * `noreplace-smp` keeps the kernel's `lock` prefixes on a one-vCPU VM instead of rewriting
///   each of them to a no-op at boot (the "switching to UP code" pass over every atomic
///   instruction of the kernel): 0.3 s of a TCG boot, where each patched instruction discards
///   translated code. The kernel keeps the code it would run on more vCPUs, correct on any
///   number; an uncontended `lock` costs a one-vCPU guest a few cycles.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init cryptomgr.notests \
     noreplace-smp initcall_blacklist=jent_mod_init,load_system_certificate_list,bpf_tcp_ca_kfunc_init,\
     bpf_dummy_struct_ops_init,init_encrypted,snapshot_device_init,init_kprobe_trace,\
     init_trace_printk_function_export,blake2s_mod_init,trace_eval_init";

/// What to build from.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The output directory (replaced as a whole once the build succeeded).
    pub out: PathBuf,
    /// The agent binary.
    pub agent: PathBuf,
    /// Package files to use; when `None`, downloaded into `cache`.
    pub debs: Option<PathBuf>,
    /// Where downloaded package files are kept.
    pub cache: PathBuf,
    /// Firmware for SEV-SNP launches, kept in the pod VM as [`crate::FIRMWARE_SNP`]: it must
    /// carry SEV metadata and the SNP kernel-hashes table (OVMF's AmdSev build), or measured
    /// direct boot would measure nothing of the kernel.
    pub snp_firmware: Option<FirmwareFrom>,
    /// Firmware for TDX launches (a TDVF), kept in the pod VM as [`crate::FIRMWARE_TDX`].
    pub tdx_firmware: Option<FirmwareFrom>,
    /// Bootable disks to make besides the kernel-boot files (see [`crate::disk`]), each in its
    /// format.
    pub disks: Vec<crate::disk::DiskFormat>,
    /// The disks' scratch partition (MiB).
    pub scratch_mib: u64,
    /// The machine it is for.
    pub arch: Arch,
    /// A last step on the staged output before it is moved into place, which may add files and
    /// manifest entries (`coffer-se-image` seals an s390x pod VM's SE image here).
    pub finish: Option<Finish>,
}

/// A last build step: given the staging directory and the manifest (`measurements.json`), it
/// adds what it makes or says why it cannot.
#[derive(Clone)]
pub struct Finish(
    /// The step.
    pub std::sync::Arc<FinishFn>,
);

/// What a [`Finish`] runs: the staging directory, the manifest; `Err` says why it failed.
pub type FinishFn = dyn Fn(&Path, &mut serde_json::Value) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Finish(..)")
    }
}

/// Where a TEE's firmware comes from.
#[derive(Clone, Debug)]
pub enum FirmwareFrom {
    /// This file (checked before anything is built).
    File(PathBuf),
    /// Built from Debian's edk2 source package ([`crate::firmware`]), kept in the cache.
    DebianSource,
}

impl FirmwareFrom {
    /// The image and, when built here, the edk2 source version it was built from.
    fn load(
        &self,
        kind: crate::firmware::Kind,
        cache: &Path,
    ) -> Result<(Vec<u8>, Option<String>), BuildError> {
        let what = match kind {
            crate::firmware::Kind::AmdSev => "SEV-SNP",
            crate::firmware::Kind::IntelTdx => "TDX",
        };
        match self {
            FirmwareFrom::File(f) => {
                let fw =
                    std::fs::read(f).map_err(io(format!("the {what} firmware {}", f.display())))?;
                crate::firmware::check(kind, &fw).map_err(|e| {
                    BuildError::Missing(format!(
                        "{} cannot be the {what} firmware: {e}",
                        f.display()
                    ))
                })?;
                Ok((fw, None))
            }
            FirmwareFrom::DebianSource => {
                let built = crate::firmware::build(kind, &crate::firmware::Source::debian(cache))
                    .map_err(|e| BuildError::Missing(e.to_string()))?;
                let fw =
                    std::fs::read(&built.path).map_err(io(built.path.display().to_string()))?;
                Ok((fw, Some(built.version)))
            }
        }
    }
}

/// The package whose systemd-stub makes the disks' unified kernel image.
pub const STUB_PACKAGE: &str = "systemd-boot-efi";

/// A failed build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A tool failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The command.
        tool: String,
        /// Its error output.
        detail: String,
    },
    /// A package or file is missing.
    #[error("{0}")]
    Missing(String),
    /// The kernel package's bzImage cannot be booted directly (see [`crate::bzimage`]).
    #[error(transparent)]
    Kernel(#[from] crate::bzimage::BzImageError),
    /// I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn disk_error(e: crate::disk::DiskError) -> BuildError {
    BuildError::Missing(format!("the bootable disk: {e}"))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, BuildError> {
    let tool = format!("{:?}", cmd.get_program());
    let out = cmd.output().map_err(|e| BuildError::Tool {
        tool: tool.clone(),
        detail: format!("cannot run it: {e} (is it installed?)"),
    })?;
    if !out.status.success() {
        return Err(BuildError::Tool {
            tool,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// The package file of `name` for `arch` in `dir` (`NAME_VERSION_ARCH.deb`, or `_all`), if any;
/// the newest by name when several are there.
fn find_deb(dir: &Path, name: &str, backports: bool, arch: Arch) -> Option<PathBuf> {
    let prefix = format!("{name}_");
    let ours = format!("_{}.deb", arch.deb_arch());
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix)
                    && (n.ends_with(&ours) || n.ends_with("_all.deb"))
                    && (!backports || n.contains("~bpo"))
            })
        })
        .collect();
    found.sort();
    found.pop()
}

/// Where a build's package files come from: `given` (`--debs`), else the cache, where they are
/// downloaded once and then kept (which pins them for later builds).
struct Debs<'a> {
    given: Option<&'a Path>,
    cache: &'a Path,
    arch: Arch,
}

impl<'a> Debs<'a> {
    fn of(o: &'a BuildOptions) -> Self {
        Self {
            given: o.debs.as_deref(),
            cache: &o.cache,
            arch: o.arch,
        }
    }

    fn get(&self, name: &str) -> Result<PathBuf, BuildError> {
        self.get_from(name, None)
    }

    /// Where downloaded package files of this machine are kept: the cache (x86), its `s390x/`.
    fn download_dir(&self) -> PathBuf {
        match self.arch {
            Arch::X86_64 => self.cache.to_path_buf(),
            Arch::S390x => self.cache.join("s390x"),
        }
    }

    /// The kernel's package (the one [`kernel_package`] depends on) and its file.
    fn kernel(&self) -> Result<(String, PathBuf), BuildError> {
        let meta = self.get_from(kernel_package(self.arch), Some(KERNEL_SUITE))?;
        let depends = String::from_utf8_lossy(&run(Command::new("dpkg-deb")
            .arg("-f")
            .arg(&meta)
            .arg("Depends"))?)
        .to_string();
        let name = depends
            .split([',', ' ', '|'])
            .find(|d| d.starts_with("linux-image-"))
            .ok_or_else(|| BuildError::Missing(format!("{} names no kernel", meta.display())))?
            .to_string();
        let file = self.get(&name)?;
        Ok((name, file))
    }

    /// A package file of `name`, from `suite` (its version then carries `~bpo`) when given.
    fn get_from(&self, name: &str, suite: Option<&str>) -> Result<PathBuf, BuildError> {
        let cached = self.download_dir();
        let dir = self.given.unwrap_or(&cached);
        let backports = suite.is_some();
        if let Some(p) = find_deb(dir, name, backports, self.arch) {
            return Ok(p);
        }
        if self.given.is_some() {
            return Err(BuildError::Missing(format!(
                "no {name}_*.deb in {}",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        tracing::info!(package = name, "downloading");
        let what = match suite {
            Some(suite) => format!("{name}/{suite}"),
            None => name.to_string(),
        };
        let mut apt = match self.arch {
            Arch::X86_64 => Command::new("apt-get"),
            Arch::S390x => s390x_apt(self.cache).map_err(io("cannot set up apt for s390x"))?,
        };
        let downloaded = run(apt.args(["download", "-q", &what]).current_dir(dir));
        // The installed version (e.g. a security update) may be one the mirror does not serve:
        // then the newest version the sources list.
        let downloaded = match (downloaded, suite) {
            (Err(e), None) if self.arch == Arch::X86_64 => match mirror_version(name) {
                Some(v) => run(Command::new("apt-get")
                    .args(["download", "-q", &format!("{name}={v}")])
                    .current_dir(dir))
                .map_err(|_| e),
                None => Err(e),
            },
            (r, _) => r,
        };
        downloaded.map_err(|e| match suite {
            Some(suite) => BuildError::Missing(format!(
                "{e} (the kernel comes from Debian {suite}: add `deb http://deb.debian.org/debian {suite} main` to apt's sources and run apt-get update)"
            )),
            None => e,
        })?;
        find_deb(dir, name, backports, self.arch).ok_or_else(|| {
            BuildError::Missing(format!("apt-get download {name} left no package file"))
        })
    }
}

/// Holds the s390x package cache ([`crate::apt::s390x_lock`]) and refreshes its index; offline,
/// the package files fetched before serve (warned).
fn s390x_ready(cache: &Path) -> Result<std::fs::File, BuildError> {
    let lock = crate::apt::s390x_lock(cache).map_err(io("cannot lock the s390x package cache"))?;
    if let Err(e) = run(s390x_apt(cache)
        .map_err(io("cannot set up apt for s390x"))?
        .arg("update"))
    {
        tracing::warn!(error = %e, "the s390x package index cannot be refreshed: using the package files fetched before");
    }
    Ok(lock)
}

/// The s390x kernel package an s390x pod VM is built with, and its file: fetched into
/// `cache/s390x/` as [`build`] fetches it (and then kept, which pins it).
pub fn s390x_kernel(cache: &Path) -> Result<(String, PathBuf), BuildError> {
    let _held = s390x_ready(cache)?;
    Debs {
        given: None,
        cache,
        arch: Arch::S390x,
    }
    .kernel()
}

/// The newest version of `name` that apt's sources serve (`apt-cache madison`), if any.
fn mirror_version(name: &str) -> Option<String> {
    let out = run(Command::new("apt-cache").args(["madison", name])).ok()?;
    String::from_utf8_lossy(&out)
        .lines()
        .find(|l| l.contains("Packages"))
        .and_then(|l| l.split('|').nth(1))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The shared libraries `elf` needs (`DT_NEEDED`), as `readelf -d` lists them.
fn needed(elf: &Path) -> Result<Vec<String>, BuildError> {
    let out = run(Command::new("readelf").arg("-d").arg(elf))?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next().map(str::to_string))
        .collect())
}

/// Copies `elf` to `to` in `root` and every library it needs, transitively, into `root`'s
/// `lib/TRIPLET` (found in the extracted package `trees`; what is already there is kept).
fn stage_elf(
    root: &Path,
    trees: &BTreeMap<String, PathBuf>,
    elf: &Path,
    to: &str,
    arch: Arch,
) -> Result<(), BuildError> {
    let dest = root.join(to);
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p).map_err(io("cannot stage the root"))?;
    }
    std::fs::copy(elf, &dest).map_err(io(format!("cannot stage {to}")))?;
    let libs = root.join(format!("lib/{}", arch.triplet()));
    for (lib, from) in needed_libs(trees, arch, elf, to, |lib| libs.join(lib).exists())? {
        std::fs::copy(&from, libs.join(&lib)).map_err(io(format!("cannot stage {lib}")))?;
    }
    Ok(())
}

/// The shared libraries `elf` (`user` in errors) needs, transitively, each with its file in the
/// packages' library directories: all but those `have` says are there already (whose own needs
/// are theirs).
fn needed_libs(
    trees: &BTreeMap<String, PathBuf>,
    arch: Arch,
    elf: &Path,
    user: &str,
    have: impl Fn(&str) -> bool,
) -> Result<Vec<(String, PathBuf)>, BuildError> {
    let mut todo = needed(elf)?;
    let mut seen = BTreeSet::new();
    let mut libs = Vec::new();
    while let Some(lib) = todo.pop() {
        if !seen.insert(lib.clone()) || have(&lib) {
            continue;
        }
        let from = find_lib(trees, arch, &lib, user)?;
        todo.extend(needed(&from)?);
        libs.push((lib, from));
    }
    Ok(libs)
}

/// The shared library `lib` (a `DT_NEEDED` name of `user`) in the packages' library
/// directories.
fn find_lib(
    trees: &BTreeMap<String, PathBuf>,
    arch: Arch,
    lib: &str,
    user: &str,
) -> Result<PathBuf, BuildError> {
    let triplet = arch.triplet();
    trees
        .values()
        .flat_map(|t| {
            [format!("lib/{triplet}"), format!("usr/lib/{triplet}")]
                .map(|d| format!("{d}/{lib}"))
                .into_iter()
                .filter_map(|rel| resolve_in(t, &rel).ok())
        })
        .next()
        .ok_or_else(|| {
            BuildError::Missing(format!(
                "{lib}, which {user} needs, is in none of the packages"
            ))
        })
}

/// Resolves a symbolic link inside an extracted tree (absolute targets stay inside `root`).
fn resolve_in(root: &Path, rel: &str) -> Result<PathBuf, BuildError> {
    let mut rel = PathBuf::from(rel.trim_start_matches('/'));
    for _ in 0..16 {
        let p = root.join(&rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let t = std::fs::read_link(&p).map_err(io(p.display().to_string()))?;
                rel = if t.is_absolute() {
                    t.strip_prefix("/").unwrap_or(&t).to_path_buf()
                } else {
                    rel.parent().unwrap_or(Path::new("")).join(t)
                };
            }
            Ok(_) => return Ok(p),
            Err(e) => return Err(io(format!("{} in a package", rel.display()))(e)),
        }
    }
    Err(BuildError::Missing(format!(
        "{}: too many links",
        rel.display()
    )))
}

fn modinfo_field(ko: &[u8], field: &str) -> Vec<String> {
    let key = format!("{field}=");
    ko.split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .filter_map(|s| s.strip_prefix(&key))
        .flat_map(|v| {
            v.replace("pre:", " ")
                .replace("post:", " ")
                .replace(',', " ")
                .split_whitespace()
                .map(|m| m.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A module to load: its name and its file.
type Module = (String, Vec<u8>);
/// Modules in load order.
type ModuleList = Vec<Module>;

/// What ends a module that carries a signature (`scripts/sign-file` in the kernel's tree).
const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// A module without its appended signature: `struct module_signature` (12 bytes, the
/// signature's length big-endian in its last four) and the signature precede the magic.
/// The initramfs that holds the modules is measured as a whole at launch (the SEV hashes
/// table, TDX's RTMRs, the emulated PSP's measurement), so the kernel's per-module RSA check
/// would verify again what the measurement covers, at about 0.8 s of a TCG boot. An unsigned
/// module comes back as it is; a malformed trailer is an error.
pub fn strip_module_signature(mut ko: Vec<u8>) -> Result<Vec<u8>, BuildError> {
    let Some(body) = ko.len().checked_sub(MODULE_SIG_MAGIC.len()) else {
        return Ok(ko);
    };
    if &ko[body..] != MODULE_SIG_MAGIC {
        return Ok(ko);
    }
    let malformed =
        || BuildError::Missing("a kernel module's signature trailer is malformed".into());
    let info = body.checked_sub(12).ok_or_else(malformed)?;
    let sig_len = u32::from_be_bytes(ko[info + 8..info + 12].try_into().expect("4 bytes")) as usize;
    let start = info.checked_sub(sig_len).ok_or_else(malformed)?;
    ko.truncate(start);
    Ok(ko)
}

/// The modules to load, dependencies first: one list per list of names in `lists` (a module
/// already in an earlier list is not repeated), then one per list in `groups`, each without what
/// `lists` hold but independent of the other groups (the agent loads some groups, not all):
/// (name, file content).
fn modules(
    moddir: &Path,
    lists: &[&[&str]],
    groups: &[&[&str]],
) -> Result<(Vec<ModuleList>, Vec<ModuleList>), BuildError> {
    fn walk(d: &Path, into: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                walk(&p, into)?;
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = n.strip_suffix(".ko").or_else(|| n.strip_suffix(".ko.xz")) {
                    into.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
        Ok(())
    }
    let mut files = BTreeMap::new();
    walk(moddir, &mut files).map_err(io(format!("cannot list {}", moddir.display())))?;
    let mut done = BTreeSet::new();
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), BuildError> {
        if done.contains(name) || depth > 32 {
            return Ok(());
        }
        // Not a module file: built into the kernel.
        let Some(path) = files.get(name) else {
            return Ok(());
        };
        // Compressed modules are stored decompressed: the agent loads plain ELF objects.
        let ko = strip_module_signature(if path.extension().is_some_and(|x| x == "xz") {
            run(Command::new("xz").arg("-dc").arg(path))?
        } else {
            std::fs::read(path).map_err(io(path.display().to_string()))?
        })?;
        for dep in modinfo_field(&ko, "depends")
            .into_iter()
            .chain(modinfo_field(&ko, "softdep"))
        {
            visit(&dep, files, done, order, depth + 1)?;
        }
        done.insert(name.to_string());
        order.push((name.to_string(), ko));
        Ok(())
    }
    // What the kernel has built in (`modules.builtin`: one module path per line) needs no file.
    let listing = moddir.parent().unwrap_or(moddir).join("modules.builtin");
    let builtin: BTreeSet<String> = std::fs::read_to_string(listing)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|n| n.strip_suffix(".ko"))
        .map(|n| n.replace('-', "_"))
        .collect();
    let resolve = |list: &[&str], done: &mut BTreeSet<String>| {
        let mut order = Vec::new();
        for m in list {
            if !files.contains_key(*m) {
                if builtin.contains(*m) {
                    continue;
                }
                return Err(BuildError::Missing(format!(
                    "the kernel package has no module {m}, and does not build it in"
                )));
            }
            visit(m, &files, done, &mut order, 0)?;
        }
        Ok(order)
    };
    let orders = lists
        .iter()
        .map(|list| resolve(list, &mut done))
        .collect::<Result<Vec<_>, _>>()?;
    let group_orders = groups
        .iter()
        .map(|list| resolve(list, &mut done.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((orders, group_orders))
}

/// Checks that `agent` is an ELF executable for `arch`.
fn check_agent(agent: &Path, arch: Arch) -> Result<(), BuildError> {
    let mut head = [0u8; 20];
    let ok = std::fs::File::open(agent)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .map_err(io(format!("the agent {}", agent.display())))
        .map(|()| {
            let machine = if head[5] == 2 {
                u16::from_be_bytes([head[18], head[19]])
            } else {
                u16::from_le_bytes([head[18], head[19]])
            };
            &head[..4] == b"\x7fELF" && machine == arch.elf_machine()
        })?;
    if !ok {
        return Err(BuildError::Missing(format!(
            "{} is not an {} ELF executable: give the agent built for the pod VM's machine \
             (for s390x: cargo build --target s390x-unknown-linux-gnu -p coffer-agent)",
            agent.display(),
            arch.name()
        )));
    }
    Ok(())
}

/// Builds the pod VM into `o.out`; returns the content of `measurements.json`.
pub fn build(o: &BuildOptions) -> Result<serde_json::Value, BuildError> {
    let parent = o
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("cannot create {}", parent.display())))?;
    let work = tempfile::Builder::new()
        .prefix(".podvm-build-")
        .tempdir_in(parent)
        .map_err(io(format!(
            "cannot create a build directory in {}",
            parent.display()
        )))?;
    let stage = work.path().join("out");
    std::fs::create_dir(&stage).map_err(io("cannot create the staging directory"))?;

    if o.arch == Arch::S390x
        && (o.snp_firmware.is_some() || o.tdx_firmware.is_some() || !o.disks.is_empty())
    {
        return Err(BuildError::Missing(
            "--tee snp, --tee tdx and --disk are for x86-64 pod VMs: an s390x pod VM has no such firmware and no UEFI disk (its TEE is --tee se)"
                .into(),
        ));
    }
    check_agent(&o.agent, o.arch)?;
    let debs = Debs::of(o);
    let _s390x_cache = match (o.arch, &o.debs) {
        (Arch::S390x, None) => Some(s390x_ready(&o.cache)?),
        _ => None,
    };

    // TEE firmware: checked (or built) before anything else is.
    let snp_firmware = o
        .snp_firmware
        .as_ref()
        .map(|f| f.load(crate::firmware::Kind::AmdSev, &o.cache))
        .transpose()?;
    let tdx_firmware = o
        .tdx_firmware
        .as_ref()
        .map(|f| f.load(crate::firmware::Kind::IntelTdx, &o.cache))
        .transpose()?;

    // Packages: resolve, record, extract.
    let (kernel_pkg, _) = debs.kernel()?;
    let mut inputs = BTreeMap::new();
    let mut trees = BTreeMap::new();
    let packages = PACKAGES[1..]
        .iter()
        .copied()
        .filter(|p| o.arch == Arch::X86_64 || !TSS_PACKAGES.contains(p));
    for name in std::iter::once(kernel_pkg.as_str()).chain(packages) {
        let file = debs.get(name)?;
        let digest = sha256_file(&file).map_err(io(file.display().to_string()))?;
        inputs.insert(
            file.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string(),
            hex::encode(digest),
        );
        let dir = work.path().join("pkg").join(name);
        std::fs::create_dir_all(&dir).map_err(io("cannot create a package directory"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&file).arg(&dir))?;
        trees.insert(name.to_string(), dir);
    }
    let kernel_tree = &trees[&kernel_pkg];
    let boot = kernel_tree.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io(format!("{} in {kernel_pkg}", boot.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| BuildError::Missing(format!("{kernel_pkg} has no /boot/vmlinuz-*")))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    std::fs::copy(&vmlinuz, stage.join("vmlinuz")).map_err(io("cannot copy the kernel"))?;
    if o.arch == Arch::X86_64 {
        // The same kernel uncompressed, for the direct PVH boot of launches without a TEE
        // firmware.
        let bzimage = std::fs::read(&vmlinuz).map_err(io("cannot read the kernel"))?;
        std::fs::write(
            stage.join(crate::PVH_KERNEL),
            crate::bzimage::pvh_kernel(&bzimage)?,
        )
        .map_err(io("cannot write the uncompressed kernel"))?;
    }
    let t = o.arch.triplet();

    // The initramfs: the agent as /init, its libraries, the modules.
    let mut initrd = Initrd::default();
    let stripped = work.path().join("coffer-agent");
    run(Command::new(match o.arch {
        Arch::X86_64 => "objcopy",
        Arch::S390x => "s390x-linux-gnu-objcopy",
    })
    .arg("--strip-debug")
    .arg(&o.agent)
    .arg(&stripped))?;
    let agent = std::fs::read(&stripped).map_err(io("the stripped agent"))?;
    initrd.add("init", Node::File(agent, 0o755));
    let tss: &[(&str, &str)] = match o.arch {
        Arch::X86_64 => TSS_LIBS,
        Arch::S390x => &[],
    };
    let libs: Vec<(&str, String)> = c_libs(o.arch)
        .into_iter()
        .chain(tss.iter().map(|(p, f)| (*p, f.to_string())))
        .collect();
    for (pkg, path) in &libs {
        let file = resolve_in(&trees[*pkg], path)?;
        let bytes = std::fs::read(&file).map_err(io(file.display().to_string()))?;
        // One library directory in the initrd, where the loader's default path looks.
        let name = Path::new(path).file_name().expect("a file name");
        initrd.add(
            &format!("lib/{t}/{}", name.to_string_lossy()),
            Node::File(bytes, 0o755),
        );
    }
    let (loader, loader_at) = o.arch.loader();
    initrd.add(loader_at, Node::Symlink(format!("/lib/{t}/{loader}")));
    // e2fsprogs' mke2fs, which makes the scratch's filesystem at boot, with the libraries it
    // links besides the agent's: run from the initramfs, whose files are in memory, it skipped
    // the first reads of itself and its libraries from the verity root (squashfs and dm-verity,
    // 0.15 s of a TCG boot), and shares the agent's C library.
    let mke2fs = resolve_in(&trees["e2fsprogs"], "sbin/mke2fs")?;
    let read = |p: &Path| std::fs::read(p).map_err(io(p.display().to_string()));
    initrd.add(MKE2FS, Node::File(read(&mke2fs)?, 0o755));
    let libs = needed_libs(&trees, o.arch, &mke2fs, MKE2FS, |lib| {
        initrd.has(&format!("lib/{t}/{lib}"))
    })?;
    for (lib, from) in libs {
        initrd.add(&format!("lib/{t}/{lib}"), Node::File(read(&from)?, 0o755));
    }
    // The drivers of hardware only some x86-64 pod VMs have: a listing each.
    let devices: &[Device] = match o.arch {
        Arch::X86_64 => &Device::ALL,
        Arch::S390x => &[],
    };
    let device_lists: Vec<&[&str]> = devices.iter().map(|d| d.modules()).collect();
    let (lists, groups) = modules(
        &kernel_tree
            .join("lib/modules")
            .join(&release)
            .join("kernel"),
        &[modules_for(o.arch), LATER_MODULES],
        &device_lists,
    )?;
    let listings = [
        "/etc/coffer/modules".to_string(),
        "/etc/coffer/modules.later".into(),
    ]
    .into_iter()
    .chain(devices.iter().map(|d| d.listing()));
    for (listing, mods) in listings.zip(lists.iter().chain(&groups)) {
        let mut list = String::new();
        for (name, ko) in mods {
            list.push_str(name);
            list.push('\n');
            // A module of two devices' lists is stored once.
            initrd.add(
                &format!("lib/modules/{name}.ko"),
                Node::File(ko.clone(), 0o644),
            );
        }
        initrd.add(&listing, Node::File(list.into_bytes(), 0o644));
    }
    let mut mods: Vec<&(String, Vec<u8>)> = lists.iter().chain(&groups).flatten().collect();
    let mut seen = BTreeSet::new();
    mods.retain(|(name, _)| seen.insert(name.clone()));
    for d in ["dev", "proc", "sys", "sysroot", "run", "tmp"] {
        initrd.add(d, Node::Dir);
    }
    let initrd_file = File::create(stage.join("initrd.img")).map_err(io("initrd.img"))?;
    initrd
        .write(std::io::BufWriter::new(initrd_file))
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(io("cannot write initrd.img"))?;

    // The root filesystem.
    let root = work.path().join("root");
    for d in ["dev", "proc", "sys", "run", "tmp", "etc", "usr/sbin", "bin"] {
        std::fs::create_dir_all(root.join(d)).map_err(io("cannot stage the root"))?;
    }
    let copy = |pkg: &str, rel: &str| -> Result<(), BuildError> {
        let from = resolve_in(&trees[pkg], rel)?;
        let to = root.join(rel);
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(io("cannot stage the root"))?;
        }
        std::fs::copy(&from, &to).map_err(io(format!("cannot stage {rel}")))?;
        Ok(())
    };
    copy("runc", "usr/sbin/runc")?;
    copy("busybox-static", "bin/busybox")?;
    for (pkg, path) in c_libs(o.arch) {
        copy(pkg, &path)?;
    }
    stage_elf(
        &root,
        &trees,
        &resolve_in(&trees["cryptsetup-bin"], "sbin/cryptsetup")?,
        "usr/sbin/cryptsetup",
        o.arch,
    )?;
    stage_elf(
        &root,
        &trees,
        &resolve_in(&trees["iptables"], "usr/sbin/xtables-nft-multi")?,
        "usr/sbin/xtables-nft-multi",
        o.arch,
    )?;
    for ext in XTABLES {
        let rel = format!("usr/lib/{t}/xtables/{ext}");
        stage_elf(
            &root,
            &trees,
            &resolve_in(&trees["iptables"], &rel)?,
            &rel,
            o.arch,
        )?;
    }
    let seccomp_dir = trees["libseccomp2"].join(format!("usr/lib/{t}"));
    let seccomp = std::fs::read_dir(&seccomp_dir)
        .map_err(io(format!("{}", seccomp_dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("libseccomp.so.2"))
        .ok_or_else(|| BuildError::Missing("libseccomp2 has no libseccomp.so.2".into()))?;
    let from = resolve_in(&trees["libseccomp2"], &format!("usr/lib/{t}/{seccomp}"))?;
    std::fs::copy(&from, root.join(format!("lib/{t}/libseccomp.so.2")))
        .map_err(io("cannot stage libseccomp"))?;
    let link = root.join(loader_at);
    if let Some(p) = link.parent() {
        std::fs::create_dir_all(p).map_err(io("cannot stage the root"))?;
    }
    std::os::unix::fs::symlink(format!("/lib/{t}/{loader}"), link)
        .map_err(io("cannot stage the loader link"))?;
    // The CA bundle update-ca-certificates would make: every Mozilla root, in name order.
    let mozilla = trees["ca-certificates"].join("usr/share/ca-certificates/mozilla");
    let mut certs: Vec<PathBuf> = std::fs::read_dir(&mozilla)
        .map_err(io(format!("{}", mozilla.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    certs.sort();
    let mut bundle = Vec::new();
    for c in &certs {
        bundle.extend(std::fs::read(c).map_err(io(c.display().to_string()))?);
        if !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
    }
    std::fs::create_dir_all(root.join("etc/ssl/certs")).map_err(io("cannot stage the root"))?;
    std::fs::write(root.join("etc/ssl/certs/ca-certificates.crt"), bundle)
        .map_err(io("cannot stage the CA bundle"))?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")
        .map_err(io("cannot stage /etc/passwd"))?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").map_err(io("cannot stage /etc/group"))?;
    // The DHCP hook's shell (busybox's).
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))
        .map_err(io("cannot stage /bin/sh"))?;
    std::fs::create_dir_all(root.join("etc/coffer")).map_err(io("cannot stage the root"))?;
    std::fs::write(root.join("etc/coffer/udhcpc.script"), UDHCPC_SCRIPT)
        .map_err(io("cannot stage the DHCP hook"))?;
    std::fs::set_permissions(
        root.join("etc/coffer/udhcpc.script"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(io("cannot stage the DHCP hook"))?;
    // The guest's resolver, written by the agent from the pod's DNS settings (SetNetwork).
    std::os::unix::fs::symlink("/run/resolv.conf", root.join("etc/resolv.conf"))
        .map_err(io("cannot stage /etc/resolv.conf"))?;
    let root_img = stage.join("root.img");
    run(Command::new("mksquashfs").arg(&root).arg(&root_img).args([
        "-noappend",
        "-no-progress",
        "-quiet",
        "-all-root",
        "-no-xattrs",
        "-mkfs-time",
        "0",
        "-all-time",
        "0",
        "-comp",
        "zstd",
    ]))?;
    let mut img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&root_img)
        .map_err(io("root.img"))?;
    let params = verity::append_hash_tree(&mut img).map_err(io("cannot write the hash tree"))?;
    drop(img);

    let cmdline = format!("{} coffer.verity={params}", cmdline_for(o.arch));
    std::fs::write(stage.join("cmdline"), format!("{cmdline}\n")).map_err(io("cmdline"))?;
    let k = sha256_file(&stage.join("vmlinuz")).map_err(io("vmlinuz"))?;
    let i = sha256_file(&stage.join("initrd.img")).map_err(io("initrd.img"))?;
    let r = sha256_file(&root_img).map_err(io("root.img"))?;
    let mut manifest = json!({
        "arch": o.arch.name(),
        "inputs": { "packages": inputs, "agent": hex::encode(sha256_file(&o.agent).map_err(io("the agent"))?) },
        "kernel_release": release,
        "modules": mods.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "sha256": { "vmlinuz": hex::encode(k), "initrd.img": hex::encode(i), "root.img": hex::encode(r) },
        "cmdline": cmdline,
        "verity": { "data_blocks": params.data_blocks, "root_hash": hex::encode(params.root_hash), "salt": hex::encode(params.salt) },
    });
    if o.arch == Arch::X86_64 {
        let x = sha256_file(&stage.join(crate::PVH_KERNEL)).map_err(io(crate::PVH_KERNEL))?;
        manifest["sha256"]["vmlinux"] = json!(hex::encode(x));
        // The emulated TEE's launch boots the uncompressed kernel.
        manifest["measurement"] =
            json!({ "emulated": hex::encode(launch_digest(&x, &i, &cmdline)) });
    }
    if let Some(finish) = &o.finish {
        (finish.0)(&stage, &mut manifest).map_err(BuildError::Missing)?;
    }
    if let Some((fw, built_from)) = &snp_firmware {
        std::fs::write(stage.join(crate::FIRMWARE_SNP), fw)
            .map_err(io("cannot write the SEV-SNP firmware"))?;
        // The launch digest also depends on the vCPU count and model chosen at launch:
        // `coffer measure --sandbox vm --tee snp` computes it for those.
        manifest["snp"] = json!({
            "firmware": crate::FIRMWARE_SNP,
            "firmware_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(fw)),
            "edk2_source": built_from,
        });
    }
    if let Some((fw, built_from)) = &tdx_firmware {
        std::fs::write(stage.join(crate::FIRMWARE_TDX), fw)
            .map_err(io("cannot write the TDX firmware"))?;
        let kernel = std::fs::read(stage.join("vmlinuz")).map_err(io("the kernel"))?;
        let initrd = std::fs::read(stage.join("initrd.img")).map_err(io("the initrd"))?;
        let m = crate::tdx::measure(&crate::tdx::LaunchInputs {
            firmware: fw,
            kernel: &kernel,
            initrd: &initrd,
            append: &cmdline,
            memory_mib: crate::tdx::DEFAULT_MEMORY_MIB,
        })
        .map_err(|e| BuildError::Missing(format!("the TDX reference values: {e}")))?;
        manifest["tdx"] = json!({
            "firmware": crate::FIRMWARE_TDX,
            "firmware_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(fw)),
            "edk2_source": built_from,
            "mr_td": m.mrtd.map(hex::encode),
            "rtmr1": hex::encode(m.rtmr1),
            "rtmr2": hex::encode(m.rtmr2),
        });
    }
    if !o.disks.is_empty() {
        let stub_deb = debs.get(STUB_PACKAGE)?;
        manifest["inputs"]["packages"][stub_deb
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string()] = json!(hex::encode(
            sha256_file(&stub_deb).map_err(io(stub_deb.display().to_string()))?
        ));
        let dir = work.path().join("pkg").join(STUB_PACKAGE);
        std::fs::create_dir_all(&dir).map_err(io("cannot create a package directory"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&stub_deb).arg(&dir))?;
        let stub = resolve_in(&dir, "usr/lib/systemd/boot/efi/linuxx64.efi.stub")?;
        let disk_work = work.path().join("disk");
        std::fs::create_dir_all(&disk_work)
            .map_err(io("cannot create the disk's work directory"))?;
        let uki = disk_work.join("BOOTX64.EFI");
        // The firmware loads vmlinuz through its EFI stub: the bzImage, not the PVH ELF.
        crate::disk::uki(
            &stub,
            &stage.join("vmlinuz"),
            &stage.join("initrd.img"),
            &cmdline,
            &disk_work,
            &uki,
        )
        .map_err(disk_error)?;
        let raw = disk_work.join("disk.raw");
        crate::disk::write_raw(
            &uki,
            &root_img,
            o.scratch_mib,
            &params.root_hash,
            &disk_work,
            &raw,
        )
        .map_err(disk_error)?;
        let mut files = serde_json::Map::new();
        for f in &o.disks {
            let out = stage.join(f.file_name());
            crate::disk::convert(&raw, *f, &params.root_hash, &out).map_err(disk_error)?;
            files.insert(
                f.file_name().into(),
                json!(hex::encode(sha256_file(&out).map_err(io(f.file_name()))?)),
            );
        }
        manifest["disk"] = json!({
            "uki_sha256": hex::encode(sha256_file(&uki).map_err(io("the UKI"))?),
            "scratch_mib": o.scratch_mib,
            "partitions": [crate::disk::ROOT_PARTITION, crate::disk::SCRATCH_PARTITION],
            "sha256": files,
        });
    }
    let mut text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    text.push('\n');
    std::fs::write(stage.join("measurements.json"), text).map_err(io("measurements.json"))?;

    // Into place: the old output (if any) is moved aside first, then removed.
    if o.out.exists() {
        let old = work.path().join("old");
        std::fs::rename(&o.out, &old).map_err(io(format!("cannot replace {}", o.out.display())))?;
    }
    std::fs::rename(&stage, &o.out).map_err(io(format!("cannot create {}", o.out.display())))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_signatures_are_cut_at_their_trailer_and_unsigned_modules_kept() {
        let elf = b"\x7fELF module body".to_vec();
        let sig = vec![0xabu8; 300];
        // struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len.
        let mut info = vec![0u8, 0, 2, 0, 0, 0, 0, 0];
        info.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        let signed = [elf.clone(), sig, info, MODULE_SIG_MAGIC.to_vec()].concat();
        assert_eq!(strip_module_signature(signed).unwrap(), elf);
        assert_eq!(strip_module_signature(elf.clone()).unwrap(), elf);
        assert!(strip_module_signature(Vec::new()).unwrap().is_empty());
        // A signature length pointing before the file's start is refused.
        let mut bad = vec![0u8; 8];
        bad.extend_from_slice(&1_000_000u32.to_be_bytes());
        bad.extend_from_slice(MODULE_SIG_MAGIC);
        assert!(strip_module_signature(bad).is_err());
    }

    #[test]
    fn no_module_is_loaded_both_at_boot_and_later() {
        assert!(LATER_MODULES.iter().all(|m| !MODULES.contains(m)));
        for d in Device::ALL {
            assert!(
                d.modules()
                    .iter()
                    .all(|m| !MODULES.contains(m) && !LATER_MODULES.contains(m)),
                "{d:?}"
            );
            // Each device's drivers are among those that refuse other machines.
            assert!(d
                .modules()
                .iter()
                .all(|m| TEE_MODULES.contains(m) || CLOUD_MODULES.contains(m)));
        }
    }
}
