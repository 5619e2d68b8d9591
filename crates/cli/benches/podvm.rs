//! `cargo bench -p coffer --bench podvm [-- RUNS] [--busy] [--cpus N] [--verbose-console]
//! [--remote [--disk]] [--agent PATH]`: a pod VM's start, under the accelerator `coffer run
//! --accel auto` picks here (TCG on this project's CI machine).
//!
//! `--remote` starts a peer pod instead (`coffer run --sandbox remote`): Debian's libvirtd and
//! coffer-cloud, started by the bench in a network namespace of its own (removed at the end),
//! make the VM under TCG on the bench's bridge; the keeper's own marks give the breakdown (the
//! API call that makes the VM, its boot until the agent answers over mutual TLS, the agent ready,
//! then attestation, pull and runc until the container's first output). With `--disk` the VM boots
//! the image's disk (`coffer podvm build --disk qcow2`) through UEFI firmware as a cloud VM does,
//! instead of libvirt's direct kernel boot.
//!
//! Each run is `coffer run --sandbox vm` of the encrypted busybox image (KBS in this process,
//! Debian's docker-registry on loopback) with a fresh VM: QEMU start, kernel, the agent as init
//! (modules, dm-verity root, dm-integrity + dm-crypt scratch formatted), initdata check,
//! attestation, key release, pull inside the guest, runc. Printed: the time to agent-ready (the
//! keeper's `agent.sock` appears once the agent says it serves) and to the container's first
//! output, median and worst over the runs, the guest's boot steps from its console, and the
//! guest memory in use (MemTotal − MemAvailable) and agent RSS at agent-ready and with the
//! container running.
//!
//! `--busy` keeps both host cores busy (two spinning threads, as a parallel build would) during
//! the runs; `--cpus N` sets the pod VM's vCPUs (default: `coffer run`'s); `--verbose-console`
//! boots a copy of the image whose kernel logs at `loglevel=7` (lockup backtraces on the
//! console); `--agent PATH` boots that agent binary instead of this package's (to compare
//! builds). A run that does not finish within its bound counts as stalled and its console's
//! last lines are printed; the bench goes on.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::Read,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{coffer_bin as coffer, ms, run_ok};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn worst(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// How long one run may take before it counts as stalled.
const RUN_BOUND: Duration = Duration::from_secs(240);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3);
    let busy = args.iter().any(|a| a == "--busy");
    let verbose = args.iter().any(|a| a == "--verbose-console");
    let remote = args.iter().any(|a| a == "--remote");
    let disk = remote && args.iter().any(|a| a == "--disk");
    let cpus: Option<String> = args
        .iter()
        .position(|a| a == "--cpus")
        .and_then(|i| args.get(i + 1).cloned());
    // Another agent binary to boot instead of this package's (an older build, to compare).
    let agent: PathBuf = args
        .iter()
        .position(|a| a == "--agent")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        // The agent is built (when missing) here, before the timed pod VM build.
        .unwrap_or_else(common::agent_binary);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The pod VM is built first: its packages may be downloaded, which a peer pod's namespace
    // cannot reach.
    let podvm = d.join("podvm");
    let t = Instant::now();
    if disk {
        common::build_podvm_from(
            &podvm,
            &agent,
            &["--disk", "qcow2", "--disk-scratch-mib", "512"],
        );
    } else {
        common::build_podvm_from(&podvm, &agent, &[]);
    }
    println!("podvm build: {:.0} ms", ms(t.elapsed()));
    let _netns = remote.then(|| {
        let n = common::containerd::TestNetns::enter();
        common::containerd::TestNetns::bridge_named("cfrbench0", "10.99.20.1/24");
        n
    });
    let common::BenchWorld {
        kbs,
        registry: _registry,
        image,
        psp_dir,
        initdata,
    } = common::bench_world(&rt, d);
    let libvirtd = remote.then(|| common::libvirt::Libvirtd::start(&d.join("libvirt")));
    let cloud = libvirtd.as_ref().map(|l| {
        common::libvirt::Cloud::start_opts(
            d,
            l,
            &podvm,
            "cfrbench0",
            "10.99.20.0/24",
            "10.99.20.1",
            if disk { "boot = \"disk\"\n" } else { "" },
        )
    });
    if verbose {
        let cmdline = std::fs::read_to_string(podvm.join("cmdline")).unwrap();
        let cmdline = cmdline.trim().replace(
            "quiet loglevel=4",
            "loglevel=7 softlockup_all_cpu_backtrace=1",
        );
        std::fs::write(podvm.join("cmdline"), format!("{cmdline}\n")).unwrap();
    }
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

    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..if busy { 2 } else { 0 })
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Bounded: the bench's own runs are.
                let until = Instant::now() + RUN_BOUND * (runs as u32 + 1);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();

    let state = d.join("sandboxes");
    let (mut ready_ms, mut running_ms) = (Vec::new(), Vec::new());
    let mut keeper_log = String::new();
    let mut stalls = 0;
    let mut console = String::new();
    for i in 0..runs {
        let name = format!("b{i}");
        let t0 = Instant::now();
        let mut cmd = Command::new(coffer());
        match &cloud {
            // The keeper's marks (its log) give the breakdown.
            Some(c) => cmd
                .args(["run", "--sandbox", "remote", "--cloud"])
                .arg(&c.socket)
                .env("RUST_LOG", "warn,coffer_keeper=info"),
            // The keeper's mark "the agent serves" splits the rest of the phases.
            None => cmd
                .args(["run", "--sandbox", "vm"])
                .env("RUST_LOG", "warn,coffer_keeper=info"),
        };
        cmd.arg("--podvm")
            .arg(&podvm)
            .args(["--kbs", &kbs.url, "--initdata"])
            .arg(&initdata)
            .args(["--plain-http", "--name", &name, "--psp-dir"])
            .arg(&psp_dir)
            .arg("--state-dir")
            .arg(&state)
            .args(["--ready-timeout", &RUN_BOUND.as_secs().to_string()]);
        if let Some(n) = &cpus {
            cmd.args(["--cpus", n]);
        }
        let mut child = cmd
            .arg(&image)
            .args(["--", "/bin/sh", "-c", "echo started; exec sleep 2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sock = state.join(&name).join("agent.sock");
        let watch = std::thread::spawn(move || loop {
            if sock.exists() || t0.elapsed() > RUN_BOUND {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        });
        // The first byte of output, or the bound.
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let n = out.read(&mut b).unwrap_or(0);
            let _ = tx.send(n);
            let mut rest = Vec::new();
            let _ = out.read_to_end(&mut rest);
        });
        let got = rx.recv_timeout(RUN_BOUND).unwrap_or(0);
        let console_now = || {
            let dir = state.join(&name);
            // A peer pod's console is in the libvirt pool, where the keeper says.
            let path = std::fs::read_to_string(dir.join("console.path"))
                .map(PathBuf::from)
                .unwrap_or_else(|_| dir.join("agent.log"));
            std::fs::read_to_string(path).unwrap_or_default()
        };
        if got != 1 {
            stalls += 1;
            let c = console_now();
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            let _ = child.wait();
            println!(
                "run {i}: STALLED after {:.0} ms; coffer run said: {}\n--- console (last 60 lines) ---\n{}",
                ms(t0.elapsed()),
                err.trim(),
                c.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            let _ = watch.join();
            continue;
        }
        running_ms.push(ms(t0.elapsed()));
        ready_ms.push(ms(watch.join().unwrap()));
        std::thread::sleep(Duration::from_millis(300));
        console = console_now();
        keeper_log =
            std::fs::read_to_string(state.join(&name).join("keeper.log")).unwrap_or_default();
        assert!(child.wait().unwrap().success());
        println!(
            "run {i}: agent ready {:.0} ms, container output {:.0} ms",
            ready_ms.last().unwrap(),
            running_ms.last().unwrap()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    let vcpus = cpus.as_deref().unwrap_or("coffer run's default");
    println!(
        "{} runs ({}, vCPUs: {vcpus}): {stalls} stalled",
        runs,
        if busy {
            "both host cores busy"
        } else {
            "idle host"
        }
    );
    if !ready_ms.is_empty() {
        println!(
            "agent ready: median {:.0} ms, worst {:.0} ms; container running (first output): median {:.0} ms, worst {:.0} ms",
            median(ready_ms.clone()),
            worst(&ready_ms),
            median(running_ms.clone()),
            worst(&running_ms)
        );
    }
    // Phases of the last run: the kernel's boot by the guest's clock, the agent's steps, and what
    // remains of the host's agent-ready time (keeper and QEMU start, firmware, the host seeing
    // the agent ready).
    let kernel = common::log_field(&console, "the agent starts as init", "uptime_ms");
    let booted = common::log_field(&console, "booted", "ms");
    // The guest's uptime when the agent told the host it serves (its "agent ready" memory line).
    let serving = console
        .lines()
        .rev()
        .find(|l| l.contains("when=\"agent ready\""))
        .and_then(|l| common::log_field(l, "guest memory", "uptime_ms"));
    if let (Some(k), Some(b), Some(a), Some(r)) = (kernel, booted, serving, ready_ms.last()) {
        println!("phases of the last run (ms): kernel boot until init {k:.0}, agent as init until booted {b:.0}, the agent from booted until it tells the host it serves (initdata check, policy, API) {:.0}, the rest (keeper and QEMU start, firmware, ready seen by the host) {:.0}", a - k - b, r - a);
        // The keeper's mark (ms since it spawned QEMU) splits the rest.
        if let (false, Some(s)) = (
            remote,
            common::log_field(&keeper_log, "the agent serves", "ms"),
        ) {
            println!("  of the rest: before QEMU's start (coffer run, the keeper) {:.0}, QEMU's start and firmware with the keeper seeing the agent ready {:.0}", r - s, s - a);
        }
    }
    if remote {
        // The keeper's marks (ms since its start): the VM made, the agent answering, serving.
        let created = common::log_field(&keeper_log, "the peer pod's VM is created", "ms");
        let connected = common::log_field(&keeper_log, "connected to the agent", "ms");
        let serves = common::log_field(&keeper_log, "the agent serves", "ms");
        if let (Some(c), Some(n), Some(s), Some(r)) =
            (created, connected, serves, running_ms.last())
        {
            println!(
                "peer pod breakdown of the last run (ms): API call (coffer-cloud: image check, domain defined and started) {c:.0}, VM boot until the agent answers over mutual TLS {:.0}, agent ready {:.0}, attestation + pull + runc until the first output {:.0}",
                n - c,
                s - n,
                r - ready_ms.last().copied().unwrap_or(s)
            );
        }
    }
    println!("guest boot steps (ms since the agent started as init, last run):");
    // "vm: modules loaded", not the later modules' line, which comes after the boot.
    for (step, needle) in [
        ("modules loaded", "vm: modules loaded"),
        ("verity root mounted", "verity root mounted"),
        ("encrypted scratch mounted", "encrypted scratch mounted"),
        ("booted", "booted"),
    ] {
        if let Some(v) = common::log_field(&console, needle, "ms") {
            println!("  {step}: {v:.0}");
        }
    }
    for when in ["agent ready", "container running"] {
        let needle = format!("when=\"{when}\"");
        let used = common::log_field(&console, &needle, "guest_used_kib");
        let rss = common::log_field(&console, &needle, "agent_rss_kib");
        if let (Some(u), Some(r)) = (used, rss) {
            println!(
                "guest memory at {when}: {:.1} MiB in use (MemTotal - MemAvailable), agent RSS {:.1} MiB",
                u / 1024.0,
                r / 1024.0
            );
        }
    }
}
