//! `cargo bench -p coffer-cloud --bench create`: how fast coffer-cloud turns pods into VMs,
//! through its own API and binary, against moto's EC2 in server mode on loopback (PyPI
//! `moto[server]`): 20 pods created at once (each a RunInstances and the DescribeInstances
//! polls until it runs), then deleted at once; medians of 5 rounds. moto answers in
//! milliseconds, so this is coffer-cloud's own cost (checks, signing, XML, its API) plus moto's,
//! not EC2's boot time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use coffer_cloud::api::DeleteVmRequest;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_moto, endpoint) = common::moto();
    let image = common::boto(
        &endpoint,
        "print(json.dumps(ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']))",
    );
    let cfg = common::config(d, &endpoint, image.as_str().unwrap());
    let cloud = common::daemon(d, &cfg, true).unwrap();
    let data = common::launch("kbs = 'https://kbs.example'");
    let (mut create, mut delete) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let client = coffer_cloud::client::connect(&cloud.socket).await.unwrap();
        for round in 0..5 {
            let mut locks = Vec::new();
            let mut reqs = Vec::new();
            for n in 0..20 {
                let (s, l) = common::sandbox(d, &format!("r{round}-{n}"));
                locks.push(l);
                reqs.push(common::request(&format!("r{round}-{n}"), &s, data.clone()));
            }
            let t = Instant::now();
            let tasks: Vec<_> = reqs
                .into_iter()
                .map(|r| {
                    let mut c = client.clone();
                    tokio::spawn(async move { c.create_vm(r).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            create.push(20.0 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let tasks: Vec<_> = (0..20)
                .map(|n| {
                    let mut c = client.clone();
                    tokio::spawn(async move {
                        c.delete_vm(DeleteVmRequest {
                            pod: format!("r{round}-{n}"),
                        })
                        .await
                    })
                })
                .collect();
            for t in tasks {
                assert!(t.await.unwrap().unwrap().into_inner().deleted);
            }
            delete.push(20.0 / t.elapsed().as_secs_f64());
            drop(locks);
        }
    });
    assert!(common::instances(&endpoint).is_empty(), "instances left");
    println!(
        "aws (moto), 20 concurrent pods: create {:.1} pods/s, delete {:.1} pods/s (medians of 5)",
        median(create),
        median(delete)
    );
}
