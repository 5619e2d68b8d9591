//! The AWS provider against moto in server mode, with coffer-cloud's own binary and API. What
//! the provider did is read back from moto with boto3, never through coffer-cloud.

mod common;

use std::net::Ipv4Addr;

use coffer_cloud::api::DeleteVmRequest;
use common::{
    boto, config, create_at_once, daemon, delete_at_once, eventually, instances, launch, moto,
    request, retry_then_replace, sandbox,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_instances_are_made_tagged_and_deleted_as_pods_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_moto, endpoint) = moto();
    let image = boto(
        &endpoint,
        "print(json.dumps(ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']))",
    );
    let image = image.as_str().unwrap().to_string();
    let cfg = config(d, &endpoint, &image);

    // Without credentials the daemon does not start, and says why.
    let e = daemon(d, &cfg, false).err().expect("refused");
    assert!(e.contains("no credentials"), "{e}");

    let cloud = daemon(d, &cfg, true).unwrap();
    let mut client = coffer_cloud::client::connect(&cloud.socket).await.unwrap();

    // One pod: the exact instance, tags and user data.
    let (s1, lock1) = sandbox(d, "s1");
    let data = launch("kbs = 'https://kbs.example'");
    let vm = client
        .create_vm(request("p1", &s1, data.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.provider, "aws");
    assert_eq!(
        vm.instance_type, "m6a.large",
        "the smallest allowed type that holds the pod"
    );
    assert!(vm.address.parse::<Ipv4Addr>().is_ok(), "{vm:?}");
    let all = instances(&endpoint);
    assert_eq!(all.len(), 1, "{all:#?}");
    let i = &all[0];
    assert_eq!(i["id"], vm.id);
    assert_eq!(i["type"], "m6a.large");
    assert_eq!(i["image"], image.as_str());
    assert_eq!(i["tags"]["coffer:cluster"], "test");
    assert_eq!(i["tags"]["coffer:node"], "node-1");
    assert_eq!(i["tags"]["coffer:pod"], "p1");
    assert_eq!(i["tags"]["coffer:sandbox-dir"], s1.display().to_string());
    assert_eq!(i["user_data"].as_str().unwrap().as_bytes(), &data[..]);
    // Asking again (a keeper retrying) returns the same instance; a new keeper of the same pod
    // (its keys differ, after a crash): the old instance goes and a new one carries the new
    // user data.
    let (fresh, renewed) = retry_then_replace(&mut client, "p1", &s1, &vm, &data).await;
    let all = instances(&endpoint);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["id"], fresh.id);
    assert_eq!(
        all[0]["user_data"].as_str().unwrap().as_bytes(),
        &renewed[..]
    );

    // Bad input is refused before any call, naming it.
    let mut r = request("p2", &s1, data.clone());
    r.instance_type = "p5.48xlarge".into();
    let e = client.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("\"p5.48xlarge\" is not allowed"),
        "{}",
        e.message()
    );
    let e = client
        .create_vm(request("p2", &s1, vec![b' '; 17 << 10]))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("over the aws provider's limit of 16384"),
        "{}",
        e.message()
    );
    let e = client
        .create_vm(request("p3", &d.join("nobody"), data.clone()))
        .await
        .unwrap_err();
    assert!(e.message().contains("no live sandbox"), "{}", e.message());
    assert_eq!(
        instances(&endpoint).len(),
        1,
        "nothing was made for bad input"
    );

    // Deleted with its pod.
    let gone = client
        .delete_vm(DeleteVmRequest { pod: "p1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.deleted);
    assert_eq!(instances(&endpoint).len(), 0);
    drop(lock1);

    // Twenty pods at once, then deleted: none left.
    let (_, locks) = create_at_once(&client, d, 20, &data).await;
    assert_eq!(instances(&endpoint).len(), 20);
    delete_at_once(&client, 20).await;
    assert_eq!(instances(&endpoint).len(), 0);
    drop(locks);

    // coffer-cloud killed with SIGKILL after a create whose keeper then died: its restart
    // terminates the instance.
    let (s9, lock9) = sandbox(d, "s9");
    client
        .create_vm(request("p9", &s9, data.clone()))
        .await
        .unwrap();
    let log = cloud.log.clone();
    drop(cloud);
    drop(lock9);
    assert_eq!(instances(&endpoint).len(), 1);
    let _restarted = daemon(d, &cfg, true).unwrap();
    eventually("the restarted coffer-cloud terminates the orphan", || {
        instances(&endpoint).is_empty()
    })
    .await;
    let _ = log;
}
