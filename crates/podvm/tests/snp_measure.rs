//! `coffer_podvm::snp::launch_digest` against AMD's reference tool `sev-snp-measure` (0.0.13),
//! run for real, with Debian's OVMF (package `ovmf`): both must print the same SEV-SNP launch
//! digest bit for bit. Measured direct boot is compared with a copy of that OVMF whose SEV
//! metadata and footer table are patched to declare a kernel-hashes page (Debian's build has
//! none); the reference tool reads the same bytes.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use coffer_podvm::snp::{launch_digest, CpuType, LaunchInputs, SnpError};

const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// Debian's 4 MiB OVMF code image: no SEV metadata.
const OVMF_CODE_4M: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// `sev-snp-measure` on PATH; a missing tool fails the test (never a silent skip).
fn tool() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("sev-snp-measure"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "sev-snp-measure (AMD's reference SNP measurement tool) is not on PATH: \
                 install it with `pip install sev-snp-measure==0.0.13` (.ci/run and scripts/test do)"
            )
        })
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!("{path}: {e} (Debian's OVMF: apt-get install -y ovmf; .ci/run and scripts/test do)")
    })
}

/// One launch, for both implementations.
struct Case<'a> {
    firmware: &'a Path,
    kernel: Option<&'a Path>,
    initrd: Option<&'a Path>,
    append: Option<&'a str>,
    vcpus: u32,
    cpu: &'a str,
    guest_features: u64,
}

impl Case<'_> {
    fn reference(&self) -> String {
        let mut cmd = Command::new(tool());
        cmd.args(["--mode", "snp", "--output-format", "hex"])
            .args(["--vcpus", &self.vcpus.to_string()])
            .args(["--vcpu-type", self.cpu])
            .args(["--guest-features", &format!("{:#x}", self.guest_features)])
            .arg("--ovmf")
            .arg(self.firmware);
        if let Some(k) = self.kernel {
            cmd.arg("--kernel").arg(k);
        }
        if let Some(i) = self.initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(a) = self.append {
            cmd.args(["--append", a]);
        }
        let out = cmd.output().expect("running sev-snp-measure");
        assert!(
            out.status.success(),
            "sev-snp-measure failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn ours(&self) -> String {
        let firmware = std::fs::read(self.firmware).unwrap();
        let kernel = self.kernel.map(|p| std::fs::read(p).unwrap());
        let initrd = self.initrd.map(|p| std::fs::read(p).unwrap());
        let digest = launch_digest(&LaunchInputs {
            firmware: &firmware,
            kernel: kernel.as_deref(),
            initrd: initrd.as_deref(),
            append: self.append,
            vcpus: self.vcpus,
            cpu: self.cpu.parse().unwrap(),
            guest_features: self.guest_features,
        })
        .unwrap();
        hex::encode(digest)
    }

    fn check(&self) {
        let (reference, ours) = (self.reference(), self.ours());
        assert_eq!(reference.len(), 96, "reference output: {reference}");
        assert_eq!(
            ours, reference,
            "{} vCPU(s) {} features {:#x} kernel {:?} initrd {:?} append {:?}",
            self.vcpus, self.cpu, self.guest_features, self.kernel, self.initrd, self.append
        );
    }
}

#[test]
fn debian_ovmf_matches_the_reference_tool() {
    tool();
    read(OVMF);
    let fw = Path::new(OVMF);
    let sets: [(u32, &str, u64); 9] = [
        (1, "EPYC-Milan", 0x1),
        (2, "EPYC-Milan", 0x1),
        (4, "EPYC-Genoa", 0x1),
        (16, "EPYC-Rome", 0x1),
        (2, "EPYC", 0x0),
        (1, "EPYC-Genoa", 0x21),
        (4, "EPYC-Milan-v2", 0x0),
        (3, "EPYC-Turin", 0x1),
        (2, "EPYC-v4", 0x5),
    ];
    for (vcpus, cpu, guest_features) in sets {
        Case {
            firmware: fw,
            kernel: None,
            initrd: None,
            append: None,
            vcpus,
            cpu,
            guest_features,
        }
        .check();
    }
}

/// Debian's OVMF with a kernel-hashes page (see `coffer_testkit::ovmf`).
fn ovmf_with_hashes_page() -> Vec<u8> {
    coffer_testkit::ovmf::with_hashes_page(&read(OVMF))
}

#[test]
fn measured_direct_boot_matches_the_reference_tool() {
    tool();
    let dir = tempfile::tempdir().unwrap();
    let fw = dir.path().join("OVMF-hashes.fd");
    std::fs::write(&fw, ovmf_with_hashes_page()).unwrap();
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.img");
    std::fs::write(
        &kernel,
        (0..200_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(&initrd, b"an initrd").unwrap();
    let cases = [
        (
            Some(&*kernel),
            Some(&*initrd),
            Some("console=ttyS0 root=/dev/vda ro"),
            2,
            "EPYC-Milan",
        ),
        (Some(&*kernel), None, None, 1, "EPYC-Genoa"),
        (Some(&*kernel), None, Some("quiet"), 4, "EPYC-Rome"),
        // The firmware's hashes page without a kernel: measured as a zero page.
        (None, None, None, 2, "EPYC-Milan"),
    ];
    for (kernel, initrd, append, vcpus, cpu) in cases {
        Case {
            firmware: &fw,
            kernel,
            initrd,
            append,
            vcpus,
            cpu,
            guest_features: 0x1,
        }
        .check();
    }
}

fn inputs(firmware: &[u8]) -> LaunchInputs<'_> {
    LaunchInputs {
        firmware,
        kernel: None,
        initrd: None,
        append: None,
        vcpus: 2,
        cpu: CpuType::EpycMilan,
        guest_features: 0x1,
    }
}

#[test]
fn every_input_changes_the_digest() {
    let fw = read(OVMF);
    let base = launch_digest(&inputs(&fw)).unwrap();
    let mut changed = fw.clone();
    changed[0x1000] ^= 1;
    assert_ne!(launch_digest(&inputs(&changed)).unwrap(), base);
    let three = LaunchInputs {
        vcpus: 3,
        ..inputs(&fw)
    };
    assert_ne!(launch_digest(&three).unwrap(), base);
    let genoa = LaunchInputs {
        cpu: CpuType::EpycGenoa,
        ..inputs(&fw)
    };
    assert_ne!(launch_digest(&genoa).unwrap(), base);
    let features = LaunchInputs {
        guest_features: 0,
        ..inputs(&fw)
    };
    assert_ne!(launch_digest(&features).unwrap(), base);
    // Versioned aliases of a model measure the same.
    let milan_v2 = LaunchInputs {
        cpu: CpuType::EpycMilanV2,
        ..inputs(&fw)
    };
    assert_eq!(launch_digest(&milan_v2).unwrap(), base);

    let patched = ovmf_with_hashes_page();
    let with = |append| {
        launch_digest(&LaunchInputs {
            kernel: Some(b"kernel"),
            append,
            ..inputs(&patched)
        })
        .unwrap()
    };
    assert_ne!(with(Some("a")), with(Some("b")));
    // No command line measures as the empty one (both are a lone NUL).
    assert_eq!(with(None), with(Some("")));
}

#[test]
fn firmware_without_what_snp_needs_is_refused() {
    let code = read(OVMF_CODE_4M);
    let err = launch_digest(&inputs(&code)).unwrap_err();
    assert_eq!(err, SnpError::NoSevMetadata);
    assert!(
        err.to_string().contains("has no SEV metadata section"),
        "{err}"
    );
    // Debian's OVMF.fd has SEV metadata but no kernel-hashes page.
    let fw = read(OVMF);
    let err = launch_digest(&LaunchInputs {
        kernel: Some(b"kernel"),
        ..inputs(&fw)
    })
    .unwrap_err();
    assert_eq!(err, SnpError::NoKernelHashesTable);
    assert!(err.to_string().contains("SEV_HASH_TABLE_RV_GUID"), "{err}");
    // What the reference tool says of the same: it refuses too.
    let out = Command::new(tool())
        .args(["--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC-Milan"])
        .args(["--ovmf", OVMF, "--kernel", OVMF])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
