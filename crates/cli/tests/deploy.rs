//! The Kubernetes manifests in `deploy/`: they parse, fit together (names, selectors, the
//! runtime handler containerd is configured with), and the example pod's initdata annotation is
//! one the shim accepts.

use std::path::Path;

use serde_yaml_ng::Value;

/// Every YAML document of `deploy/FILE`.
fn docs(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The containerd configuration `coffer install containerd --print-config` writes for a node of
/// process sandboxes (emulated TEE), with `extra` arguments.
fn print_config(extra: &[&str]) -> toml::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args([
            "install",
            "containerd",
            "--print-config",
            "--sandbox",
            "process",
            "--emulated-tee",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

#[test]
fn the_runtime_class_names_the_handler_coffer_install_configures() {
    let rc = docs("runtimeclass.yaml");
    let rc = kind(&rc, "RuntimeClass");
    assert_eq!(s(&rc["metadata"]["name"]), "coffer");
    assert_eq!(s(&rc["handler"]), "coffer");
    let node_label = &rc["scheduling"]["nodeSelector"];

    let config = print_config(&[]);
    assert!(
        config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
            .get(s(&rc["handler"]))
            .is_some()
    );

    // The installer runs on the nodes the RuntimeClass schedules to.
    let installer = docs("node-installer.yaml");
    let ds = kind(&installer, "DaemonSet");
    assert_eq!(&ds["spec"]["template"]["spec"]["nodeSelector"], node_label);
    let script =
        serde_yaml_ng::to_string(&ds["spec"]["template"]["spec"]["initContainers"]).unwrap();
    assert!(script.contains("coffer install containerd"), "{script}");
    assert!(script.contains("containerd-shim-coffer-v2"), "{script}");
    let snap = serde_yaml_ng::to_string(&ds["spec"]["template"]["spec"]["containers"]).unwrap();
    assert!(snap.contains("/run/coffer/snapshotter.sock"), "{snap}");
}

#[test]
fn coffer_cloud_runs_its_configuration_beside_the_keepers_it_serves() {
    let d = docs("peer-pods.yaml");
    // The RuntimeClass names the handler `coffer install containerd --peer-pods` configures.
    let rc = kind(&d, "RuntimeClass");
    assert_eq!(s(&rc["handler"]), "coffer-remote");
    let config = print_config(&["--peer-pods"]);
    let runtimes = &config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert_eq!(
        runtimes["coffer-remote"]["runtime_type"].as_str(),
        Some("io.containerd.coffer-remote.v2")
    );
    assert!(runtimes.get("coffer").is_some());
    let cm = kind(&d, "ConfigMap");
    // The shipped configuration is one coffer-cloud accepts.
    let text = s(&cm["data"]["cloud.toml"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.toml");
    std::fs::write(&path, text).unwrap();
    let c = coffer_cloud::Config::load(&path).unwrap();
    assert_eq!(c.provider, "libvirt");
    let ds = kind(&d, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    // A keeper's lock shows in /proc/locks only in the host's PID namespace.
    assert_eq!(spec["hostPID"], Value::Bool(true));
    // Its host name, the default node name its VMs are tagged with, is the node's.
    assert_eq!(spec["hostNetwork"], Value::Bool(true));
    let c = serde_yaml_ng::to_string(&spec["containers"][0]).unwrap();
    assert!(c.contains("/run/coffer/cloud.sock"), "{c}");
    assert!(c.contains("mountPath: /run/coffer"), "{c}");
    let containerfile = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/Containerfile"),
    )
    .unwrap();
    assert!(containerfile.contains("target/release/coffer-cloud"));
}

#[test]
fn each_kbs_variant_has_a_service_selecting_its_pods() {
    for (file, replicas) in [("kbs.yaml", 1), ("kbs-postgres.yaml", 2)] {
        let d = docs(file);
        let dep = kind(&d, "Deployment");
        let svc = kind(&d, "Service");
        assert_eq!(dep["spec"]["replicas"].as_i64(), Some(replicas), "{file}");
        let labels = &dep["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
            assert_eq!(&labels[s(k)], v, "{file}: the Service selects {k:?}");
        }
        let args =
            serde_yaml_ng::to_string(&dep["spec"]["template"]["spec"]["containers"][0]).unwrap();
        assert!(args.contains("coffer-kbs"), "{file}");
        assert!(
            !args.contains("allow-emulated") && !args.contains("insecure-http"),
            "{file}: a deployed KBS accepts neither the emulated TEE nor plain HTTP by default"
        );
    }
    let pg = docs("kbs-postgres.yaml");
    let env = serde_yaml_ng::to_string(&kind(&pg, "Deployment")["spec"]["template"]).unwrap();
    assert!(
        env.contains("COFFER_KBS_DATABASE_URL") && env.contains("secretKeyRef"),
        "{env}"
    );
}

#[test]
fn the_example_pod_carries_initdata_the_shim_accepts() {
    let d = docs("example-pod.yaml");
    let pod = kind(&d, "Pod");
    assert_eq!(s(&pod["spec"]["runtimeClassName"]), "coffer");
    let annotations: std::collections::BTreeMap<String, String> =
        serde_yaml_ng::from_value(pod["metadata"]["annotations"].clone()).unwrap();
    coffer_shim::annotations::refuse_overrides(&annotations).unwrap();
    let text = coffer_shim::annotations::initdata(&annotations)
        .unwrap()
        .expect("the example carries initdata");
    let parsed = coffer_wire::initdata::Initdata::parse(&text).unwrap();
    let kbs = coffer_agent::keys::kbs_config(&parsed).unwrap();
    assert_eq!(
        kbs.url.as_deref(),
        Some("https://coffer-kbs.coffer-system.svc:8080")
    );
}
