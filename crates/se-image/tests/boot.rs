//! IBM Secure Execution images under QEMU's s390x emulation (TCG: Debian bookworm-backports'
//! `qemu-system-s390x`), with Debian's s390x kernel. There is no Ultravisor here, so the boot is
//! checked in its two halves:
//!
//! 1. **Before unpack.** The sealed image is IPLed as a hypervisor IPLs it (`-kernel`, the IPL
//!    PSW at 0): stage3a runs, finds no Secure Execution unpack facility (161) on this machine
//!    and stops in its disabled wait 0x5e0a0100, which QEMU reports.
//! 2. **After unpack.** Guest memory as the Ultravisor stand-in (`coffer_verifier::se::testing`)
//!    leaves it, having checked the image's digests and decrypted every component in place, is
//!    started at the PSW sealed in the header (stage3b). stage3b moves the kernel and the command
//!    line into place and records the initrd; Linux boots, and the initrd's `/init` prints the
//!    command line it was given and powers the machine off.
//!
//! And a whole s390x pod VM built with `--tee se`, booted the same way after unpack, up to its
//! agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coffer_se_image::{self as se, Inputs, Loaders, DEFAULT_PCF};
use coffer_verifier::se::testing::Host;

fn cache() -> PathBuf {
    coffer_testkit::debs_cache()
}

/// A static s390x `/init` (Debian's s390x cross compiler) that prints its command line and
/// powers off.
fn init(work: &Path) -> Vec<u8> {
    let src = work.join("init.c");
    std::fs::write(
        &src,
        r#"#include <fcntl.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <unistd.h>
int main(void) {
    char buf[1024] = {0};
    mount("proc", "/proc", "proc", 0, 0);
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) { read(fd, buf, sizeof buf - 1); close(fd); }
    printf("COFFER-SE-INIT cmdline=%s", buf);
    fflush(stdout);
    reboot(RB_POWER_OFF);
    return 0;
}
"#,
    )
    .unwrap();
    let bin = work.join("init");
    let out = Command::new("s390x-linux-gnu-gcc")
        .args(["-static", "-Os", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("s390x-linux-gnu-gcc (Debian gcc-s390x-linux-gnu, libc6-dev-s390x-cross)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(bin).unwrap()
}

/// Runs `image` in QEMU (TCG), with `extra` arguments, until it powers off or stops; returns the
/// console output and QEMU's guest-error log.
fn boot(image: &Path, work: &Path, limit: Duration, extra: &[String]) -> (String, String) {
    let console = work.join("console.log");
    let log = work.join("qemu.log");
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&log);
    let mut child = Command::new("qemu-system-s390x")
        .args(["-M", "s390-ccw-virtio", "-accel", "tcg", "-m", "1024"])
        .args(["-nographic", "-nodefaults", "-no-reboot"])
        .args(["-action", "panic=exit-failure"])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-device", "sclpconsole,chardev=con"])
        .args(["-d", "guest_errors", "-D"])
        .arg(&log)
        .arg("-kernel")
        .arg(image)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-s390x (Debian bookworm-backports' qemu-system-s390x)");
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (
        std::fs::read_to_string(&console).unwrap_or_default(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn a_sealed_image_ipls_into_stage3a_and_once_unpacked_stage3b_boots_linux_with_its_initrd() {
    let work = tempfile::tempdir().unwrap();
    let kernel = se::debian_kernel(&cache()).expect("Debian's s390x kernel");
    let kernel_bytes = std::fs::read(&kernel.vmlinuz).unwrap();
    let mut initrd = coffer_podvm::initrd::Initrd::default();
    initrd.add(
        "init",
        coffer_podvm::initrd::Node::File(init(work.path()), 0o755),
    );
    for d in ["proc", "dev"] {
        initrd.add(d, coffer_podvm::initrd::Node::Dir);
    }
    let initrd = initrd.write(Vec::new()).unwrap();
    let cmdline = "console=ttysclp0 panic=-1 quiet coffer.marker=se-42";
    let host = Host::new("test host");
    let loaders = Loaders::assemble().unwrap();
    let sealed = se::seal(
        &Inputs {
            kernel: &kernel_bytes,
            initrd: Some(&initrd),
            cmdline,
            host_keys: &[host.public()],
            pcf: DEFAULT_PCF,
        },
        &loaders,
    )
    .unwrap();

    // 1. The sealed image: stage3a stops where the unpack facility is missing.
    let image = work.path().join("se.img");
    std::fs::write(&image, &sealed.image).unwrap();
    let (_, log) = boot(&image, work.path(), Duration::from_secs(60), &[]);
    assert!(
        log.contains("disabled-wait") && log.contains("0x000000005e0a0100"),
        "stage3a did not report the missing unpack facility: {log}"
    );

    // 2. Unpacked by the Ultravisor stand-in, started at the sealed PSW.
    let unpacked = host.unpack(&sealed.image).unwrap();
    assert_eq!(unpacked.psw, sealed.psw);
    let mut memory = unpacked.memory;
    let (mask, addr) = unpacked.psw;
    assert!(addr < 1 << 31, "a short PSW holds a 31-bit address");
    let short = mask | 0x0008_0000_0000_0000 | addr;
    memory[..8].copy_from_slice(&short.to_be_bytes());
    let unpacked_image = work.path().join("unpacked.img");
    std::fs::write(&unpacked_image, &memory).unwrap();
    let (console, log) = boot(&unpacked_image, work.path(), Duration::from_secs(240), &[]);
    assert!(
        console.contains(&format!("COFFER-SE-INIT cmdline={cmdline}")),
        "Linux did not reach the initrd's init with the sealed command line.\nconsole:\n{console}\nqemu:\n{log}"
    );
    assert!(!log.contains("disabled-wait"), "a loader stopped: {log}");

    // 3. stage3b refuses a command line longer than the kernel takes (its arguments altered
    //    after sealing, which the Ultravisor's digests would catch; here stage3b's own check).
    let stage3b = sealed.components.last().unwrap();
    let args = (stage3b.addr + stage3b.original_size) as usize - 64;
    memory[args + 24..args + 32].copy_from_slice(&5000u64.to_be_bytes());
    std::fs::write(&unpacked_image, &memory).unwrap();
    let (console, log) = boot(&unpacked_image, work.path(), Duration::from_secs(60), &[]);
    assert!(
        log.contains("disabled-wait") && log.contains("0x000000005e0b0002"),
        "stage3b did not refuse the command line: {log}"
    );
    assert!(!console.contains("COFFER-SE-INIT"));
}

/// An s390x pod VM built with `--tee se` (Debian's s390x packages, the agent built for s390x,
/// sealed for a test host): the Ultravisor stand-in unpacks its SE image, and started at the
/// sealed PSW it boots under QEMU's s390x emulation with its verity root, its encrypted scratch
/// disk and the launch configuration on its configuration disk, up to the agent's "booted".
/// Asked for SE attestation where there is no Ultravisor, the agent then stops, naming the
/// missing device: it never runs without the TEE the launch asked for.
#[test]
fn an_s390x_pod_vm_sealed_for_se_boots_its_agent_once_unpacked() {
    let work = tempfile::tempdir().unwrap();
    let host = Host::new("test host");
    let out = work.path().join("podvm");
    let manifest = coffer_podvm::build::build(&coffer_podvm::build::BuildOptions {
        out: out.clone(),
        agent: coffer_testkit::s390x_agent(),
        debs: None,
        cache: cache(),
        snp_firmware: None,
        tdx_firmware: None,
        disks: Vec::new(),
        scratch_mib: 0,
        arch: coffer_podvm::build::Arch::S390x,
        finish: Some(se::podvm_finish(vec![host.public()])),
    })
    .unwrap();
    assert_eq!(manifest["arch"], "s390x");
    assert!(manifest.get("measurement").is_none() && !out.join("vmlinux").exists());
    let image = std::fs::read(out.join(coffer_podvm::SE_IMAGE)).unwrap();
    // The reference value in measurements.json is the image's, as the KBS reads it.
    let tags = coffer_verifier::se::ImageTags::from_se_image(&image).unwrap();
    assert_eq!(manifest["se"]["se_image_tags"][0], tags.to_hex());

    let unpacked = host.unpack(&image).unwrap();
    let mut memory = unpacked.memory;
    let short = unpacked.psw.0 | 0x0008_0000_0000_0000 | unpacked.psw.1;
    memory[..8].copy_from_slice(&short.to_be_bytes());
    let unpacked_image = work.path().join("unpacked.img");
    std::fs::write(&unpacked_image, &memory).unwrap();
    drop(memory);

    let config = serde_json::to_vec(&serde_json::json!({
        "initdata": "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n",
        "tee": "se",
    }))
    .unwrap();
    let config_disk = work.path().join("config.img");
    std::fs::write(&config_disk, coffer_podvm::launch::config_disk(&config)).unwrap();
    let scratch = work.path().join("scratch.img");
    std::fs::File::create(&scratch)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let disk = |file: &Path, serial: &str, ro: bool| {
        [
            "-drive".to_string(),
            format!(
                "file={},if=none,id={serial},format=raw{}",
                file.display(),
                if ro { ",readonly=on" } else { "" }
            ),
            "-device".to_string(),
            format!("virtio-blk-ccw,drive={serial},serial={serial}"),
        ]
    };
    let mut extra = Vec::new();
    extra.extend(disk(&out.join("root.img"), "coffer-root", true));
    extra.extend(disk(&scratch, "coffer-scratch", false));
    extra.extend(disk(&config_disk, coffer_podvm::launch::CONFIG_DISK, true));
    extra.extend([
        "-device".to_string(),
        "virtio-serial-ccw,id=ports".to_string(),
        "-chardev".to_string(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            work.path().join("agent.sock").display()
        ),
        "-device".to_string(),
        format!(
            "virtserialport,bus=ports.0,chardev=agent,name={}",
            coffer_podvm::launch::AGENT_PORT
        ),
    ]);
    // The agent ends, the kernel reboots (panic=-1) and QEMU exits (-no-reboot): the console
    // is whole once QEMU is gone.
    let (log, _) = boot(
        &unpacked_image,
        work.path(),
        Duration::from_secs(300),
        &extra,
    );
    for step in [
        "modules loaded",
        "verity root mounted",
        "encrypted scratch mounted",
        "launch configuration from the configuration disk",
        "booted",
    ] {
        assert!(log.contains(step), "no {step:?} on the console:\n{log}");
    }
    assert!(
        log.contains("no TEE found") && log.contains("/dev/uv (IBM Secure Execution"),
        "the agent did not stop for the missing Ultravisor:\n{log}"
    );
}
