//! IBM Secure Execution through the KBS protocol: `/auth` answers an SE client with an
//! attestation request only the configured hosts can open, the guest hands it to the
//! Ultravisor (here the verifier's stand-in, holding a host key), and `/attest` releases
//! secrets only for a registered image, this session's runtime data and initdata, and an
//! accepted host.

mod common;

use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs_client::{http_client, Attester, AttesterError, KbsClient};
use coffer_verifier::se::{
    testing::{image, Host},
    ImageTags,
};
use coffer_wire::{error::ErrorKind, Tee};
use common::TestKbs;
use serde_json::{json, Value};

const INITDATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"policy.rego\" = \"package agent_policy\"\n";

/// An SE guest on `host` running `image`: the Ultravisor answers the KBS's request.
struct SeGuest<'a> {
    host: &'a Host,
    image: ImageTags,
}

impl Attester for SeGuest<'_> {
    fn tee(&self) -> Tee {
        Tee::Se
    }

    fn evidence(&self, _: &[u8], _: Option<&[u8]>) -> Result<Value, AttesterError> {
        Err(AttesterError("SE answers the KBS's request".into()))
    }

    fn evidence_for_challenge(
        &self,
        extra: &Value,
        report_data: &[u8],
        init: Option<&[u8]>,
    ) -> Result<Value, AttesterError> {
        use base64::Engine;
        let arcb = base64::engine::general_purpose::STANDARD
            .decode(
                extra["arcb"]
                    .as_str()
                    .expect("an SE challenge carries arcb"),
            )
            .unwrap();
        let user = coffer_attester::se::user_data(report_data, init);
        Ok(serde_json::to_value(self.host.answer(&arcb, &self.image, [3; 16], &user)).unwrap())
    }
}

/// A client for a guest on `host` running `image`, launched with [`INITDATA`].
fn guest(kbs: &TestKbs, host: &'static Host, image: ImageTags) -> KbsClient {
    KbsClient::new(
        &kbs.url,
        http_client(None).unwrap(),
        Box::new(SeGuest { host, image }),
        TeeKeyAlgorithm::EcP256,
    )
    .unwrap()
    .with_initdata(INITDATA.to_string())
}

/// Registers `refs` as the KBS's reference values.
async fn register(kbs: &TestKbs, refs: Value) {
    kbs.admin()
        .set_reference_values(refs.to_string().as_bytes())
        .await
        .unwrap();
}

/// A KBS for SE guests (no sample TEE; `configure` names its host keys) holding the image key
/// `default/image/key`.
async fn se_kbs(configure: impl FnOnce(&mut coffer_kbs::Config)) -> TestKbs {
    let kbs = TestKbs::start_with(|c| {
        c.allow_sample = false;
        configure(c);
    })
    .await;
    kbs.admin()
        .set_resource("default/image/key", b"image key".to_vec())
        .await
        .unwrap();
    kbs
}

fn leak(h: Host) -> &'static Host {
    Box::leak(Box::new(h))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_se_guest_gets_secrets_only_for_a_registered_image_initdata_and_host() {
    let (a, b) = (leak(Host::new("host-a")), leak(Host::new("host-b")));
    let docs = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, h) in [("a.crt", a), ("b.crt", b)] {
        let p = docs.path().join(name);
        std::fs::write(&p, &h.document).unwrap();
        paths.push(p);
    }
    let kbs = se_kbs(|c| {
        c.se_host_key_document = paths.clone();
        c.se_unverified_host_keys = true;
    })
    .await;
    let (good, other) = (image(1), image(2));
    let init = hex::encode(coffer_wire::initdata::digest(INITDATA).unwrap());

    // No image registered: refused, naming it.
    let err = guest(&kbs, a, good)
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::AttestationError), "{err}");
    assert!(
        err.to_string().contains("no SE image is registered"),
        "{err}"
    );

    register(
        &kbs,
        json!({"se_image_tags": [good.to_hex()], "init_data": [init]}),
    )
    .await;
    // The registered image on either configured host: released.
    for host in [a, b] {
        let got = guest(&kbs, host, good)
            .get_resource("default/image/key")
            .await
            .unwrap();
        assert_eq!(got.as_slice(), b"image key");
    }
    // Another image: its measurement matches nothing registered.
    let err = guest(&kbs, a, other)
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::AttestationError), "{err}");
    assert!(
        err.to_string()
            .contains("matches none of the 1 registered image"),
        "{err}"
    );

    // Other initdata: the measured user data carries its digest, the policy refuses it.
    let err = guest(&kbs, a, good)
        .with_initdata(INITDATA.replace("agent_policy", "other"))
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny), "{err}");

    // Only host a accepted: host b's guest is refused by the policy.
    register(
        &kbs,
        json!({"se_attestation_phkh": [hex::encode(a.hash())]}),
    )
    .await;
    let err = guest(&kbs, b, good)
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::PolicyDeny), "{err}");
    assert!(kbs
        .audit()
        .contains("attesting host is not in reference value se_attestation_phkh"));
    assert!(guest(&kbs, a, good)
        .get_resource("default/image/key")
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn se_is_off_unless_host_keys_are_configured_and_checked() {
    let a = leak(Host::new("host-a"));
    let kbs = TestKbs::start().await;
    let err = guest(&kbs, a, image(1))
        .get_resource("default/image/key")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not configured"), "{err}");

    // A host-key document without IBM's signing chain is refused at start, unless the test
    // switch says otherwise.
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("a.crt");
    std::fs::write(&doc, &a.document).unwrap();
    let mut cfg = common::config(dir.path(), None);
    cfg.se_host_key_document = vec![doc];
    let err = coffer_kbs::Kbs::new(cfg).await.err().unwrap();
    assert!(err.to_string().contains("--se-signing-cert"), "{err}");
    // The test switch never silently overrides a configured signing chain.
    let mut cfg = common::config(dir.path(), None);
    cfg.se_host_key_document = vec![dir.path().join("a.crt")];
    cfg.se_signing_cert = vec![dir.path().join("sign.crt")];
    cfg.se_unverified_host_keys = true;
    let err = coffer_kbs::Kbs::new(cfg).await.err().unwrap();
    assert!(
        err.to_string()
            .contains("--se-unverified-host-keys would ignore"),
        "{err}"
    );
}

/// The production path: host-key documents checked against a signing chain shaped like IBM's
/// (root, intermediate, the signing certificate with IBM's subject, CRLs of all three), made
/// by `data/ibm-test-chain.sh` with OpenSSL. A good document starts the KBS and its host's
/// guest attests; a revoked or expired one stops the KBS at start, naming the document.
#[tokio::test(flavor = "multi_thread")]
async fn host_key_documents_are_checked_against_the_signing_chain_and_crls() {
    let chain = tempfile::tempdir().unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ibm-test-chain.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(chain.path())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = |name: &str| chain.path().join(name);
    let configure = |c: &mut coffer_kbs::Config, hkd: &str| {
        c.se_host_key_document = vec![f(hkd)];
        c.se_signing_cert = vec![f("inter.crt"), f("sign.crt")];
        c.se_crl = vec![f("root.crl"), f("inter.crl"), f("sign.crl")];
        c.se_root_ca = Some(f("root.crt"));
    };
    for (hkd, why) in [
        ("revoked.crt", "revoked"),
        ("expired.crt", "validity period"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = common::config(dir.path(), None);
        configure(&mut cfg, hkd);
        let err = format!("{:#}", coffer_kbs::Kbs::new(cfg).await.err().unwrap());
        assert!(err.contains(hkd) && err.contains(why), "{err}");
    }
    // A CRL missing from the chain: nothing verifies (fail closed).
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path(), None);
    configure(&mut cfg, "good.crt");
    cfg.se_crl.pop();
    assert!(coffer_kbs::Kbs::new(cfg).await.is_err());

    let host = leak(Host::from_pem(
        &std::fs::read(f("good.key")).unwrap(),
        &std::fs::read(f("good.crt")).unwrap(),
    ));
    let kbs = se_kbs(|c| configure(c, "good.crt")).await;
    let good = image(7);
    let init = hex::encode(coffer_wire::initdata::digest(INITDATA).unwrap());
    register(
        &kbs,
        json!({"se_image_tags": [good.to_hex()], "init_data": [init]}),
    )
    .await;
    let got = guest(&kbs, host, good)
        .get_resource("default/image/key")
        .await
        .unwrap();
    assert_eq!(got.as_slice(), b"image key");
}
