//! Coffer under a real containerd (Debian's 1.6), as a Kubernetes node runs it: the CRI calls
//! of the kubelet, `ctr`, and what is left after the shim or containerd is killed.

mod common;

use std::{process::Command, time::Duration};

use coffer_shim::annotations::INITDATA;
use common::containerd::{
    mounts_under, node, processes_mentioning, shell_container, Node, Pods, EXEC_ALLOWED,
};

/// The layer digests of `image`'s manifest (skopeo reads it from the registry).
fn layers(image: &str) -> Vec<String> {
    let out = common::run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]));
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Registry blob requests for `digest`, split into containerd's and the others'.
fn fetched_by(reg: &common::Registry, digest: &str) -> (usize, usize) {
    let gets: Vec<_> = reg
        .blob_gets()
        .into_iter()
        .filter(|l| l.contains(digest))
        .collect();
    let by_containerd = gets.iter().filter(|l| l.contains("containerd/")).count();
    (by_containerd, gets.len() - by_containerd)
}

/// Nothing of the node's pods is left: no shim, keeper or agent, no sandbox directory, mount,
/// or shim socket of the pods (or standalone containers) `groups`.
fn assert_nothing_left(n: &Node, groups: &[&str]) {
    let d = &n.containerd.dir;
    let pods = d.join("node/run/coffer/pods");
    let until = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let procs: Vec<_> = [
            processes_mentioning(&pods.display().to_string()),
            processes_mentioning(&format!("-address {}", n.containerd.sock.display())),
        ]
        .concat();
        let dirs: Vec<_> = std::fs::read_dir(&pods)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let mounts = mounts_under(&pods);
        let sockets: Vec<_> = groups
            .iter()
            .map(|g| {
                let sock = n.containerd.sock.display().to_string();
                coffer_shim::socket_path(&sock, "k8s.io", g)
            })
            .filter(|p| p.exists())
            .collect();
        if procs.is_empty() && dirs.is_empty() && mounts.is_empty() && sockets.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "left behind: processes {procs:?}, sandboxes {dirs:?}, mounts {mounts:?}, \
             sockets {sockets:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pod_runs_through_the_cri_and_its_layers_are_pulled_only_inside_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), None);
    let app_layers = layers(&n.app);
    let pod = n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        let v =
            p.rt.version(coffer_shim::cri::VersionRequest::default())
                .await
                .unwrap()
                .into_inner();
        assert_eq!(v.runtime_name, "containerd");

        p.pull(&n.app).await.expect("PullImage (metadata only)");
        for l in &app_layers {
            assert_eq!(
                fetched_by(&n.world.registry, l),
                (0, 0),
                "layer {l} fetched"
            );
        }
        let config = p.sandbox_config("web", &[(INITDATA, &n.annotation)]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");

        // A container that prints and exits 7: its log and exit code reach the kubelet's view.
        let id = p
            .start_container(
                &pod,
                &config,
                "app",
                &n.app,
                &[
                    "/bin/sh",
                    "-c",
                    "echo hello from coffer; echo oops >&2; exit 7",
                ],
            )
            .await
            .expect("CreateContainer + StartContainer");
        assert_eq!(p.wait_exited(&id, Duration::from_secs(60)).await, 7);
        let log = std::fs::read_to_string(p.log_dir.join("web/app.log")).unwrap();
        assert!(log.contains(" stdout F hello from coffer"), "{log}");
        assert!(log.contains(" stderr F oops"), "{log}");

        // A second container in the same sandbox: stats while it runs, then StopContainer.
        let id2 = p
            .start_container(
                &pod,
                &config,
                "sleeper",
                &n.app,
                &["/bin/sh", "-c", "exec sleep 60"],
            )
            .await
            .unwrap();
        let stats =
            p.rt.container_stats(coffer_shim::cri::ContainerStatsRequest {
                container_id: id2.clone(),
            })
            .await
            .expect("ContainerStats")
            .into_inner()
            .stats
            .unwrap();
        let mem = stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map(|v| v.value);
        assert!(mem.unwrap_or(0) > 0, "memory {mem:?}");
        p.rt.stop_container(coffer_shim::cri::StopContainerRequest {
            container_id: id2.clone(),
            timeout: 1,
        })
        .await
        .unwrap();
        let code = p.wait_exited(&id2, Duration::from_secs(30)).await;
        assert!(code == 137 || code == 143, "{code}");

        // A container past its memory limit: the OOM killer ends it inside the sandbox, and
        // the kubelet learns why.
        let id3 = p
            .start_limited(
                &pod,
                &config,
                "hog",
                &n.app,
                &[
                    "/bin/sh",
                    "-c",
                    "exec dd if=/dev/zero of=/dev/null bs=96M count=4",
                ],
                32 << 20,
            )
            .await
            .unwrap();
        assert_eq!(p.wait_exited(&id3, Duration::from_secs(30)).await, 137);
        let reason = p.status(&id3).await.reason;
        assert_eq!(reason, "OOMKilled");

        // The layers came from inside the sandbox only; containerd fetched none.
        for l in &app_layers {
            let (ctrd, others) = fetched_by(&n.world.registry, l);
            assert_eq!(ctrd, 0, "containerd fetched layer {l}");
            assert!(others > 0, "layer {l} was never fetched by the sandbox");
        }
        p.remove_pod(&pod).await.expect("Stop/RemovePodSandbox");
        pod
    });
    assert_nothing_left(&n, &[&pod]);
}

#[test]
fn exec_through_the_cri_runs_only_what_the_pods_policy_allows() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), None);
    let pods = n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let sleeper = ["/bin/sh", "-c", "exec sleep 60"];

        // The default policy: no exec at all, and the refusal says which rule.
        let config = p.sandbox_config("plain", &[(INITDATA, &n.annotation)]);
        let plain = p.run_pod(&config).await.unwrap();
        let id = p
            .start_container(&plain, &config, "app", &n.app, &sleeper)
            .await
            .unwrap();
        let err = p.exec_sync(&id, &EXEC_ALLOWED).await.unwrap_err();
        assert!(
            err.message()
                .contains("denied by policy: ExecProcessRequest"),
            "{err:?}"
        );
        p.remove_pod(&plain).await.unwrap();

        // A pod whose initdata policy allows one command: it runs, its output and exit code
        // come back; any other command is refused; the container runs on.
        let config = p.sandbox_config("execs", &[(INITDATA, &n.exec_annotation)]);
        let execs = p.run_pod(&config).await.unwrap();
        let id = p
            .start_container(&execs, &config, "app", &n.app, &sleeper)
            .await
            .unwrap();
        let r = p.exec_sync(&id, &EXEC_ALLOWED).await.expect("ExecSync");
        assert_eq!(r.exit_code, 4);
        assert_eq!(String::from_utf8_lossy(&r.stdout), "exec says hi\n");
        assert_eq!(String::from_utf8_lossy(&r.stderr), "exec complains\n");
        let err = p
            .exec_sync(&id, &["/bin/cat", "/etc/passwd"])
            .await
            .unwrap_err();
        assert!(
            err.message()
                .contains("denied by policy: ExecProcessRequest"),
            "{err:?}"
        );
        // Again, through `ctr task exec`: the shim forgot the first exec when containerd
        // deleted it, and ctr's own stdio carries the output.
        let mut args = vec!["-n", "k8s.io", "task", "exec", "--exec-id", "again", &id];
        args.extend(EXEC_ALLOWED);
        let out = n.containerd.ctr(&args);
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "exec says hi\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "exec complains\n");
        assert_eq!(
            p.status(&id).await.state,
            coffer_shim::cri::ContainerState::ContainerRunning as i32
        );
        p.remove_pod(&execs).await.unwrap();
        [plain, execs]
    });
    assert_nothing_left(&n, &[&pods[0], &pods[1]]);
}

#[test]
fn pods_whose_annotations_would_change_the_policy_or_carry_no_initdata_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), None);
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        let config = p.sandbox_config(
            "sneaky",
            &[
                (INITDATA, &n.annotation),
                (
                    "io.katacontainers.config.agent.policy",
                    "cGFja2FnZSBhZ2VudF9wb2xpY3k=",
                ),
            ],
        );
        let e = p.run_pod(&config).await.unwrap_err();
        assert!(
            e.message()
                .contains("io.katacontainers.config.agent.policy"),
            "{}",
            e.message()
        );
        let e = p.run_pod(&p.sandbox_config("bare", &[])).await.unwrap_err();
        assert!(e.message().contains(INITDATA), "{}", e.message());
    });
    assert_nothing_left(&n, &[]);
}

#[test]
fn ctr_runs_a_container_with_the_coffer_runtime_and_snapshotter() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), None);
    let app_layers = layers(&n.app);
    // The image's metadata, as the CRI pulls it: containerd unpacks it onto the coffer
    // snapshotter, which leaves the layers to the sandbox.
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
    });
    let out = n.containerd.ctr(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--runtime",
        "io.containerd.coffer.v2",
        "--snapshotter",
        "coffer",
        "--annotation",
        &format!("{INITDATA}={}", n.annotation),
        &n.app,
        "ctr-app",
        "/bin/sh",
        "-c",
        "echo hello through ctr; exit 3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello through ctr"),
        "stdout {stdout:?}, stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3));
    for l in &app_layers {
        let (ctrd, others) = fetched_by(&n.world.registry, l);
        assert_eq!(ctrd, 0, "containerd fetched layer {l}");
        assert!(others > 0, "layer {l} was never fetched by the sandbox");
    }
    assert_nothing_left(&n, &["ctr-app"]);
}

/// The process id of the pod's shim.
fn shim_pid(n: &Node) -> i32 {
    let procs = processes_mentioning(&format!("-address {}", n.containerd.sock.display()));
    let line = procs
        .iter()
        .find(|l| l.contains("containerd-shim-coffer-v2"))
        .unwrap_or_else(|| panic!("no shim in {procs:?}"));
    line.split(':').next().unwrap().parse().unwrap()
}

fn kill9(pid: i32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn killing_the_shim_or_containerd_mid_run_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = node(dir.path(), None);
    let annotation = n.annotation.clone();
    let app = n.app.clone();
    let start = |n: &Node, name: &str| {
        n.rt.block_on(async {
            let mut p = Pods::new(&n.containerd).await;
            p.pull(&app).await.unwrap();
            let config = p.sandbox_config(name, &[(INITDATA, &annotation)]);
            let pod = p.run_pod(&config).await.unwrap();
            let id = p
                .start_container(
                    &pod,
                    &config,
                    "app",
                    &app,
                    &["/bin/sh", "-c", "exec sleep 300"],
                )
                .await
                .unwrap();
            (pod, id)
        })
    };

    // kill -9 of the shim: its sandbox goes with it, containerd sees the container exit, and the
    // pod can be removed.
    let (pod, id) = start(&n, "victim");
    kill9(shim_pid(&n));
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.wait_exited(&id, Duration::from_secs(30)).await;
        p.remove_pod(&pod).await.unwrap();
    });
    assert_nothing_left(&n, &[&pod]);

    // kill -9 of containerd: the pod keeps running; a restarted containerd finds it again and
    // removes it.
    let (pod, id) = start(&n, "survivor");
    n.containerd.kill9();
    n.containerd.restart();
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        let s = p.status(&id).await;
        assert_eq!(
            s.state,
            coffer_shim::cri::ContainerState::ContainerRunning as i32
        );
        p.remove_pod(&pod).await.unwrap();
    });
    assert_nothing_left(&n, &[&pod]);
}

#[test]
fn a_pod_vm_runs_through_the_cri_on_the_pod_network() {
    // Everything of this test, the CNI bridge and the pods' addresses included, lives in a
    // network namespace of its own. The KBS and the registry listen on the bridge's address,
    // which the pod VM reaches over the pod network, not through the host. The pod VM is built
    // first: its Debian packages may have to be downloaded, which the namespace cannot reach.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let podvm = d.join("podvm");
    common::build_podvm(&podvm);
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge("10.88.9.1/24");
    common::containerd::TestNetns::cni_config(&d.join("node"), "10.88.9.0/24");
    let n = common::containerd::node_at(d, Some(&podvm), "10.88.9.1");
    // A second node on the same bridge and address pool runs process sandboxes (one containerd
    // configuration runs one sandbox kind): its pod and the pod VM reach each other.
    let pn_dir = d.join("process-node");
    std::fs::create_dir_all(&pn_dir).unwrap();
    common::containerd::TestNetns::cni_config_with(
        &pn_dir.join("node"),
        "10.88.9.0/24",
        &d.join("node/var/lib/cni"),
    );
    let pn = common::containerd::node_at(&pn_dir, None, "10.88.9.1");
    let app_layers = layers(&n.app);
    let registry_port = n
        .world
        .registry
        .addr
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let pod = n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let mut config = p.sandbox_config("vm-pod", &[(INITDATA, &n.annotation)]);
        p.on_pod_network(&mut config);
        config.port_mappings = vec![coffer_shim::cri::PortMapping {
            protocol: coffer_shim::cri::Protocol::Tcp as i32,
            container_port: 8080,
            host_port: 18080,
            host_ip: String::new(),
        }];
        let pod = p.run_pod(&config).await.expect("RunPodSandbox (pod VM)");
        let (ip, netns) = p.address(&pod).await;
        assert!(std::path::Path::new(&netns).exists(), "{netns}");
        assert!(ip.starts_with("10.88.9."), "the pod's address: {ip:?}");
        let id = p
            .start_container(
                &pod,
                &config,
                "app",
                &n.app,
                &["/bin/sh", "-c", "echo hello from the pod VM; exit 5"],
            )
            .await
            .expect("CreateContainer + StartContainer in the pod VM");
        assert_eq!(p.wait_exited(&id, Duration::from_secs(120)).await, 5);
        let log = std::fs::read_to_string(p.log_dir.join("vm-pod/app.log")).unwrap();
        assert!(log.contains(" stdout F hello from the pod VM"), "{log}");

        // A web server in the pod VM: the node reaches it at the pod's address and through
        // the hostPort (CNI portmap), as with any runtime.
        p.start_container(
            &pod,
            &config,
            "web",
            &n.app,
            &[
                "/bin/sh",
                "-c",
                "mkdir -p /www && echo hello from the pod VM over the pod network > /www/index.html && exec httpd -f -p 8080 -h /www",
            ],
        )
        .await
        .expect("the web server");
        let until = std::time::Instant::now() + Duration::from_secs(120);
        let page = common::http_get(&ip, 8080, until);
        assert!(page.contains("hello from the pod VM over the pod network"), "{page}");
        let page = common::http_get("10.88.9.1", 18080, until);
        assert!(page.contains("hello from the pod VM over the pod network"), "hostPort: {page}");
        // A process-sandbox pod of the other node serves too: each fetches from the other.
        let mut q = Pods::new(&pn.containerd).await;
        q.pull(&pn.app).await.unwrap();
        let mut pc = q.sandbox_config("proc-pod", &[(INITDATA, &pn.annotation)]);
        q.on_pod_network(&mut pc);
        let ppod = q.run_pod(&pc).await.expect("RunPodSandbox (process sandbox)");
        let (pip, _) = q.address(&ppod).await;
        assert!(pip.starts_with("10.88.9.") && pip != ip, "{pip}");
        q.start_container(
            &ppod,
            &pc,
            "web",
            &pn.app,
            &[
                "/bin/sh",
                "-c",
                "mkdir -p /www && echo hello from the process sandbox > /www/index.html && exec httpd -f -p 8080 -h /www",
            ],
        )
        .await
        .unwrap();
        let fetch_from = |addr: &str| {
            format!(
                "for i in $(seq 1 100); do wget -q -O - http://{addr}:8080/ && exit 0; sleep 0.2; done; exit 1"
            )
        };
        let to_vm = q
            .start_container(&ppod, &pc, "client", &pn.app, &["/bin/sh", "-c", &fetch_from(&ip)])
            .await
            .unwrap();
        assert_eq!(q.wait_exited(&to_vm, Duration::from_secs(60)).await, 0);
        let log = std::fs::read_to_string(q.log_dir.join("proc-pod/client.log")).unwrap();
        assert!(log.contains("hello from the pod VM over the pod network"), "{log}");
        let to_process = p
            .start_container(&pod, &config, "peer", &n.app, &["/bin/sh", "-c", &fetch_from(&pip)])
            .await
            .unwrap();
        assert_eq!(p.wait_exited(&to_process, Duration::from_secs(60)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("vm-pod/peer.log")).unwrap();
        assert!(log.contains("hello from the process sandbox"), "{log}");
        q.remove_pod(&ppod).await.unwrap();
        // And the pod reaches the node: the registry's API root, the pod's resolver as the
        // CRI's DNS settings made it, its own address on eth0.
        let fetch = format!(
            "cat /etc/resolv.conf; ip -o addr show dev eth0; wget -q -O - http://10.88.9.1:{registry_port}/v2/ && echo && echo fetched from the node"
        );
        let client = p
            .start_container(&pod, &config, "client", &n.app, &["/bin/sh", "-c", &fetch])
            .await
            .unwrap();
        assert_eq!(p.wait_exited(&client, Duration::from_secs(60)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("vm-pod/client.log")).unwrap();
        for want in [
            "fetched from the node",
            "nameserver 10.96.0.10",
            "search default.svc.cluster.local",
            &format!("inet {ip}/24"),
        ] {
            assert!(log.contains(want), "{want} missing in {log}");
        }
        // The guest pulled its image over the pod network: the registry saw the pod's address.
        let gets = n.world.registry.blob_gets();
        assert!(
            gets.iter().any(|l| l.starts_with(&format!("{ip} "))),
            "no blob request from {ip}: {gets:#?}"
        );

        // The node cannot reconfigure the guest's network: a second configuration, or a
        // malformed one, is refused naming what is wrong.
        let sock = n
            .containerd
            .dir
            .join("node/run/coffer/pods")
            .join(coffer_shim::sandbox::name_for(&pod))
            .join("agent.sock");
        let mut agent = coffer_agent::api::connect_unix(&sock).await.unwrap();
        let mut bad = coffer_agent::proto::SetNetworkRequest {
            interfaces: vec![coffer_agent::proto::NetworkInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:09:63".into(),
                addresses: vec!["10.88.9.99/24".into()],
                mtu: 1500,
            }],
            routes: vec![coffer_agent::proto::NetworkRoute {
                destination: "default".into(),
                gateway: "10.77.0.1".into(),
                interface: "eth0".into(),
            }],
            ..Default::default()
        };
        let e = agent.set_network(bad.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("gateway 10.77.0.1 is outside the subnets of eth0"), "{e:?}");
        bad.routes.clear();
        let e = agent.set_network(bad).await.unwrap_err();
        assert!(e.message().contains("already configured"), "{e:?}");

        // Another pod VM on the pod network reaches this one's server, pod to pod (and stays,
        // for the kill -9 below).
        let mut victim = p.sandbox_config("vm-victim", &[(INITDATA, &n.annotation)]);
        p.on_pod_network(&mut victim);
        let other = p.run_pod(&victim).await.unwrap();
        let (other_ip, other_netns) = p.address(&other).await;
        assert!(other_ip.starts_with("10.88.9.") && other_ip != ip, "{other_ip}");
        let peer = format!(
            "wget -q -O - http://{ip}:8080/ && echo fetched from the other pod VM; exec sleep 300"
        );
        p.start_container(&other, &victim, "app", &n.app, &["/bin/sh", "-c", &peer])
            .await
            .unwrap();
        let log = p.log_dir.join("vm-victim/app.log");
        let until = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("fetched from the other pod VM") {
                assert!(
                    text.contains("hello from the pod VM over the pod network"),
                    "{text}"
                );
                break;
            }
            assert!(std::time::Instant::now() < until, "pod to pod: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }

        p.remove_pod(&pod).await.unwrap();
        (pod, netns, other, other_netns)
    });
    let (first, netns, pod, victim_netns) = pod;
    assert!(!std::path::Path::new(&netns).exists(), "{netns} remains");
    for l in &app_layers {
        let (ctrd, others) = fetched_by(&n.world.registry, l);
        assert_eq!(ctrd, 0, "containerd fetched layer {l}");
        assert!(others > 0, "layer {l} was never fetched by the pod VM");
    }

    // kill -9 of the shim of a running pod VM: QEMU goes with it.
    let netns = victim_netns;
    let pods = n.containerd.dir.join("node/run/coffer/pods");
    assert!(
        processes_mentioning(&pods.display().to_string())
            .iter()
            .any(|l| l.contains("qemu-system")),
        "the pod VM runs under QEMU"
    );
    kill9(shim_pid(&n));
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.remove_pod(&pod).await.unwrap();
    });
    assert_nothing_left(&n, &[&first, &pod]);
    // Nothing of the pods' networks remains: no pod namespace, veth or tap.
    assert!(!std::path::Path::new(&netns).exists(), "{netns} remains");
    let links = common::run_ok(Command::new("ip").args(["-o", "link"]));
    assert!(
        !links.contains("veth") && !links.contains("coffertap"),
        "{links}"
    );
}

/// The workload of the pinned-pod test: a Deployment with an init container, two containers,
/// environment from a ConfigMap, the ConfigMap as a volume, an emptyDir and an exec readiness
/// probe; the app prints its ConfigMap file and service-account token every second.
const WORKLOAD: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
data:
  GREETING: hello from a pinned pod
  MODE: strict
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
  labels:
    app: web
spec:
  replicas: 1
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      initContainers:
      - name: init
        image: REGISTRY/app:v1
        command: ["/bin/sh", "-c", "echo init ran > /work/init-ran; echo init is done > /dev/termination-log"]
        volumeMounts:
        - name: work
          mountPath: /work
      containers:
      - name: app
        image: REGISTRY/app:v1
        command: ["/bin/sh", "-c"]
        args: ["echo $GREETING level $(LEVEL) after $(cat /work/init-ran); while true; do echo mode $(cat /etc/web/MODE) token $(cat /var/run/secrets/kubernetes.io/serviceaccount/token) hosts $(cat /etc/hosts) sub $(cat /etc/web-mode); sleep 1; done"]
        env:
        - name: LEVEL
          value: "3"
        envFrom:
        - configMapRef:
            name: web-config
        volumeMounts:
        - name: work
          mountPath: /work
        - name: config
          mountPath: /etc/web
        - name: config
          mountPath: /etc/web-mode
          subPath: MODE
        readinessProbe:
          exec:
            command: ["/bin/sh", "-c", "test -d /proc/self"]
      - name: sidecar
        image: REGISTRY/app:v1
        command: ["/bin/sh", "-c", "exec sleep 120"]
        workingDir: /tmp
        volumeMounts:
        - name: work
          mountPath: /work
          readOnly: true
      volumes:
      - name: work
        emptyDir: {}
      - name: config
        configMap:
          name: web-config
"#;

/// What a kubelet sends for the containers of [`WORKLOAD`]'s pod: the command and
/// arguments with `$(VAR)` expanded, the environment (the ConfigMap's, the container's, the
/// API server's service variables), the volumes, the service-account token, `/etc/hosts` and
/// the termination log, all under `kubelet` on this host.
struct Kubelet {
    root: std::path::PathBuf,
    image: String,
    /// The pod directory the app's ConfigMap volume comes from.
    config_pod: &'static str,
}

/// Unmounts a bind the test made, when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The app's script as the kubelet hands it over (`$(LEVEL)` expanded).
const APP_SCRIPT: &str = "echo $GREETING level 3 after $(cat /work/init-ran); while true; do echo mode $(cat /etc/web/MODE) token $(cat /var/run/secrets/kubernetes.io/serviceaccount/token) hosts $(cat /etc/hosts) sub $(cat /etc/web-mode); sleep 1; done";

/// Writes a volume as the kubelet does (its `AtomicWriter`): the files into a new timestamped
/// directory, then `..data` swapped to it with one rename, each visible name a link through
/// `..data`.
fn kubelet_write(dir: &std::path::Path, generation: u32, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    let gen = format!("..2026_12_04_00_00_{generation:02}.000000001");
    for (name, content) in files {
        std::fs::create_dir_all(dir.join(&gen)).unwrap();
        std::fs::write(dir.join(&gen).join(name), content).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&gen, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), link).unwrap();
        }
    }
}

impl Kubelet {
    fn mount(&self, path: &str, host: &str, readonly: bool) -> coffer_shim::cri::Mount {
        let host = self.root.join(host);
        if host.ends_with("etc-hosts") {
            // The kubelet's /etc/hosts for the pod.
            std::fs::create_dir_all(host.parent().unwrap()).unwrap();
            std::fs::write(&host, "10.244.0.7 web-5d8f7c9b4-x2x7z\n").unwrap();
        } else if host.extension().is_some() {
            std::fs::create_dir_all(host.parent().unwrap()).unwrap();
            std::fs::write(&host, "").unwrap();
        } else {
            std::fs::create_dir_all(&host).unwrap();
        }
        coffer_shim::cri::Mount {
            container_path: path.into(),
            host_path: host.display().to_string(),
            readonly,
            ..Default::default()
        }
    }

    fn config(&self, name: &str, attempt: u32) -> coffer_shim::cri::ContainerConfig {
        use coffer_shim::cri::*;
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect::<Vec<_>>()
        };
        let service = [
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
            ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
            ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
            ("KUBERNETES_PORT_443_TCP_PROTO", "tcp"),
            ("KUBERNETES_PORT_443_TCP_PORT", "443"),
            ("KUBERNETES_PORT_443_TCP_ADDR", "10.96.0.1"),
        ];
        let mut mounts = vec![
            self.mount(
                "/var/run/secrets/kubernetes.io/serviceaccount",
                "pods/uid-web/volumes/kubernetes.io~projected/kube-api-access-x7k2p",
                true,
            ),
            self.mount("/etc/hosts", "pods/uid-web/etc-hosts", false),
            self.mount(
                "/dev/termination-log",
                &format!("pods/uid-web/containers/{name}/{attempt}.log"),
                false,
            ),
        ];
        let (command, args, envs, working_dir) = match name {
            "init" => {
                mounts.push(self.mount(
                    "/work",
                    "pods/uid-web/volumes/kubernetes.io~empty-dir/work",
                    false,
                ));
                (
                    strings(&[
                        "/bin/sh",
                        "-c",
                        "echo init ran > /work/init-ran; echo init is done > /dev/termination-log",
                    ]),
                    vec![],
                    env(&service),
                    String::new(),
                )
            }
            "app" => {
                let mut e = vec![
                    ("GREETING", "hello from a pinned pod"),
                    ("MODE", "strict"),
                    ("LEVEL", "3"),
                ];
                e.extend(service);
                mounts.push(self.mount(
                    "/work",
                    "pods/uid-web/volumes/kubernetes.io~empty-dir/work",
                    false,
                ));
                mounts.push(self.mount(
                    "/etc/web",
                    &format!(
                        "pods/{}/volumes/kubernetes.io~configmap/config",
                        self.config_pod
                    ),
                    true,
                ));
                // The kubelet binds a subPath from its own directory (the test makes that bind).
                mounts.push(coffer_shim::cri::Mount {
                    container_path: "/etc/web-mode".into(),
                    host_path: self
                        .root
                        .join("pods/uid-web/volume-subpaths/config/app/2")
                        .display()
                        .to_string(),
                    readonly: true,
                    ..Default::default()
                });
                (
                    strings(&["/bin/sh", "-c"]),
                    strings(&[APP_SCRIPT]),
                    env(&e),
                    String::new(),
                )
            }
            _ => {
                mounts.push(self.mount(
                    "/work",
                    "pods/uid-web/volumes/kubernetes.io~empty-dir/work",
                    true,
                ));
                (
                    strings(&["/bin/sh", "-c", "exec sleep 120"]),
                    vec![],
                    env(&service),
                    "/tmp".to_string(),
                )
            }
        };
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command,
            args,
            working_dir,
            envs,
            mounts,
            log_path: format!("{name}-{attempt}.log"),
            linux: Some(LinuxContainerConfig::default()),
            ..Default::default()
        }
    }
}

#[test]
fn a_pod_policy_generated_from_its_deployment_runs_it_and_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let n = node(d, None);
    let reg = n.world.registry.addr.clone();
    let workload = d.join("web.yaml");
    std::fs::write(&workload, WORKLOAD.replace("REGISTRY", &reg)).unwrap();
    let (ok, out, err) = common::coffer(&[
        "policy",
        "generate",
        "-f",
        workload.to_str().unwrap(),
        "--kbs-url",
        &n.world.kbs.url,
        "--image-key",
        "kbs:///default/image-keys/app",
        "--plain-http",
        "--reference-values",
        d.join("refs.json").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // The Deployment's pod template now carries the runtime class and the initdata.
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect();
    assert_eq!(docs.len(), 2, "{out}");
    let template = &docs[1]["spec"]["template"];
    assert_eq!(template["spec"]["runtimeClassName"], "coffer");
    let annotation = template["metadata"]["annotations"][INITDATA]
        .as_str()
        .expect("the initdata annotation")
        .to_string();
    let initdata = coffer_shim::annotations::initdata(
        &[(INITDATA.to_string(), annotation.clone())]
            .into_iter()
            .collect(),
    )
    .unwrap()
    .unwrap();
    std::fs::write(d.join("web-initdata.toml"), &initdata).unwrap();
    // What --reference-values wrote is this initdata's digest; register it with the launch
    // measurement.
    let refs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("refs.json")).unwrap()).unwrap();
    let measured: serde_json::Value = serde_json::from_str(&common::run_ok(
        Command::new(common::coffer_bin())
            .args(["measure", "--sandbox", "process", "--initdata"])
            .arg(d.join("web-initdata.toml"))
            .arg("--agent")
            .arg(common::agent_binary())
            .arg("--psp-dir")
            .arg(&n.world.psp_dir),
    ))
    .unwrap();
    assert_eq!(refs["init_data"], measured["init_data"]);
    n.rt.block_on(
        n.world
            .kbs
            .admin
            .set_reference_values(measured.to_string().as_bytes()),
    )
    .unwrap();

    // After generation the tag moves to another image (the same busybox, unencrypted).
    let pinned = layers(&n.app);
    // Another image, which the node will ask for instead.
    let mut other = common::Layout::new(&d.join("other"));
    let desc = other.image(
        &[common::tar(&[("hello", "another image\n", 'f')])],
        "amd64",
        None,
    );
    other.tag(desc, "v1");
    common::skopeo_push(
        &format!("oci:{}:v1", d.join("other").display()),
        &format!("docker://{reg}/other:v1"),
        false,
    );
    common::skopeo_push(
        &format!("oci:{}:v1", d.join("plain").display()),
        &format!("docker://{reg}/app:v1"),
        false,
    );
    let moved = layers(&n.app);
    assert_ne!(pinned, moved);

    let mut kubelet = Kubelet {
        root: d.join("kubelet"),
        image: n.app.clone(),
        config_pod: "uid-web",
    };
    // The kubelet's copies of the ConfigMap volume and the projected service-account token.
    let config_dir = d.join("kubelet/pods/uid-web/volumes/kubernetes.io~configmap/config");
    kubelet_write(
        &config_dir,
        1,
        &[("GREETING", "hello from a pinned pod"), ("MODE", "strict")],
    );
    // The kubelet's subPath bind of the ConfigMap key MODE, as it makes it: the key's file in
    // the generation current at the container's start, bound onto a file of its own.
    let subpath = d.join("kubelet/pods/uid-web/volume-subpaths/config/app/2");
    std::fs::create_dir_all(subpath.parent().unwrap()).unwrap();
    std::fs::write(&subpath, "").unwrap();
    common::run_ok(
        Command::new("mount")
            .arg("--bind")
            .arg(config_dir.join("..2026_12_04_00_00_01.000000001/MODE"))
            .arg(&subpath),
    );
    let _unbind = Unmount(subpath.clone());
    kubelet_write(
        &d.join("kubelet/pods/uid-web/volumes/kubernetes.io~projected/kube-api-access-x7k2p"),
        1,
        &[
            ("token", "eyJ-a-service-account-token"),
            ("namespace", "default"),
        ],
    );
    let pod = n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let other_tag = format!("{reg}/other:v1");
        p.pull(&other_tag).await.unwrap();
        let mut sandbox = p.sandbox_config("web-5d8f7c9b4-x2x7z", &[(INITDATA, &annotation)]);
        // containerd runs a privileged container only in a privileged sandbox: the refusal
        // below must come from the policy.
        sandbox
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .privileged = true;
        let pod = p.run_pod(&sandbox).await.expect("RunPodSandbox");

        // The pod as the Deployment describes it runs: the init container, then both others.
        let init = p
            .create_config(&pod, &sandbox, kubelet.config("init", 0))
            .await
            .expect("the init container");
        p.start(&init).await.unwrap();
        assert_eq!(p.wait_exited(&init, Duration::from_secs(60)).await, 0);
        // Its termination message, written in the guest, is in the kubelet's file on the node.
        assert_eq!(
            std::fs::read_to_string(d.join("kubelet/pods/uid-web/containers/init/0.log")).unwrap(),
            "init is done\n"
        );
        let app = p
            .create_config(&pod, &sandbox, kubelet.config("app", 0))
            .await
            .expect("the app container");
        p.start(&app).await.unwrap();
        let sidecar = p
            .create_config(&pod, &sandbox, kubelet.config("sidecar", 0))
            .await
            .expect("the sidecar");
        p.start(&sidecar).await.unwrap();
        let log = p.log_dir.join("web-5d8f7c9b4-x2x7z/app-0.log");
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("hello from a pinned pod level 3 after init ran")
        {
            assert!(std::time::Instant::now() < until, "app's log: {log:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The ConfigMap volume, the token and the kubelet's /etc/hosts, copied into the sandbox
        // by the shim; an edit of
        // the ConfigMap (the kubelet's `..data` swap) reaches the container within 10 s.
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("mode strict token eyJ-a-service-account-token hosts 10.244.0.7 web-5d8f7c9b4-x2x7z sub strict")
        {
            assert!(
                std::time::Instant::now() < until,
                "app's log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        kubelet_write(&config_dir, 2, &[("GREETING", "hello from a pinned pod"), ("MODE", "relaxed")]);
        let edited = std::time::Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("mode relaxed token")
        {
            assert!(
                edited.elapsed() < Duration::from_secs(10),
                "the ConfigMap edit did not reach the container in 10 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A subPath keeps the file it was bound to, as with the kubelet and runc.
        let log_now = std::fs::read_to_string(&log).unwrap_or_default();
        let relaxed = log_now.lines().find(|l| l.contains("mode relaxed")).unwrap();
        assert!(relaxed.contains("sub strict"), "{relaxed}");

        // The readiness probe's exec is allowed; any other exec is refused, naming it.
        let probe = p
            .exec_sync(&app, &["/bin/sh", "-c", "test -d /proc/self"])
            .await
            .expect("the probe");
        assert_eq!(probe.exit_code, 0);
        let e = p.exec_sync(&app, &["/bin/cat", "/etc/passwd"]).await.unwrap_err();
        assert!(
            e.message().contains(
                "denied by policy: ExecProcessRequest: exec of [\"/bin/cat\", \"/etc/passwd\"] in container \"app\" is not allowed"
            ),
            "{e:?}"
        );

        // Each single change to a container is refused, naming the field.
        type Change = Box<dyn Fn(&mut coffer_shim::cri::ContainerConfig)>;
        let changes: Vec<(&str, Change, String)> = vec![
            (
                "app",
                Box::new(|c| c.args = vec!["echo evil; exec sleep 120".into()]),
                format!("args[2] is \"echo evil; exec sleep 120\", the policy allows {APP_SCRIPT:?}"),
            ),
            (
                "app",
                Box::new(|c| {
                    c.envs.push(coffer_shim::cri::KeyValue {
                        key: "LD_PRELOAD".into(),
                        value: "/tmp/evil.so".into(),
                    })
                }),
                "env LD_PRELOAD is not allowed by the policy".into(),
            ),
            (
                "app",
                {
                    let other_tag = other_tag.clone();
                    Box::new(move |c| c.image.as_mut().unwrap().image = other_tag.clone())
                },
                format!("image is \"docker://{other_tag}\", the policy allows {reg}/app:v1 (pinned to sha256:"),
            ),
            (
                "app",
                Box::new(|c| c.working_dir = "/etc".into()),
                "working_dir is \"/etc\", the policy allows \"/\"".into(),
            ),
            (
                "app",
                Box::new(|c| {
                    c.linux.as_mut().unwrap().security_context = Some(
                        coffer_shim::cri::LinuxContainerSecurityContext {
                            run_as_user: Some(coffer_shim::cri::Int64Value { value: 1234 }),
                            ..Default::default()
                        },
                    )
                }),
                "user uid is 1234, the policy allows 0".into(),
            ),
            (
                "app",
                {
                    let host = d.join("host-secrets");
                    std::fs::create_dir_all(&host).unwrap();
                    Box::new(move |c| {
                        c.mounts.push(coffer_shim::cri::Mount {
                            container_path: "/host".into(),
                            host_path: host.display().to_string(),
                            ..Default::default()
                        })
                    })
                },
                "mounts: /host (bind from".into(),
            ),
            (
                "app",
                Box::new(|c| {
                    c.linux.as_mut().unwrap().security_context = Some(
                        coffer_shim::cri::LinuxContainerSecurityContext {
                            privileged: true,
                            ..Default::default()
                        },
                    )
                }),
                "privileged is true, the policy allows false".into(),
            ),
            (
                "intruder",
                Box::new(|c| c.metadata.as_mut().unwrap().name = "intruder".into()),
                "container \"intruder\" is not in the policy, which allows [\"app\", \"init\", \"sidecar\"]".into(),
            ),
        ];
        for (attempt, (name, change, why)) in changes.into_iter().enumerate() {
            let mut config = kubelet.config(name, attempt as u32 + 1);
            change(&mut config);
            // containerd creates the task, and so the shim asks the agent, at StartContainer.
            let e = match p.create_config(&pod, &sandbox, config).await {
                Ok(id) => p.start(&id).await.expect_err(&why),
                Err(e) => e,
            };
            assert!(
                e.message()
                    .contains(&format!("denied by policy: CreateContainerRequest: {why}")),
                "expected {why:?}: {e:?}"
            );
        }

        // A volume whose file links out of it (to the node's own files): refused, naming it,
        // before anything reaches the guest.
        let evil = d.join("kubelet/pods/uid-evil/volumes/kubernetes.io~configmap/config");
        std::fs::create_dir_all(&evil).unwrap();
        std::fs::write(d.join("node-secret"), "the node's own file").unwrap();
        std::os::unix::fs::symlink(d.join("node-secret"), evil.join("MODE")).unwrap();
        kubelet.config_pod = "uid-evil";
        let config = kubelet.config("app", 40);
        let e = match p.create_config(&pod, &sandbox, config).await {
            Ok(id) => p.start(&id).await.expect_err("a volume linking out of itself"),
            Err(e) => e,
        };
        assert!(
            e.message().contains("configmap volume config: MODE is a link to")
                && e.message().contains("outside the volume"),
            "{e:?}"
        );
        kubelet.config_pod = "uid-web";

        // The guest pulled the pinned image: the moved tag's layers were never fetched.
        for l in &moved {
            assert_eq!(fetched_by(&n.world.registry, l), (0, 0), "moved layer {l}");
        }
        for l in &pinned {
            assert!(fetched_by(&n.world.registry, l).1 > 0, "pinned layer {l}");
        }
        p.remove_pod(&pod).await.unwrap();
        pod
    });
    assert_nothing_left(&n, &[&pod]);
}

#[test]
fn a_process_sandbox_pod_is_on_the_pod_network_the_cni_made() {
    // Everything of this test, the CNI bridge and the pods' addresses included, lives in a
    // network namespace of its own.
    let _netns = common::containerd::TestNetns::enter();
    let dir = tempfile::tempdir().unwrap();
    common::containerd::TestNetns::cni_config(&dir.path().join("node"), "10.88.7.0/24");
    let n = node(dir.path(), None);
    let pod = n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let mut config = p.sandbox_config("net", &[(INITDATA, &n.annotation)]);
        // The pod's own network (the CNI's), not the node's; the kubelet's DNS settings.
        p.on_pod_network(&mut config);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox with CNI");
        let (ip, _) = p.address(&pod).await;
        assert!(ip.starts_with("10.88.7."), "the pod's address: {ip:?}");

        // A web server in the pod, and a second container that fetches from it by the pod's
        // address: both are on the pod's network.
        p.start_container(
            &pod,
            &config,
            "web",
            &n.app,
            &[
                "/bin/sh",
                "-c",
                "mkdir -p /www && echo hello over the pod network > /www/index.html && cat /etc/resolv.conf && exec httpd -f -p 8080 -h /www",
            ],
        )
        .await
        .expect("the web server");
        let until = std::time::Instant::now() + Duration::from_secs(60);
        let page = common::http_get(&ip, 8080, until);
        assert!(page.contains("hello over the pod network"), "{page}");
        let fetch = format!(
            "for i in $(seq 1 50); do wget -q -O - http://{ip}:8080/ && exit 0; sleep 0.2; done; exit 1"
        );
        let client = p
            .start_container(&pod, &config, "client", &n.app, &["/bin/sh", "-c", &fetch])
            .await
            .unwrap();
        assert_eq!(p.wait_exited(&client, Duration::from_secs(60)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("net/client.log")).unwrap();
        assert!(log.contains("hello over the pod network"), "{log}");
        // The CRI's DNS settings are the containers' /etc/resolv.conf.
        let log = std::fs::read_to_string(p.log_dir.join("net/web.log")).unwrap();
        assert!(
            log.contains("nameserver 10.96.0.10") && log.contains("search default.svc.cluster.local"),
            "{log}"
        );
        p.remove_pod(&pod).await.expect("Stop/RemovePodSandbox");
        pod
    });
    assert_nothing_left(&n, &[&pod]);
    // The CNI's interface of the pod is gone with it.
    let links = common::run_ok(Command::new("ip").args(["-o", "link"]));
    assert!(!links.contains("veth"), "{links}");
}

/// Initdata with the default policy whose block volume at `/dev/xvda` is keyed by each `key`
/// (none: no block volume), as the pod annotation carries it; their reference values are what
/// the KBS then holds.
fn block_volume_initdata(
    n: &Node,
    d: &std::path::Path,
    podvm: &std::path::Path,
    keys: &[Option<&str>],
) -> Vec<String> {
    let mut refs: Option<serde_json::Value> = None;
    let mut annotations = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let volume = key.map(|k| format!("/dev/xvda={k}"));
        let mut args = vec![
            "initdata",
            "new",
            "--kbs-url",
            &n.world.kbs.url,
            "--image-key",
            "kbs:///default/image-keys/app",
        ];
        if let Some(v) = &volume {
            args.extend(["--block-volume", v.as_str()]);
        }
        let (ok, text, err) = common::coffer(&args);
        assert!(ok, "{err}");
        let file = d.join(format!("block-initdata-{i}.toml"));
        std::fs::write(&file, &text).unwrap();
        annotations.push(coffer_shim::annotations::encode_initdata(&text));
        let r: serde_json::Value = serde_json::from_str(&common::run_ok(
            Command::new(common::coffer_bin())
                .args(["measure", "--sandbox", "vm", "--podvm"])
                .arg(podvm)
                .arg("--initdata")
                .arg(&file),
        ))
        .unwrap();
        match &mut refs {
            None => refs = Some(r),
            Some(a) => {
                let more = r["init_data"].as_array().unwrap().clone();
                a["init_data"].as_array_mut().unwrap().extend(more);
            }
        }
    }
    n.rt.block_on(
        n.world
            .kbs
            .admin
            .set_reference_values(refs.unwrap().to_string().as_bytes()),
    )
    .unwrap();
    annotations
}

#[test]
fn an_encrypted_block_volume_keeps_its_data_across_pods_and_the_node_sees_only_ciphertext() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let podvm = d.join("podvm");
    common::build_podvm(&podvm);
    let n = node(d, Some(&podvm));
    // The volume: a blank 64 MiB file on a loop device, as a local block PV would be.
    let backing = d.join("pv.img");
    let lo = coffer_testkit::loopdev::LoopDevice::on_new_file(&backing, 64 << 20);
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .unwrap();
    n.rt.block_on(
        n.world
            .kbs
            .admin
            .set_resource("default/pv/data", key.to_vec()),
    )
    .unwrap();
    n.rt.block_on(
        n.world
            .kbs
            .admin
            .set_resource("default/pv/other", vec![9u8; 32]),
    )
    .unwrap();
    let annotations = block_volume_initdata(
        &n,
        d,
        &podvm,
        &[
            Some("kbs:///default/pv/data"),
            Some("kbs:///default/pv/other"),
            None,
        ],
    );
    let marker = "coffer-block-volume-marker-8c1f";
    // What the kubelet sends for `volumeDevices: [{name: data, devicePath: /dev/xvda}]`.
    let container =
        |name: &str, command: &str| shell_container(&n.app, name, command, Some(&lo.dev));
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        // The first pod formats the blank volume and writes the marker through it.
        let config = p.sandbox_config("writer", &[(INITDATA, &annotations[0])]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        let write = format!(
            "echo {marker} | dd of=/dev/xvda bs=4096 conv=sync,fsync && dd if=/dev/xvda bs=4096 count=1 | head -c 64"
        );
        let id = p
            .create_config(&pod, &config, container("writer", &write))
            .await
            .expect("CreateContainer with a block volume");
        p.start(&id).await.unwrap();
        assert_eq!(p.wait_exited(&id, Duration::from_secs(300)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("writer/writer.log")).unwrap();
        assert!(log.contains(marker), "{log}");
        p.remove_pod(&pod).await.unwrap();
    });
    assert_nothing_left(&n, &[]);
    // The node holds only ciphertext: a LUKS2 header, and the marker nowhere.
    let bytes = std::fs::read(&backing).unwrap();
    assert_eq!(&bytes[..6], b"LUKS\xba\xbe", "no LUKS header on the volume");
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker is in the backing file in plaintext"
    );
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        // A second pod with the same initdata reads it back.
        let config = p.sandbox_config("reader", &[(INITDATA, &annotations[0])]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        let id = p
            .create_config(
                &pod,
                &config,
                container("reader", "dd if=/dev/xvda bs=4096 count=1 | head -c 64"),
            )
            .await
            .expect("CreateContainer with the volume again");
        p.start(&id).await.unwrap();
        assert_eq!(p.wait_exited(&id, Duration::from_secs(300)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("reader/reader.log")).unwrap();
        assert!(log.contains(marker), "the second pod read {log}");
        p.remove_pod(&pod).await.unwrap();

        // A pod whose initdata keys the volume with another key is refused, naming it.
        let config = p.sandbox_config("stranger", &[(INITDATA, &annotations[1])]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        // (containerd creates the task, where the agent opens the volume, at StartContainer.)
        let id = p
            .create_config(
                &pod,
                &config,
                container("stranger", "dd if=/dev/xvda count=1"),
            )
            .await
            .unwrap();
        let e = p
            .start(&id)
            .await
            .expect_err("a volume opened with another key");
        assert!(
            e.message()
                .contains("does not open with the key kbs:///default/pv/other"),
            "{e:?}"
        );
        p.remove_pod(&pod).await.unwrap();

        // A pod whose initdata names no key for the device gets no plaintext volume.
        let config = p.sandbox_config("keyless", &[(INITDATA, &annotations[2])]);
        let pod = p.run_pod(&config).await.expect("RunPodSandbox");
        let id = p
            .create_config(
                &pod,
                &config,
                container("keyless", "dd if=/dev/xvda count=1"),
            )
            .await
            .unwrap();
        let e = p.start(&id).await.expect_err("a volume without a key");
        assert!(e.message().contains("names no key for it"), "{e:?}");
        p.remove_pod(&pod).await.unwrap();
    });
    assert_nothing_left(&n, &[]);
    let after = std::fs::read(&backing).unwrap();
    assert!(!after.windows(marker.len()).any(|w| w == marker.as_bytes()));
}

/// What a plain HTTP GET of `/` from the node (outside the mesh) gets from `ip:port`, however
/// the connection ends.
fn plaintext_get(ip: &str, port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((ip, port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).to_string()
}

/// A packet capture on the test's bridge (`tcpdump`), stopped when dropped.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(file: std::path::PathBuf) -> Self {
        let child = Command::new("tcpdump")
            .args(["-i", "cfr0", "-U", "-n", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        // tcpdump opens its file once it is capturing.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(
                std::time::Instant::now() < until,
                "tcpdump does not capture"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, file }
    }

    /// Stops the capture; the captured bytes.
    fn stop(mut self) -> Vec<u8> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pods_in_the_mesh_talk_only_through_attested_mutual_tls() {
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge("10.88.15.1/24");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::containerd::TestNetns::cni_config(&d.join("node"), "10.88.15.0/24");
    // Short-lived certificates, so that renewals happen while the test runs.
    let n = common::containerd::node_with(d, None, "10.88.15.1", |c| c.mesh_cert_ttl_secs = 12);
    let annotations = common::containerd::mesh_initdata(
        &n,
        d,
        &["web", "client", "intruder"],
        "10.88.15.0/24",
        &[8081],
        None,
    );
    let admin = &n.world.kbs.admin;
    // The operator's resource policy: everything to affirming TEEs, but no mesh certificate to
    // the intruder's identity.
    let policy = |denied: &str| {
        format!(
            "package policy\nimport rego.v1\ndefault allow := false\nallow if {{\n\tcount(input.submods) > 0\n\tevery _, a in input.submods {{\n\t\ta[\"ear.status\"] == \"affirming\"\n\t}}\n\tnot input.mesh.identity in {denied}\n}}\n"
        )
    };
    n.rt.block_on(
        admin.set_resource_policy(&policy("{\"spiffe://coffer.test/ns/default/sa/intruder\"}")),
    )
    .unwrap();
    let capture = Capture::start(d.join("bridge.pcap"));
    let marker = "coffer-mesh-marker-5d2e";
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let pod_with = |p: &Pods, name: &str, who: &str| {
            let mut c = p.sandbox_config(name, &[(INITDATA, &annotations[who])]);
            p.on_pod_network(&mut c);
            c
        };
        // The server: a page on 8080 (meshed), a probe page on 8081 (open), an echo on 9000.
        let web = pod_with(&p, "web", "web");
        let web_pod = p.run_pod(&web).await.expect("RunPodSandbox");
        let (ip, _) = p.address(&web_pod).await;
        let serve = format!(
            "mkdir -p /www /probe && echo {marker} > /www/index.html && echo probe-ok > /probe/index.html && httpd -p 8081 -h /probe && exec httpd -f -p {ip}:8080 -h /www"
        );
        p.start_container(&web_pod, &web, "web", &n.app, &["/bin/sh", "-c", &serve])
            .await
            .expect("a container of a mesh pod");
        let echo_server = ["/bin/sh", "-c", "nc -l -p 9000 -e /bin/busybox head -n 20"];
        p.start_container(&web_pod, &web, "echo", &n.app, &echo_server)
            .await
            .unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(60);
        // The node (outside the mesh) gets the open probe port, and nothing from a mesh port.
        let probe = common::http_get(&ip, 8081, until);
        assert!(probe.contains("probe-ok"), "{probe}");
        let plain = plaintext_get(&ip, 8080);
        assert!(!plain.contains(marker), "plaintext from the node was served: {plain}");

        // A mesh pod fetches the page; a long connection (20 lines, one a second) outlives
        // the certificates it was made with.
        let client = pod_with(&p, "client", "client");
        let client_pod = p.run_pod(&client).await.expect("RunPodSandbox");
        let fetch = format!(
            "for i in $(seq 1 50); do wget -q -O - http://{ip}:8080/ && exit 0; sleep 0.2; done; exit 1"
        );
        let id = p
            .start_container(&client_pod, &client, "fetch", &n.app, &["/bin/sh", "-c", &fetch])
            .await
            .unwrap();
        assert_eq!(p.wait_exited(&id, Duration::from_secs(60)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("client/fetch.log")).unwrap();
        assert!(log.contains(marker), "{log}");
        let before: Vec<String> = admin
            .mesh_certificates()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.serial)
            .collect();
        let echo = format!("(for i in $(seq 1 20); do echo tick-$i; sleep 1; done) | nc {ip} 9000");
        let id = p
            .start_container(&client_pod, &client, "long", &n.app, &["/bin/sh", "-c", &echo])
            .await
            .unwrap();
        assert_eq!(p.wait_exited(&id, Duration::from_secs(90)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("client/long.log")).unwrap();
        let agent_logs = |pod: &str| {
            std::fs::read_to_string(
                n.containerd
                    .dir
                    .join("node/run/coffer/pods")
                    .join(coffer_shim::sandbox::name_for(pod))
                    .join("agent.log"),
            )
            .unwrap_or_default()
        };
        assert!(
            log.contains("tick-20"),
            "the long connection broke: {log}\nserver: {}\nserver agent: {}\nclient agent: {}",
            std::fs::read_to_string(p.log_dir.join("web/echo.log")).unwrap_or_default(),
            agent_logs(&web_pod),
            agent_logs(&client_pod)
        );
        let issued = admin.mesh_certificates().await.unwrap();
        let renewed: Vec<_> = issued
            .iter()
            .filter(|c| !before.contains(&c.serial))
            .map(|c| c.identity.clone())
            .collect();
        assert!(
            renewed.iter().any(|i| i.ends_with("/sa/web")) && renewed.iter().any(|i| i.ends_with("/sa/client")),
            "no renewal during the connection: {issued:#?}"
        );

        // A pod outside the mesh cannot reach the mesh port's service.
        let plain_pod_config = pod_with(&p, "plain", "plain");
        let plain_pod = p.run_pod(&plain_pod_config).await.unwrap();
        let id = p
            .start_container(
                &plain_pod,
                &plain_pod_config,
                "fetch",
                &n.app,
                &["/bin/sh", "-c", &format!("wget -q -T 5 -O - http://{ip}:8080/")],
            )
            .await
            .unwrap();
        assert_ne!(p.wait_exited(&id, Duration::from_secs(60)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("plain/fetch.log")).unwrap();
        assert!(!log.contains(marker), "{log}");

        // The intruder's attestation passes, but the policy gives it no certificate: its
        // containers do not start, and the reason says why.
        let intruder = pod_with(&p, "intruder", "intruder");
        let intruder_pod = p.run_pod(&intruder).await.unwrap();
        let e = p
            .start_container(&intruder_pod, &intruder, "fetch", &n.app, &["/bin/sh", "-c", &fetch])
            .await
            .expect_err("a pod without a mesh certificate");
        assert!(
            e.message().contains("denies a mesh certificate to spiffe://coffer.test/ns/default/sa/intruder"),
            "{e:?}"
        );

        // Revoked: the policy now denies the client; once its certificate has expired, new
        // connections fail.
        n.world
            .kbs
            .admin
            .set_resource_policy(&policy("{\"spiffe://coffer.test/ns/default/sa/client\"}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(13)).await;
        let id = p
            .start_container(
                &client_pod,
                &client,
                "revoked",
                &n.app,
                &["/bin/sh", "-c", &format!("wget -q -T 5 -O - http://{ip}:8080/")],
            )
            .await
            .unwrap();
        assert_ne!(p.wait_exited(&id, Duration::from_secs(60)).await, 0);
        for pod in [&web_pod, &client_pod, &plain_pod, &intruder_pod] {
            p.remove_pod(pod).await.unwrap();
        }
    });
    // What crossed the bridge: TLS records, never the page.
    let bytes = capture.stop();
    assert!(bytes.len() > 1000, "nothing captured");
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the page crossed the bridge in plaintext"
    );
    assert!(
        bytes.windows(3).any(|w| w == [0x17, 0x03, 0x03]),
        "no TLS application data records on the bridge"
    );
}

#[test]
fn pod_vms_and_process_sandbox_pods_talk_through_the_mesh_every_way() {
    // The pod VM is built first: its packages may have to be downloaded, which the test's
    // namespace cannot reach.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let podvm = d.join("podvm");
    common::build_podvm(&podvm);
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge("10.88.17.1/24");
    common::containerd::TestNetns::cni_config(&d.join("node"), "10.88.17.0/24");
    let n = common::containerd::node_at(d, Some(&podvm), "10.88.17.1");
    // A second containerd on the same bridge, pool and KBS (one mesh CA) runs process
    // sandboxes (one containerd configuration runs one sandbox kind).
    let pn_dir = d.join("process-node");
    std::fs::create_dir_all(&pn_dir).unwrap();
    common::containerd::TestNetns::cni_config_with(
        &pn_dir.join("node"),
        "10.88.17.0/24",
        &d.join("node/var/lib/cni"),
    );
    let pcd = common::containerd::Containerd::start(
        &pn_dir,
        &common::containerd::ShimSetup {
            sandbox: "process",
            podvm: None,
            psp_dir: &n.world.psp_dir,
            registry: &n.world.registry.addr,
            cloud: None,
            peer_pods: false,
        },
    );
    let vm_annotations = common::containerd::mesh_initdata(
        &n,
        d,
        &["vm-web", "vm-client"],
        "10.88.17.0/24",
        &[],
        Some(&podvm),
    );
    let p_annotations =
        common::containerd::mesh_initdata(&n, &pn_dir, &["proc-web"], "10.88.17.0/24", &[], None);
    let capture = Capture::start(d.join("bridge.pcap"));
    let (vm_marker, proc_marker) = ("coffer-vm-page-31c7", "coffer-process-page-8a0e");
    let serve = |m: &str| {
        format!("mkdir -p /www && echo {m} > /www/index.html && exec httpd -f -p 8080 -h /www")
    };
    let fetch = |ip: &str| {
        format!(
            "for i in $(seq 1 100); do wget -q -O - http://{ip}:8080/ && exit 0; sleep 0.3; done; exit 1"
        )
    };
    n.rt.block_on(async {
        let mut v = Pods::new(&n.containerd).await;
        v.pull(&n.app).await.unwrap();
        let mut vc = v.sandbox_config("vm-web", &[(INITDATA, &vm_annotations["vm-web"])]);
        v.on_pod_network(&mut vc);
        let vm_pod = v.run_pod(&vc).await.expect("RunPodSandbox (pod VM)");
        let (vm_ip, _) = v.address(&vm_pod).await;
        v.start_container(
            &vm_pod,
            &vc,
            "web",
            &n.app,
            &["/bin/sh", "-c", &serve(vm_marker)],
        )
        .await
        .expect("a mesh container in a pod VM");

        let mut q = Pods::new(&pcd).await;
        q.pull(&n.app).await.unwrap();
        let mut pc = q.sandbox_config("proc-web", &[(INITDATA, &p_annotations["proc-web"])]);
        q.on_pod_network(&mut pc);
        let p_pod = q
            .run_pod(&pc)
            .await
            .expect("RunPodSandbox (process sandbox)");
        let (p_ip, _) = q.address(&p_pod).await;
        q.start_container(
            &p_pod,
            &pc,
            "web",
            &n.app,
            &["/bin/sh", "-c", &serve(proc_marker)],
        )
        .await
        .unwrap();
        // Process sandbox → pod VM, and pod VM → process sandbox.
        let to_vm = q
            .start_container(
                &p_pod,
                &pc,
                "client",
                &n.app,
                &["/bin/sh", "-c", &fetch(&vm_ip)],
            )
            .await
            .unwrap();
        assert_eq!(q.wait_exited(&to_vm, Duration::from_secs(120)).await, 0);
        let log = std::fs::read_to_string(q.log_dir.join("proc-web/client.log")).unwrap();
        assert!(log.contains(vm_marker), "{log}");
        let to_p = v
            .start_container(
                &vm_pod,
                &vc,
                "client",
                &n.app,
                &["/bin/sh", "-c", &fetch(&p_ip)],
            )
            .await
            .unwrap();
        assert_eq!(v.wait_exited(&to_p, Duration::from_secs(120)).await, 0);
        let log = std::fs::read_to_string(v.log_dir.join("vm-web/client.log")).unwrap();
        assert!(log.contains(proc_marker), "{log}");
        // The node's plaintext to the pod VM's server gets nothing.
        let plain = plaintext_get(&vm_ip, 8080);
        assert!(!plain.contains(vm_marker), "{plain}");
        // Pod VM → pod VM.
        let mut vc2 = v.sandbox_config("vm-client", &[(INITDATA, &vm_annotations["vm-client"])]);
        v.on_pod_network(&mut vc2);
        let vm2 = v
            .run_pod(&vc2)
            .await
            .expect("RunPodSandbox (second pod VM)");
        let id = v
            .start_container(
                &vm2,
                &vc2,
                "client",
                &n.app,
                &["/bin/sh", "-c", &fetch(&vm_ip)],
            )
            .await
            .unwrap();
        assert_eq!(v.wait_exited(&id, Duration::from_secs(120)).await, 0);
        let log = std::fs::read_to_string(v.log_dir.join("vm-client/client.log")).unwrap();
        assert!(log.contains(vm_marker), "{log}");
        v.remove_pod(&vm2).await.unwrap();
        q.remove_pod(&p_pod).await.unwrap();
        v.remove_pod(&vm_pod).await.unwrap();
    });
    let bytes = capture.stop();
    for m in [vm_marker, proc_marker] {
        assert!(
            !bytes.windows(m.len()).any(|w| w == m.as_bytes()),
            "{m} crossed the bridge in plaintext"
        );
    }
    assert!(bytes.windows(3).any(|w| w == [0x17, 0x03, 0x03]));
}

#[test]
fn a_peer_pod_runs_through_the_cri_at_its_pod_address() {
    // A node with the RuntimeClass handler `coffer-remote` (`coffer install containerd
    // --peer-pods`) beside `coffer` (process sandboxes here): the peer pod's VM is made by
    // coffer-cloud through Debian's libvirtd (TCG, emulated TEE), both started by the test in its
    // own network namespace. The pod keeps the address the CNI gave it on the node (carried to
    // the VM over VXLAN); the node and a process-sandbox pod of the same node reach its web
    // server there; removing the pod removes the VM.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let podvm = d.join("podvm");
    common::build_podvm(&podvm);
    let _netns = common::containerd::TestNetns::enter();
    common::containerd::TestNetns::bridge("10.88.17.1/24");
    common::containerd::TestNetns::bridge_named("cfrpp2", "10.99.9.1/24");
    common::containerd::TestNetns::cni_config(&d.join("node"), "10.88.17.0/24");
    let libvirtd = common::libvirt::Libvirtd::start(&d.join("libvirt"));
    let cloud_dir = d.join("cloud");
    std::fs::create_dir_all(&cloud_dir).unwrap();
    let cloud = common::libvirt::Cloud::start(
        &cloud_dir,
        &libvirtd,
        &podvm,
        "cfrpp2",
        // One VM address (10.99.9.2) beside the gateway: a second peer pod finds no capacity.
        "10.99.9.0/30",
        "10.99.9.1",
    );
    let n = common::containerd::node_remote(d, &podvm, &cloud.socket, "10.88.17.1");
    n.rt.block_on(async {
        let mut p = Pods::new(&n.containerd).await;
        p.pull(&n.app).await.unwrap();
        let mut config = p.sandbox_config("peer-pod", &[(INITDATA, &n.annotation)]);
        p.on_pod_network(&mut config);
        let pod = p
            .run_pod_with(&config, "coffer-remote")
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RunPodSandbox (peer pod): {e}\ncoffer-cloud: {}",
                    cloud.log()
                )
            });
        let (ip, _) = p.address(&pod).await;
        assert!(ip.starts_with("10.88.17."), "the pod's address: {ip:?}");
        let domains = libvirtd.virsh(&["list", "--name"]);
        assert!(domains.contains("coffer-node-1-"), "{domains}");
        // No capacity left for a second peer pod: the CRI's error, which the kubelet records in
        // the pod's events (`kubectl describe pod`), names the provider, the instance type and
        // why; no VM is made for it.
        let mut second = p.sandbox_config("peer-pod-2", &[(INITDATA, &n.annotation)]);
        p.on_pod_network(&mut second);
        let e = p
            .run_pod_with(&second, "coffer-remote")
            .await
            .expect_err("no address is left for a second VM");
        assert!(
            format!("{e:#}")
                .contains("libvirt: no small now: no free address left in subnet 10.99.9.0/30"),
            "{e:#}"
        );
        assert_eq!(
            libvirtd.domains().len(),
            1
        );
        p.start_container(
            &pod,
            &config,
            "web",
            &n.app,
            &[
                "/bin/sh",
                "-c",
                "mkdir -p /www && echo hello from the peer pod > /www/index.html && exec httpd -f -p 8080 -h /www",
            ],
        )
        .await
        .expect("CreateContainer + StartContainer in the peer pod");
        let until = std::time::Instant::now() + Duration::from_secs(120);
        let page = common::http_get(&ip, 8080, until);
        assert!(page.contains("hello from the peer pod"), "{page}");
        // The guest pulled its image over the pod network: the registry saw the pod's address.
        let gets = n.world.registry.blob_gets();
        assert!(
            gets.iter().any(|l| l.starts_with(&format!("{ip} "))),
            "no blob request from {ip}: {gets:#?}"
        );
        // A pod of the node's other handler (a process sandbox) fetches it too.
        let mut pc = p.sandbox_config("process-pod", &[(INITDATA, &n.annotation)]);
        p.on_pod_network(&mut pc);
        let ppod = p.run_pod(&pc).await.expect("RunPodSandbox (process sandbox)");
        let fetch = format!(
            "for i in $(seq 1 100); do wget -q -O - http://{ip}:8080/ && exit 0; sleep 0.2; done; exit 1"
        );
        let client = p
            .start_container(&ppod, &pc, "client", &n.app, &["/bin/sh", "-c", &fetch])
            .await
            .unwrap();
        assert_eq!(p.wait_exited(&client, Duration::from_secs(60)).await, 0);
        let log = std::fs::read_to_string(p.log_dir.join("process-pod/client.log")).unwrap();
        assert!(log.contains("hello from the peer pod"), "{log}");
        p.remove_pod(&ppod).await.unwrap();
        p.remove_pod(&pod).await.unwrap();
    });
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !libvirtd.domains().is_empty() {
        assert!(
            std::time::Instant::now() < until,
            "the peer pod's VM is still there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cloud.log().contains("VM deleted"), "{}", cloud.log());
}
