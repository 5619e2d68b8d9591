//! The Azure provider against a local Resource Manager (`tests/azure_arm.py`) that checks every
//! request against Microsoft's Azure SDK for Python (generated from the published REST API
//! specifications) and models tokens, long-running operations, throttling, allocation failure
//! and quota as Azure documents them. What the provider did is read back from the emulator's
//! state, never through coffer-cloud.

mod common;

use std::{io::Write, net::Ipv4Addr, path::Path, path::PathBuf};

use base64::Engine;
use coffer_cloud::api::DeleteVmRequest;
use common::{
    create_at_once, daemon_with, delete_at_once, emulator, emulator_call, eventually, launch,
    request, retry_then_replace, sandbox, wrong_secret_is_reported_not_leaked,
};
use serde_json::{json, Value};

const SECRET: &str = "s3cret-for-tests";

fn config(dir: &Path, base: &str, auth: &str) -> PathBuf {
    let path = dir.join("cloud.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    let sub = "00000000-0000-0000-0000-000000000001";
    write!(
        f,
        "cluster = \"test\"\nnode = \"node-1\"\nprovider = \"azure\"\nreconcile_secs = 1\n\
         [[instance_types]]\nname = \"Standard_DC2as_v5\"\nvcpus = 2\nmemory_mib = 8192\n\
         [[instance_types]]\nname = \"Standard_DC64as_v5\"\nvcpus = 64\nmemory_mib = 262144\n\
         [[instance_types]]\nname = \"Standard_DC96as_v5\"\nvcpus = 96\nmemory_mib = 393216\n\
         [azure]\nsubscription_id = \"{sub}\"\nresource_group = \"coffer-pods\"\nlocation = \"eastus\"\n\
         image_id = \"/subscriptions/{sub}/resourceGroups/images/providers/Microsoft.Compute/galleries/coffer/images/podvm/versions/1.0.0\"\n\
         subnet_id = \"/subscriptions/{sub}/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/pods/subnets/default\"\n\
         auth = \"{auth}\"\ntenant_id = \"72f988bf-0000-0000-0000-000000000000\"\nclient_id = \"coffer-test-client\"\n\
         endpoint = \"{base}\"\nauthority = \"{base}\"\nidentity_endpoint = \"{base}/metadata/identity/oauth2/token\"\n"
    )
    .unwrap();
    path
}

fn state(base: &str) -> Value {
    emulator_call(base, "/_emulator/state", None)
}

fn vms(base: &str) -> Vec<Value> {
    state(base)["vms"]
        .as_object()
        .unwrap()
        .values()
        .cloned()
        .collect()
}

/// The emulator refused none of the provider's requests.
fn all_valid(base: &str) {
    let s = state(base);
    assert_eq!(s["invalid"], json!([]), "requests that did not validate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidential_vms_are_made_tagged_and_deleted_as_pods_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_arm, base) = emulator(
        "azure_arm.py",
        &[
            "--no-capacity",
            "Standard_DC96as_v5",
            "--no-quota",
            "Standard_DC64as_v5",
        ],
    );
    let cfg = config(d, &base, "client-secret");

    // Without the secret the daemon does not start, and says why.
    let e = daemon_with(d, &cfg, &[]).err().expect("refused");
    assert!(
        e.contains("no credentials") && e.contains("AZURE_CLIENT_SECRET"),
        "{e}"
    );
    // A wrong secret: the identity platform's reason reaches the caller, the secret does not.
    let (s1, lock1) = sandbox(d, "s1");
    let data = launch("kbs = 'https://kbs.example'");
    wrong_secret_is_reported_not_leaked(
        d,
        &cfg,
        ("AZURE_CLIENT_SECRET", "wrong-secret-value"),
        "AADSTS7000215",
        &s1,
    )
    .await;
    assert!(vms(&base).is_empty());

    let cloud = daemon_with(d, &cfg, &[("AZURE_CLIENT_SECRET", SECRET)]).unwrap();
    let mut client = coffer_cloud::client::connect(&cloud.socket).await.unwrap();

    // One pod: the exact VM, tags, confidential settings and user data.
    let vm = client
        .create_vm(request("p1", &s1, data.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.provider, "azure");
    assert_eq!(vm.instance_type, "Standard_DC2as_v5");
    let addr: Ipv4Addr = vm.address.parse().unwrap();
    let all = vms(&base);
    assert_eq!(all.len(), 1, "{all:#?}");
    let v = &all[0];
    assert_eq!(v["name"], vm.id);
    assert_eq!(v["properties"]["provisioningState"], "Succeeded");
    let tags = &v["tags"];
    assert_eq!(tags["coffer-cluster"], "test");
    assert_eq!(tags["coffer-node"], "node-1");
    assert_eq!(tags["coffer-pod"], "p1");
    assert_eq!(tags["coffer-sandbox-dir"], s1.display().to_string());
    let p = &v["properties"];
    assert_eq!(p["hardwareProfile"]["vmSize"], "Standard_DC2as_v5");
    assert_eq!(p["securityProfile"]["securityType"], "ConfidentialVM");
    assert_eq!(p["securityProfile"]["uefiSettings"]["vTpmEnabled"], true);
    assert_eq!(
        p["securityProfile"]["uefiSettings"]["secureBootEnabled"],
        true
    );
    let disk = &p["storageProfile"]["osDisk"];
    assert_eq!(
        disk["managedDisk"]["securityProfile"]["securityEncryptionType"],
        "VMGuestStateOnly"
    );
    assert_eq!(disk["deleteOption"], "Delete");
    let user_data = base64::engine::general_purpose::STANDARD
        .decode(p["userData"].as_str().unwrap())
        .unwrap();
    assert_eq!(user_data, data);
    let s = state(&base);
    let nics = s["nics"].as_object().unwrap();
    assert_eq!(nics.len(), 1);
    let nic = nics.values().next().unwrap();
    assert_eq!(nic["deleteOption"], "Delete");
    assert_eq!(
        nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"],
        addr.to_string(),
        "the address is the NIC's"
    );
    assert_eq!(s["disks"].as_object().unwrap().len(), 1);

    // Asked again: the same VM; a new keeper's keys: the old VM goes, a new one holds them.
    let (fresh, _) = retry_then_replace(&mut client, "p1", &s1, &vm, &data).await;
    let all = vms(&base);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["name"], fresh.id);
    assert_eq!(state(&base)["nics"].as_object().unwrap().len(), 1);

    // Throttled: the calls are retried after Retry-After and the create succeeds.
    emulator_call(&base, "/_emulator/throttle", Some(json!({"count": 2})));
    let (s2, lock2) = sandbox(d, "s2");
    client
        .create_vm(request("p2", &s2, data.clone()))
        .await
        .unwrap();
    assert_eq!(state(&base)["throttled"], 2);

    // No capacity for a size: the pod's error names the provider, the size and Azure's reason,
    // and the failed VM does not stay behind.
    let (s3, _lock3) = sandbox(d, "s3");
    let mut r = request("p3", &s3, data.clone());
    r.instance_type = "Standard_DC96as_v5".into();
    let e = client.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("azure: no Standard_DC96as_v5 now: AllocationFailed"),
        "{}",
        e.message()
    );
    assert!(vms(&base).iter().all(|v| v["tags"]["coffer-pod"] != "p3"));
    // Over quota: refused at once, nothing made.
    let mut r = request("p3", &s3, data.clone());
    r.instance_type = "Standard_DC64as_v5".into();
    let e = client.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("azure: no Standard_DC64as_v5 now: OperationNotAllowed")
            && e.message().contains("quota"),
        "{}",
        e.message()
    );
    // Over Azure's user-data limit: refused before any call.
    let e = client
        .create_vm(request("p3", &s3, vec![b' '; 49 << 10]))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("over the azure provider's limit of 49152"),
        "{}",
        e.message()
    );
    assert_eq!(vms(&base).len(), 2);

    // Deleted with its pod: the VM, its NIC and its disk.
    let gone = client
        .delete_vm(DeleteVmRequest { pod: "p2".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.deleted);
    drop(lock2);
    let s = state(&base);
    assert_eq!(s["vms"].as_object().unwrap().len(), 1);
    assert_eq!(s["nics"].as_object().unwrap().len(), 1);
    assert_eq!(s["disks"].as_object().unwrap().len(), 1);

    // A pod whose keeper died: the reconciler deletes its VM and everything made with it.
    drop(lock1);
    eventually("the reconciler deletes the dead pod's VM", || {
        let s = state(&base);
        s["vms"].as_object().unwrap().is_empty()
            && s["nics"].as_object().unwrap().is_empty()
            && s["disks"].as_object().unwrap().is_empty()
    })
    .await;
    all_valid(&base);
    assert!(!std::fs::read_to_string(&cloud.log)
        .unwrap()
        .contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_pods_at_once_and_a_daemon_killed_mid_create_leave_no_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Pages of 5 VMs (the list follows nextLink); each operation answers InProgress twice.
    let (_arm, base) = emulator("azure_arm.py", &["--page", "5", "--polls", "2"]);
    // The node's managed identity, from the instance metadata service's token endpoint.
    let cfg = config(d, &base, "managed-identity");
    let cloud = daemon_with(d, &cfg, &[]).unwrap();
    let mut client = coffer_cloud::client::connect(&cloud.socket).await.unwrap();
    let data = launch("kbs = 'https://kbs.example'");

    let (created, locks) = create_at_once(&client, d, 20, &data).await;
    let addresses: std::collections::HashSet<_> = created.iter().map(|v| &v.address).collect();
    assert_eq!(addresses.len(), 20, "each VM has its own address");
    assert_eq!(vms(&base).len(), 20);
    let listed = client
        .list_vms(coffer_cloud::api::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(listed.len(), 20, "all pages are listed");
    assert!(listed.iter().all(|v| v.running));
    delete_at_once(&client, 20).await;
    let s = state(&base);
    assert!(s["vms"].as_object().unwrap().is_empty());
    assert!(s["nics"].as_object().unwrap().is_empty());
    assert!(s["tokens_issued"].as_u64().unwrap() >= 1);
    drop(locks);

    // coffer-cloud killed with SIGKILL while a VM is being made, its keeper gone too: the
    // restarted daemon deletes the half-made VM.
    let (s9, lock9) = sandbox(d, "s9");
    let mut c = client.clone();
    let create = tokio::spawn(async move { c.create_vm(request("p9", &s9, data)).await });
    eventually("the VM is being made", || !vms(&base).is_empty()).await;
    assert_eq!(vms(&base)[0]["properties"]["provisioningState"], "Creating");
    drop(cloud);
    let _ = create.await;
    drop(lock9);
    let _restarted = daemon_with(d, &cfg, &[]).unwrap();
    eventually("the restarted coffer-cloud deletes the orphan", || {
        vms(&base).is_empty()
    })
    .await;
    all_valid(&base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_create_holds_its_pod_until_the_provider_call_ends() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Each operation answers InProgress four times: a create takes about five seconds.
    let (_arm, base) = emulator("azure_arm.py", &["--polls", "4"]);
    let cfg = config(d, &base, "managed-identity");
    let _cloud = daemon_with(d, &cfg, &[]).unwrap();
    let mut client = coffer_cloud::client::connect(&d.join("cloud.sock"))
        .await
        .unwrap();
    let (s1, _lock1) = sandbox(d, "s1");

    // The caller goes away a second into the create; the provider's call goes on.
    let mut c = client.clone();
    let first = launch("kbs = 'https://kbs.example'");
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        c.create_vm(request("p1", &s1, first)),
    )
    .await;
    assert!(cancelled.is_err(), "the create was cut short by its caller");
    // A second create of the pod (a new keeper) waits for it instead of racing it to a second VM.
    let second = launch("kbs = 'https://kbs.example'");
    let e = client
        .create_vm(request("p1", &s1, second.clone()))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("a create for pod p1 is under way"),
        "{}",
        e.message()
    );
    // Once the first call ended, the second create replaces its VM: one VM, the second's.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let vm = loop {
        match client.create_vm(request("p1", &s1, second.clone())).await {
            Ok(v) => break v.into_inner(),
            Err(e) if e.message().contains("under way") => {
                assert!(
                    std::time::Instant::now() < until,
                    "the first create never ended"
                );
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{}", e.message()),
        }
    };
    let all = vms(&base);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["name"], vm.id);
    all_valid(&base);
}
