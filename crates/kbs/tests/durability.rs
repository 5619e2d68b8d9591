//! The real coffer-kbs binary: state survives `kill -9`, and HTTPS works with the generated
//! development certificate.

mod common;

use common::{free_port, spawn_kbs, wait_ready};

use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs_client::{http_client, AdminClient, KbsClient, SampleAttester};

#[tokio::test(flavor = "multi_thread")]
async fn state_survives_kill_9() {
    fn spawn(dir: &std::path::Path, port: u16, admin_pub: &std::path::Path) -> std::process::Child {
        let listen = format!("127.0.0.1:{port}");
        let data = dir.join("data");
        spawn_kbs(&[
            "--listen".as_ref(),
            listen.as_ref(),
            "--insecure-http".as_ref(),
            "--allow-sample".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--admin-public-key".as_ref(),
            admin_pub.as_os_str(),
        ])
    }
    let dir = tempfile::tempdir().unwrap();
    let (admin_private, admin_pub) = common::admin_keypair(dir.path(), "admin");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = spawn(dir.path(), port, &admin_pub);
    wait_ready(&url).await;

    let admin = AdminClient::new(&url, http_client(None).unwrap(), &admin_private).unwrap();
    let secret: Vec<u8> = (0..=255u8).collect();
    admin
        .set_resource("default/test/key", secret.clone())
        .await
        .unwrap();
    admin
        .set_reference_values(br#"{"sample_svn": ["1"]}"#)
        .await
        .unwrap();
    let tee = KbsClient::new(
        &url,
        http_client(None).unwrap(),
        Box::new(SampleAttester::default()),
        TeeKeyAlgorithm::EcP256,
    )
    .unwrap();
    let token = tee.attest().await.unwrap();

    // SIGKILL right after the acknowledged writes: no graceful shutdown.
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = spawn(dir.path(), port, &admin_pub);
    wait_ready(&url).await;
    assert_eq!(
        tee.get_resource("default/test/key")
            .await
            .unwrap()
            .as_slice(),
        secret.as_slice(),
        "the resource and the token signing key survive"
    );
    // The token issued before the crash still verifies: the signing key was persisted.
    let resp = reqwest::Client::new()
        .get(format!("{url}/kbs/v0/resource/default/test/key"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        admin.get_reference_values().await.unwrap()["sample_svn"],
        vec![serde_json::json!("1")]
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_generated_development_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    coffer_kbs::server::generate_self_signed(vec!["127.0.0.1".into()], &cert, &key).unwrap();
    let (admin_private, admin_pub) = common::admin_keypair(dir.path(), "admin");
    let mut cfg = common::config(dir.path(), Some(admin_pub));
    cfg.insecure_http = false;
    cfg.tls_cert = Some(cert.clone());
    cfg.tls_key = Some(key);
    let kbs = common::TestKbs::serve(cfg, dir, admin_private).await;
    assert!(kbs.url.starts_with("https://"));

    let ca = std::fs::read(&cert).unwrap();
    let admin = AdminClient::new(
        &kbs.url,
        http_client(Some(&ca)).unwrap(),
        &kbs.admin_private,
    )
    .unwrap();
    admin
        .set_resource("default/test/key", b"over tls".to_vec())
        .await
        .unwrap();
    let tee = KbsClient::new(
        &kbs.url,
        http_client(Some(&ca)).unwrap(),
        Box::new(SampleAttester::default()),
        TeeKeyAlgorithm::EcP256,
    )
    .unwrap();
    assert_eq!(
        tee.get_resource("default/test/key")
            .await
            .unwrap()
            .as_slice(),
        b"over tls"
    );

    // A client that does not trust the certificate cannot talk to it.
    let untrusting = KbsClient::new(
        &kbs.url,
        http_client(Some(include_bytes!("data/other-ca.pem"))).unwrap(),
        Box::new(SampleAttester::default()),
        TeeKeyAlgorithm::EcP256,
    )
    .unwrap();
    let err = untrusting
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert!(
        matches!(err, coffer_kbs_client::ClientError::Http { .. }),
        "{err}"
    );
}
