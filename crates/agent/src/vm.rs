//! The agent as a pod VM's init (PID 1). Before serving it boots the guest:
//!
//! 1. mounts `/dev` (devtmpfs), `/proc`, `/sys`; loads the kernel modules listed in
//!    `/etc/coffer/modules` of the (measured) initramfs, and those of `/etc/coffer/modules.NAME`
//!    for each [`Device`] the guest has (the TEE guest drivers, a cloud's);
//! 2. opens the root disk (virtio serial `coffer-root`, or the GPT partition of that name on a
//!    disk-booted VM) through dm-verity with the parameters of the measured kernel command line
//!    (`coffer.verity=`) and mounts its squashfs read-only;
//! 3. sets up the scratch disk (`coffer-scratch`): dm-integrity with HMAC-SHA256 tags under a
//!    key born here, below dm-crypt AES-XTS under a second key born here; neither key leaves the
//!    guest (both are zeroized once in the kernel). The host sees only ciphertext and tags;
//!    a block the host changed fails its tag and reads as an I/O error. It is formatted (ext4
//!    without a journal, e2fsprogs' `mke2fs` from the initramfs) and mounted on `/run/coffer`,
//!    where image layers, bundles, container root filesystems and their writes live;
//! 4. moves into the verity root and mounts cgroup2, then reads the launch configuration
//!    (the initdata, checked against HOST_DATA like everywhere, and unmeasured options): the
//!    host's `fw_cfg` entry `opt/coffer/config`, or, with none (a disk-booted VM in a cloud),
//!    the VM's user data from the cloud's metadata service after DHCP on its own interface
//!    ([`crate::cloud`]); and finds the agent's and the PSP's virtio-serial ports.
//!
//! When the agent ends, the VM powers off.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rustix::mount::MountFlags;
use zeroize::Zeroizing;

use coffer_podvm::build::Device;

use crate::dm::{Control, Target};

static BOOTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is a pod VM's init: PID 1 started by the kernel, which passes no
/// arguments (the process sandbox's agent is PID 1 of its namespace too, with arguments).
pub fn is_init() -> bool {
    std::process::id() == 1 && std::env::args_os().count() == 1
}

/// Whether [`boot`] ran in this process.
pub fn booted() -> bool {
    BOOTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the encrypted scratch filesystem is mounted (in the verity root).
pub const SCRATCH: &str = "/run/coffer";

/// A failed boot step.
#[derive(Debug, thiserror::Error)]
#[error("pod VM boot: {0}")]
pub struct BootError(String);

fn fail(what: impl std::fmt::Display) -> BootError {
    BootError(what.to_string())
}

/// How the host reaches the agent.
#[derive(Debug)]
pub enum Channel {
    /// The agent's virtio-serial port (a local pod VM).
    Serial(PathBuf),
    /// Mutual TLS on TCP (a peer pod, `coffer_podvm::remote`).
    Tls(Box<coffer_podvm::remote::RemoteAgent>),
}

/// What the boot found for the agent.
#[derive(Debug)]
pub struct Boot {
    /// How the host reaches the agent.
    pub channel: Channel,
    /// The emulated PSP's virtio-serial port, when the launch is emulated; `None` when the
    /// launcher asked for a hardware TEE, whose interfaces the agent probes for.
    pub psp_port: Option<PathBuf>,
    /// The initdata (TOML), as the host handed it over.
    pub initdata: String,
    /// Pull over plain HTTP (development registries).
    pub plain_http: bool,
    /// The VM has the pod's network interfaces, which the host configures with SetNetwork.
    pub pod_network: bool,
}

fn mount(src: &str, target: &str, fs: &str, flags: MountFlags) -> Result<(), BootError> {
    mount_with(src, target, fs, flags, None)
}

/// [`mount`] with filesystem-specific options (`data`).
fn mount_with(
    src: &str,
    target: &str,
    fs: &str,
    flags: MountFlags,
    data: Option<&std::ffi::CStr>,
) -> Result<(), BootError> {
    std::fs::create_dir_all(target).map_err(|e| fail(format!("mkdir {target}: {e}")))?;
    rustix::mount::mount(src, target, fs, flags, data)
        .map_err(|e| fail(format!("cannot mount {fs} on {target}: {e}")))
}

/// The modules loaded once the agent serves ([`later_modules`]): unset outside a pod VM.
static LATER_MODULES: std::sync::OnceLock<LaterModules> = std::sync::OnceLock::new();

/// Where the later modules are, and its signal.
type LaterModules = (std::sync::Mutex<Later>, std::sync::Condvar);

/// The later modules: opened at boot, loading, or their outcome.
enum Later {
    Opened(Vec<(String, std::fs::File)>),
    Loading,
    Done(Result<(), String>),
}

/// Opens `/etc/coffer/modules.later` (the LUKS2, mesh and VXLAN modules) at boot, in the
/// initramfs: the boot moves into the verity root before they load.
/// [`start_later_modules`] loads them once the agent serves.
fn open_later_modules() {
    let opened = match open_modules("/etc/coffer/modules.later") {
        Ok(o) => Later::Opened(o),
        Err(e) => {
            tracing::error!(error = %e, "later modules not loaded");
            Later::Done(Err(e.to_string()))
        }
    };
    let _ = LATER_MODULES.set((std::sync::Mutex::new(opened), std::sync::Condvar::new()));
}

/// Starts loading the later modules on a thread of their own (once; nothing outside a pod VM).
/// The agent calls it once it told the host it serves: on one vCPU, loading them during the
/// boot delayed it by their CPU time.
pub fn start_later_modules() {
    let Some(state) = LATER_MODULES.get() else {
        return;
    };
    let mut later = state.0.lock().unwrap_or_else(|p| p.into_inner());
    let opened = match std::mem::replace(&mut *later, Later::Loading) {
        Later::Opened(o) => o,
        // Loading or loaded already.
        other => {
            *later = other;
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("coffer-modules".into())
        .spawn(move || {
            let t0 = Instant::now();
            let r = load_opened(opened).map_err(|e| e.to_string());
            match &r {
                Ok(()) => {
                    tracing::info!(ms = t0.elapsed().as_millis() as u64, "later modules loaded")
                }
                Err(e) => tracing::error!(error = %e, "later modules not loaded"),
            }
            *state.0.lock().unwrap_or_else(|p| p.into_inner()) = Later::Done(r);
            state.1.notify_all();
        });
    if let Err(e) = spawned {
        *later = Later::Done(Err(format!("cannot start the module loading thread: {e}")));
        state.1.notify_all();
    }
}

/// Waits until the modules loaded after boot are in (at once outside a pod VM), starting their
/// loading if it did not start yet: the encrypted block volumes, the mesh and the pod network's
/// tunnels call it before they use the kernel features these modules bring.
pub async fn later_modules() -> Result<(), String> {
    tokio::task::spawn_blocking(wait_later_modules)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
}

/// [`later_modules`], blocking this thread.
fn wait_later_modules() -> Result<(), String> {
    let Some((lock, cond)) = LATER_MODULES.get() else {
        return Ok(());
    };
    start_later_modules();
    let mut later = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        match &*later {
            Later::Done(r) => return r.clone(),
            _ => later = cond.wait(later).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

fn load_modules(listing: &str) -> Result<(), BootError> {
    load_opened(open_modules(listing)?)
}

/// Opens the modules `listing` names, in order, and unlinks their files (the open files keep
/// them until loaded; the initramfs's memory is freed once they are).
fn open_modules(listing: &str) -> Result<Vec<(String, std::fs::File)>, BootError> {
    let list = std::fs::read_to_string(listing).map_err(|e| fail(format!("{listing}: {e}")))?;
    let mut opened = Vec::new();
    for name in list.lines().filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Loaded already from another listing (two devices' drivers share it).
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && Path::new("/sys/module").join(name).exists() =>
            {
                continue
            }
            Err(e) => return Err(fail(format!("{path}: {e}"))),
        };
        let _ = std::fs::remove_file(&path);
        opened.push((name.to_string(), f));
    }
    Ok(opened)
}

/// Loads opened modules in order.
fn load_opened(modules: Vec<(String, std::fs::File)>) -> Result<(), BootError> {
    for (name, f) in modules {
        let name = name.as_str();
        match rustix::system::finit_module(&f, c"", 0) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {}
            // A CPU without AES-NI, or an IBM Z without the CPACF functions (e.g. under
            // emulation): the generic implementations serve.
            Err(e) if coffer_podvm::build::CPU_CRYPTO_MODULES.contains(&name) => {
                tracing::info!(module = name, error = %e, "CPU crypto module not loaded; the generic implementation serves")
            }
            // The SEV-SNP and TDX guest drivers refuse to load (ENODEV) outside such a guest.
            Err(e) if coffer_podvm::build::TEE_MODULES.contains(&name) => {
                tracing::info!(module = name, error = %e, "TEE guest driver not loaded (not this TEE)")
            }
            Err(e) if coffer_podvm::build::CLOUD_MODULES.contains(&name) => {
                tracing::debug!(module = name, error = %e, "cloud device driver not loaded (not this cloud)")
            }
            // The image's modules carry no signature (the measured initramfs vouches for them):
            // a kernel in lockdown, as under UEFI Secure Boot, refuses them.
            Err(e @ (rustix::io::Errno::KEYREJECTED | rustix::io::Errno::PERM)) => {
                return Err(fail(format!(
                    "cannot load module {name}: {e}; the kernel refuses unsigned modules \
                     (lockdown, e.g. UEFI Secure Boot): boot the pod VM without Secure Boot, \
                     as coffer's launches do"
                )))
            }
            Err(e) => return Err(fail(format!("cannot load module {name}: {e}"))),
        }
    }
    Ok(())
}

/// Loads the drivers of the hardware this guest has among [`Device::ALL`] (their listings; an
/// s390x pod VM has none), and drops the other devices' module files unloaded, freeing the
/// initramfs's memory they held.
fn load_device_modules() -> Result<(), BootError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let signature = hypervisor_signature();
    let (present, absent): (Vec<Device>, Vec<Device>) = Device::ALL
        .into_iter()
        .partition(|d| has_device(*d, Path::new("/sys"), &cpuinfo, &signature));
    for d in present {
        let listing = d.listing();
        if Path::new(&listing).exists() {
            tracing::info!(
                device = d.name(),
                "loading the drivers of this guest's hardware"
            );
            load_modules(&listing)?;
        }
    }
    for d in absent {
        for name in std::fs::read_to_string(d.listing())
            .unwrap_or_default()
            .lines()
        {
            let _ = std::fs::remove_file(format!("/lib/modules/{name}.ko"));
        }
    }
    Ok(())
}

/// Whether the guest has `d`, from sysfs under `sys`, `/proc/cpuinfo`'s text and the
/// hypervisor's CPUID signature (leaf 0x40000000).
fn has_device(d: Device, sys: &Path, cpuinfo: &str, signature: &[u8; 12]) -> bool {
    match d {
        // Registered by the kernel in an SEV-SNP guest only; sev_guest binds to it.
        Device::SevSnp => sys.join("bus/platform/devices/sev-guest").exists(),
        Device::Tdx => cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "tdx_guest")),
        Device::HyperV => signature == b"Microsoft Hv",
        Device::Nitro => std::fs::read_dir(sys.join("bus/pci/devices"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_to_string(e.path().join("vendor")).is_ok_and(|v| v.trim() == "0x1d0f")
            }),
    }
}

/// The hypervisor's CPUID signature (leaf 0x40000000: `KVMKVMKVM`, `Microsoft Hv`, …); zeros
/// off x86-64.
fn hypervisor_signature() -> [u8; 12] {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID exists on every x86-64 CPU (a safe intrinsic since Rust 1.87).
        let r = std::arch::x86_64::__cpuid(0x4000_0000);
        let mut s = [0u8; 12];
        s[..4].copy_from_slice(&r.ebx.to_le_bytes());
        s[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        s[8..].copy_from_slice(&r.edx.to_le_bytes());
        s
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        [0; 12]
    }
}

/// Polls `find` until it finds something, up to 20 s; `what` names it in the error.
fn wait_for(what: &str, find: impl Fn() -> Option<PathBuf>) -> Result<PathBuf, BootError> {
    crate::sys::wait_for(what, find).map_err(fail)
}

/// The device node under `/dev` of the first entry of `class` (a `/sys` directory) whose
/// attribute `attr` reads `value`.
fn find_in_sys(class: &str, attr: &str, value: &str) -> Option<PathBuf> {
    std::fs::read_dir(class).ok()?.flatten().find_map(|e| {
        let v = std::fs::read_to_string(e.path().join(attr)).ok()?;
        let dev = Path::new("/dev").join(e.file_name());
        (v.trim() == value && dev.exists()).then_some(dev)
    })
}

/// The block device whose virtio serial is `name` (a kernel-booted VM's disks), or the GPT
/// partition named `name` (a disk-booted VM's, `coffer_podvm::disk`), waiting for it to appear.
/// Either way what is read is authenticated (verity) or sealed (the scratch's key never leaves
/// the guest), so a look-alike device can deny service, not deceive.
fn disk(name: &str) -> Result<PathBuf, BootError> {
    wait_for(
        &format!("disk with serial {name} or partition {name}"),
        || find_in_sys("/sys/block", "serial", name).or_else(|| partition_named(name)),
    )
}

/// The partition whose GPT name (`PARTNAME` in its uevent) is `name`.
fn partition_named(name: &str) -> Option<PathBuf> {
    std::fs::read_dir("/sys/class/block")
        .ok()?
        .flatten()
        .find_map(|e| {
            let uevent = std::fs::read_to_string(e.path().join("uevent")).ok()?;
            let field = |k: &str| {
                uevent
                    .lines()
                    .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            };
            let dev = Path::new("/dev").join(field("DEVNAME")?);
            (field("DEVTYPE") == Some("partition")
                && field("PARTNAME") == Some(name)
                && dev.exists())
            .then_some(dev)
        })
}

/// The virtio-serial port named `name`, waiting for it to appear.
fn port(name: &str) -> Result<PathBuf, BootError> {
    wait_for(&format!("virtio-serial port {name}"), || {
        find_in_sys("/sys/class/virtio-ports", "name", name)
    })
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).map(str::to_string))
}

fn random_hex(n: usize) -> Zeroizing<String> {
    use rand_core::TryRngCore;
    let mut b = Zeroizing::new(vec![0u8; n]);
    rand_core::OsRng
        .try_fill_bytes(&mut b)
        .expect("the kernel's random generator");
    Zeroizing::new(hex::encode(&*b))
}

fn run_tool(prog: &str, args: &[&str]) -> Result<(), BootError> {
    crate::sys::run_tool(prog, args).map_err(fail)
}

/// Block groups of an ext2/ext4 filesystem with 4 KiB blocks (32768 blocks each).
const GROUP: u64 = 128 << 20;

/// A fresh dm-integrity device has no valid tags: reading a block never written fails. The
/// filesystem reads only what it wrote, except where `mke2fs` writes less than a block: the
/// boot record and the superblock in the device's first block, and each backup superblock
/// (1 KiB at the start of its group's first block); the kernel completes those by reading the
/// block first. Everything else `mke2fs` writes (group descriptors, bitmaps, the root and
/// `lost+found` directories) is whole blocks. So the first block of every group is written with
/// zeros here before `mke2fs` runs: 64 KiB for the 2 GiB default, where zeroing the first MiB of
/// each group cost a second of a TCG boot.
fn prezero(dev: &Path, size: u64) -> Result<(), BootError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| fail(format!("{}: {e}", dev.display())))?;
    let zeros = [0u8; 4096];
    for at in (0..size).step_by(GROUP as usize) {
        let n = (size - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)
            .map_err(|e| fail(format!("cannot initialize {}: {e}", dev.display())))?;
    }
    f.sync_all()
        .map_err(|e| fail(format!("cannot initialize {}: {e}", dev.display())))
}

/// Sets up the encrypted, integrity-protected scratch disk and mounts it on `target`.
fn scratch(dm: &Control, dev: &Path, target: &str) -> Result<(), BootError> {
    let d = dev.display().to_string();
    // A zeroed superblock makes dm-integrity format the device (whatever the host left there).
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dev)
            .map_err(|e| fail(format!("{d}: {e}")))?;
        f.write_all(&[0u8; 8192])
            .and_then(|()| f.sync_all())
            .map_err(|e| fail(format!("{d}: {e}")))?;
    }
    let mac_key = random_hex(32);
    let integrity = Zeroizing::new(format!(
        "{d} 0 32 D 4 internal_hash:hmac(sha256):{} block_size:4096 fix_padding journal_sectors:1",
        &*mac_key
    ));
    // Formatted on first activation; its status then tells the usable size. Mode D writes no
    // journal, so the one it formats is the smallest (a section): the default (1/128 of the
    // disk) was written at format and read again at each activation, 0.3 s of a TCG boot.
    dm.create(
        "coffer-integrity",
        Target {
            sectors: 8,
            kind: "integrity",
            params: &integrity,
        },
        false,
    )
    .map_err(fail)?;
    let status = dm.status("coffer-integrity").map_err(fail)?;
    dm.remove("coffer-integrity").map_err(fail)?;
    let sectors: u64 = status
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(format!("dm-integrity status {status:?}")))?;
    let sectors = sectors / 8 * 8;
    let inner = dm
        .create(
            "coffer-integrity",
            Target {
                sectors,
                kind: "integrity",
                params: &integrity,
            },
            false,
        )
        .map_err(fail)?;
    drop(integrity);
    drop(mac_key);
    let key = random_hex(64);
    let crypt = Zeroizing::new(format!(
        "aes-xts-plain64 {} 0 {} 0 1 sector_size:4096",
        &*key,
        inner.display()
    ));
    let outer = dm
        .create(
            "coffer-scratch",
            Target {
                sectors,
                kind: "crypt",
                params: &crypt,
            },
            false,
        )
        .map_err(fail)?;
    drop(crypt);
    drop(key);
    let o = outer.display().to_string();
    prezero(&outer, sectors * 512)?;
    // ext4 without a journal (the filesystem lives for one boot, under a key of that boot), one
    // inode per 64 KiB. Its inode tables are left as they are (lazy_itable_init): writing them
    // (8 MiB for 2 GiB, through AES-XTS and HMAC-SHA256) was half a second of a TCG boot. The
    // kernel reads an inode table block only once it holds an inode, that is once it was
    // written (a block with no inode in use is made in memory); `noinit_itable` keeps it from
    // zeroing them in the background.
    run_tool(
        &format!("/{}", coffer_podvm::build::MKE2FS),
        &[
            "-F",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-i",
            "65536",
            "-m",
            "0",
            "-O",
            "^has_journal,^resize_inode",
            "-E",
            "lazy_itable_init=1,nodiscard",
            &o,
        ],
    )?;
    mount_with(
        &o,
        target,
        "ext4",
        MountFlags::NODEV,
        Some(c"noinit_itable"),
    )
}

/// Boots the guest (see the module documentation). Runs as PID 1 of the pod VM.
pub fn boot() -> Result<Boot, BootError> {
    let t0 = Instant::now();
    mount("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID)?;
    mount(
        "proc",
        "/proc",
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
    )?;
    // How long the kernel took to start this init (its boot and the initramfs unpacking).
    tracing::info!(uptime_ms = uptime_ms(), "the agent starts as init");
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
    )?;
    load_modules("/etc/coffer/modules")?;
    load_device_modules()?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "modules loaded");
    open_later_modules();

    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| fail(format!("/proc/cmdline: {e}")))?;
    let verity = cmdline_value(&cmdline, "coffer.verity=")
        .ok_or_else(|| fail("no coffer.verity= on the kernel command line"))?;
    let params = coffer_podvm::verity::VerityParams::parse(&verity).map_err(fail)?;
    let dm = Control::open().map_err(fail)?;
    let root_disk = disk("coffer-root")?;
    let root = dm
        .create(
            "coffer-root",
            Target {
                sectors: params.sectors(),
                kind: "verity",
                params: &params.table(&root_disk.display().to_string()),
            },
            true,
        )
        .map_err(fail)?;
    mount(
        &root.display().to_string(),
        "/sysroot",
        "squashfs",
        MountFlags::RDONLY | MountFlags::NODEV,
    )?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "verity root mounted");

    mount(
        "tmpfs",
        "/sysroot/run",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
    )
    .and_then(|()| {
        mount(
            "tmpfs",
            "/sysroot/tmp",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
        )
    })?;
    let scratch_disk = disk("coffer-scratch")?;
    scratch(&dm, &scratch_disk, &format!("/sysroot{SCRATCH}"))?;
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        "encrypted scratch mounted"
    );

    // The launch configuration: the host's fw_cfg entry (local VMs, libvirt); without one, a
    // cloud's user data, read once the root (busybox's DHCP client) is in place.
    let fw_cfg = match std::fs::read(format!(
        "/sys/firmware/qemu_fw_cfg/by_name/{}/raw",
        coffer_podvm::launch::CONFIG_FW_CFG
    )) {
        Ok(raw) => Ok(zeroize::Zeroizing::new(raw)),
        // Machines without fw_cfg (s390x): the configuration disk.
        // (On s390x, where there is never fw_cfg, it is waited for like the other disks: virtio-ccw
        // devices appear asynchronously.)
        Err(fw) => match if cfg!(target_arch = "s390x") {
            Some(disk(coffer_podvm::launch::CONFIG_DISK)?)
        } else {
            find_in_sys("/sys/block", "serial", coffer_podvm::launch::CONFIG_DISK)
        } {
            Some(dev) => {
                let disk =
                    zeroize::Zeroizing::new(std::fs::read(&dev).map_err(|e| {
                        fail(format!("the configuration disk {}: {e}", dev.display()))
                    })?);
                let config = coffer_podvm::launch::read_config_disk(&disk).ok_or_else(|| {
                    fail(format!(
                        "the configuration disk {} is malformed",
                        dev.display()
                    ))
                })?;
                tracing::info!(
                    ms = t0.elapsed().as_millis() as u64,
                    "launch configuration from the configuration disk"
                );
                Ok(zeroize::Zeroizing::new(config.to_vec()))
            }
            None => Err(fw),
        },
    };

    // Into the verity root.
    for m in ["dev", "proc", "sys"] {
        rustix::mount::mount_move(format!("/{m}"), format!("/sysroot/{m}"))
            .map_err(|e| fail(format!("cannot move /{m}: {e}")))?;
    }
    std::env::set_current_dir("/sysroot").map_err(|e| fail(format!("chdir /sysroot: {e}")))?;
    rustix::mount::mount_move(".", "/").map_err(|e| fail(format!("cannot move the root: {e}")))?;
    rustix::process::chroot(".").map_err(|e| fail(format!("chroot: {e}")))?;
    std::env::set_current_dir("/").map_err(|e| fail(format!("chdir /: {e}")))?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
    )?;
    // The agent's HTTP clients reach the host's forwarder through a loopback listener.
    run_tool("/bin/busybox", &["ip", "link", "set", "lo", "up"])?;
    let raw = match fw_cfg {
        Ok(raw) => raw,
        Err(fw) => {
            let cloud = crate::cloud::Cloud::detect().map_err(|e| {
                fail(format!(
                    "{e} (fw_cfg {}: {fw})",
                    coffer_podvm::launch::CONFIG_FW_CFG
                ))
            })?;
            let address = crate::cloud::dhcp(UNDERLAY).map_err(fail)?;
            tracing::info!(ms = t0.elapsed().as_millis() as u64, %address, ?cloud, "interface configured by DHCP");
            let data = cloud
                .user_data(
                    &format!("http://{}", crate::cloud::METADATA),
                    Duration::from_secs(60),
                )
                .map_err(fail)?;
            tracing::info!(
                ms = t0.elapsed().as_millis() as u64,
                ?cloud,
                "launch configuration from the metadata service"
            );
            data
        }
    };
    let config: coffer_podvm::remote::LaunchConfig =
        serde_json::from_slice(&raw).map_err(|e| fail(format!("the launch configuration: {e}")))?;
    drop(raw);
    let channel = match config.remote {
        Some(remote) => Channel::Tls(Box::new(remote)),
        None => Channel::Serial(port(coffer_podvm::launch::AGENT_PORT)?),
    };
    let psp_port = match config.tee.as_str() {
        "emulated" => Some(port(coffer_podvm::launch::PSP_PORT)?),
        _ => {
            // configfs-tsm lives in configfs; without it the probe tries /dev/sev-guest and a
            // vTPM, and says what it found missing.
            if let Err(e) = mount(
                "configfs",
                "/sys/kernel/config",
                "configfs",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            ) {
                tracing::warn!(error = %e, "configfs not mounted");
            }
            None
        }
    };
    // A peer pod's own interface where the provider assigns it (libvirt): the host reaches the
    // agent through it. (In a cloud, DHCP configured it above.)
    if let Channel::Tls(remote) = &channel {
        if let Some(i) = &remote.interface {
            static_interface(i)?;
            tracing::info!(ms = t0.elapsed().as_millis() as u64, address = %i.address, "interface configured");
        }
    }
    // Where the programs the agent starts (runc) are found.
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        uptime_ms = uptime_ms(),
        "booted"
    );
    BOOTED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(Boot {
        channel,
        psp_port,
        initdata: config.initdata,
        plain_http: config.plain_http,
        pod_network: config.network == "pod",
    })
}

/// A peer pod's own interface in the guest: the node reaches the agent, and the pod network's
/// tunnels, through it; no route but its subnet's (the guest's and its containers' traffic goes
/// through the node: the keeper's forwarder, or the pod network).
pub const UNDERLAY: &str = "coffer0";

/// Brings up the interface with `i.mac` as [`UNDERLAY`], with its address.
fn static_interface(i: &coffer_podvm::remote::StaticInterface) -> Result<(), BootError> {
    let want = i.mac.to_ascii_lowercase();
    let name = wait_for(&format!("network interface {}", i.mac), || {
        std::fs::read_dir("/sys/class/net")
            .ok()?
            .flatten()
            .find_map(|e| {
                let mac = std::fs::read_to_string(e.path().join("address")).ok()?;
                (mac.trim() == want).then(|| PathBuf::from(e.file_name()))
            })
    })?;
    let name = name.display().to_string();
    // Named apart from the pod's interfaces (eth0, …), which come later over VXLAN.
    run_tool(
        "/bin/busybox",
        &["ip", "link", "set", &name, "name", UNDERLAY],
    )?;
    run_tool("/bin/busybox", &["ip", "link", "set", UNDERLAY, "up"])?;
    run_tool(
        "/bin/busybox",
        &["ip", "addr", "add", &i.address, "dev", UNDERLAY],
    )?;
    Ok(())
}

/// The kernel's uptime in ms (`/proc/uptime`), 0 when unreadable.
fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

fn kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Logs the guest's memory in use (MemTotal − MemAvailable) and the agent's resident size.
pub fn log_memory(when: &str) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let used = kib(&meminfo, "MemTotal:").saturating_sub(kib(&meminfo, "MemAvailable:"));
    tracing::info!(
        when,
        guest_used_kib = used,
        guest_total_kib = kib(&meminfo, "MemTotal:"),
        agent_rss_kib = kib(&status, "VmRSS:"),
        uptime_ms = uptime_ms(),
        "guest memory"
    );
}

/// Flushes the disks and powers the VM off.
pub fn power_off() -> ! {
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    // Not reached as PID 1 with CAP_SYS_BOOT; exiting makes the kernel panic and the VM stop.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_values() {
        let c = "console=ttyS0 quiet coffer.verity=2,aa,bb rdinit=/init";
        assert_eq!(
            cmdline_value(c, "coffer.verity=").as_deref(),
            Some("2,aa,bb")
        );
        assert_eq!(cmdline_value(c, "coffer.none="), None);
    }

    #[test]
    fn only_the_hardware_the_guest_has_gets_its_drivers() {
        let sys = tempfile::tempdir().unwrap();
        let pci = sys.path().join("bus/pci/devices");
        // A QEMU guest: virtio devices (Red Hat's vendor ID), KVM's signature.
        let qemu = pci.join("0000:00:02.0");
        std::fs::create_dir_all(&qemu).unwrap();
        std::fs::write(qemu.join("vendor"), "0x1af4\n").unwrap();
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu vme hypervisor aes\n";
        let kvm = *b"KVMKVMKVM\0\0\0";
        for d in Device::ALL {
            assert!(!has_device(d, sys.path(), cpuinfo, &kvm), "{d:?}");
        }
        // Each device seen where it is.
        let tdx = "flags\t\t: fpu tdx_guest aes\n";
        assert!(has_device(Device::Tdx, sys.path(), tdx, &kvm));
        assert!(!has_device(
            Device::Tdx,
            sys.path(),
            "flags : tdx_guestx\n",
            &kvm
        ));
        assert!(has_device(
            Device::HyperV,
            sys.path(),
            cpuinfo,
            b"Microsoft Hv"
        ));
        std::fs::create_dir_all(sys.path().join("bus/platform/devices/sev-guest")).unwrap();
        assert!(has_device(Device::SevSnp, sys.path(), cpuinfo, &kvm));
        let ena = pci.join("0000:00:05.0");
        std::fs::create_dir_all(&ena).unwrap();
        std::fs::write(ena.join("vendor"), "0x1d0f\n").unwrap();
        assert!(has_device(Device::Nitro, sys.path(), cpuinfo, &kvm));
    }
}
