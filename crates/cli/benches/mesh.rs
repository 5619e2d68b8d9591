//! `cargo bench -p coffer --bench mesh [-- --vm]`: what the attested mesh costs, pod to pod.
//!
//! Everything runs in a network namespace of the bench's own (removed at the end) with the CNI
//! bridge `cfr0`, on process sandboxes through containerd's CRI. Two server pods serve the same
//! busybox `httpd` (a small page and a 64 MiB file), one in the mesh and one outside it; two
//! client pods idle beside them, likewise. The client is a thread of this bench that entered a
//! client pod's network namespace, so that its connections take exactly the path a container's
//! would (through that pod's proxy when it is in the mesh):
//!
//! - **plain**: client pod → server pod, no mesh (the baseline);
//! - **mesh**: client pod → its proxy → mutual TLS 1.3 → the server pod's proxy → server.
//!
//! Printed (medians of 5 rounds, each case in turn): throughput of one TCP stream (a GET of
//! the 64 MiB file), request latency (sequential GETs of the small page, a new connection each:
//! p50, p99), new connections per second with 8 clients at once (each GETs the small page on
//! a new connection, again and again, for 2 s at most), and the ratio to the baseline. Then the KBS's
//! mesh CA: certificates issued per second to 8 concurrent attested clients (token reused, so
//! this is the request check, the policy and the signature; the bench's sample TEE is allowed by a
//! permissive resource policy, still evaluated per request). With `--vm` the two servers are pod
//! VMs (the accelerator `auto` picks: TCG on this project's CI machine) and the clients stay
//! process sandboxes of a second containerd on the same bridge and KBS. Every load is bounded in
//! count and time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use coffer_shim::annotations::INITDATA;
use common::containerd::{node_with, Pods, TestNetns};

const BRIDGE: &str = "10.88.16.1";
const SUBNET: &str = "10.88.16.0/24";

#[derive(Clone, Copy)]
struct Figures {
    mib_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    conn_s: f64,
}

/// Clients at once in the connection-rate part of a round.
const CLIENTS: usize = 8;

/// One round against `addr`: throughput, then up to 300 sequential requests (30 s at most).
fn measure(addr: &str) -> Figures {
    let t = Instant::now();
    let n = common::http_get_len(addr, 8080, "/big").expect("GET /big");
    assert!(n >= 64 << 20, "short read: {n} bytes");
    let mib_s = n as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let stop = Instant::now() + Duration::from_secs(30);
    for _ in 0..300 {
        let t = Instant::now();
        let got = common::http_get_len(addr, 8080, "/index.html").expect("GET /index.html");
        assert!(got > 0);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if Instant::now() > stop {
            break;
        }
    }
    // New connections per second, CLIENTS at once: 2 s at most, 2,000 requests each at most.
    let t = Instant::now();
    let until = t + Duration::from_secs(2);
    let done: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(move || {
                    let mut n = 0;
                    while n < 2000 && Instant::now() < until {
                        let got = common::http_get_len(addr, 8080, "/index.html")
                            .expect("GET /index.html");
                        assert!(got > 0);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    Figures {
        mib_s,
        p50_ms: common::percentile(&mut lat, 0.5),
        p99_ms: common::percentile(&mut lat, 0.99),
        conn_s: done as f64 / t.elapsed().as_secs_f64(),
    }
}

/// Runs `f` on a thread inside the network namespace at `netns`.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = PathBuf::from(netns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn main() {
    std::env::set_var("RUST_LOG", "warn");
    let vm = std::env::args().any(|a| a == "--vm");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A pod VM is built before the bench's namespace is entered (its packages may have to be
    // downloaded, which the namespace cannot reach).
    let podvm = d.join("podvm");
    if vm {
        common::build_podvm(&podvm);
    }
    let _netns = TestNetns::enter();
    TestNetns::bridge(&format!("{BRIDGE}/24"));
    TestNetns::cni_config(&d.join("node"), SUBNET);
    let n = node_with(d, vm.then_some(podvm.as_path()), BRIDGE, |c| {
        c.allow_sample = true
    });
    // The clients' containerd: the same one, or for pod VM servers a second one running process
    // sandboxes on the same bridge, address pool and KBS.
    let cd = d.join("clients");
    std::fs::create_dir_all(&cd).unwrap();
    let clients_containerd = vm.then(|| {
        TestNetns::cni_config_with(&cd.join("node"), SUBNET, &d.join("node/var/lib/cni"));
        common::containerd::Containerd::start(
            &cd,
            &common::containerd::ShimSetup {
                sandbox: "process",
                podvm: None,
                psp_dir: &n.world.psp_dir,
                registry: &n.world.registry.addr,
                cloud: None,
                peer_pods: false,
            },
        )
    });
    let servers = common::containerd::mesh_initdata(
        &n,
        d,
        &["server"],
        SUBNET,
        &[],
        vm.then_some(podvm.as_path()),
    );
    let clients = common::containerd::mesh_initdata(&n, &cd, &["client"], SUBNET, &[], None);
    let serve = "mkdir -p /www && echo hello > /www/index.html && dd if=/dev/zero of=/www/big bs=1M count=64 2>/dev/null && exec httpd -f -p 8080 -h /www";
    let (mesh_server, mesh_client, plain_server, plain_client) = n.rt.block_on(async {
        let mut server_pods = Pods::new(&n.containerd).await;
        server_pods.pull(&n.app).await.unwrap();
        let mut client_pods = Pods::new(clients_containerd.as_ref().unwrap_or(&n.containerd)).await;
        client_pods.pull(&n.app).await.unwrap();
        let mut out = Vec::new();
        for (name, who, command) in [
            ("mesh-server", "server", serve),
            ("mesh-client", "client", "sleep 600"),
            ("plain-server", "plain", serve),
            ("plain-client", "plain", "sleep 600"),
        ] {
            let (p, annotations) = if name.ends_with("server") {
                (&mut server_pods, &servers)
            } else {
                (&mut client_pods, &clients)
            };
            let mut c = p.sandbox_config(name, &[(INITDATA, &annotations[who])]);
            p.on_pod_network(&mut c);
            let pod = p.run_pod(&c).await.expect("RunPodSandbox");
            p.start_container(&pod, &c, "main", &n.app, &["/bin/sh", "-c", command])
                .await
                .expect("the container");
            out.push(p.address(&pod).await);
        }
        (
            out[0].clone(),
            out[1].clone(),
            out[2].clone(),
            out[3].clone(),
        )
    });
    // Wait until both servers serve their clients.
    for ((server, _), (_, client_ns)) in
        [(&mesh_server, &mesh_client), (&plain_server, &plain_client)]
    {
        let server = server.clone();
        in_netns(client_ns, move || {
            let until = Instant::now() + Duration::from_secs(120);
            while common::http_get_len(&server, 8080, "/index.html")
                .map(|n| n == 0)
                .unwrap_or(true)
            {
                assert!(Instant::now() < until, "{server} does not serve");
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    let (mut plain, mut mesh) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let s = plain_server.0.clone();
        plain.push(in_netns(&plain_client.1, move || measure(&s)));
        let s = mesh_server.0.clone();
        mesh.push(in_netns(&mesh_client.1, move || measure(&s)));
    }
    let median = |v: &[Figures]| {
        let mut t: Vec<f64> = v.iter().map(|f| f.mib_s).collect();
        let mut l: Vec<f64> = v.iter().map(|f| f.p50_ms).collect();
        let mut h: Vec<f64> = v.iter().map(|f| f.p99_ms).collect();
        let mut c: Vec<f64> = v.iter().map(|f| f.conn_s).collect();
        Figures {
            mib_s: common::percentile(&mut t, 0.5),
            p50_ms: common::percentile(&mut l, 0.5),
            p99_ms: common::percentile(&mut h, 0.5),
            conn_s: common::percentile(&mut c, 0.5),
        }
    };
    let (b, m) = (median(&plain), median(&mesh));
    println!(
        "pod to pod over the CNI bridge, {}, busybox httpd; medians of 5 rounds:",
        if vm {
            "process-sandbox clients, pod VM servers"
        } else {
            "process sandboxes"
        }
    );
    for (case, f) in [("plain", b), ("mesh (mTLS 1.3)", m)] {
        println!(
            "{case:<16} {:>8.1} MiB/s   p50 {:>6.3} ms   p99 {:>6.3} ms   {:>6.0} new connections/s ({CLIENTS} clients)",
            f.mib_s,
            f.p50_ms,
            f.p99_ms,
            f.conn_s
        );
    }
    println!(
        "mesh against plain: throughput {:.2}x ({:+.0} %), p50 {:+.3} ms, new connections {:.2}x",
        m.mib_s / b.mib_s,
        (m.mib_s / b.mib_s - 1.0) * 100.0,
        m.p50_ms - b.p50_ms,
        m.conn_s / b.conn_s
    );

    // The mesh CA's issuance rate (the bench's sample attester is not one the measured-launch
    // policy affirms: a resource policy that allows, still evaluated for each request).
    let rate = n.rt.block_on(async {
        n.world
            .kbs
            .admin
            .set_resource_policy("package policy\nimport rego.v1\ndefault allow := true\n")
            .await
            .unwrap();
        let mesh_toml = std::fs::read_to_string(cd.join("client-mesh.toml")).unwrap();
        let initdata = format!(
            "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"mesh.toml\" = '''{mesh_toml}'''\n"
        );
        let client = Arc::new(
            coffer_kbs_client::KbsClient::new(
                &n.world.kbs.url,
                coffer_kbs_client::http_client(None).unwrap(),
                Box::new(coffer_kbs_client::SampleAttester::default()),
                coffer_jose::TeeKeyAlgorithm::EcP256,
            )
            .unwrap()
            .with_initdata(initdata),
        );
        let csr = |_: usize| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap()
        };
        client.mesh_certificate(&csr(0)).await.expect("a certificate");
        const EACH: usize = 50;
        let csrs: Vec<Vec<String>> = (0..8).map(|_| (0..EACH).map(csr).collect()).collect();
        let t = Instant::now();
        let tasks: Vec<_> = csrs
            .into_iter()
            .map(|batch| {
                let client = client.clone();
                tokio::spawn(async move {
                    for c in batch {
                        client.mesh_certificate(&c).await.expect("a certificate");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        (8 * EACH) as f64 / t.elapsed().as_secs_f64()
    });
    println!("mesh CA: {rate:.0} certificates/s (8 concurrent attested clients, 400 requests)");
}
