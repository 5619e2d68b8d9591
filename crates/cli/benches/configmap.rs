//! `cargo bench -p coffer --bench configmap [-- --vm]`: how long a ConfigMap edit takes to reach a
//! running container, through containerd's CRI as the kubelet drives it.
//!
//! The kubelet's copy of a ConfigMap volume (`…/volumes/kubernetes.io~configmap/cfg`, its files
//! behind `..data`) is mounted into a Coffer pod's container, which prints the file every 50 ms
//! (a bounded loop). The bench then edits the volume as the kubelet does (a new generation
//! directory, the atomic `..data` swap) 10 times, one second apart, and times each edit until the
//! container's log shows the new value: the shim's poll of the node's directory (every second),
//! the copy through `SetVolume`, the agent's own `..data` swap, and the container's next read.
//! Printed: median, 90th percentile and maximum. Process sandbox by default; `--vm` a pod VM (the
//! accelerator `auto` picks: TCG on this project's CI machine).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use coffer_shim::annotations::INITDATA;
use common::containerd::{node, Pods};

const EDITS: u32 = 10;

/// Writes generation `generation` of the volume at `dir` with `value` in `VALUE`, as the
/// kubelet does: the files in a new directory, then `..data` swapped onto it atomically.
fn kubelet_write(dir: &Path, generation: u32, value: &str) {
    let gen = format!("..2026_12_05_00_00_{generation:02}.000000001");
    std::fs::create_dir_all(dir.join(&gen)).unwrap();
    std::fs::write(dir.join(&gen).join("VALUE"), value).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&gen, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if std::fs::symlink_metadata(dir.join("VALUE")).is_err() {
        std::os::unix::fs::symlink("..data/VALUE", dir.join("VALUE")).unwrap();
    }
}

fn main() {
    let vm = std::env::args().any(|a| a == "--vm");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let podvm = d.join("podvm");
    if vm {
        common::build_podvm(&podvm);
    }
    let n = node(d, vm.then_some(podvm.as_path()));
    let volume = d.join("kubelet/pods/uid-cm/volumes/kubernetes.io~configmap/cfg");
    kubelet_write(&volume, 0, "value-0");
    let mut took = n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let config = p.sandbox_config("cm", &[(INITDATA, &n.annotation)]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        let c = coffer_shim::cri::ContainerConfig {
            metadata: Some(coffer_shim::cri::ContainerMetadata {
                name: "reader".into(),
                attempt: 0,
            }),
            image: Some(coffer_shim::cri::ImageSpec {
                image: n.app.clone(),
                ..Default::default()
            }),
            // Bounded: at most 40 s of reads.
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "for i in $(seq 1 800); do cat /cfg/VALUE; echo; sleep 0.05; done".into(),
            ],
            log_path: "reader.log".into(),
            mounts: vec![coffer_shim::cri::Mount {
                container_path: "/cfg".into(),
                host_path: volume.display().to_string(),
                readonly: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let id = p
            .create_config(&pod, &config, c)
            .await
            .expect("CreateContainer");
        p.start(&id).await.expect("StartContainer");
        let log = p.log_dir.join("cm/reader.log");
        let seen = |value: &str| {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.ends_with(&format!(" {value}")))
        };
        let until = Instant::now() + Duration::from_secs(120);
        while !seen("value-0") {
            assert!(
                Instant::now() < until,
                "the container never read the volume"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut took = Vec::new();
        for g in 1..=EDITS {
            let value = format!("value-{g}");
            kubelet_write(&volume, g, &value);
            let t = Instant::now();
            while !seen(&value) {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "edit {g} not seen within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            took.push(t.elapsed().as_secs_f64() * 1e3);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        p.remove_pod(&pod).await.unwrap();
        took
    });
    took.sort_by(|a, b| a.total_cmp(b));
    println!(
        "ConfigMap edit to the container's read ({}, {EDITS} edits): median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        if vm { "pod VM" } else { "process sandbox" },
        took[took.len() / 2],
        took[(took.len() * 9) / 10 - 1],
        took[took.len() - 1]
    );
}
