//! `cargo bench -p coffer-policy --bench generate [-- RUNS]`: prints
//! - the time `generate` takes for 50 documents (Deployments, StatefulSets, Jobs, CronJobs,
//!   Pods, ConfigMaps, Secrets, Services; images from an offline file: no registry), median and
//!   p99 over RUNS runs (default 30);
//! - for one pod of 20 containers: the policy's size, the initdata's, and the annotation's
//!   (base64 of gzip), against Kubernetes' 256 KiB limit on all of a pod's annotations together.

use std::time::{Duration, Instant};

use coffer_policy::{generate, OfflineImages, Options, ResolvedImage};
use serde_json::json;

fn images() -> OfflineImages {
    let mut images = OfflineImages::default();
    for i in 0..10 {
        images.insert(
            &format!("registry.example:5000/team/app{i}:v{i}"),
            ResolvedImage {
                digest: format!("sha256:{:064x}", i + 1),
                config: json!({
                    "Entrypoint": ["/usr/local/bin/entry"],
                    "Cmd": ["serve", "--config", "/etc/app/config.yaml"],
                    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", format!("APP_VERSION={i}"), "LANG=C.UTF-8"],
                    "WorkingDir": "/srv",
                    "User": "1000",
                }),
            },
        );
    }
    images
}

/// A container of a realistic size: env from a ConfigMap and a Secret, probes, mounts.
fn container(name: &str, image: usize) -> serde_json::Value {
    json!({
        "name": name,
        "image": format!("registry.example:5000/team/app{image}:v{image}"),
        "args": ["--listen=:8080", "--log-level=$(LOG_LEVEL)"],
        "envFrom": [{"configMapRef": {"name": "settings"}}],
        "env": [
            {"name": "LOG_LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "REGION", "value": "eu-west-1"},
        ],
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app", "readOnly": true},
            {"name": "scratch", "mountPath": "/tmp"},
        ],
        "readinessProbe": {"exec": {"command": ["/usr/local/bin/entry", "health"]}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
        "securityContext": {"runAsUser": 1000, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
    })
}

fn pod_spec(containers: usize, seed: usize) -> serde_json::Value {
    json!({
        "containers": (0..containers).map(|c| container(&format!("c{c}"), (seed + c) % 10)).collect::<Vec<_>>(),
        "volumes": [{"name": "config", "configMap": {"name": "settings"}}, {"name": "scratch", "emptyDir": {}}],
    })
}

fn template(containers: usize, seed: usize) -> serde_json::Value {
    json!({"metadata": {"labels": {"app": "x"}}, "spec": pod_spec(containers, seed)})
}

fn fifty_documents() -> String {
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
               "data": {"level": "info", "FEATURE_A": "on", "FEATURE_B": "off"}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
               "stringData": {"password": "hunter2"}}),
    ];
    for i in 0..48 {
        let name = format!("w{i}");
        docs.push(match i % 6 {
            0 => json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                        "spec": {"selector": {"matchLabels": {"app": "x"}}, "template": template(3, i)}}),
            1 => json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
                        "spec": {"serviceName": name, "selector": {"matchLabels": {"app": "x"}}, "template": template(2, i)}}),
            2 => json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                        "spec": {"template": template(1, i)}}),
            3 => json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name},
                        "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template(1, i)}}}}),
            4 => json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec(2, i)}),
            _ => json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                        "spec": {"ports": [{"port": 80}]}}),
        });
    }
    docs.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn opts() -> Options {
    Options {
        kbs_url: "https://kbs.example:8080".into(),
        image_keys: vec!["kbs:///default/image-key/app".into()],
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let images = images();
    let opts = opts();

    let yaml = fifty_documents();
    let mut times = Vec::with_capacity(runs);
    let mut pods = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let g = rt
            .block_on(generate(std::slice::from_ref(&yaml), &images, &opts))
            .expect("generates");
        times.push(start.elapsed());
        pods = g.pods.len();
    }
    times.sort();
    println!(
        "generate, 50 documents ({pods} workloads), {runs} runs: median {:.1} ms, p99 {:.1} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
    );

    let big = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big"}, "spec": pod_spec(20, 0)});
    let docs = [format!(
        "{big}\n---\n{}",
        fifty_documents()
            .split("\n---\n")
            .take(2)
            .collect::<Vec<_>>()
            .join("\n---\n")
    )];
    let g = rt
        .block_on(generate(&docs, &images, &opts))
        .expect("generates");
    let p = &g.pods[0];
    let annotation = coffer_wire::initdata::encode_annotation(&p.initdata);
    const LIMIT: usize = 256 << 10;
    println!(
        "pod of 20 containers: policy {} bytes (rules {} + data {}), initdata {} bytes, annotation (base64 of gzip) {} bytes = {:.1}% of the 256 KiB annotation limit",
        p.policy.len(),
        coffer_policy::RULES.len(),
        p.policy.len() - coffer_policy::RULES.len(),
        p.initdata.len(),
        annotation.len(),
        annotation.len() as f64 * 100.0 / LIMIT as f64,
    );
    println!(
        "the agent's limit on the policy text itself: {} bytes ({:.1}% used)",
        coffer_wire::rego::MAX_BYTES,
        p.policy.len() as f64 * 100.0 / coffer_wire::rego::MAX_BYTES as f64
    );
}
