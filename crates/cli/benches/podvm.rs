//! `cargo bench -p coffer --bench podvm [-- RUNS]`: a pod VM's start, under the accelerator
//! `coffer run --accel auto` picks here (TCG on this project's CI machine).
//!
//! Each run is `coffer run --sandbox vm` of the encrypted busybox image (KBS in this process,
//! Debian's docker-registry on loopback) with a fresh VM: QEMU start, kernel, the agent as init
//! (modules, dm-verity root, dm-integrity + dm-crypt scratch formatted), initdata check,
//! attestation, key release, pull inside the guest, runc. Printed: the time to agent-ready (the
//! keeper's `agent.sock` appears once the agent says it serves) and to the container's first
//! output, the guest's boot steps from its console, and the guest memory in use (MemTotal −
//! MemAvailable) and agent RSS at agent-ready and with the container running.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{coffer_bin as coffer, ms, run_ok};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `key=value` of the last console line containing `needle`.
fn field(console: &str, needle: &str, key: &str) -> Option<f64> {
    let line = console.lines().rev().find(|l| l.contains(needle))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = common::agent_binary();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let common::BenchWorld {
        kbs,
        registry: _registry,
        image,
        psp_dir,
        initdata,
    } = common::bench_world(&rt, d);
    let podvm = d.join("podvm");
    let t = Instant::now();
    run_ok(
        Command::new(coffer())
            .args(["podvm", "build", "--out"])
            .arg(&podvm)
            .arg("--agent")
            .arg(&agent),
    );
    println!("podvm build: {:.0} ms", ms(t.elapsed()));
    let refs = run_ok(
        Command::new(coffer())
            .args(["measure", "--sandbox", "vm", "--podvm"])
            .arg(&podvm)
            .arg("--initdata")
            .arg(&initdata)
            .arg("--psp-dir")
            .arg(&psp_dir),
    );
    rt.block_on(kbs.admin.set_reference_values(refs.as_bytes()))
        .unwrap();

    let state = d.join("sandboxes");
    let (mut ready_ms, mut running_ms) = (Vec::new(), Vec::new());
    let mut console = String::new();
    for i in 0..runs {
        let name = format!("b{i}");
        let t0 = Instant::now();
        let mut child = Command::new(coffer())
            .args(["run", "--sandbox", "vm", "--podvm"])
            .arg(&podvm)
            .args(["--kbs", &kbs.url, "--initdata"])
            .arg(&initdata)
            .args(["--plain-http", "--name", &name, "--psp-dir"])
            .arg(&psp_dir)
            .arg("--state-dir")
            .arg(&state)
            .arg(&image)
            .args(["--", "/bin/sh", "-c", "echo started; exec sleep 2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sock = state.join(&name).join("agent.sock");
        let watch = std::thread::spawn(move || loop {
            if sock.exists() || t0.elapsed() > Duration::from_secs(600) {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        });
        let mut b = [0u8; 1];
        let mut out = child.stdout.take().unwrap();
        assert_eq!(out.read(&mut b).unwrap(), 1, "no output from the pod VM");
        running_ms.push(ms(t0.elapsed()));
        ready_ms.push(ms(watch.join().unwrap()));
        std::thread::sleep(Duration::from_millis(300));
        console = std::fs::read_to_string(state.join(&name).join("agent.log")).unwrap_or_default();
        let mut rest = Vec::new();
        let _ = out.read_to_end(&mut rest);
        assert!(child.wait().unwrap().success());
        println!(
            "run {i}: agent ready {:.0} ms, container output {:.0} ms",
            ready_ms[i], running_ms[i]
        );
    }
    println!(
        "median over {runs} runs: agent ready {:.0} ms, container running (first output) {:.0} ms",
        median(ready_ms),
        median(running_ms)
    );
    println!("guest boot steps (ms since the agent started as init, last run):");
    for step in [
        "modules loaded",
        "verity root mounted",
        "encrypted scratch mounted",
        "booted",
    ] {
        if let Some(v) = field(&console, step, "ms") {
            println!("  {step}: {v:.0}");
        }
    }
    for when in ["agent ready", "container running"] {
        let needle = format!("when=\"{when}\"");
        let used = field(&console, &needle, "guest_used_kib");
        let rss = field(&console, &needle, "agent_rss_kib");
        if let (Some(u), Some(r)) = (used, rss) {
            println!(
                "guest memory at {when}: {:.1} MiB in use (MemTotal - MemAvailable), agent RSS {:.1} MiB",
                u / 1024.0,
                r / 1024.0
            );
        }
    }
}
