//! The KBS under attack, against a real listener on loopback: stalled clients over TCP and TLS,
//! a flood at the connection bound, future-dated and not-yet-valid admin tokens, policy bombs,
//! and short bodies.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use common::TestKbs;
use serde_json::json;

fn addr(kbs: &TestKbs) -> SocketAddr {
    kbs.url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()
        .unwrap()
}

/// Raises this test process's open-file limit (it holds both ends of every connection).
fn enough_files() {
    let mut c = coffer_kbs::Config::default();
    coffer_kbs::server::fit_file_limit(&mut c);
}

/// A client that stalls: silent, in the middle of its header, or in the middle of its body.
fn stalled(at: SocketAddr, how: usize) -> TcpStream {
    let mut s = TcpStream::connect(at).unwrap();
    match how % 3 {
        0 => {}
        1 => s
            .write_all(b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\n")
            .unwrap(),
        _ => s
            .write_all(
                b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"version\":",
            )
            .unwrap(),
    }
    s
}

/// Whether the server closed `s` (EOF or reset) within `wait`; what it sent first is returned.
fn closed_within(s: &mut TcpStream, wait: Duration) -> Option<String> {
    let until = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned())
            }
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_clients_are_closed_while_every_valid_client_is_served() {
    enough_files();
    let kbs = TestKbs::start_with(|c| {
        c.header_read_timeout_secs = 10;
        c.body_read_timeout_secs = 10;
        c.idle_timeout_secs = 10;
    })
    .await;
    kbs.admin()
        .set_resource("default/test/key", b"sealed".to_vec())
        .await
        .unwrap();
    let at = addr(&kbs);
    let opened = Instant::now();
    let mut conns: Vec<TcpStream> =
        tokio::task::spawn_blocking(move || (0..1000).map(|i| stalled(at, i)).collect())
            .await
            .unwrap();
    // With 1,000 stalled connections open, attesters are served.
    for _ in 0..10 {
        let got = kbs.tee().get_resource("default/test/key").await.unwrap();
        assert_eq!(&got[..], b"sealed");
    }
    // ... while the stalled connections were all still open (none has been answered or closed).
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let open = matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(
            open,
            "stalled connection {i} was closed before the valid clients were served ({:?} after opening)",
            opened.elapsed()
        );
        s.set_nonblocking(false).unwrap();
    }
    // Every stalled connection is closed within the header and body timeouts (10 s) and a
    // margin; a stalled body is answered 408 first.
    let mut timed_out_bodies = 0;
    for (i, s) in conns.iter_mut().enumerate() {
        let left = Duration::from_secs(20).saturating_sub(opened.elapsed());
        let said = closed_within(s, left)
            .unwrap_or_else(|| panic!("connection {i} (kind {}) still open", i % 3));
        if i % 3 == 2 {
            assert!(said.starts_with("HTTP/1.1 408"), "{said}");
            assert!(said.contains("RequestTimeout"), "{said}");
            timed_out_bodies += 1;
        }
    }
    assert_eq!(timed_out_bodies, 333);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let kbs = TestKbs::start_with(|c| {
        c.idle_timeout_secs = 1;
        c.header_read_timeout_secs = 30;
    })
    .await;
    let mut s = TcpStream::connect(addr(&kbs)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let said = closed_within(&mut s, Duration::from_secs(5)).expect("still open after 5 s");
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_connection_bound_the_longest_idle_connection_makes_room() {
    let kbs = TestKbs::start_with(|c| {
        c.max_connections = 20;
        c.header_read_timeout_secs = 60;
    })
    .await;
    let at = addr(&kbs);
    let mut conns: Vec<TcpStream> = (0..20).map(|i| stalled(at, i * 3)).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The bound is full of silent clients; a new client still gets its answer.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for _ in 0..5 {
        let r = client
            .get(format!("{}/healthz", kbs.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Room was made by closing the oldest silent ones.
    let closed = conns
        .iter_mut()
        .filter_map(|s| closed_within(s, Duration::from_millis(50)))
        .count();
    assert!(closed >= 1, "no stalled connection was closed");
    // Operators see it in the metrics.
    let metrics = client
        .get(format!("{}/metrics", kbs.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let evicted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kbs_connections_total{event=\"evicted\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no eviction count in:\n{metrics}"));
    assert!(evicted >= 1, "{metrics}");
    assert!(metrics.contains("kbs_open_connections "), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_tls_handshakes_are_closed_and_tls_clients_served() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    coffer_kbs::server::generate_self_signed(vec!["localhost".into()], &cert, &key).unwrap();
    let kbs = TestKbs::start_with(|c| {
        c.insecure_http = false;
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.tls_handshake_timeout_secs = 1;
    })
    .await;
    let at = addr(&kbs);
    // Silent, and a ClientHello cut short.
    let mut conns: Vec<TcpStream> = (0..100)
        .map(|i| {
            let mut s = TcpStream::connect(at).unwrap();
            if i % 2 == 1 {
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
            }
            s
        })
        .collect();
    let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .resolve("localhost", at)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = client
        .get(format!("https://localhost:{}/healthz", at.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (i, s) in conns.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(4)).is_some(),
            "TLS connection {i} still open"
        );
    }
}

/// The reproduction against the real binary: a file limit of 256 and 300 connections
/// that each send half a request header; `/healthz` must still answer within 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn half_headers_beyond_the_file_limit_do_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 256 && exec {} --listen 127.0.0.1:{port} --data-dir {} --insecure-http",
            env!("CARGO_BIN_EXE_coffer-kbs"),
            dir.path().join("data").display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    common::wait_ready(&url).await;
    let at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _conns: Vec<TcpStream> = (0..300).map(|_| stalled(at, 1)).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = client.get(format!("{url}/healthz")).send().await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.expect("healthz did not answer within 5 s").status(), 200);
}

/// An admin token signed by the configured admin key, with `claims`.
fn admin_token(kbs: &TestKbs, claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&kbs.admin_private).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &key,
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The status and error detail of an admin read with `token`.
async fn admin_get(kbs: &TestKbs, token: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("{}/kbs/v0/resource-policy", kbs.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or(json!({}));
    (
        status,
        body["detail"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_tokens_dated_ahead_or_not_yet_valid_are_refused_naming_the_claim() {
    let kbs = TestKbs::start().await;
    let t = now();
    let ok = admin_token(&kbs, json!({"iat": t, "exp": t + 600}));
    assert_eq!(admin_get(&kbs, &ok).await.0, 200);
    // Dated 30 days ahead with a 10-minute lifetime: within the cap from its iat, not from now.
    let ahead = admin_token(
        &kbs,
        json!({"iat": t + 30 * 86400, "exp": t + 30 * 86400 + 600}),
    );
    let (status, detail) = admin_get(&kbs, &ahead).await;
    assert_eq!(status, 401);
    assert!(
        detail.contains("`iat`") && detail.contains("future"),
        "{detail}"
    );
    let early = admin_token(&kbs, json!({"iat": t, "nbf": t + 600, "exp": t + 1200}));
    let (status, detail) = admin_get(&kbs, &early).await;
    assert_eq!(status, 401);
    assert!(detail.contains("`nbf`"), "{detail}");
    let no_exp = admin_token(&kbs, json!({"iat": t}));
    let (status, detail) = admin_get(&kbs, &no_exp).await;
    assert_eq!(status, 401);
    assert!(detail.contains("`exp`"), "{detail}");
    // iat a little ahead (clock skew) is fine; an exp beyond an hour from now is not.
    let skewed = admin_token(&kbs, json!({"iat": t + 10, "exp": t + 600}));
    assert_eq!(admin_get(&kbs, &skewed).await.0, 200);
    let long = admin_token(&kbs, json!({"iat": t - 10, "exp": t + 7200}));
    let (status, detail) = admin_get(&kbs, &long).await;
    assert_eq!(status, 401);
    assert!(detail.contains("one hour"), "{detail}");
    let expired = admin_token(&kbs, json!({"iat": t - 900, "exp": t - 300}));
    let (status, detail) = admin_get(&kbs, &expired).await;
    assert_eq!(status, 401);
    assert!(detail.contains("expired"), "{detail}");
}

async fn set_policy(kbs: &TestKbs, kind: &str, text: &str) -> (u16, serde_json::Value) {
    use base64::Engine;
    let t = now();
    let token = admin_token(kbs, json!({"iat": t, "exp": t + 600}));
    let r = reqwest::Client::new()
        .post(format!("{}/kbs/v0/{kind}-policy", kbs.url))
        .bearer_auth(token)
        .json(&json!({
            "policy": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
        }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(json!({})))
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_bombs_are_refused_before_the_parser_and_handshakes_go_on() {
    let kbs = TestKbs::start().await;
    kbs.admin()
        .set_resource("default/test/key", b"sealed".to_vec())
        .await
        .unwrap();
    // The 51-byte bomb of the report: 30 unclosed brackets.
    let bomb = format!("package policy\nx := {}", "[".repeat(30));
    for kind in ["resource", "attestation"] {
        let (status, body) = set_policy(&kbs, kind, &bomb).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["type"].as_str().unwrap().ends_with("PolicyTooComplex"),
            "{body}"
        );
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("max-policy-nesting"),
            "{body}"
        );
    }
    // A valid but 16-deep policy is refused the same way; one within the limit is taken.
    let deep = format!(
        "package policy\nimport rego.v1\nallow if {{ x := {}true{}; x }}\n",
        "[".repeat(16),
        "]".repeat(16)
    );
    let (status, body) = set_policy(&kbs, "resource", &deep).await;
    assert_eq!(status, 400, "{body}");
    let shallow = "package policy\nimport rego.v1\ndefault allow := false\nallow if { input.submods.cpu0[\"ear.status\"] == \"affirming\" }\n";
    let (status, body) = set_policy(&kbs, "resource", shallow).await;
    assert_eq!(status, 200, "{body}");
    // Brackets inside strings and comments do not count.
    let quoted = format!(
        "package policy\nimport rego.v1\n# {}\nnote := \"{}\"\ndefault allow := false\nallow if {{ input.submods.cpu0[\"ear.status\"] == \"affirming\" }}\n",
        "[".repeat(40),
        "{".repeat(40)
    );
    assert_eq!(set_policy(&kbs, "resource", &quoted).await.0, 200);
    let huge = format!(
        "package policy\nallow := true\n# {}\n",
        "x".repeat(300 << 10)
    );
    let (status, body) = set_policy(&kbs, "resource", &huge).await;
    assert_eq!(status, 400);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("max-policy-bytes"),
        "{body}"
    );
    // The server still answers attesters.
    let got = kbs.tee().get_resource("default/test/key").await.unwrap();
    assert_eq!(&got[..], b"sealed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_shorter_than_its_length_is_a_400_of_its_own_kind() {
    let kbs = TestKbs::start().await;
    let mut s = TcpStream::connect(addr(&kbs)).unwrap();
    s.write_all(
        b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"version\":",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let said = closed_within(&mut s, Duration::from_secs(5)).expect("no answer");
    assert!(said.starts_with("HTTP/1.1 400"), "{said}");
    assert!(said.contains("IncompleteBody"), "{said}");
}
