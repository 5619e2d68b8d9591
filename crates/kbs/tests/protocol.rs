//! The KBS protocol end to end against a served coffer-kbs: round trips, policies, admin
//! authentication and every kind of bad input.

mod common;

use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs_client::{http_client, AdminClient};
use coffer_wire::error::ErrorKind;
use common::TestKbs;
use serde_json::{json, Value};

const SECRET: &[u8] = b"\x00demo secret bytes\xff\n";

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_returns_exact_bytes_for_every_key_type() {
    let kbs = TestKbs::start().await;
    kbs.admin()
        .set_resource("default/test/key", SECRET.to_vec())
        .await
        .unwrap();
    for alg in [
        TeeKeyAlgorithm::EcP256,
        TeeKeyAlgorithm::EcP521,
        TeeKeyAlgorithm::Rsa2048,
    ] {
        let got = kbs
            .tee_with(alg)
            .get_resource("default/test/key")
            .await
            .unwrap();
        assert_eq!(got.as_slice(), SECRET, "{alg:?}");
    }
    // kbs:/// URIs and the two-part form (repository "default") name the same resource.
    let client = kbs.tee();
    assert_eq!(
        client
            .get_resource("kbs:///default/test/key")
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
    assert_eq!(
        client.get_resource("test/key").await.unwrap().as_slice(),
        SECRET
    );
    let audit = kbs.audit();
    assert!(audit.contains(r#""event":"release""#), "{audit}");
    assert!(audit.contains(r#""decision":"release""#));
    assert!(
        !audit.contains("demo secret"),
        "audit log must not contain resource bytes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sample_tee_is_refused_unless_allowed() {
    let kbs = TestKbs::start_with(|c| c.allow_sample = false).await;
    let err = kbs
        .tee()
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::AttestationError));
    assert!(err.to_string().contains("--allow-sample"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_calls_need_a_configured_key() {
    let kbs = TestKbs::start().await;
    // A key the KBS does not know.
    let (other, _) = common::admin_keypair(kbs.dir.path(), "intruder");
    let intruder = AdminClient::new(&kbs.url, http_client(None).unwrap(), &other).unwrap();
    let err = intruder
        .set_resource("default/test/key", b"evil".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::AdminAuthAccess));
    assert_eq!(err.status(), Some(401));
    // No token at all.
    let resp = reqwest::Client::new()
        .post(format!("{}/kbs/v0/resource/default/test/key", kbs.url))
        .body("evil")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Nothing was stored.
    assert_eq!(
        kbs.kbs
            .store
            .get_resource("default/test/key")
            .await
            .unwrap(),
        None
    );
    let audit = kbs.audit();
    assert!(!audit.contains("set-resource"), "{audit}");

    // A KBS started without any admin key refuses everything, even a well-formed token.
    let bare = TestKbs::start_with(|c| c.admin_public_key.clear()).await;
    let err = bare
        .admin()
        .set_resource("default/test/key", b"x".to_vec())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--admin-public-key"), "{err}");
    assert_eq!(
        bare.kbs
            .store
            .get_resource("default/test/key")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_all_resource_policy_releases_nothing() {
    let kbs = TestKbs::start().await;
    let admin = kbs.admin();
    admin
        .set_resource("default/test/key", SECRET.to_vec())
        .await
        .unwrap();
    admin
        .set_resource_policy("package policy\n\ndefault allow := false\n")
        .await
        .unwrap();
    let err = kbs
        .tee()
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
    assert_eq!(err.status(), Some(403));
    assert!(kbs.audit().contains(r#""decision":"deny""#));

    // A policy that does not compile is refused and the deny-all policy stays in force.
    let err = admin
        .set_resource_policy("package policy\nallow if {")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidRequest));
    let err = admin
        .set_resource_policy("package other\nallow := true")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("package policy"), "{err}");
    assert!(admin
        .get_policy("resource-policy")
        .await
        .unwrap()
        .contains("default allow := false"));
    let err = kbs
        .tee()
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));

    // A policy that looks at the path: only default/test/* is released.
    admin
        .set_resource_policy(
            "package policy\nimport rego.v1\ndefault allow := false\nallow if {\n  startswith(data[\"resource-path\"], \"/default/test/\")\n  input.submods.cpu0[\"ear.status\"] == \"affirming\"\n}\n",
        )
        .await
        .unwrap();
    admin
        .set_resource("default/other/key", b"x".to_vec())
        .await
        .unwrap();
    let client = kbs.tee();
    assert_eq!(
        client
            .get_resource("default/test/key")
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
    let err = client.get_resource("default/other/key").await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
}

#[tokio::test(flavor = "multi_thread")]
async fn attestation_policy_and_reference_values_decide_the_status() {
    let kbs = TestKbs::start().await;
    let admin = kbs.admin();
    admin
        .set_resource("default/test/key", SECRET.to_vec())
        .await
        .unwrap();
    // The sample attester reports svn "1"; require "2".
    admin
        .set_reference_values(br#"{"sample_svn": ["2"]}"#)
        .await
        .unwrap();
    let err = kbs
        .tee()
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
    // The reason reaches the admin's audit log, not the client.
    assert!(!err.to_string().contains("sample_svn"), "{err}");
    assert!(kbs
        .audit()
        .contains("sample svn is not in reference value sample_svn"));
    let refs = admin.get_reference_values().await.unwrap();
    assert_eq!(refs["sample_svn"], vec![json!("2")]);

    admin
        .set_reference_values(br#"{"sample_svn": ["1", "2"]}"#)
        .await
        .unwrap();
    assert_eq!(
        kbs.tee()
            .get_resource("default/test/key")
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
    admin.delete_reference_value("sample_svn").await.unwrap();
    assert!(admin.get_reference_values().await.unwrap().is_empty());
    let err = admin
        .delete_reference_value("sample_svn")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404));
    // A malformed document is refused and changes nothing.
    let err = admin
        .set_reference_values(br#"{"sample_svn": "1"}"#)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("arrays"), "{err}");

    // A custom attestation policy that contraindicates everything.
    admin
        .set_attestation_policy(
            "package policy\nstatus := \"contraindicated\"\nreason := \"maintenance\"\n",
        )
        .await
        .unwrap();
    let err = kbs
        .tee()
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
    let err = admin
        .set_attestation_policy("package policy\nstatus := \"great\"\n")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("status"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn initdata_is_bound_and_checked_against_reference_values() {
    let kbs = TestKbs::start().await;
    let admin = kbs.admin();
    admin
        .set_resource("default/test/key", SECRET.to_vec())
        .await
        .unwrap();
    let initdata = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"package agent_policy\"\n";
    let digest = hex(&coffer_wire::initdata::digest(initdata).unwrap());
    admin
        .set_reference_values(format!(r#"{{"init_data": ["{digest}"]}}"#).as_bytes())
        .await
        .unwrap();
    // Without initdata the policy contraindicates.
    let err = kbs
        .tee()
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
    // With the registered initdata it releases.
    let client = kbs.tee().with_initdata(initdata.to_string());
    assert_eq!(
        client
            .get_resource("default/test/key")
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
    // Other initdata: a different digest, not registered.
    let other = initdata.replace("agent_policy", "other");
    let err = kbs
        .tee()
        .with_initdata(other)
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny));
    // Malformed initdata is a clear error.
    let err = kbs
        .tee()
        .with_initdata("version = \"9\"\nalgorithm = \"sha384\"\n".into())
        .get_resource("default/test/key")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("initdata"), "{err}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_resource_and_bad_paths() {
    let kbs = TestKbs::start().await;
    let client = kbs.tee();
    let err = client
        .get_resource("default/test/missing")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::ResourceNotFound));
    assert_eq!(err.status(), Some(404));
    for bad in ["a/b/c/d", "default/../key", "default/te st/key", "x"] {
        let err = client.get_resource(bad).await.unwrap_err();
        assert_eq!(err.status(), Some(404), "{bad}: {err}");
    }
    let err = kbs
        .admin()
        .set_resource("default/../../etc", b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidRequestPath));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health() {
    let kbs = TestKbs::start().await;
    kbs.admin()
        .set_resource("default/test/key", SECRET.to_vec())
        .await
        .unwrap();
    kbs.tee().get_resource("default/test/key").await.unwrap();
    let http = reqwest::Client::new();
    let health = http
        .get(format!("{}/healthz", kbs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let text: String = http
        .get(format!("{}/metrics", kbs.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#"kbs_attestations_total{outcome="affirming",tee="sample"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"kbs_resource_releases_total{outcome="released"} 1"#));
    assert!(text.contains(r#"kbs_http_requests_total{endpoint="auth",status="200"} 1"#));
    assert!(text.contains("kbs_request_duration_seconds_bucket"));
    assert!(text.contains("kbs_process_resident_memory_bytes"));
    // Unknown endpoints answer in the protocol's error shape.
    let resp = http
        .get(format!("{}/kbs/v0/nope", kbs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(body["type"]
        .as_str()
        .unwrap()
        .ends_with("/InvalidRequestPath"));
}
