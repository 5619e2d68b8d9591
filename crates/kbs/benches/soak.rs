//! Soak benchmark: the real `coffer-kbs` on loopback under a bounded mix of valid handshakes,
//! admin writes and malformed or stalling requests, for a fixed time. Prints the handshakes'
//! rate and latency, the answers by status (no 5xx expected) and the server's RSS at the start,
//! peak and end (flat expected).
//!
//! Usage: `cargo bench -p coffer-kbs --bench soak -- [SECONDS] [HANDSHAKES_PER_SECOND]`
//! (defaults 600 and 100). `COFFER_KBS=PATH` runs another server binary.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs_client::{generate_admin_key, http_client, AdminClient, KbsClient, SampleAttester};

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    failed_handshakes: u64,
    statuses: BTreeMap<String, u64>,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let seconds: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(600);
    let rate: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(soak(Duration::from_secs(seconds), rate));
}

async fn soak(length: Duration, rate: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (admin_private, admin_public) = generate_admin_key().unwrap();
    std::fs::write(dir.path().join("admin.pub"), admin_public).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin =
        std::env::var("COFFER_KBS").unwrap_or_else(|_| env!("CARGO_BIN_EXE_coffer-kbs").into());
    let mut server = std::process::Command::new(&bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--insecure-http",
            "--allow-sample",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--admin-public-key")
        .arg(dir.path().join("admin.pub"))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = server.id();
    let url = format!("http://127.0.0.1:{port}");
    let admin =
        AdminClient::new(&url, http_client(None).unwrap(), admin_private.as_bytes()).unwrap();
    let ready = Instant::now();
    while admin.get_reference_values().await.is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "{bin} did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin
        .set_resource("default/test/key", vec![7u8; 64])
        .await
        .unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let until = start + length;
    let mut tasks = Vec::new();

    // Valid handshakes: 8 clients sharing `rate` per second, each a fresh TEE key and session.
    let clients = 8;
    for _ in 0..clients {
        let (url, tally) = (url.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * clients / rate.max(1)));
            while Instant::now() < until {
                tick.tick().await;
                let c = KbsClient::new(
                    &url,
                    http_client(None).unwrap(),
                    Box::new(SampleAttester::default()),
                    TeeKeyAlgorithm::EcP256,
                )
                .unwrap();
                let t = Instant::now();
                let ok = c.get_resource("default/test/key").await.is_ok();
                let mut g = tally.lock().unwrap();
                if ok {
                    g.latencies.push(t.elapsed());
                } else {
                    g.failed_handshakes += 1;
                }
            }
        }));
    }

    // Admin writes: a resource every 200 ms, the resource policy every 5 s.
    {
        let admin =
            AdminClient::new(&url, http_client(None).unwrap(), admin_private.as_bytes()).unwrap();
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            let policy = coffer_kbs::policy::DEFAULT_RESOURCE_POLICY;
            let mut n = 0u64;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(200)).await;
                n += 1;
                let r = if n.is_multiple_of(25) {
                    admin.set_resource_policy(policy).await
                } else {
                    admin
                        .set_resource(&format!("default/soak/r{}", n % 50), vec![1u8; 256])
                        .await
                };
                let key = match r {
                    Ok(()) => "admin 2xx".to_string(),
                    Err(e) => format!("admin error {:?}", e.status()),
                };
                *tally.lock().unwrap().statuses.entry(key).or_default() += 1;
            }
        }));
    }

    // Malformed and stalling requests, one every 20 ms.
    {
        let (url, tally) = (url.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut stalled: Vec<(Instant, std::net::TcpStream)> = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
                n += 1;
                let sent = match n % 6 {
                    0 => {
                        http.post(format!("{url}/kbs/v0/auth"))
                            .body("{\"version\": 7, \"tee\": [")
                            .send()
                            .await
                    }
                    1 => {
                        http.post(format!("{url}/kbs/v0/attest"))
                            .header("cookie", "kbs-session-id=forged")
                            .body("{}")
                            .send()
                            .await
                    }
                    2 => {
                        http.get(format!("{url}/kbs/v0/resource/default/test/key"))
                            .bearer_auth("eyJhbGciOiJFUzI1NiJ9.e30.AAAA")
                            .send()
                            .await
                    }
                    3 => {
                        http.post(format!("{url}/kbs/v0/resource-policy"))
                            .bearer_auth("not-a-token")
                            .body(vec![b'['; 4096])
                            .send()
                            .await
                    }
                    4 => {
                        http.post(format!("{url}/kbs/v0/auth"))
                            .body(vec![b' '; 2 << 20])
                            .send()
                            .await
                    }
                    _ => {
                        // A connection that stops in its header, kept for 15 s, at most 100.
                        stalled.retain(|(t, _)| t.elapsed() < Duration::from_secs(15));
                        if stalled.len() < 100 {
                            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                                let _ = s.write_all(b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\n");
                                stalled.push((Instant::now(), s));
                            }
                        }
                        continue;
                    }
                };
                let key = match sent {
                    Ok(r) => format!("malformed {}", r.status().as_u16()),
                    Err(e) if e.is_timeout() => "malformed timeout".into(),
                    Err(_) => "malformed connection error".into(),
                };
                *tally.lock().unwrap().statuses.entry(key).or_default() += 1;
            }
        }));
    }

    // The server's RSS each second.
    let mut rss = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(rss_kib(pid));
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = server.kill();
    let _ = server.wait();

    let mut g = tally.lock().unwrap();
    g.latencies.sort();
    let pct = |p: f64| {
        g.latencies
            .get(((g.latencies.len() as f64 * p) as usize).min(g.latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let secs = start.elapsed().as_secs_f64();
    println!("soak: {secs:.0} s against {bin}");
    println!(
        "handshakes: {} ok ({:.1}/s), {} failed; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        g.latencies.len(),
        g.latencies.len() as f64 / secs,
        g.failed_handshakes,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    for (k, v) in &g.statuses {
        println!("{k}: {v}");
    }
    let fives: u64 = g
        .statuses
        .iter()
        .filter(|(k, _)| k.contains(" 5") || k.contains("Some(5"))
        .map(|(_, v)| *v)
        .sum();
    println!("5xx answers: {fives}");
    let minutes: Vec<String> = rss
        .iter()
        .skip(59)
        .step_by(60)
        .map(|k| format!("{:.0}", *k as f64 / 1024.0))
        .collect();
    println!("server RSS each minute (MiB): {}", minutes.join(" "));
    let warm = rss.get(5).or(rss.first()).copied().unwrap_or(0);
    println!(
        "server RSS: {:.1} MiB after 5 s, peak {:.1} MiB, end {:.1} MiB",
        warm as f64 / 1024.0,
        rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        rss.last().copied().unwrap_or(0) as f64 / 1024.0
    );
}
