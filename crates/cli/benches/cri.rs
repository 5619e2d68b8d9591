//! `cargo bench -p coffer --bench cri [-- RUNS] [--vm]`: a pod's start through the CRI, as the
//! kubelet makes it, under Debian's containerd with Coffer installed (`coffer install
//! containerd`): RunPodSandbox + CreateContainer + StartContainer of the encrypted busybox image
//! (KBS in this process, docker-registry on loopback). Each pod is fresh: sandbox launch
//! (RunPodSandbox), then containerd's container record (CreateContainer), then the shim's task
//! (StartContainer): attestation, key release, the pull inside the sandbox (process sandboxes
//! share the verified blob cache, a pod VM pulls from the registry), runc. Printed per call, and to the container's
//! first log line; `--vm` runs pod VMs (the accelerator `auto` picks: TCG on this project's CI
//! machine) instead of process sandboxes.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use coffer_shim::annotations::INITDATA;
use common::{containerd::Pods, ms};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let vm = args.iter().any(|a| a == "--vm");
    let runs: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if vm { 3 } else { 10 });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let podvm = vm.then(|| {
        let out = d.join("podvm");
        common::build_podvm(&out);
        out
    });
    let n = common::containerd::node(d, podvm.as_deref());
    let (mut run, mut create, mut start, mut total, mut first) =
        (vec![], vec![], vec![], vec![], vec![]);
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        // One pod first: fills the process sandboxes' blob cache and warms containerd.
        for i in 0..=runs {
            let name = format!("bench-{i}");
            let config = p.sandbox_config(&name, &[(INITDATA, &n.annotation)]);
            let t0 = Instant::now();
            let pod = p.run_pod(&config).await.expect("RunPodSandbox");
            let t1 = Instant::now();
            let id = p
                .create(
                    &pod,
                    &config,
                    "app",
                    &n.app,
                    &["/bin/sh", "-c", "echo started; exec sleep 30"],
                    0,
                )
                .await
                .expect("CreateContainer");
            let t2 = Instant::now();
            p.start(&id).await.expect("StartContainer");
            let t3 = Instant::now();
            let log = p.log_dir.join(&name).join("app.log");
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("started")
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let t4 = Instant::now();
            p.remove_pod(&pod).await.unwrap();
            if i == 0 {
                continue;
            }
            run.push(ms(t1 - t0));
            create.push(ms(t2 - t1));
            start.push(ms(t3 - t2));
            total.push(ms(t3 - t0));
            first.push(ms(t4 - t0));
        }
    });
    let kind = if vm { "pod VM" } else { "process sandbox" };
    println!("CRI pod start, {kind}, {runs} pods (median ms):");
    println!(
        "  RunPodSandbox (sandbox launch)         {:8.1}",
        median(run)
    );
    println!(
        "  CreateContainer (containerd's record)  {:8.1}",
        median(create)
    );
    println!(
        "  StartContainer (pull inside, runc)     {:8.1}",
        median(start)
    );
    println!(
        "  Run + Create + Start                   {:8.1}",
        median(total)
    );
    println!(
        "  ... to the first log line              {:8.1}",
        median(first)
    );
}
