//! The time of one SEV-SNP launch digest: Debian's OVMF (`/usr/share/ovmf/OVMF.fd`, or the
//! firmware given as the first argument) with 2 vCPUs, median of 20 runs.
//! `cargo bench -p coffer-podvm --bench snp_measure`.

use std::time::Instant;

use coffer_podvm::snp::{launch_digest, CpuType, LaunchInputs, DEFAULT_GUEST_FEATURES};

fn main() {
    // `cargo bench` passes `--bench`; the firmware is the first argument that is not an option.
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "/usr/share/ovmf/OVMF.fd".to_string());
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
