//! Launching a pod VM: its files, its launch measurement and the QEMU command line.
//!
//! **Measurement (emulated TEE).** The emulated PSP reports
//! `MEASUREMENT = SHA-384("coffer pod VM launch v1\0" ‖ SHA-256(kernel) ‖ SHA-256(initrd) ‖
//! SHA-256(cmdline ‖ NUL))`, computed by the launcher from the very files it hands to QEMU.
//! The three SHA-256 digests are the ones AMD's measured direct boot puts in OVMF's hashes table
//! (and TDX's TDVF measures the same three into `RTMR[1]`/`RTMR[2]`); `docs/podvm.md` says how
//! they map to a real SNP launch digest and TDX MRTD/RTMRs. The dm-verity root hash is on the
//! command line, so the measurement covers the root filesystem too.

use std::{
    ffi::OsString,
    io::Read,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256, Sha384};

/// A built pod VM (the output of `coffer podvm build`).
#[derive(Clone, Debug)]
pub struct PodVm {
    /// The kernel (`vmlinuz`): what TEE firmware boots.
    pub kernel: PathBuf,
    /// The same kernel uncompressed ([`crate::PVH_KERNEL`]): what QEMU boots directly when
    /// there is no TEE firmware (the emulated TEE). On s390x, the kernel itself (QEMU boots
    /// it as it is).
    pub pvh_kernel: PathBuf,
    /// The initramfs (`initrd.img`): the agent, its libraries and the kernel modules it loads.
    pub initrd: PathBuf,
    /// The read-only root image with its dm-verity hash tree (`root.img`).
    pub root: PathBuf,
    /// The kernel command line (`cmdline`), carrying the verity root hash.
    pub cmdline: String,
    /// The machine it was built for (`measurements.json`'s `arch`; x86-64 when absent).
    pub arch: crate::arch::Arch,
    /// An s390x pod VM's IBM Secure Execution image ([`crate::SE_IMAGE`]), if it has one.
    pub se_image: Option<PathBuf>,
}

/// A pod VM directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A file is missing or unreadable.
    #[error("pod VM {path}: {source} (build one with `coffer podvm build --out DIR`)")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError + '_ {
    move |source| LaunchError::Read {
        path: path.display().to_string(),
        source,
    }
}

impl PodVm {
    /// The pod VM in `dir`.
    pub fn open(dir: &Path) -> Result<Self, LaunchError> {
        let cmdline_path = dir.join("cmdline");
        let cmdline = std::fs::read_to_string(&cmdline_path).map_err(read_err(&cmdline_path))?;
        let manifest = dir.join("measurements.json");
        let arch = match std::fs::read(&manifest) {
            Ok(m) => {
                let m: serde_json::Value =
                    serde_json::from_slice(&m).map_err(|e| LaunchError::Read {
                        path: manifest.display().to_string(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    })?;
                match m["arch"].as_str() {
                    None => crate::arch::Arch::X86_64,
                    Some(a) => crate::arch::Arch::parse(a).map_err(|e| LaunchError::Read {
                        path: manifest.display().to_string(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                    })?,
                }
            }
            Err(_) => crate::arch::Arch::X86_64,
        };
        let se_image = dir.join(crate::SE_IMAGE);
        let vm = Self {
            kernel: dir.join("vmlinuz"),
            pvh_kernel: match arch {
                crate::arch::Arch::X86_64 => dir.join(crate::PVH_KERNEL),
                crate::arch::Arch::S390x => dir.join("vmlinuz"),
            },
            initrd: dir.join("initrd.img"),
            root: dir.join("root.img"),
            cmdline: cmdline.trim_end_matches('\n').to_string(),
            arch,
            se_image: se_image.is_file().then_some(se_image),
        };
        for p in [&vm.kernel, &vm.pvh_kernel, &vm.initrd, &vm.root] {
            std::fs::metadata(p).map_err(read_err(p))?;
        }
        Ok(vm)
    }

    /// The emulated TEE's launch measurement of the kernel it boots (the uncompressed one), the
    /// initrd and the command line.
    pub fn measurement(&self) -> Result<[u8; 48], LaunchError> {
        let k = sha256_file(&self.pvh_kernel).map_err(read_err(&self.pvh_kernel))?;
        let i = sha256_file(&self.initrd).map_err(read_err(&self.initrd))?;
        Ok(launch_digest(&k, &i, &self.cmdline))
    }
}

/// SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// The emulated launch measurement from the kernel's and initrd's SHA-256 and the command line.
pub fn launch_digest(
    kernel_sha256: &[u8; 32],
    initrd_sha256: &[u8; 32],
    cmdline: &str,
) -> [u8; 48] {
    let mut c = Sha256::new();
    c.update(cmdline.as_bytes());
    c.update([0u8]);
    let mut h = Sha384::new();
    h.update(b"coffer pod VM launch v1\0");
    h.update(kernel_sha256);
    h.update(initrd_sha256);
    h.update(c.finalize());
    h.finalize().into()
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// The TEE the guest is launched in.
#[derive(Clone, Debug)]
pub enum Tee {
    /// No hardware TEE: the launcher's emulated PSP, reached over its own serial port.
    Emulated,
    /// AMD SEV-SNP with measured direct boot: HOST_DATA = the initdata digest. QEMU 10 accepts
    /// the command line up to asking KVM for an SNP VM (tests/qemu_tee.rs).
    SevSnp {
        /// The SNP-capable firmware (OVMF built for SEV, `OVMF.amdsev.fd`).
        firmware: PathBuf,
        /// HOST_DATA.
        host_data: [u8; 32],
        /// The vCPU model (`-cpu`): named rather than `host`, because the launch digest covers
        /// it (each VMSA's reset state), so that reference values do not depend on the host.
        cpu: crate::snp::CpuType,
    },
    /// Intel TDX: MRCONFIGID = the initdata digest (SHA-384 fills it). QEMU gained `tdx-guest`
    /// in 10.1; Debian's 10.0 rejects the object type (tests/qemu_tee.rs).
    Tdx {
        /// TDVF (`OVMF.fd` built for TDX).
        firmware: PathBuf,
        /// MRCONFIGID.
        mrconfigid: [u8; 48],
    },
    /// IBM Secure Execution (s390x, KVM on IBM Z with SE): QEMU's `s390-pv-guest` IPLs the pod
    /// VM's sealed image ([`PodVm::se_image`]). Nothing of the initdata is set at launch: the
    /// guest binds its digest into each attestation's user data.
    Se {
        /// The SE image.
        image: PathBuf,
    },
}

/// Everything one pod VM launch needs.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The image.
    pub vm: PodVm,
    /// The scratch disk (raw; encrypted and integrity-protected by the guest).
    pub scratch: PathBuf,
    /// Unix socket the keeper listens on for the agent channel (QEMU connects).
    pub agent_channel: PathBuf,
    /// Unix socket the keeper listens on for the emulated PSP (QEMU connects).
    pub psp_channel: PathBuf,
    /// The guest's console output (kernel and agent log).
    pub console: PathBuf,
    /// The launch configuration file handed to the guest (`fw_cfg` `opt/coffer/config`).
    pub config: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// KVM or TCG.
    pub accel: Accel,
    /// The TEE.
    pub tee: Tee,
    /// The pod network's interfaces, each a tap QEMU makes (QEMU then runs in the pod's
    /// network namespace); none: the VM has no network device.
    pub nics: Vec<Nic>,
    /// QEMU's monitor socket (QMP), through which block volumes are hot-plugged into
    /// [`HOTPLUG_PORTS`] empty PCIe root ports; none: no monitor, no hotplug.
    pub qmp: Option<PathBuf>,
}

/// Empty PCIe root ports a pod VM has for hot-plugged block volumes (`coffer-hp0`, …): the most
/// block volumes one pod VM takes.
pub const HOTPLUG_PORTS: u32 = 4;

/// The CPU of an x86 pod VM under TCG: everything TCG emulates, but without ERMS and FSRM
/// ("enhanced" and "fast short" `rep movsb`). With them the guest's kernel and glibc copy memory
/// with `rep movsb`, which TCG runs one byte per iteration; without, with wide moves. Unpacking
/// the 42 MiB initramfs and every later copy got faster: under TCG, until `/init` 2.05–2.11 s →
/// 1.53–1.66 s, agent ready 3.48–3.57 s → 2.86–3.04 s (medians of 5, alternately, two rounds).
/// KVM and the TEEs run the host's CPU model instead.
const TCG_X86_CPU: &str = "max,-erms,-fsrm";

/// The machine of every x86-64 launch (its TEE's options follow): q35 without an HPET. The
/// kernel keeps the TSC as its clock (checked against the ACPI PM timer) and the local APIC's
/// timer for events; with an HPET it calibrated the TSC against it and read it through MMIO
/// while booting, 0.25 s of a TCG boot.
const X86_MACHINE: &str = "q35,hpet=off";

/// The id of hot-plug root port `i`.
pub fn hotplug_port(i: u32) -> String {
    format!("coffer-hp{i}")
}

/// A network interface of the guest: a tap on the host, a virtio-net device in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// The tap's name (QEMU makes it, and it goes when QEMU does).
    pub tap: String,
    /// The guest device's MAC.
    pub mac: String,
}

/// The name of the agent's virtio-serial port in the guest.
pub const AGENT_PORT: &str = "coffer.agent";
/// The name of the emulated PSP's virtio-serial port in the guest.
pub const PSP_PORT: &str = "coffer.psp";
/// The `fw_cfg` file carrying the launch configuration (initdata and options; not measured,
/// the initdata is checked against HOST_DATA).
pub const CONFIG_FW_CFG: &str = "opt/coffer/config";
/// Where machines without `fw_cfg` (s390x) take the launch configuration from: a virtio disk
/// with this serial holding the configuration's length (u32, big-endian) and then the
/// configuration (see [`config_disk`]). Not measured, like the `fw_cfg` entry.
pub const CONFIG_DISK: &str = "coffer-config";

/// The content of a [`CONFIG_DISK`] for `config` (padded to 512-byte sectors).
pub fn config_disk(config: &[u8]) -> Vec<u8> {
    let mut d = (config.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(config);
    d.resize(d.len().div_ceil(512) * 512, 0);
    d
}

/// The configuration a [`CONFIG_DISK`] holds, if it is well formed.
pub fn read_config_disk(disk: &[u8]) -> Option<&[u8]> {
    let n = u32::from_be_bytes(disk.get(..4)?.try_into().ok()?) as usize;
    disk.get(4..4 + n)
}

impl Launch {
    /// The QEMU that runs this pod VM.
    pub fn qemu_binary(&self) -> &'static str {
        match self.vm.arch {
            crate::arch::Arch::X86_64 => "qemu-system-x86_64",
            crate::arch::Arch::S390x => "qemu-system-s390x",
        }
    }

    /// The arguments of [`Launch::qemu_binary`].
    pub fn qemu_args(&self) -> Vec<OsString> {
        if self.vm.arch == crate::arch::Arch::S390x {
            return self.s390x_args();
        }
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        let p = |p: &Path| p.display().to_string();
        push("-nodefaults");
        push("-nographic");
        push("-no-user-config");
        push("-no-reboot");
        push("-m");
        push(&format!("{}M", self.memory_mib));
        push("-smp");
        push(&self.cpus.to_string());
        match &self.tee {
            Tee::Emulated => {
                push("-machine");
                push(X86_MACHINE);
            }
            Tee::SevSnp {
                firmware,
                host_data,
                ..
            } => {
                use base64::Engine;
                let hd = base64::engine::general_purpose::STANDARD.encode(host_data);
                push("-machine");
                push(&format!(
                    "{X86_MACHINE},confidential-guest-support=sev0,memory-backend=ram0"
                ));
                push("-object");
                push(&format!(
                    "memory-backend-memfd,id=ram0,size={}M,share=true",
                    self.memory_mib
                ));
                push("-object");
                push(&format!(
                    "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,host-data={hd}"
                ));
                push("-bios");
                push(&p(firmware));
            }
            Tee::Se { .. } => {
                // Not an x86 TEE (the keeper refuses it before): should it get here, QEMU
                // refuses the object rather than start a VM without its TEE.
                push("-machine");
                push("q35,confidential-guest-support=pv0");
                push("-object");
                push("s390-pv-guest,id=pv0");
            }
            Tee::Tdx {
                firmware,
                mrconfigid,
            } => {
                use base64::Engine;
                let id = base64::engine::general_purpose::STANDARD.encode(mrconfigid);
                push("-machine");
                push(&format!(
                    "{X86_MACHINE},confidential-guest-support=tdx0,kernel-irqchip=split"
                ));
                push("-object");
                push(&format!("tdx-guest,id=tdx0,mrconfigid={id}"));
                push("-bios");
                push(&p(firmware));
            }
        }
        match (self.accel, &self.tee) {
            (Accel::Kvm, Tee::SevSnp { cpu, .. }) => {
                push("-accel");
                push("kvm");
                push("-cpu");
                push(cpu.name());
            }
            (Accel::Kvm, _) => {
                push("-accel");
                push("kvm");
                push("-cpu");
                push("host");
            }
            (Accel::Tcg, _) => {
                push("-accel");
                push("tcg");
                push("-cpu");
                push(TCG_X86_CPU);
            }
        }
        // Hot-plugged block volumes arrive through the PCIe root ports below by native PCIe
        // hotplug (the kernel's pciehp), so QEMU's ACPI hotplug is off: its AML for every slot
        // took the guest's ACPI interpreter 0.2 s of a TCG boot (QEMU builds smaller tables too).
        push("-global");
        push("ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off");
        push("-kernel");
        // TEE firmware boots the bzImage (its EFI stub; SEV-SNP's kernel hashes are of it);
        // without one, QEMU boots the uncompressed kernel at its PVH entry: no real-mode setup,
        // no decompressor (a second of a TCG boot).
        push(&p(match self.tee {
            Tee::Emulated | Tee::Se { .. } => &self.vm.pvh_kernel,
            Tee::SevSnp { .. } | Tee::Tdx { .. } => &self.vm.kernel,
        }));
        push("-initrd");
        push(&p(&self.vm.initrd));
        push("-append");
        push(&self.vm.cmdline);
        push("-serial");
        push(&format!("file:{}", p(&self.console)));
        push("-drive");
        push(&format!(
            "file={},if=none,id=root,format=raw,readonly=on",
            p(&self.vm.root)
        ));
        push("-device");
        push("virtio-blk-pci,drive=root,serial=coffer-root");
        push("-drive");
        push(&format!(
            "file={},if=none,id=scratch,format=raw,cache=directsync",
            p(&self.scratch)
        ));
        push("-device");
        push("virtio-blk-pci,drive=scratch,serial=coffer-scratch");
        for arg in self.ports_and_nics("pci") {
            push(&arg);
        }
        if let Some(qmp) = &self.qmp {
            push("-qmp");
            push(&format!("unix:{},server=on,wait=off", p(qmp)));
            for i in 0..HOTPLUG_PORTS {
                push("-device");
                push(&format!(
                    "pcie-root-port,id={},chassis={}",
                    hotplug_port(i),
                    i + 1
                ));
            }
        }
        push("-fw_cfg");
        push(&format!("name={CONFIG_FW_CFG},file={}", p(&self.config)));
        a
    }

    /// The agent's (and the emulated PSP's) virtio-serial ports and the pod network's interfaces,
    /// on virtio `transport` (`pci`, `ccw`).
    fn ports_and_nics(&self, transport: &str) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        let p = |p: &Path| p.display().to_string();
        push("-device");
        push(&format!("virtio-serial-{transport},id=ports"));
        push("-chardev");
        push(&format!("socket,id=agent,path={}", p(&self.agent_channel)));
        push("-device");
        push(&format!(
            "virtserialport,bus=ports.0,chardev=agent,name={AGENT_PORT}"
        ));
        if matches!(self.tee, Tee::Emulated) {
            push("-chardev");
            push(&format!("socket,id=psp,path={}", p(&self.psp_channel)));
            push("-device");
            push(&format!(
                "virtserialport,bus=ports.0,chardev=psp,name={PSP_PORT}"
            ));
        }
        for (i, n) in self.nics.iter().enumerate() {
            push("-netdev");
            push(&format!(
                "tap,id=pod{i},ifname={},script=no,downscript=no",
                n.tap
            ));
            push("-device");
            // No option ROM (PCI): the guest boots its kernel directly, never from the network.
            push(&format!(
                "virtio-net-{transport},netdev=pod{i},mac={}{}",
                n.mac,
                if transport == "pci" { ",romfile=" } else { "" }
            ));
        }
        a
    }

    /// `qemu-system-s390x`'s arguments: the s390-ccw-virtio machine with virtio-ccw devices,
    /// the SCLP console, and the launch configuration on a disk ([`CONFIG_DISK`]: `config`
    /// holds [`config_disk`]'s bytes), there being no `fw_cfg`. Under the emulated TEE QEMU
    /// boots the kernel, initrd and command line; under Secure Execution it IPLs the sealed
    /// image, which carries all three. Block volumes are not hot-plugged (no PCIe root ports).
    fn s390x_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        let p = |p: &Path| p.display().to_string();
        for s in ["-nodefaults", "-nographic", "-no-user-config", "-no-reboot"] {
            push(s);
        }
        push("-m");
        push(&format!("{}M", self.memory_mib));
        push("-smp");
        push(&self.cpus.to_string());
        push("-machine");
        match &self.tee {
            Tee::Se { .. } => {
                push("s390-ccw-virtio,confidential-guest-support=pv0");
                push("-object");
                push("s390-pv-guest,id=pv0");
            }
            _ => push("s390-ccw-virtio"),
        }
        push("-accel");
        match self.accel {
            Accel::Kvm => {
                push("kvm");
                push("-cpu");
                push("host");
            }
            Accel::Tcg => {
                push("tcg");
                push("-cpu");
                push("max");
            }
        }
        push("-kernel");
        match &self.tee {
            Tee::Se { image } => push(&p(image)),
            _ => {
                push(&p(&self.vm.kernel));
                push("-initrd");
                push(&p(&self.vm.initrd));
                push("-append");
                push(&self.vm.cmdline);
            }
        }
        push("-chardev");
        push(&format!("file,id=console,path={}", p(&self.console)));
        push("-device");
        push("sclpconsole,chardev=console");
        for (file, id, extra) in [
            (&self.vm.root, "coffer-root", ",readonly=on"),
            (&self.scratch, "coffer-scratch", ",cache=directsync"),
            (&self.config, CONFIG_DISK, ",readonly=on"),
        ] {
            push("-drive");
            push(&format!(
                "file={},if=none,id={id},format=raw{extra}",
                p(file)
            ));
            push("-device");
            push(&format!("virtio-blk-ccw,drive={id},serial={id}"));
        }
        for arg in self.ports_and_nics("ccw") {
            push(&arg);
        }
        if let Some(qmp) = &self.qmp {
            push("-qmp");
            push(&format!("unix:{},server=on,wait=off", p(qmp)));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(tee: Tee, accel: Accel) -> Vec<String> {
        launch_with(tee, accel, Vec::new())
    }

    fn launch_with(tee: Tee, accel: Accel, nics: Vec<Nic>) -> Vec<String> {
        let vm = PodVm {
            kernel: "/p/vmlinuz".into(),
            pvh_kernel: "/p/vmlinux".into(),
            initrd: "/p/initrd.img".into(),
            root: "/p/root.img".into(),
            cmdline: "console=ttyS0 coffer.verity=2,aa,bb".into(),
            arch: crate::arch::Arch::X86_64,
            se_image: None,
        };
        Launch {
            vm,
            scratch: "/s/scratch.img".into(),
            agent_channel: "/s/agent-chan.sock".into(),
            psp_channel: "/s/psp-chan.sock".into(),
            console: "/s/agent.log".into(),
            config: "/s/launch.json".into(),
            memory_mib: 256,
            cpus: 2,
            accel,
            tee,
            nics,
            qmp: Some("/s/qmp.sock".into()),
        }
        .qemu_args()
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
    }

    #[test]
    fn the_command_line_names_what_is_measured_and_each_tees_options() {
        let a = launch(Tee::Emulated, Accel::Tcg).join(" ");
        for want in [
            "-qmp unix:/s/qmp.sock,server=on,wait=off",
            "-device pcie-root-port,id=coffer-hp0,chassis=1",
            "-device pcie-root-port,id=coffer-hp3,chassis=4",
            // Native PCIe hotplug on those ports.
            "-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            "-machine q35,hpet=off ",
            // Without `rep movsb` (one byte per iteration under TCG).
            "-accel tcg -cpu max,-erms,-fsrm ",
            // The uncompressed kernel, at its PVH entry.
            "-kernel /p/vmlinux -initrd /p/initrd.img -append console=ttyS0 coffer.verity=2,aa,bb",
            "file=/p/root.img,if=none,id=root,format=raw,readonly=on",
            "name=coffer.agent",
            "name=coffer.psp",
            "name=opt/coffer/config,file=/s/launch.json",
        ] {
            assert!(a.contains(want), "{want} missing in {a}");
        }
        assert!(!a.contains("-netdev") && !a.contains("nic"), "{a}");
        // On a pod network: a tap per interface, the guest's device with its MAC.
        let net = launch_with(
            Tee::Emulated,
            Accel::Tcg,
            vec![Nic {
                tap: "coffertap0".into(),
                mac: "0a:58:0a:58:07:05".into(),
            }],
        )
        .join(" ");
        assert!(net.contains("-netdev tap,id=pod0,ifname=coffertap0,script=no,downscript=no -device virtio-net-pci,netdev=pod0,mac=0a:58:0a:58:07:05,romfile="), "{net}");
        // SEV-SNP: HOST_DATA in base64, the hashes of kernel, initrd and command line measured
        // by the firmware, and no emulated PSP port.
        let snp = launch(
            Tee::SevSnp {
                firmware: "/fw/OVMF.amdsev.fd".into(),
                host_data: [0xab; 32],
                cpu: crate::snp::CpuType::EpycGenoa,
            },
            Accel::Kvm,
        )
        .join(" ");
        assert!(snp.contains("sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,host-data=q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s="), "{snp}");
        assert!(
            snp.contains("-bios /fw/OVMF.amdsev.fd") && snp.contains("-accel kvm -cpu EPYC-Genoa")
        );
        assert!(!snp.contains("coffer.psp"), "{snp}");
        // The firmware boots the bzImage, whose hashes it measures.
        assert!(snp.contains("-kernel /p/vmlinuz "), "{snp}");
        let tdx = launch(
            Tee::Tdx {
                firmware: "/fw/OVMF.fd".into(),
                mrconfigid: [1; 48],
            },
            Accel::Kvm,
        )
        .join(" ");
        assert!(tdx.contains("tdx-guest,id=tdx0,mrconfigid=AQEB"), "{tdx}");
        assert!(tdx.contains("confidential-guest-support=tdx0") && !tdx.contains("coffer.psp"));
        assert!(tdx.contains("-kernel /p/vmlinuz "), "{tdx}");
    }

    /// An s390x pod VM: the s390-ccw-virtio machine, virtio-ccw disks and ports, the SCLP
    /// console, the configuration on its disk (no fw_cfg, no PCIe hotplug ports); under SE the
    /// sealed image is IPLed with QEMU's s390-pv-guest, and nothing else is booted beside it.
    #[test]
    fn an_s390x_pod_vm_has_its_own_machine_devices_and_configuration_disk() {
        let launch = |tee: Tee, accel: Accel| -> String {
            Launch {
                vm: PodVm {
                    kernel: "/p/vmlinuz".into(),
                    pvh_kernel: "/p/vmlinuz".into(),
                    initrd: "/p/initrd.img".into(),
                    root: "/p/root.img".into(),
                    cmdline: "console=ttysclp0 coffer.verity=2,aa,bb".into(),
                    arch: crate::arch::Arch::S390x,
                    se_image: Some("/p/se.img".into()),
                },
                scratch: "/s/scratch.img".into(),
                agent_channel: "/s/agent-chan.sock".into(),
                psp_channel: "/s/psp-chan.sock".into(),
                console: "/s/agent.log".into(),
                config: "/s/launch.json".into(),
                memory_mib: 512,
                cpus: 1,
                accel,
                tee,
                nics: vec![Nic {
                    tap: "coffertap0".into(),
                    mac: "0a:58:0a:58:07:05".into(),
                }],
                qmp: Some("/s/qmp.sock".into()),
            }
            .qemu_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
        };
        let emulated = launch(Tee::Emulated, Accel::Tcg);
        for want in [
            "-machine s390-ccw-virtio -accel tcg -cpu max",
            "-kernel /p/vmlinuz -initrd /p/initrd.img -append console=ttysclp0 coffer.verity=2,aa,bb",
            "-chardev file,id=console,path=/s/agent.log -device sclpconsole,chardev=console",
            "-drive file=/p/root.img,if=none,id=coffer-root,format=raw,readonly=on -device virtio-blk-ccw,drive=coffer-root,serial=coffer-root",
            "-device virtio-blk-ccw,drive=coffer-scratch,serial=coffer-scratch",
            "-drive file=/s/launch.json,if=none,id=coffer-config,format=raw,readonly=on -device virtio-blk-ccw,drive=coffer-config,serial=coffer-config",
            "-device virtio-serial-ccw,id=ports",
            "name=coffer.agent",
            "name=coffer.psp",
            "-device virtio-net-ccw,netdev=pod0,mac=0a:58:0a:58:07:05",
            "-qmp unix:/s/qmp.sock,server=on,wait=off",
        ] {
            assert!(emulated.contains(want), "{want} missing in {emulated}");
        }
        for never in ["fw_cfg", "-pci", "pcie-root-port", " -serial ", "q35"] {
            assert!(!emulated.contains(never), "{never} in {emulated}");
        }
        let se = launch(
            Tee::Se {
                image: "/p/se.img".into(),
            },
            Accel::Kvm,
        );
        assert!(
            se.contains("-machine s390-ccw-virtio,confidential-guest-support=pv0 -object s390-pv-guest,id=pv0 -accel kvm -cpu host -kernel /p/se.img -chardev"),
            "{se}"
        );
        assert!(
            !se.contains("-initrd") && !se.contains("-append") && !se.contains("coffer.psp"),
            "{se}"
        );
    }

    #[test]
    fn every_input_moves_the_measurement() {
        let base = launch_digest(&[1; 32], &[2; 32], "console=ttyS0");
        assert_ne!(base, launch_digest(&[9; 32], &[2; 32], "console=ttyS0"));
        assert_ne!(base, launch_digest(&[1; 32], &[9; 32], "console=ttyS0"));
        assert_ne!(base, launch_digest(&[1; 32], &[2; 32], "console=ttyS0 x"));
        assert_eq!(base, launch_digest(&[1; 32], &[2; 32], "console=ttyS0"));
    }
}
