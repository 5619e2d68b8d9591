//! The agent's policy decision on CreateContainer for a pod of 20 containers, with the policy
//! `coffer policy generate` writes for it: the time per decision (what the agent does per
//! request: clone the prepared engine, set the input, evaluate; a denial also evaluates its
//! reason), and the policy's and initdata's sizes against Kubernetes' 256 KiB limit on a
//! pod's annotations.
//!
//! `cargo bench -p coffer-agent --bench policy [-- DECISIONS]` (default 2000).

use std::{sync::Arc, time::Instant};

use coffer_agent::policy::{AgentPolicy, Audit};
use coffer_policy::{OfflineImages, Options, ResolvedImage};
use serde_json::{json, Value};

/// Decisions are not recorded: the sink's cost is not the policy's.
struct Discard;

impl Audit for Discard {
    fn record(&self, _: Value) {}
}

const CONTAINERS: usize = 20;
const REGISTRY: &str = "registry.example:5000";
const DIGEST: &str = "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270";

/// A Deployment of 20 containers, each with its command, three variables of its own, a
/// ConfigMap's two, two volumes and an exec readiness probe.
fn workload() -> String {
    let mut containers = String::new();
    for i in 0..CONTAINERS {
        containers.push_str(&format!(
            r#"      - name: c{i}
        image: {REGISTRY}/app:v1
        command: ["/app/server", "--port", "{port}", "--id", "c{i}"]
        env:
        - {{name: LEVEL, value: "{i}"}}
        - {{name: URL, value: "https://svc-{i}.example/api"}}
        - {{name: TOKEN, valueFrom: {{secretKeyRef: {{name: tokens, key: t{i}}}}}}}
        envFrom:
        - configMapRef: {{name: shared}}
        volumeMounts:
        - {{name: work, mountPath: /work/c{i}}}
        - {{name: config, mountPath: /etc/app, readOnly: true}}
        readinessProbe:
          exec:
            command: ["/app/health", "--id", "c{i}"]
"#,
            port = 8000 + i
        ));
    }
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: shared}}
data: {{MODE: strict, REGION: eu-west}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: big, namespace: default}}
spec:
  selector: {{matchLabels: {{app: big}}}}
  template:
    metadata: {{labels: {{app: big}}}}
    spec:
      containers:
{containers}      volumes:
      - {{name: work, emptyDir: {{}}}}
      - {{name: config, configMap: {{name: shared}}}}
"#
    )
}

/// The policy input of container `i`'s CreateContainer as the agent builds it from what the
/// shim sends for the kubelet's request.
fn input(i: usize) -> Value {
    let pod = "/var/lib/kubelet/pods/0b8e5a36-5b59-4b5f-9b0e-6a1f7c1d2e3f";
    json!({
        "container_id": format!("{:064x}", i + 1),
        "image": format!("docker://{REGISTRY}/app:v1"),
        "args": ["/app/server", "--port", (8000 + i).to_string(), "--id", format!("c{i}")],
        "env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME=big-5d8f7c9b4-x2x7z",
            "MODE=strict", "REGION=eu-west",
            format!("LEVEL={i}"), format!("URL=https://svc-{i}.example/api"), "TOKEN=s3cr3t",
            "KUBERNETES_SERVICE_HOST=10.96.0.1", "KUBERNETES_SERVICE_PORT=443",
            "KUBERNETES_SERVICE_PORT_HTTPS=443", "KUBERNETES_PORT=tcp://10.96.0.1:443",
            "KUBERNETES_PORT_443_TCP=tcp://10.96.0.1:443", "KUBERNETES_PORT_443_TCP_PROTO=tcp",
            "KUBERNETES_PORT_443_TCP_PORT=443", "KUBERNETES_PORT_443_TCP_ADDR=10.96.0.1",
        ],
        "working_dir": "/",
        "read_only_rootfs": false, "tty": false, "stdin": false, "memory_limit_bytes": 0,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": format!("{pod}/etc-hosts"), "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/dev/termination-log", "type": "bind", "source": format!("{pod}/containers/c{i}/1a2b3c4d"), "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/hostname", "type": "bind", "source": "/var/lib/containerd/sandboxes/x/hostname", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/var/lib/containerd/sandboxes/x/resolv.conf", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/sandboxes/x/shm", "options": ["rbind", "rprivate", "rw"]},
            {"destination": format!("/work/c{i}"), "type": "bind", "source": format!("{pod}/volumes/kubernetes.io~empty-dir/work"), "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/app", "type": "bind", "source": format!("{pod}/volumes/kubernetes.io~configmap/config"), "options": ["rbind", "rprivate", "ro"]},
            {"destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind", "source": format!("{pod}/volumes/kubernetes.io~projected/kube-api-access-x7k2p"), "options": ["rbind", "rprivate", "ro"]},
        ],
        "user": {"uid": 0, "gid": 0, "additional_gids": [0]},
        "capabilities": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
            "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"],
        "privileged": false,
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": format!("c{i}"),
            "io.kubernetes.cri.sandbox-name": "big-5d8f7c9b4-x2x7z",
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.image-name": format!("{REGISTRY}/app:v1"),
        },
        "image_ref": {"registry": REGISTRY, "repository": "app", "tag": "v1", "digest": null},
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    // As the agent runs.
    coffer_agent::policy::quiet_library_backtraces();
    let decisions: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let mut images = OfflineImages::default();
    images.insert(
        &format!("{REGISTRY}/app:v1"),
        ResolvedImage {
            digest: DIGEST.into(),
            config: json!({"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
        },
    );
    let opts = Options {
        kbs_url: "https://kbs.example:8080".into(),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let generated = rt
        .block_on(coffer_policy::generate(&[workload()], &images, &opts))
        .expect("the generator");
    let pod = &generated.pods[0];
    if let Ok(path) = std::env::var("COFFER_BENCH_WRITE_POLICY") {
        std::fs::write(&path, &pod.policy).unwrap();
        std::fs::write(format!("{path}.input.json"), input(7).to_string()).unwrap();
    }
    let annotation = coffer_wire::initdata::encode_annotation(&pod.initdata);
    println!(
        "policy for {CONTAINERS} containers: {} bytes; initdata {} bytes; annotation (gzip, base64) {} bytes = {:.1}% of the 256 KiB a pod's annotations may take",
        pod.policy.len(),
        pod.initdata.len(),
        annotation.len(),
        annotation.len() as f64 * 100.0 / (256.0 * 1024.0)
    );

    let t = Instant::now();
    let policy = AgentPolicy::new(Some(&pod.policy), Arc::new(Discard)).expect("the policy");
    println!(
        "compile (agent start): {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let inputs: Vec<Value> = (0..CONTAINERS).map(input).collect();
    for i in &inputs {
        let pinned = policy
            .check_then("CreateContainerRequest", i, Some("pull_image"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            pinned.as_deref(),
            Some(format!("docker://{REGISTRY}/app@{DIGEST}").as_str())
        );
    }
    let mut denied = inputs[7].clone();
    denied["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("LD_PRELOAD=/tmp/x.so"));
    assert!(policy.check("CreateContainerRequest", &denied).is_err());

    for (what, input) in [
        ("allowed", None),
        ("denied (with its reason)", Some(&denied)),
    ] {
        let mut ms = Vec::with_capacity(decisions);
        for n in 0..decisions {
            let i = input.unwrap_or(&inputs[n % CONTAINERS]);
            let t = Instant::now();
            let r = policy.check_then("CreateContainerRequest", i, Some("pull_image"));
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(r.is_ok(), input.is_none());
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "CreateContainer decision, {what}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({decisions} decisions)",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99),
            ms[ms.len() - 1]
        );
    }
}
