//! The mesh CA: certificates for the identity an attested initdata names, decided by the
//! resource policy, listed for the operator, signed by one CA that survives a restart.

mod common;

use coffer_wire::{error::ErrorKind, mesh::CertificateResponse};
use common::TestKbs;

fn initdata(mesh: Option<&str>) -> String {
    let mut t = String::from(
        "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = \"package agent_policy\"\n",
    );
    if let Some(m) = mesh {
        t.push_str(&format!("\"mesh.toml\" = '''{m}'''\n"));
    }
    t
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::new(vec!["anything.example".into()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

const WEB: &str = "identity = \"spiffe://coffer.test/ns/shop/sa/web\"\npeers = [\"spiffe://coffer.test/ns/shop/*\"]\n";

#[tokio::test(flavor = "multi_thread")]
async fn attested_workloads_get_certificates_for_their_initdatas_identity_only() {
    let kbs = TestKbs::start_with(|c| c.mesh_cert_ttl_secs = 600).await;
    let tee = kbs.tee().with_initdata(initdata(Some(WEB)));
    let CertificateResponse {
        certificate,
        ca,
        identity,
        peers,
        not_after,
    } = tee.mesh_certificate(&csr()).await.unwrap();
    assert_eq!(identity, "spiffe://coffer.test/ns/shop/sa/web");
    assert_eq!(peers, ["spiffe://coffer.test/ns/shop/*"]);
    let now = coffer_kbs::store::now_secs();
    assert!(
        not_after > now + 590 && not_after <= now + 601,
        "{not_after}"
    );
    assert!(certificate.contains("BEGIN CERTIFICATE") && ca.contains("BEGIN CERTIFICATE"));
    // The CA is public.
    let public = reqwest::get(format!("{}/kbs/v0/mesh/ca", kbs.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(public, ca);
    // The operator sees who holds one, until when.
    let issued = kbs.admin().mesh_certificates().await.unwrap();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].identity, identity);
    assert_eq!(issued[0].not_after, not_after);
    assert_eq!(
        issued[0].init_data,
        hex::encode(coffer_wire::initdata::digest(&initdata(Some(WEB))).unwrap())
    );

    // No mesh.toml in the initdata: no certificate, whatever the request asks for.
    let e = kbs
        .tee()
        .with_initdata(initdata(None))
        .mesh_certificate(&csr())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::PolicyDeny));
    assert!(e.to_string().contains("names no mesh identity"), "{e}");
    // A request that is not a CSR.
    let e = tee.mesh_certificate("not a csr").await.unwrap_err();
    assert!(e.to_string().contains("certificate request"), "{e}");

    // The resource policy decides: an identity it denies gets nothing, others still do.
    kbs.admin()
        .set_resource_policy(
            "package policy\nimport rego.v1\ndefault allow := false\nallow if {\n\tcount(input.submods) > 0\n\tnot input.mesh.identity == \"spiffe://coffer.test/ns/shop/sa/web\"\n}\n",
        )
        .await
        .unwrap();
    let e = kbs
        .tee()
        .with_initdata(initdata(Some(WEB)))
        .mesh_certificate(&csr())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::PolicyDeny));
    assert!(
        e.to_string()
            .contains("denies a mesh certificate to spiffe://coffer.test/ns/shop/sa/web"),
        "{e}"
    );
    let db = "identity = \"spiffe://coffer.test/ns/shop/sa/db\"\n";
    kbs.tee()
        .with_initdata(initdata(Some(db)))
        .mesh_certificate(&csr())
        .await
        .unwrap();

    // Restarted on the same store: the same CA.
    // Restarted: the server lets go of the store once its connections are gone.
    drop(tee);
    let mut kbs = kbs;
    let dir = std::mem::replace(&mut kbs.dir, tempfile::tempdir().unwrap());
    drop(kbs);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let again = loop {
        match coffer_kbs::Kbs::new(common::config(dir.path(), None)).await {
            Ok(k) => break k,
            Err(e) if std::time::Instant::now() < until => {
                assert!(format!("{e:#}").contains("already open"), "{e:#}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    };
    assert_eq!(again.mesh.certificate(), ca);
}
