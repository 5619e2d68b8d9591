//! `coffer initdata new` and `coffer initdata digest` as acceptance scripts run them.

mod common;

use common::coffer;
use sha2::{Digest, Sha384};

#[test]
fn new_initdata_parses_names_the_kbs_and_digests_as_sha384_of_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text, stderr) = coffer(&[
        "initdata",
        "new",
        "--kbs-url",
        "http://127.0.0.1:8080",
        "--image-key",
        "kbs:///default/image-keys/app",
    ]);
    assert!(ok, "{stderr}");
    // Without a policy of its own, the sandbox runs whatever the node asks: said plainly.
    assert!(
        stderr.contains("no --policy") && stderr.contains("any container"),
        "{stderr}"
    );
    let parsed = coffer_wire::initdata::Initdata::parse(&text).unwrap();
    assert!(parsed.data["aa.toml"].contains("http://127.0.0.1:8080"));
    assert!(parsed.data["cdh.toml"].contains("kbs:///default/image-keys/app"));
    assert!(parsed.data["policy.rego"].contains("default ExecProcessRequest := false"));
    let file = dir.path().join("initdata.toml");
    std::fs::write(&file, &text).unwrap();
    let (ok, digest, stderr) = coffer(&["initdata", "digest", file.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(digest.trim(), hex::encode(Sha384::digest(text.as_bytes())));

    // A policy the agent would refuse is refused here; so are bad URIs.
    let bad = dir.path().join("bad.rego");
    std::fs::write(&bad, "package other\n").unwrap();
    let (ok, _, stderr) = coffer(&[
        "initdata",
        "new",
        "--kbs-url",
        "http://k",
        "--policy",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("agent_policy"), "{stderr}");
    let (ok, _, stderr) = coffer(&[
        "initdata",
        "new",
        "--kbs-url",
        "http://k",
        "--image-key",
        "kbs:///a/b",
    ]);
    assert!(!ok && stderr.contains("--image-key"), "{stderr}");
}
