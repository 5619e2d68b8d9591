//! The time of one SEV-SNP launch digest: Debian's OVMF (`/usr/share/ovmf/OVMF.fd`, or the
//! firmware given as the first argument) with 2 vCPUs, median of 20 runs. Given a pod VM
//! directory built with `--tee snp` instead, the whole `coffer measure --sandbox vm --tee snp`
//! computation: read its firmware, kernel, initrd and command line, hash them into the
//! kernel-hashes page, digest the launch.
//! `cargo bench -p coffer-podvm --bench snp_measure [-- FIRMWARE|PODVM_DIR]`.

use std::time::Instant;

use coffer_podvm::snp::{launch_digest, CpuType, LaunchInputs, DEFAULT_GUEST_FEATURES};

fn main() {
    // `cargo bench` passes `--bench`; the firmware is the first argument that is not an option.
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "/usr/share/ovmf/OVMF.fd".to_string());
    if std::path::Path::new(&path).is_dir() {
        return podvm(std::path::Path::new(&path));
    }
    let firmware = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (Debian's OVMF: apt-get install -y ovmf)"));
    let inputs = LaunchInputs {
        firmware: &firmware,
        kernel: None,
        initrd: None,
        append: None,
        vcpus: 2,
        cpu: CpuType::EpycMilan,
        guest_features: DEFAULT_GUEST_FEATURES,
    };
    let mut ms: Vec<f64> = (0..20)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(launch_digest(std::hint::black_box(&inputs)).unwrap());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "snp launch_digest ({path}, {} KiB, 2 vCPUs): median {:.2} ms over 20 runs (min {:.2}, max {:.2})",
        firmware.len() / 1024,
        (ms[9] + ms[10]) / 2.0,
        ms[0],
        ms[19]
    );
}

fn podvm(dir: &std::path::Path) {
    let once = || {
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        let (fw, kernel, initrd) = (
            read(coffer_podvm::FIRMWARE_SNP),
            read("vmlinuz"),
            read("initrd.img"),
        );
        let cmdline = String::from_utf8(read("cmdline")).unwrap();
        let d = launch_digest(&LaunchInputs {
            firmware: &fw,
            kernel: Some(&kernel),
            initrd: Some(&initrd),
            append: Some(cmdline.trim()),
            vcpus: 2,
            cpu: CpuType::EpycMilan,
            guest_features: DEFAULT_GUEST_FEATURES,
        })
        .unwrap();
        (d, kernel.len() + initrd.len())
    };
    let mut size = 0;
    let mut ms: Vec<f64> = (0..20)
        .map(|_| {
            let start = Instant::now();
            let (d, n) = once();
            std::hint::black_box(d);
            size = n;
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "pod VM SEV-SNP launch digest ({}, kernel and initrd {} KiB, 2 vCPUs, files read each time): median {:.2} ms over 20 runs (min {:.2}, max {:.2})",
        dir.display(),
        size / 1024,
        (ms[9] + ms[10]) / 2.0,
        ms[0],
        ms[19]
    );
}
