//! Two coffer-kbs processes on one real PostgreSQL server: they share resources, policies,
//! reference values, sessions and the token key.
//!
//! Needs `COFFER_TEST_DATABASE_URL` (a role that may create databases); `scripts/test` starts a
//! private PostgreSQL server and sets it.

mod common;

use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_jose::{TeeKeyAlgorithm, TeeKeyPair};
use coffer_kbs_client::{http_client, AdminClient, KbsClient, SampleAttester};
use coffer_wire::error::ErrorKind;
use reqwest::header;
use serde_json::json;
use sha2::{Digest, Sha384};
use sqlx::Connection;

async fn fresh_database() -> String {
    let admin_url = std::env::var("COFFER_TEST_DATABASE_URL").expect(
        "COFFER_TEST_DATABASE_URL is not set: run the tests with scripts/test, which starts PostgreSQL",
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("coffer_test_{}_{nanos}", std::process::id());
    let mut conn = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("cannot connect to COFFER_TEST_DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut url = url_without_db(&admin_url);
    url.push('/');
    url.push_str(&name);
    url
}

fn url_without_db(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let _ = query;
    base[..path_start].to_string()
}

struct Replica {
    url: String,
    child: std::process::Child,
    admin_private: Vec<u8>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn admin(&self) -> AdminClient {
        AdminClient::new(&self.url, http_client(None).unwrap(), &self.admin_private).unwrap()
    }

    fn tee(&self) -> KbsClient {
        KbsClient::new(
            &self.url,
            http_client(None).unwrap(),
            Box::new(SampleAttester::default()),
            TeeKeyAlgorithm::EcP256,
        )
        .unwrap()
    }
}

/// Replica A is configured by flags, replica B by a TOML config file with the same keys.
async fn replicas(db: &str, dir: &std::path::Path) -> (Replica, Replica) {
    let (admin_private, admin_pub) = common::admin_keypair(dir, "admin");
    let (port_a, port_b) = (common::free_port(), common::free_port());
    let listen_a = format!("127.0.0.1:{port_a}");
    let audit_a = dir.join("audit-a.jsonl");
    let a = common::spawn_kbs(&[
        "--listen".as_ref(),
        listen_a.as_ref(),
        "--insecure-http".as_ref(),
        "--allow-sample".as_ref(),
        "--database-url".as_ref(),
        db.as_ref(),
        "--audit-log".as_ref(),
        audit_a.as_os_str(),
        "--admin-public-key".as_ref(),
        admin_pub.as_os_str(),
    ]);
    let config = dir.join("kbs-b.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port_b}\"\ninsecure-http = true\nallow-sample = true\n\
             database-url = \"{db}\"\naudit-log = \"{}\"\nadmin-public-key = [\"{}\"]\n",
            dir.join("audit-b.jsonl").display(),
            admin_pub.display()
        ),
    )
    .unwrap();
    let b = common::spawn_kbs(&["--config".as_ref(), config.as_os_str()]);
    let a = Replica {
        url: format!("http://{listen_a}"),
        child: a,
        admin_private: admin_private.clone(),
    };
    let b = Replica {
        url: format!("http://127.0.0.1:{port_b}"),
        child: b,
        admin_private,
    };
    common::wait_ready(&a.url).await;
    common::wait_ready(&b.url).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_one_database() {
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = replicas(&db, dir.path()).await;

    // A resource written through one is served by the other.
    a.admin()
        .set_resource("default/test/key", b"shared secret".to_vec())
        .await
        .unwrap();
    assert_eq!(
        b.tee()
            .get_resource("default/test/key")
            .await
            .unwrap()
            .as_slice(),
        b"shared secret"
    );

    // A token issued by A is accepted by B (one signing key).
    let token = a.tee().attest().await.unwrap();
    let resp = reqwest::Client::new()
        .get(format!("{}/kbs/v0/resource/default/test/key", b.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // One mesh CA, whichever replica made it first (they started together).
    let ca = |url: String| async move {
        reqwest::get(format!("{url}/kbs/v0/mesh/ca"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let (ca_a, ca_b) = (ca(a.url.clone()).await, ca(b.url.clone()).await);
    assert!(ca_a.contains("BEGIN CERTIFICATE"), "{ca_a}");
    assert_eq!(ca_a, ca_b, "the replicas sign with different mesh CAs");

    // A session begun on A completes on B, and its cookie works on both.
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/kbs/v0/auth", a.url))
        .json(&json!({"version": "0.4.0", "tee": "sample", "extra-params": {}}))
        .send()
        .await
        .unwrap();
    let cookie = resp
        .headers()
        .get(header::SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let nonce = resp.json::<serde_json::Value>().await.unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_string();
    let key = TeeKeyPair::generate(TeeKeyAlgorithm::EcP256).unwrap();
    let rd = coffer_wire::binding::runtime_data_canonical(key.public_jwk(), &nonce, "").unwrap();
    let body = json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": key.public_jwk()},
        "tee-evidence": {"primary_evidence": {"svn": "1", "report_data": STANDARD.encode(Sha384::digest(&rd))}, "additional_evidence": ""},
    });
    let resp = http
        .post(format!("{}/kbs/v0/attest", b.url))
        .header(header::COOKIE, &cookie)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The nonce is spent on every replica.
    let resp = http
        .post(format!("{}/kbs/v0/attest", a.url))
        .header(header::COOKIE, &cookie)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    for replica in [&a, &b] {
        let resp = http
            .get(format!("{}/kbs/v0/resource/default/test/key", replica.url))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let jwe: coffer_wire::JweResponse = resp.json().await.unwrap();
        assert_eq!(key.decrypt(&jwe).unwrap().as_slice(), b"shared secret");
    }

    // A policy set through B applies on A at once.
    b.admin()
        .set_resource_policy("package policy\ndefault allow := false\n")
        .await
        .unwrap();
    let err = a.tee().get_resource("default/test/key").await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
    // Reference values too.
    a.admin()
        .set_reference_values(br#"{"sample_svn": ["7"]}"#)
        .await
        .unwrap();
    assert_eq!(
        b.admin().get_reference_values().await.unwrap()["sample_svn"],
        vec![json!("7")]
    );
}

/// `/auth` on one replica, returning the HTTP status and the body.
async fn auth(url: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/kbs/v0/auth"))
        .json(&json!({"version": "0.4.0", "tee": "sample", "extra-params": {}}))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_bound_holds_on_postgresql_and_lifts_as_sessions_expire() {
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, admin_pub) = common::admin_keypair(dir.path(), "admin");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let kbs = common::spawn_kbs(&[
        "--listen".as_ref(),
        listen.as_ref(),
        "--insecure-http".as_ref(),
        "--allow-sample".as_ref(),
        "--database-url".as_ref(),
        db.as_ref(),
        "--max-sessions".as_ref(),
        "3".as_ref(),
        "--session-ttl-secs".as_ref(),
        "2".as_ref(),
        "--audit-log".as_ref(),
        dir.path().join("audit.jsonl").as_os_str(),
        "--admin-public-key".as_ref(),
        admin_pub.as_os_str(),
    ]);
    let _kbs = Replica {
        url: format!("http://{listen}"),
        child: kbs,
        admin_private: Vec::new(),
    };
    let url = format!("http://{listen}");
    common::wait_ready(&url).await;
    for _ in 0..3 {
        assert_eq!(auth(&url).await.0, 200);
    }
    // The fourth live session is refused, also within the second after the last count.
    let (status, body) = auth(&url).await;
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("too many open sessions"), "{body}");
    // Once those expire, the next count finds room.
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    let (status, body) = auth(&url).await;
    assert_eq!(status, 200, "{body}");
}
