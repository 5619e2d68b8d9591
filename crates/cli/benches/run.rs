//! `cargo bench -p coffer --bench run [-- RUNS]`: what `coffer run --sandbox process` adds to
//! starting a container, against `runc run` of the same bundle in the same minutes.
//!
//! The image is the small busybox image, encrypted by skopeo to a key only the KBS (in this
//! process) holds, served by Debian's docker-registry on loopback and already in the image
//! cache. Each `coffer run` starts a fresh sandbox: keeper, emulated PSP, agent, initdata check,
//! attestation to the KBS, key release, pull from the cache (verify, decrypt, unpack), the OCI
//! spec, runc. The figure is the time from starting the command to the container's first output
//! reaching the caller; runc gets the same rootfs and spec, unpacked beforehand. The agent's
//! peak RSS is read from /proc while the container runs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{coffer_bin as coffer, ms, run_ok};

/// Starts `cmd`, returns the time until its first stdout byte and, if `agent_of` names a sandbox
/// directory, the agent's peak RSS (KiB) read while the container runs.
fn first_output(cmd: &mut Command, agent_of: Option<&Path>) -> (Duration, Option<u64>) {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut b = [0u8; 1];
    let mut out = child.stdout.take().unwrap();
    assert_eq!(out.read(&mut b).unwrap(), 1, "no output from {cmd:?}");
    let took = t0.elapsed();
    let rss = agent_of.and_then(agent_hwm);
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    assert!(child.wait().unwrap().success(), "{cmd:?} failed");
    (took, rss)
}

/// VmHWM (KiB) of the agent serving the sandbox in `dir`.
fn agent_hwm(dir: &Path) -> Option<u64> {
    agent_status(dir, "status", "VmHWM:")
}

/// A `KEY: N kB` line of `/proc/<agent>/FILE` for the agent serving the sandbox in `dir`.
fn agent_status(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let needle = format!("--listen\0unix:{}", dir.join("agent.sock").display());
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&cmdline);
        if c.contains(&needle) && !c.starts_with("unshare") {
            let status = std::fs::read_to_string(e.path().join(file)).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        }
    }
    None
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.0), at(0.5), at(0.9))
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(15);
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
    let refs = run_ok(
        Command::new(coffer())
            .args(["measure", "--sandbox", "process", "--initdata"])
            .arg(&initdata)
            .arg("--agent")
            .arg(&agent)
            .arg("--psp-dir")
            .arg(&psp_dir),
    );
    rt.block_on(kbs.admin.set_reference_values(refs.as_bytes()))
        .unwrap();

    let probe = ["/bin/sh", "-c", "echo started; exec sleep 0.3"];
    let state = d.join("sandboxes");
    let cache = d.join("image-cache");
    let coffer_run = |name: &str| {
        let mut c = Command::new(coffer());
        c.args([
            "run",
            "--sandbox",
            "process",
            "--kbs",
            &kbs.url,
            "--initdata",
        ])
        .arg(&initdata)
        .args(["--plain-http", "--name", name, "--psp-dir"])
        .arg(&psp_dir)
        .arg("--agent")
        .arg(&agent)
        .arg("--state-dir")
        .arg(&state)
        .arg("--image-cache")
        .arg(&cache)
        .arg(&image)
        .arg("--")
        .args(probe);
        c
    };
    // Fills the cache.
    first_output(&mut coffer_run("warm"), None);

    // The runc bundle: the same rootfs (the decrypting pull is coffer's) and the agent's spec.
    let bundle = d.join("bundle");
    run_ok(
        Command::new(coffer())
            .args([
                "image",
                "pull",
                "--quiet",
                "--plain-http",
                "--decryption-key",
            ])
            .arg(d.join("img.pem"))
            .arg(&image)
            .arg("--rootfs")
            .arg(bundle.join("rootfs")),
    );
    let req = coffer_agent::api::proto::CreateContainerRequest {
        container_id: "bench".into(),
        args: probe.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // The probe names its command; the image config adds only its environment.
    let spec = coffer_agent::container::spec(
        "bench",
        "/coffer-bench",
        &serde_json::json!({}),
        (0, 0),
        &req,
    );
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let runc_run = |id: &str| {
        let mut c = Command::new("runc");
        c.arg("--root")
            .arg(d.join("runc"))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(id);
        c
    };
    first_output(&mut runc_run("warm"), None);

    let (mut coffer_ms, mut runc_ms, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (t, _) = first_output(&mut runc_run(&format!("r{i}")), None);
        runc_ms.push(ms(t));
        let name = format!("b{i}");
        let (t, r) = first_output(&mut coffer_run(&name), Some(&state.join(&name)));
        coffer_ms.push(ms(t));
        rss.extend(r);
    }
    // Where the time goes: one detached run, its agent's log against the launch time.
    let t0 = std::time::SystemTime::now();
    let traced = coffer_run("trace");
    let args: Vec<_> = traced.get_args().map(|a| a.to_os_string()).collect();
    let mut traced = Command::new(coffer());
    traced.arg(&args[0]).arg("-d").args(&args[1..]).env(
        "RUST_LOG",
        "debug,h2=info,hyper=info,tower=info,regorus=info,rustls=info,reqwest=info,hyper_util=info",
    );
    run_ok(&mut traced);
    let until = Instant::now() + Duration::from_secs(10);
    let log = state.join("trace/agent.log");
    while Instant::now() < until
        && !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("container started"))
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("one run, agent log against the launch (ms):");
    for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
        let Some((ts, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(t) = humantime::parse_rfc3339(ts) else {
            continue;
        };
        let at = t.duration_since(t0).map(ms).unwrap_or(0.0);
        println!("  {at:7.1}  {}", rest.trim());
    }
    let trace_dir = state.join("trace");
    let kib = |file: &str, key: &str| {
        agent_status(&trace_dir, file, key)
            .map(|k| format!("{:.1}", k as f64 / 1024.0))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "agent memory now (MiB): RSS {} = anonymous {} + file {}; peak {}",
        kib("smaps_rollup", "Rss:"),
        kib("smaps_rollup", "Anonymous:"),
        kib("status", "RssFile:"),
        kib("status", "VmHWM:")
    );
    run_ok(
        Command::new(coffer())
            .args(["rm", "-f", "trace", "--state-dir"])
            .arg(&state),
    );

    let (cmin, cmed, cp90) = stats(coffer_ms.clone());
    let (rmin, rmed, rp90) = stats(runc_ms.clone());
    let added: Vec<f64> = coffer_ms.iter().zip(&runc_ms).map(|(c, r)| c - r).collect();
    let (amin, amed, ap90) = stats(added);
    println!("runs: {runs} (start to first output of the container; cached encrypted image)");
    println!("runc run:    min {rmin:7.1} ms  median {rmed:7.1} ms  p90 {rp90:7.1} ms");
    println!("coffer run:  min {cmin:7.1} ms  median {cmed:7.1} ms  p90 {cp90:7.1} ms");
    println!(
        "added:       min {amin:7.1} ms  median {amed:7.1} ms  p90 {ap90:7.1} ms  (goal < 150 ms)"
    );
    match rss.iter().max() {
        Some(max) => println!(
            "agent peak RSS: max {:.1} MiB over {} runs (goal < 30 MiB)",
            *max as f64 / 1024.0,
            rss.len()
        ),
        None => println!("agent peak RSS: not read (the container ended too soon)"),
    }
}
