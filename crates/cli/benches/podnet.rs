//! `cargo bench -p coffer --bench podnet [-- --vm]`: the pod network's cost, pod to pod.
//!
//! Everything runs in a network namespace of the bench's own (removed at the end), with the CNI
//! bridge `cfr0` there; the client is this process on the bridge's side (the node, as another
//! pod would be one veth further). The same server, busybox `httpd`, serves in each case:
//!
//! - **veth**: a plain network namespace on the bridge through a veth pair (what the CNI's
//!   bridge plugin makes), the server started there with `nsenter` — the baseline;
//! - **process sandbox**: a Coffer pod (process sandbox) on the CNI's pod network, the server
//!   in its container;
//! - **pod VM** (`--vm`): a Coffer pod VM on the pod network (tap and tc mirred in the pod's
//!   namespace, virtio-net in the guest), under the accelerator `auto` picks (TCG on this
//!   project's CI machine).
//!
//! Printed per case: throughput of one TCP stream (a GET of a 64 MiB file; 16 MiB for the pod
//! VM), request latency (sequential GETs of a small page, a connection each: p50, p99), and the
//! ratio to the baseline. Then the start time networking adds: RunPodSandbox of a process
//! sandbox on the pod network against one on the node's network (the difference is containerd's
//! CNI call and the netns join), and for the pod VM the keeper's own phases (reading the
//! namespace, plugging the taps in, the guest's SetNetwork). Every load is bounded in count and
//! time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use coffer_shim::annotations::INITDATA;
use common::containerd::{node_at, Pods, TestNetns};

const BRIDGE: &str = "10.88.11.1";
const BASELINE: &str = "10.88.11.250";

/// Waits until the server answers (bounded).
fn wait_serving(addr: &str, port: u16) {
    let until = Instant::now() + Duration::from_secs(120);
    while common::http_get_len(addr, port, "/index.html")
        .map(|n| n == 0)
        .unwrap_or(true)
    {
        assert!(Instant::now() < until, "{addr}:{port} does not serve");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Figures {
    mib_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// One round: throughput (a GET of `/bigMIB`) and latency (`requests` GETs of `/index.html`,
/// stopped after 30 s).
fn measure(addr: &str, mib: usize, requests: usize) -> Figures {
    let t = Instant::now();
    let n = common::http_get_len(addr, 8080, &format!("/big{mib}")).expect("GET /big");
    assert!(n >= mib << 20, "short read: {n} bytes");
    let mib_s = n as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let stop = Instant::now() + Duration::from_secs(30);
    for _ in 0..requests {
        let t = Instant::now();
        common::http_get_len(addr, 8080, "/index.html").expect("GET /index.html");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if Instant::now() > stop {
            break;
        }
    }
    Figures {
        mib_s,
        p50_ms: common::percentile(&mut lat, 0.5),
        p99_ms: common::percentile(&mut lat, 0.99),
    }
}

/// `ROUNDS` rounds against the baseline and the pod in turn (so that both see the same
/// machine); the medians of each.
fn interleaved(pod: &str, mib: usize, requests: usize) -> (Figures, Figures) {
    const ROUNDS: usize = 5;
    let (mut b, mut p) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        b.push(measure(BASELINE, mib, requests));
        p.push(measure(pod, mib, requests));
    }
    let median = |v: &[Figures]| {
        let mut t: Vec<f64> = v.iter().map(|f| f.mib_s).collect();
        let mut l: Vec<f64> = v.iter().map(|f| f.p50_ms).collect();
        let mut h: Vec<f64> = v.iter().map(|f| f.p99_ms).collect();
        Figures {
            mib_s: common::percentile(&mut t, 0.5),
            p50_ms: common::percentile(&mut l, 0.5),
            p99_ms: common::percentile(&mut h, 0.5),
        }
    };
    (median(&b), median(&p))
}

fn print(case: &str, f: &Figures, base: Option<&Figures>) {
    let ratio = base
        .map(|b| {
            format!(
                "  (throughput {:.2}x, p50 {:.2}x of veth)",
                f.mib_s / b.mib_s,
                f.p50_ms / b.p50_ms
            )
        })
        .unwrap_or_default();
    println!(
        "{case:<16} {:>9.1} MiB/s   p50 {:>7.3} ms   p99 {:>7.3} ms{ratio}",
        f.mib_s, f.p50_ms, f.p99_ms
    );
}

/// The shell command that serves `/big64`, `/big16` and `/index.html` on port 8080.
fn server_script(www: &str) -> String {
    format!(
        "mkdir -p {www} && dd if=/dev/zero of={www}/big64 bs=1M count=64 2>/dev/null && dd if=/dev/zero of={www}/big16 bs=1M count=16 2>/dev/null && echo hello > {www}/index.html && exec httpd -f -p 8080 -h {www}"
    )
}

/// The baseline: a namespace on the bridge through a veth pair, busybox httpd in it.
struct Baseline {
    name: String,
    server: Child,
    _www: tempfile::TempDir,
}

impl Baseline {
    fn start() -> Self {
        let name = format!("coffer-bench-veth{}", std::process::id());
        let run = |args: &[&str]| common::run_ok(Command::new("ip").args(args));
        run(&["netns", "add", &name]);
        run(&[
            "link", "add", "cbv0", "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        run(&["link", "set", "cbv0", "master", "cfr0", "up"]);
        run(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{BASELINE}/24"),
            "dev",
            "eth0",
        ]);
        run(&["-n", &name, "link", "set", "eth0", "up"]);
        run(&["-n", &name, "link", "set", "lo", "up"]);
        let www = tempfile::tempdir().unwrap();
        let server = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{name}"))
            .args(["--", "busybox", "sh", "-c"])
            .arg(server_script(www.path().to_str().unwrap()))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_serving(BASELINE, 8080);
        Self {
            name,
            server,
            _www: www,
        }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// What one node gave.
struct Run {
    /// The baseline's figures and the pod's, measured in turn.
    base: Figures,
    pod: Figures,
    /// RunPodSandbox times of further sandboxes, on the pod network and on the node's.
    on: Vec<f64>,
    off: Vec<f64>,
    /// The pod's keeper log, while it ran.
    keeper_log: String,
}

/// A Coffer pod on the pod network serving as the baseline does, measured in turn with it;
/// then `starts` further sandboxes on each network.
fn coffer_pod(
    d: &std::path::Path,
    podvm: Option<&std::path::Path>,
    mib: usize,
    requests: usize,
    starts: usize,
) -> Run {
    TestNetns::cni_config(&d.join("node"), "10.88.11.0/24");
    let n = node_at(d, podvm, BRIDGE);
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let mut config = p.sandbox_config("bench", &[(INITDATA, &n.annotation)]);
        p.on_pod_network(&mut config);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        let (ip, _) = p.address(&pod).await;
        let keeper_log = std::fs::read_to_string(
            n.containerd
                .dir
                .join("node/run/coffer/pods")
                .join(coffer_shim::sandbox::name_for(&pod))
                .join("keeper.log"),
        )
        .unwrap_or_default();
        p.start_container(
            &pod,
            &config,
            "web",
            &n.app,
            &["/bin/sh", "-c", &server_script("/www")],
        )
        .await
        .expect("the server");
        let (base, f) = tokio::task::spawn_blocking(move || {
            wait_serving(&ip, 8080);
            interleaved(&ip, mib, requests)
        })
        .await
        .unwrap();
        p.remove_pod(&pod).await.unwrap();
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for i in 0..starts {
            for network in [true, false] {
                let mut c =
                    p.sandbox_config(&format!("start{i}{network}"), &[(INITDATA, &n.annotation)]);
                if network {
                    p.on_pod_network(&mut c);
                }
                let t = Instant::now();
                let pod = p.run_pod(&c).await.expect("RunPodSandbox");
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if network { &mut on } else { &mut off }.push(ms);
                p.remove_pod(&pod).await.unwrap();
            }
        }
        Run {
            base,
            pod: f,
            on,
            off,
            keeper_log,
        }
    })
}

fn main() {
    let vm = std::env::args().any(|a| a == "--vm");
    // The keepers (started by containerd's shims, which inherit this) log their start phases.
    std::env::set_var("RUST_LOG", "warn,coffer_keeper=info");
    // The pod VM is built before the bench's namespace is entered: its Debian packages may have
    // to be downloaded, which the namespace cannot reach.
    let dir = tempfile::tempdir().unwrap();
    let podvm = dir.path().join("podvm");
    if vm {
        common::build_podvm(&podvm);
    }
    let _netns = TestNetns::enter();
    TestNetns::bridge(&format!("{BRIDGE}/24"));
    let _baseline = Baseline::start();
    println!("pod-to-pod over the CNI bridge, client on the node, busybox httpd serving; medians of 5 rounds, each case in turn with the baseline:");
    let mut r = coffer_pod(&dir.path().join("process"), None, 64, 300, 5);
    print("veth (baseline)", &r.base, None);
    print("process sandbox", &r.pod, Some(&r.base));
    let (a, b) = (
        common::percentile(&mut r.on, 0.5),
        common::percentile(&mut r.off, 0.5),
    );
    println!(
        "process sandbox RunPodSandbox: {a:.0} ms on the pod network, {b:.0} ms on the node's (median of {}): networking adds {:.0} ms (containerd's CNI call included)",
        r.on.len(),
        a - b
    );

    if vm {
        let d = dir.path().join("vm");
        std::fs::create_dir_all(&d).unwrap();
        let r = coffer_pod(&d, Some(&podvm), 16, 100, 0);
        print("veth (baseline)", &r.base, None);
        print("pod VM", &r.pod, Some(&r.base));
        const MARK: &str = "the pod VM is on the pod network";
        if r.keeper_log.contains(MARK) {
            let ms = |key| common::log_field(&r.keeper_log, MARK, key).unwrap_or(f64::NAN);
            println!(
                "pod VM networking at start: read the namespace {} ms, plug the taps {} ms, SetNetwork {} ms",
                ms("read_ms"),
                ms("plug_ms"),
                ms("configure_ms")
            );
        }
    }
}
