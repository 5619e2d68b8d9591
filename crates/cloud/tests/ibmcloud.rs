//! The IBM Cloud provider against a local VPC API and IAM (`tests/ibmcloud_vpc.py`) that checks
//! every request against IBM's VPC SDK for Python (generated from IBM's API definition) and
//! models IAM tokens, instance states, capacity failure and rate limiting as IBM documents
//! them. What the provider did is read back from the emulator's state, never through
//! coffer-cloud.

mod common;

use std::{io::Write, net::Ipv4Addr, path::Path, path::PathBuf};

use coffer_cloud::api::DeleteVmRequest;
use common::{
    create_at_once, daemon_with, delete_at_once, emulator, emulator_call, eventually, launch,
    request, retry_then_replace, sandbox, wrong_secret_is_reported_not_leaked,
};
use serde_json::{json, Value};

const KEY: &str = "coffer-test-api-key";

fn config(dir: &Path, base: &str) -> PathBuf {
    let path = dir.join("cloud.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        "cluster = \"test\"\nnode = \"node-1\"\nprovider = \"ibmcloud\"\nreconcile_secs = 1\n\
         [[instance_types]]\nname = \"bz2e-2x8\"\nvcpus = 2\nmemory_mib = 8192\n\
         [[instance_types]]\nname = \"bz2e-16x64\"\nvcpus = 16\nmemory_mib = 65536\n\
         [ibmcloud]\nregion = \"us-south\"\nzone = \"us-south-1\"\nvpc_id = \"r006-pods\"\n\
         subnet_id = \"0717-pods\"\nimage_id = \"r006-coffer-se\"\nresource_group_id = \"rg-1\"\n\
         security_group_ids = [\"r006-sg\"]\nendpoint = \"{base}\"\niam_endpoint = \"{base}\"\nstate_dir = \"{}\"\n",
        dir.join("ibm-state").display()
    )
    .unwrap();
    path
}

fn state(base: &str) -> Value {
    emulator_call(base, "/_emulator/state", None)
}

fn instances(base: &str) -> Vec<Value> {
    state(base)["instances"]
        .as_object()
        .unwrap()
        .values()
        .cloned()
        .collect()
}

fn all_valid(base: &str) {
    assert_eq!(
        state(base)["invalid"],
        json!([]),
        "requests that did not validate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_instances_are_made_and_deleted_as_pods_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_vpc, base) = emulator("ibmcloud_vpc.py", &["--no-capacity", "bz2e-16x64"]);
    let cfg = config(d, &base);

    // Without an API key the daemon does not start, and says why.
    let e = daemon_with(d, &cfg, &[]).err().expect("refused");
    assert!(e.contains("IBMCLOUD_API_KEY"), "{e}");
    // A wrong key: IAM's reason reaches the caller, the key does not.
    let (s1, lock1) = sandbox(d, "s1");
    let data = launch("kbs = 'https://kbs.example'");
    wrong_secret_is_reported_not_leaked(
        d,
        &cfg,
        ("IBMCLOUD_API_KEY", "wrong-api-key-value"),
        "BXNIM0415E",
        &s1,
    )
    .await;
    assert!(instances(&base).is_empty());

    let cloud = daemon_with(d, &cfg, &[("IBMCLOUD_API_KEY", KEY)]).unwrap();
    let mut client = coffer_cloud::client::connect(&cloud.socket).await.unwrap();

    // One pod: the exact instance and user data.
    let vm = client
        .create_vm(request("p1", &s1, data.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.provider, "ibmcloud");
    assert_eq!(vm.instance_type, "bz2e-2x8");
    let addr: Ipv4Addr = vm.address.parse().unwrap();
    assert!(!addr.is_unspecified());
    let all = instances(&base);
    assert_eq!(all.len(), 1, "{all:#?}");
    let i = &all[0];
    assert_eq!(i["id"], vm.id);
    assert_eq!(i["status"], "running");
    assert!(i["name"].as_str().unwrap().starts_with("coffer-"));
    assert_eq!(i["profile"]["name"], "bz2e-2x8");
    assert_eq!(i["image"]["id"], "r006-coffer-se");
    assert_eq!(i["zone"]["name"], "us-south-1");
    assert_eq!(i["vpc"]["id"], "r006-pods");
    assert_eq!(i["primary_network_interface"]["subnet"]["id"], "0717-pods");
    assert_eq!(
        i["primary_network_interface"]["security_groups"][0]["id"],
        "r006-sg"
    );
    assert_eq!(i["metadata_service"]["enabled"], true);
    let s = state(&base);
    assert_eq!(
        s["user_data"][vm.id.as_str()].as_str().unwrap().as_bytes(),
        &data[..]
    );
    assert_eq!(s["volumes"].as_object().unwrap().len(), 1);

    // Asking again returns the same instance; a new keeper's keys replace it.
    let (fresh, _) = retry_then_replace(&mut client, "p1", &s1, &vm, &data).await;
    let all = instances(&base);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["id"], fresh.id);

    // Rate-limited: backed off and retried, and the create succeeds.
    emulator_call(&base, "/_emulator/throttle", Some(json!({"count": 2})));
    let (s2, lock2) = sandbox(d, "s2");
    client
        .create_vm(request("p2", &s2, data.clone()))
        .await
        .unwrap();
    assert_eq!(state(&base)["throttled"], 2);

    // A create whose answer is lost after the instance was made (a 500): the retried POST finds
    // the name taken, and the instance it made is the pod's — one instance, not two.
    emulator_call(&base, "/_emulator/lose-create", Some(json!({})));
    let (s4, _lock4) = sandbox(d, "s4");
    let vm4 = client
        .create_vm(request("p4", &s4, data.clone()))
        .await
        .unwrap()
        .into_inner();
    let named: Vec<Value> = instances(&base)
        .into_iter()
        .filter(|i| i["id"] == vm4.id.as_str())
        .collect();
    assert_eq!(named.len(), 1);
    assert_eq!(instances(&base).len(), 3, "p1, p2 and p4's");
    assert!(
        client
            .delete_vm(DeleteVmRequest { pod: "p4".into() })
            .await
            .unwrap()
            .into_inner()
            .deleted
    );

    // No capacity for a profile: the error names the provider, the profile and IBM's reason;
    // the failed instance does not stay behind.
    let (s3, _lock3) = sandbox(d, "s3");
    let mut r = request("p3", &s3, data.clone());
    r.instance_type = "bz2e-16x64".into();
    let e = client.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("ibmcloud: no bz2e-16x64 now: cannot_start_capacity"),
        "{}",
        e.message()
    );
    assert_eq!(instances(&base).len(), 2);
    let e = client
        .create_vm(request("p3", &s3, vec![b' '; 65 << 10]))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("over the ibmcloud provider's limit of 65536"),
        "{}",
        e.message()
    );

    // Deleted with its pod, and its boot volume with it.
    assert!(
        client
            .delete_vm(DeleteVmRequest { pod: "p2".into() })
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    drop(lock2);
    let s = state(&base);
    assert_eq!(s["instances"].as_object().unwrap().len(), 1);
    assert_eq!(s["volumes"].as_object().unwrap().len(), 1);

    // A pod whose keeper died: the reconciler deletes its instance.
    drop(lock1);
    eventually("the reconciler deletes the dead pod's instance", || {
        let s = state(&base);
        s["instances"].as_object().unwrap().is_empty()
            && s["volumes"].as_object().unwrap().is_empty()
    })
    .await;

    // An instance of this node whose record is lost cannot be tied to a sandbox: it goes.
    let (s5, _lock5) = sandbox(d, "s5");
    client
        .create_vm(request("p5", &s5, data.clone()))
        .await
        .unwrap();
    for e in std::fs::read_dir(d.join("ibm-state")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    eventually("an instance with no record is deleted", || {
        instances(&base).is_empty()
    })
    .await;
    all_valid(&base);
    assert!(!std::fs::read_to_string(&cloud.log).unwrap().contains(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_instances_at_once_and_a_daemon_killed_mid_create_leave_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_vpc, base) = emulator("ibmcloud_vpc.py", &["--polls", "3"]);
    let cfg = config(d, &base);
    let env = [("IBMCLOUD_API_KEY", KEY)];
    let cloud = daemon_with(d, &cfg, &env).unwrap();
    let client = coffer_cloud::client::connect(&cloud.socket).await.unwrap();
    let data = launch("kbs = 'https://kbs.example'");

    let (_, locks) = create_at_once(&client, d, 20, &data).await;
    assert_eq!(instances(&base).len(), 20);
    delete_at_once(&client, 20).await;
    assert!(instances(&base).is_empty());
    drop(locks);

    // coffer-cloud killed with SIGKILL while an instance is pending, its keeper gone too: the
    // restarted daemon deletes it.
    let (s9, lock9) = sandbox(d, "s9");
    let mut c = client.clone();
    let create = tokio::spawn(async move { c.create_vm(request("p9", &s9, data)).await });
    eventually("the instance is being made", || {
        !instances(&base).is_empty()
    })
    .await;
    drop(cloud);
    let _ = create.await;
    drop(lock9);
    let _restarted = daemon_with(d, &cfg, &env).unwrap();
    eventually("the restarted coffer-cloud deletes the orphan", || {
        instances(&base).is_empty()
    })
    .await;
    all_valid(&base);
}
