//! Copying a file volume into the sandbox: a projected volume of 1,000 files of 1 KiB laid out
//! as the kubelet writes it (`..data` links), read by the shim as a container sees it, then
//! written by the agent as its own copy (a new generation and the `..data` swap). The gRPC hop
//! between them is not included (one message of about 1 MiB on a local stream). Median of 20.
//!
//! `cargo bench -p coffer-shim --bench volumes`.

use std::time::Instant;

use coffer_agent::container::files;
use coffer_agent::proto::Mount;
use coffer_shim::service::volumes;

fn main() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pods/u/volumes/kubernetes.io~projected/bulk");
    let gen = dir.join("..2026_12_04_00_00_00.000000001");
    std::fs::create_dir_all(&gen).unwrap();
    for i in 0..1000 {
        std::fs::write(gen.join(format!("f{i:04}")), vec![b'x'; 1024]).unwrap();
        std::os::unix::fs::symlink(format!("..data/f{i:04}"), dir.join(format!("f{i:04}")))
            .unwrap();
    }
    std::os::unix::fs::symlink(gen.file_name().unwrap(), dir.join("..data")).unwrap();
    let v = volumes::file_volume(&Mount {
        destination: "/bulk".into(),
        r#type: "bind".into(),
        source: dir.display().to_string(),
        options: vec![],
    })
    .unwrap();
    let guest = d.path().join("guest");
    let (mut read_ms, mut store_ms) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        let got = volumes::read(&v).unwrap();
        read_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(got.len(), 1000);
        let list: Vec<files::File<'_>> = got.iter().map(files::File::from).collect();
        let t = Instant::now();
        files::store(&guest, "bulk", "projected", &list).unwrap();
        store_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[9] + v[10]) / 2.0
    };
    let (r, s) = (median(read_ms), median(store_ms));
    println!(
        "1,000-file projected volume (1 KiB each): shim read {r:.1} ms, agent store {s:.1} ms, {:.0} files/s end to end (median of 20)",
        1000.0 / ((r + s) / 1e3)
    );
}
