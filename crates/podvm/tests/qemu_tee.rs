//! The SEV-SNP and TDX launch command lines, checked by QEMU itself (Debian bookworm-backports'
//! QEMU 10): it must refuse them only where it needs the hardware (KVM with SNP, or TDX), never
//! while parsing the options. A deliberately malformed HOST_DATA shows the check tells the two
//! apart.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffer_podvm::{Accel, Launch, PodVm, Tee};

/// Where QEMU stopped.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// At the hardware: KVM, SEV-SNP or TDX missing here.
    Hardware(String),
    /// At the command line.
    Options(String),
}

const HARDWARE: [&str; 5] = [
    "not supported by KVM",
    "Could not access KVM kernel module",
    "failed to initialize kvm",
    "sev_kvm_init",
    "KVM_TDX",
];

fn qemu(args: &[std::ffi::OsString]) -> Refusal {
    let mut child = Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (Debian qemu-system-x86) must be installed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU started a guest it should have refused: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    if HARDWARE.iter().any(|h| err.contains(h)) {
        Refusal::Hardware(err)
    } else {
        Refusal::Options(err)
    }
}

/// The launch, with the keeper's agent channel listening (QEMU connects to it first).
fn launch(dir: &Path, tee: Tee) -> (Launch, std::os::unix::net::UnixListener) {
    let chan = std::os::unix::net::UnixListener::bind(dir.join("agent-chan.sock")).unwrap();
    for f in [
        "vmlinuz",
        "vmlinux",
        "initrd.img",
        "root.img",
        "scratch.img",
        "launch.json",
    ] {
        std::fs::write(dir.join(f), b"").unwrap();
    }
    let l = Launch {
        vm: PodVm {
            kernel: dir.join("vmlinuz"),
            pvh_kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd.img"),
            root: dir.join("root.img"),
            cmdline: "console=ttyS0 coffer.verity=2,aa,bb".into(),
            arch: coffer_podvm::build::Arch::X86_64,
            se_image: None,
        },
        scratch: dir.join("scratch.img"),
        agent_channel: dir.join("agent-chan.sock"),
        psp_channel: dir.join("psp-chan.sock"),
        console: dir.join("console.log"),
        config: dir.join("launch.json"),
        memory_mib: 256,
        cpus: 2,
        accel: Accel::Kvm,
        tee,
        nics: Vec::new(),
        qmp: Some(dir.join("qmp.sock")),
    };
    (l, chan)
}

fn qemu_knows(object: &str) -> bool {
    let out = Command::new("qemu-system-x86_64")
        .args(["-object", "help"])
        .output()
        .expect("qemu-system-x86_64");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == object)
}

#[test]
fn qemu_takes_the_sev_snp_command_line_up_to_the_hardware() {
    let d = tempfile::tempdir().unwrap();
    let firmware = d.path().join("firmware-snp.fd");
    std::fs::write(&firmware, vec![0u8; 4 << 20]).unwrap();
    assert!(
        qemu_knows("sev-snp-guest"),
        "this QEMU has no sev-snp-guest (QEMU 9.1 or later)"
    );
    let (l, _chan) = launch(
        d.path(),
        Tee::SevSnp {
            firmware: firmware.clone(),
            host_data: [0xab; 32],
            cpu: coffer_podvm::snp::CpuType::EpycMilan,
        },
    );
    let args = l.qemu_args();
    match qemu(&args) {
        Refusal::Hardware(_) => {}
        Refusal::Options(e) => panic!("QEMU refused the SEV-SNP options: {e}"),
    }
    // The control: a HOST_DATA of the wrong size is refused at the options.
    let bad: Vec<std::ffi::OsString> = args
        .iter()
        .map(|a| {
            let s = a.to_string_lossy();
            match s.find("host-data=") {
                Some(i) => format!("{}host-data=AAAA", &s[..i]).into(),
                None => a.clone(),
            }
        })
        .collect();
    match qemu(&bad) {
        Refusal::Options(e) => assert!(e.contains("32"), "{e}"),
        Refusal::Hardware(e) => panic!("a 3-byte HOST_DATA got past the options: {e}"),
    }
}

#[test]
fn qemu_takes_the_tdx_command_line_up_to_the_hardware_where_it_knows_tdx() {
    let d = tempfile::tempdir().unwrap();
    let firmware = d.path().join("firmware-tdx.fd");
    std::fs::write(&firmware, vec![0u8; 4 << 20]).unwrap();
    let (l, _chan) = launch(
        d.path(),
        Tee::Tdx {
            firmware,
            mrconfigid: [1; 48],
        },
    );
    match (qemu_knows("tdx-guest"), qemu(&l.qemu_args())) {
        (true, Refusal::Hardware(_)) => {}
        (true, Refusal::Options(e)) => panic!("QEMU refused the TDX options: {e}"),
        // QEMU 10.0 (Debian's) predates tdx-guest (10.1): the object type is all it names.
        (false, Refusal::Options(e)) => {
            assert!(e.contains("tdx-guest"), "{e}");
        }
        (false, Refusal::Hardware(e)) => panic!("QEMU without tdx-guest reached the hardware: {e}"),
    }
}
