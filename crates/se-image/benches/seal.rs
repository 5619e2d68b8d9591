//! The time to seal an IBM Secure Execution image (`coffer podvm seal --tee se`): Debian's s390x
//! kernel (downloaded into `~/.cache/coffer/debs/s390x` on first use), a 48 MiB initrd (about the
//! size of the x86 pod VM's) and two host keys; median of 5 runs after one warm-up, plus the
//! loaders' assembly. `cargo bench -p coffer-se-image --bench seal`.

use std::time::Instant;

use coffer_se_image::{self as se, Inputs, Loaders, DEFAULT_PCF};

fn main() {
    let cache = coffer_testkit::debs_cache();
    let kernel = se::debian_kernel(&cache).expect("Debian's s390x kernel");
    let kernel = std::fs::read(&kernel.vmlinuz).unwrap();
    // Incompressible bytes: the seal's cost does not depend on content.
    let mut initrd = vec![0u8; 48 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in initrd.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let keys: Vec<_> = (0..2)
        .map(|i| coffer_verifier::se::testing::Host::new(&format!("host {i}")).public())
        .collect();
    let t = Instant::now();
    let loaders = Loaders::assemble().expect("s390x binutils");
    let assemble_ms = t.elapsed().as_secs_f64() * 1e3;
    let inputs = Inputs {
        kernel: &kernel,
        initrd: Some(&initrd),
        cmdline: "console=ttysclp0 panic=-1 quiet",
        host_keys: &keys,
        pcf: DEFAULT_PCF,
    };
    let mut size = 0;
    let mut ms: Vec<f64> = (0..6)
        .map(|_| {
            let t = Instant::now();
            let s = se::seal(&inputs, &loaders).unwrap();
            size = s.image.len();
            std::hint::black_box(s);
            t.elapsed().as_secs_f64() * 1e3
        })
        .skip(1)
        .collect();
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    println!(
        "se seal: kernel {:.1} MiB + initrd {:.0} MiB -> image {:.1} MiB: median {median:.0} ms \
         ({:.0} MiB/s; runs {:?} ms); loaders assembled in {assemble_ms:.0} ms",
        kernel.len() as f64 / 1048576.0,
        initrd.len() as f64 / 1048576.0,
        size as f64 / 1048576.0,
        size as f64 / 1048576.0 / (median / 1e3),
        ms.iter().map(|m| m.round() as u64).collect::<Vec<_>>()
    );
}
