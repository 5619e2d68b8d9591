//! `generate` end to end, one Kubernetes rule per test: the data each workload's policy pins,
//! the errors that name what to fix, and what must never reach the policy.

use coffer_policy::{
    generate, policy_for, reference_values, Generated, OfflineImages, Options, PolicyGenError,
    Settings,
};
use serde_json::{json, Value};

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn images() -> OfflineImages {
    OfflineImages::parse(
        &json!({
            "127.0.0.1:5000/app:v1": {"digest": digest('a'), "config": {
                "Entrypoint": ["/entry"], "Cmd": ["serve", "--port=80"],
                "Env": ["PATH=/app/bin:/bin", "IMG=1", "MODE=image"], "WorkingDir": "/srv"}},
            "busybox": {"digest": digest('b'), "config": {"Cmd": ["sh"]}},
            "127.0.0.1:5000/user:v1": {"digest": digest('c'), "config": {"Cmd": ["x"], "User": "1000:2000"}},
            "127.0.0.1:5000/named:v1": {"digest": digest('d'), "config": {"Cmd": ["x"], "User": "nobody"}},
            "127.0.0.1:5000/empty:v1": {"digest": digest('e'), "config": {"Entrypoint": [""], "Cmd": ["c"]}},
            format!("127.0.0.1:5000/pinned@{}", digest('f')): {"digest": digest('f'), "config": {"Cmd": ["p"]}},
        })
        .to_string(),
    )
    .unwrap()
}

fn opts(settings: Settings) -> Options {
    Options {
        kbs_url: "https://kbs.example:8080".into(),
        image_keys: vec!["kbs:///default/key/app".into()],
        settings,
        algorithm: "sha384".into(),
    }
}

async fn gen_with(yaml: &str, settings: Settings) -> Result<Generated, PolicyGenError> {
    generate(&[yaml.to_string()], &images(), &opts(settings)).await
}

async fn gen(yaml: &str) -> Generated {
    match gen_with(yaml, Settings::default()).await {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    }
}

async fn err(yaml: &str) -> String {
    match gen_with(yaml, Settings::default()).await {
        Ok(_) => panic!("generated"),
        Err(e) => e.to_string(),
    }
}

fn data(g: &Generated, i: usize) -> Value {
    let (_, json) = g.pods[i].policy.split_once("\npolicy_data := ").unwrap();
    serde_json::from_str(json.trim()).unwrap()
}

/// A Pod named `p` with `containers` (YAML flow or block text under `containers:`) and
/// `extra` pod spec lines.
fn pod(containers: &str, extra: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n{extra}  containers:\n{containers}")
}

#[tokio::test]
async fn process_args_follow_containerds_merge() {
    let cases = [
        // (container fields, expected args)
        ("", json!(["/entry", "serve", "--port=80"])),
        ("    args: [a, b]\n", json!(["/entry", "a", "b"])),
        ("    command: [/bin/sh]\n", json!(["/bin/sh"])),
        (
            "    command: [/bin/sh]\n    args: [-c, x]\n",
            json!(["/bin/sh", "-c", "x"]),
        ),
    ];
    for (fields, want) in cases {
        let g = gen(&pod(
            &format!("  - name: app\n    image: 127.0.0.1:5000/app:v1\n{fields}"),
            "",
        ))
        .await;
        assert_eq!(data(&g, 0)["containers"]["app"]["args"], want, "{fields}");
    }
    // Entrypoint [""] is no entrypoint.
    let g = gen(&pod(
        "  - name: e\n    image: 127.0.0.1:5000/empty:v1\n",
        "",
    ))
    .await;
    assert_eq!(data(&g, 0)["containers"]["e"]["args"], json!(["c"]));
}

#[tokio::test]
async fn image_is_pinned_by_digest() {
    let g = gen(&pod(
        &format!("  - name: app\n    image: 127.0.0.1:5000/app:v1\n  - name: bb\n    image: busybox\n  - name: pin\n    image: 127.0.0.1:5000/pinned@{}\n", digest('f')),
        "",
    ))
    .await;
    let d = data(&g, 0);
    let app = &d["containers"]["app"];
    assert_eq!(
        app["image"],
        json!({"registry": "127.0.0.1:5000", "repository": "app", "tag": "v1", "digest": digest('a')})
    );
    assert_eq!(
        app["pull"],
        json!(format!("docker://127.0.0.1:5000/app@{}", digest('a')))
    );
    assert_eq!(app["working_dir"], json!("/srv"));
    let bb = &d["containers"]["bb"];
    assert_eq!(bb["image"]["registry"], json!("index.docker.io"));
    assert_eq!(bb["image"]["repository"], json!("library/busybox"));
    assert_eq!(bb["image"]["tag"], json!("latest"));
    assert_eq!(bb["working_dir"], json!("/"));
    let pin = &d["containers"]["pin"];
    assert_eq!(pin["image"]["tag"], Value::Null);
    assert_eq!(pin["image"]["digest"], json!(digest('f')));
    // A digest the resolver contradicts is refused.
    let images = OfflineImages::parse(
        &json!({format!("127.0.0.1:5000/pinned@{}", digest('f')): {"digest": digest('9')}})
            .to_string(),
    )
    .unwrap();
    let e = generate(
        &[pod(
            &format!(
                "  - name: pin\n    image: 127.0.0.1:5000/pinned@{}\n",
                digest('f')
            ),
            "",
        )],
        &images,
        &opts(Settings::default()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("the resolver gives"), "{e}");
}

const CONFIG: &str = "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata:\n  level: debug\n  MODE: cm\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: sec\nstringData:\n  token: s3cr3t-string-value\ndata:\n  password: c3VwZXItc2VjcmV0LXBhc3N3b3Jk\n";

#[tokio::test]
async fn env_resolution_and_override_order() {
    let containers = "  - name: app\n    image: 127.0.0.1:5000/app:v1\n    envFrom:\n    - configMapRef: {name: cfg}\n      prefix: CM_\n    - configMapRef: {name: cfg}\n    - secretRef: {name: sec}\n    env:\n    - {name: IMG, value: spec}\n    - {name: LEVEL, valueFrom: {configMapKeyRef: {name: cfg, key: level}}}\n    - {name: MODE, value: from-env}\n    - {name: TOKEN, valueFrom: {secretKeyRef: {name: sec, key: token}}}\n    - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}\n    - {name: NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}\n    - {name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}\n    - {name: MEM, valueFrom: {resourceFieldRef: {resource: limits.memory}}}\n    - {name: OPT, valueFrom: {configMapKeyRef: {name: missing, key: k, optional: true}}}\n    - {name: EMPTY}\n";
    let g = gen(&(pod(containers, "") + CONFIG)).await;
    let env = &data(&g, 0)["containers"]["app"]["env"];
    assert_eq!(
        env["pinned"],
        json!({
            "PATH": "/app/bin:/bin", "IMG": "spec", "MODE": "from-env", "LEVEL": "debug",
            "CM_level": "debug", "CM_MODE": "cm", "level": "debug", "NS": "default", "EMPTY": "",
        })
    );
    assert_eq!(
        env["any_value"],
        json!(["MEM", "NODE", "TOKEN", "password", "token"])
    );
    let patterns: Vec<&str> = env["patterns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    // Known names with a value pattern are looked up by name.
    assert_eq!(env["values"]["POD"], "^p$");
    assert_eq!(env["values"]["HOSTNAME"], "^p$");
    assert!(env["values"]["KUBERNETES_SERVICE_HOST"]
        .as_str()
        .unwrap()
        .starts_with('^'));
    // Service links: any service's name, so a pattern over NAME=value.
    assert!(
        patterns.iter().any(|p| p.contains("_SERVICE_HOST=")),
        "{patterns:?}"
    );
    assert!(!patterns.iter().any(|p| p.starts_with("^KUBERNETES_")));
    // No PATH in the image: containerd's.
    let g = gen(&pod(
        "  - name: bb\n    image: busybox\n",
        "  enableServiceLinks: false\n",
    ))
    .await;
    let env = &data(&g, 0)["containers"]["bb"]["env"];
    assert_eq!(
        env["pinned"]["PATH"],
        json!("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    );
    // Without service links, only the kubernetes service's variables.
    assert!(env["patterns"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| !p.as_str().unwrap().starts_with("^[A-Z_]")));
}

#[tokio::test]
async fn secret_values_never_reach_the_policy() {
    let containers = "  - name: app\n    image: 127.0.0.1:5000/app:v1\n    envFrom:\n    - secretRef: {name: sec}\n    env:\n    - {name: TOKEN, valueFrom: {secretKeyRef: {name: sec, key: token}}}\n";
    let g = gen(&(pod(containers, "") + CONFIG)).await;
    for needle in [
        "s3cr3t-string-value",
        "c3VwZXItc2VjcmV0LXBhc3N3b3Jk",
        "super-secret-password",
    ] {
        assert!(!g.pods[0].policy.contains(needle), "{needle} in the policy");
        assert!(
            !g.pods[0].initdata.contains(needle),
            "{needle} in the initdata"
        );
    }
    // The Secret document itself passes through.
    assert!(g.yaml.contains("s3cr3t-string-value"));
}

#[tokio::test]
async fn missing_config_maps_and_secrets_are_named() {
    let e = err(&pod(
        "  - name: app\n    image: busybox\n    env:\n    - {name: A, value: x}\n    - {name: B, value: y}\n    - {name: L, valueFrom: {configMapKeyRef: {name: cfg, key: level}}}\n",
        "",
    ))
    .await;
    assert_eq!(
        e,
        "document 1 (pod p), container app: env[2] (L) valueFrom.configMapKeyRef: ConfigMap cfg is not in the input; add it with -f or mark it optional"
    );
    let e = err(&pod(
        "  - name: app\n    image: busybox\n    envFrom:\n    - secretRef: {name: nope}\n",
        "",
    ))
    .await;
    assert!(
        e.contains("envFrom[0].secretRef: Secret nope is not in the input"),
        "{e}"
    );
    let e = err(&(pod("  - name: app\n    image: busybox\n    env:\n    - {name: L, valueFrom: {configMapKeyRef: {name: cfg, key: nokey}}}\n", "") + CONFIG)).await;
    assert!(e.contains("has no key \"nokey\""), "{e}");
    // Optional: skipped, with a warning.
    let g = gen(&pod("  - name: app\n    image: busybox\n    envFrom:\n    - configMapRef: {name: cfg, optional: true}\n", "")).await;
    assert!(g
        .warnings
        .iter()
        .any(|w| w.contains("optional ConfigMap cfg")));
    // A ConfigMap in another namespace is another ConfigMap.
    let e = err(&(pod(
        "  - name: app\n    image: busybox\n    envFrom:\n    - configMapRef: {name: cfg}\n",
        "",
    )
    .replace("name: p\n", "name: p\n  namespace: prod\n")
        + CONFIG))
    .await;
    assert!(e.contains("ConfigMap cfg is not in the input"), "{e}");
}

#[tokio::test]
async fn variable_references_are_expanded_as_the_kubelet_does() {
    let containers = "  - name: app\n    image: busybox\n    command: [\"/bin/$(A)\", \"$$(A)\", \"$(UNDEFINED)\", \"$(B)\"]\n    args: [\"$(LEVEL)-$(A)\"]\n    env:\n    - {name: A, value: sh}\n    - {name: B, value: \"$(A)-$(LATER)-x\"}\n    - {name: LATER, value: l}\n    - {name: LEVEL, valueFrom: {configMapKeyRef: {name: cfg, key: level}}}\n";
    let g = gen(&(pod(containers, "") + CONFIG)).await;
    let app = &data(&g, 0)["containers"]["app"];
    assert_eq!(
        app["args"],
        json!([
            "/bin/sh",
            "$(A)",
            "$(UNDEFINED)",
            "sh-$(LATER)-x",
            "debug-sh"
        ])
    );
    assert_eq!(app["env"]["pinned"]["B"], json!("sh-$(LATER)-x"));
    // A reference to a Secret's variable cannot be pinned.
    let e = err(&(pod("  - name: app\n    image: busybox\n    args: [\"--token=$(T)\"]\n    env:\n    - {name: T, valueFrom: {secretKeyRef: {name: sec, key: token}}}\n", "") + CONFIG)).await;
    assert!(
        e.starts_with("document 1 (pod p), container app: args[0] refers to $(T)"),
        "{e}"
    );
    let e = err(&pod("  - name: app\n    image: busybox\n    env:\n    - {name: U, value: \"http://$(KUBERNETES_SERVICE_HOST)\"}\n", "")).await;
    assert!(
        e.contains("env[0] (U) value refers to $(KUBERNETES_SERVICE_HOST)"),
        "{e}"
    );
}

#[tokio::test]
async fn users_follow_the_kubelet_and_containerd() {
    let cases = [
        // (image, container securityContext, pod securityContext, uid, gid)
        ("busybox", "", "", json!(0), json!(0)),
        ("busybox", "{runAsUser: 1000}", "", json!(1000), Value::Null),
        (
            "busybox",
            "{runAsUser: 1000, runAsGroup: 3000}",
            "",
            json!(1000),
            json!(3000),
        ),
        (
            "busybox",
            "",
            "{runAsUser: 7, runAsGroup: 8}",
            json!(7),
            json!(8),
        ),
        (
            "busybox",
            "{runAsUser: 9}",
            "{runAsUser: 7, runAsGroup: 8}",
            json!(9),
            json!(8),
        ),
        ("127.0.0.1:5000/user:v1", "", "", json!(1000), Value::Null),
        (
            "127.0.0.1:5000/user:v1",
            "{runAsGroup: 5}",
            "",
            json!(1000),
            json!(5),
        ),
        (
            "127.0.0.1:5000/user:v1",
            "{runAsUser: 0}",
            "",
            json!(0),
            json!(0),
        ),
        ("127.0.0.1:5000/named:v1", "", "", Value::Null, Value::Null),
    ];
    for (image, sc, psc, uid, gid) in cases {
        let c = format!(
            "  - name: c\n    image: {image}\n{}",
            if sc.is_empty() {
                String::new()
            } else {
                format!("    securityContext: {sc}\n")
            }
        );
        let extra = if psc.is_empty() {
            String::new()
        } else {
            format!("  securityContext: {psc}\n")
        };
        let g = gen(&pod(&c, &extra)).await;
        assert_eq!(
            data(&g, 0)["containers"]["c"]["user"],
            json!({"uid": uid, "gid": gid}),
            "{image} {sc} {psc}"
        );
        if image.ends_with("named:v1") {
            assert!(g.warnings.iter().any(|w| w.contains("\"nobody\"")));
        }
    }
}

#[tokio::test]
async fn capabilities_and_privileged() {
    let g = gen(&pod(
        "  - name: c\n    image: busybox\n    securityContext:\n      capabilities: {add: [NET_ADMIN], drop: [ALL]}\n  - name: d\n    image: busybox\n    securityContext:\n      capabilities: {drop: [kill, NET_RAW]}\n",
        "",
    ))
    .await;
    let d = data(&g, 0);
    assert_eq!(
        d["containers"]["c"]["capabilities"],
        json!(["CAP_NET_ADMIN"])
    );
    let caps = d["containers"]["d"]["capabilities"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(caps.len(), 12);
    assert!(!caps.contains(&json!("CAP_KILL")) && !caps.contains(&json!("CAP_NET_RAW")));
    let mut sorted = caps.clone();
    sorted.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    assert_eq!(caps, sorted);

    let privileged = pod(
        "  - name: c\n    image: busybox\n    securityContext: {privileged: true}\n",
        "",
    );
    let e = err(&privileged).await;
    assert!(
        e.starts_with("document 1 (pod p), container c: securityContext.privileged"),
        "{e}"
    );
    let g = gen_with(
        &privileged,
        Settings {
            allow_privileged: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = &data(&g, 0)["containers"]["c"];
    assert_eq!(c["privileged"], json!(true));
    assert_eq!(c["capabilities"], Value::Null);
}

#[tokio::test]
async fn mounts_per_volume_type() {
    let containers = "  - name: c\n    image: busybox\n    terminationMessagePath: /tmp/msg\n    volumeMounts:\n    - {name: scratch, mountPath: /scratch}\n    - {name: cfg, mountPath: /cfg}\n    - {name: sec, mountPath: /sec}\n    - {name: proj, mountPath: /proj}\n    - {name: down, mountPath: /down}\n    - {name: scratch, mountPath: /ro, readOnly: true}\n    - {name: scratch, mountPath: /sub, subPath: a/b}\n    - {name: claim, mountPath: /claim}\n";
    let volumes = "  volumes:\n  - {name: scratch, emptyDir: {}}\n  - {name: cfg, configMap: {name: cfg}}\n  - {name: sec, secret: {secretName: sec}}\n  - {name: proj, projected: {sources: []}}\n  - {name: down, downwardAPI: {items: []}}\n  - {name: claim, persistentVolumeClaim: {claimName: data}}\n";
    let g = gen(&pod(containers, volumes)).await;
    let mounts = data(&g, 0)["containers"]["c"]["mounts"].clone();
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(
        mounts,
        json!([
            {"destination": "/scratch", "source_regex": "/volumes/kubernetes\\.io~empty-dir/scratch$", "read_only": false, "volume": "scratch", "kind": "empty-dir", "sub_path": null, "sub_path_any": false},
            {"destination": "/cfg", "source_regex": "/volumes/kubernetes\\.io~configmap/cfg$", "read_only": true, "volume": "cfg", "kind": "configmap", "sub_path": null, "sub_path_any": false},
            {"destination": "/sec", "source_regex": "/volumes/kubernetes\\.io~secret/sec$", "read_only": true, "volume": "sec", "kind": "secret", "sub_path": null, "sub_path_any": false},
            {"destination": "/proj", "source_regex": "/volumes/kubernetes\\.io~projected/proj$", "read_only": true, "volume": "proj", "kind": "projected", "sub_path": null, "sub_path_any": false},
            {"destination": "/down", "source_regex": "/volumes/kubernetes\\.io~downward-api/down$", "read_only": true, "volume": "down", "kind": "downward-api", "sub_path": null, "sub_path_any": false},
            {"destination": "/ro", "source_regex": "/volumes/kubernetes\\.io~empty-dir/scratch$", "read_only": true, "volume": "scratch", "kind": "empty-dir", "sub_path": null, "sub_path_any": false},
            {"destination": "/sub", "source_regex": "/volume-subpaths/scratch/c/6$", "read_only": false, "volume": "scratch", "kind": "empty-dir", "sub_path": "a/b", "sub_path_any": false},
            {"destination": "/claim", "source_regex": null, "read_only": false, "volume": "claim", "kind": null, "sub_path": null, "sub_path_any": false},
            {"destination": "/etc/hosts", "source_regex": null, "read_only": false},
            {"destination": "/tmp/msg", "source_regex": null, "read_only": false},
            {"destination": sa, "source_regex": "/volumes/kubernetes\\.io~projected/kube-api-access-[a-z0-9]{5}$", "read_only": true},
        ])
    );
    assert!(g
        .warnings
        .iter()
        .any(|w| w.contains("volume claim (persistentVolumeClaim)")));

    // No token when the pod, or its ServiceAccount, says so.
    for (extra, docs) in [
        ("  automountServiceAccountToken: false\n", ""),
        ("  serviceAccountName: quiet\n", "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: quiet}\nautomountServiceAccountToken: false\n"),
    ] {
        let g = gen(&(pod("  - name: c\n    image: busybox\n", extra) + docs)).await;
        let mounts = data(&g, 0)["containers"]["c"]["mounts"].clone();
        assert!(mounts.as_array().unwrap().iter().all(|m| m["destination"] != sa), "{extra}");
        assert!(mounts.as_array().unwrap().iter().any(|m| m["destination"] == "/dev/termination-log"));
    }

    // hostPath: refused unless the settings allow it, then pinned to its path.
    let host = pod(
        "  - name: c\n    image: busybox\n    volumeMounts: [{name: logs, mountPath: /logs}]\n",
        "  volumes: [{name: logs, hostPath: {path: /var/log/}}]\n",
    );
    let e = err(&host).await;
    assert!(
        e.starts_with(
            "document 1 (pod p), container c: volumeMounts[0]: volume logs is a hostPath"
        ),
        "{e}"
    );
    let settings = Settings::parse(
        "allow_host_path: true\nextra_mounts:\n- {destination: /extra, read_only: true}\n",
    )
    .unwrap();
    let g = gen_with(&host, settings).await.unwrap();
    let mounts = data(&g, 0)["containers"]["c"]["mounts"].clone();
    assert_eq!(mounts[0]["source_regex"], json!("^/var/log$"));
    assert_eq!(
        mounts.as_array().unwrap().last().unwrap(),
        &json!({"destination": "/extra", "source_regex": null, "read_only": true})
    );
    let e = err(&pod(
        "  - name: c\n    image: busybox\n    volumeMounts: [{name: nope, mountPath: /x}]\n",
        "",
    ))
    .await;
    assert!(e.contains("no volume named \"nope\""), "{e}");
}

#[tokio::test]
async fn the_mesh_identity_is_the_workloads_namespace_and_service_account() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec:\n  serviceAccountName: web\n  containers:\n  - name: c\n    image: busybox\n";
    let settings = Settings::parse(
        "mesh: {trust_domain: cluster.local, cidrs: [10.244.0.0/16], open_ports: [8081]}\n",
    )
    .unwrap();
    let g = gen_with(yaml, settings).await.unwrap();
    let initdata = coffer_wire::initdata::Initdata::parse(&g.pods[0].initdata).unwrap();
    let mesh = coffer_wire::mesh::MeshConfig::parse(&initdata.data["mesh.toml"]).unwrap();
    assert_eq!(mesh.identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(mesh.peers, ["spiffe://cluster.local/ns/shop/*"]);
    assert_eq!(mesh.cidrs, ["10.244.0.0/16"]);
    assert_eq!(mesh.open_ports, [8081]);
    // Without the setting, no mesh; a bad range is refused at once.
    let g = gen(yaml).await;
    assert!(!g.pods[0].initdata.contains("mesh.toml"));
    let e = Settings::parse("mesh: {trust_domain: cluster.local, cidrs: [nonsense]}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("cidr \"nonsense\""), "{e}");
}

#[tokio::test]
async fn block_volume_claims_are_pinned_by_path_and_keyed_in_the_initdata() {
    let yaml = pod(
        "  - name: db\n    image: busybox\n    volumeDevices: [{name: data, devicePath: /dev/xvda}]\n",
        "  volumes: [{name: data, persistentVolumeClaim: {claimName: db-data}}]\n",
    );
    // Without a key the claim is refused, saying which setting names one.
    let e = err(&yaml).await;
    assert!(
        e.contains("volumeDevices[0]: no key for block volume db-data")
            && e.contains("volume_keys"),
        "{e}"
    );
    let settings =
        Settings::parse("volume_keys: {db-data: 'kbs:///default/pv/db-data'}\n").unwrap();
    let g = gen_with(&yaml, settings).await.unwrap();
    assert_eq!(
        data(&g, 0)["containers"]["db"]["devices"],
        json!(["/dev/xvda"])
    );
    let initdata = coffer_wire::initdata::Initdata::parse(&g.pods[0].initdata).unwrap();
    let cdh = &initdata.data["cdh.toml"];
    assert!(
        cdh.contains("[block_volumes]\n\"/dev/xvda\" = \"kbs:///default/pv/db-data\""),
        "{cdh}"
    );
    // Only claims are block volumes; keys must be KBS resources.
    let e = gen_with(
        &pod(
            "  - name: db\n    image: busybox\n    volumeDevices: [{name: data, devicePath: /dev/xvda}]\n",
            "  volumes: [{name: data, emptyDir: {}}]\n",
        ),
        Settings::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("volume data (emptyDir) is not a block volume claim"),
        "{e}"
    );
    let e = Settings::parse("volume_keys: {db-data: 'https://x/k'}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("volume_keys: db-data"), "{e}");
}

#[tokio::test]
async fn execs_tty_stdin_and_settings() {
    let containers = "  - name: c\n    image: busybox\n    tty: true\n    stdin: true\n    livenessProbe: {exec: {command: [cat, /tmp/healthy]}}\n    readinessProbe: {exec: {command: [\"$(NOT_EXPANDED)\"]}}\n    startupProbe: {httpGet: {path: /, port: 80}}\n    lifecycle:\n      preStop: {exec: {command: [/stop]}}\n";
    let g = gen(&pod(containers, "")).await;
    let c = &data(&g, 0)["containers"]["c"];
    assert_eq!(
        c["exec"],
        json!([["cat", "/tmp/healthy"], ["$(NOT_EXPANDED)"], ["/stop"]])
    );
    assert_eq!(
        (c["tty"].clone(), c["stdin"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(c["exec_any"], json!(false));
    assert_eq!(c["init"], json!(false));
    let settings =
        Settings::parse("exec_any: true\nenv_patterns: ['^DEBUG=.*$']\nany_namespace: true\n")
            .unwrap();
    let g = gen_with(&pod(containers, ""), settings).await.unwrap();
    let d = data(&g, 0);
    assert_eq!(d["containers"]["c"]["exec_any"], json!(true));
    assert_eq!(d["pod"]["namespace"], Value::Null);
    assert!(d["containers"]["c"]["env"]["patterns"]
        .as_array()
        .unwrap()
        .contains(&json!("^DEBUG=.*$")));
    assert!(g.warnings.iter().any(|w| w.contains("exec_any")));
    assert!(Settings::parse("exec_anything: true").is_err());
    assert!(Settings::parse("env_patterns: ['(']").is_err());
}

#[tokio::test]
async fn name_regexes_per_kind() {
    let template = "    metadata: {labels: {app: x}}\n    spec:\n      containers: [{name: c, image: busybox}]\n";
    let doc = |kind: &str, extra: &str| {
        format!("apiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: web.x\n  namespace: prod\nspec:\n{extra}  template:\n{template}")
    };
    let yaml = [
        doc("Deployment", ""),
        doc("ReplicaSet", ""),
        doc("DaemonSet", ""),
        doc("StatefulSet", ""),
        doc("Job", ""),
        doc("Job", "  completionMode: Indexed\n  completions: 3\n"),
        format!("apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: tick}}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n{}", template.replace("\n    ", "\n        ").replacen("    metadata", "        metadata", 1)),
        "apiVersion: v1\nkind: Pod\nmetadata: {generateName: gen-}\nspec:\n  containers: [{name: c, image: busybox}]\n".to_string(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec: {ports: [{port: 80}]}\n".to_string(),
    ]
    .join("---\n");
    let g = gen(&yaml).await;
    let got: Vec<(String, Value, Value)> = (0..g.pods.len())
        .map(|i| {
            let d = data(&g, i);
            (
                g.pods[i].kind.clone(),
                d["pod"]["name_regex"].clone(),
                d["pod"]["namespace"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "Deployment".into(),
                json!("^web\\.x-[a-z0-9]{1,10}-[a-z0-9]{5}$"),
                json!("prod")
            ),
            (
                "ReplicaSet".into(),
                json!("^web\\.x-[a-z0-9]{5}$"),
                json!("prod")
            ),
            (
                "DaemonSet".into(),
                json!("^web\\.x-[a-z0-9]{5}$"),
                json!("prod")
            ),
            (
                "StatefulSet".into(),
                json!("^web\\.x-[0-9]{1,10}$"),
                json!("prod")
            ),
            ("Job".into(), json!("^web\\.x-[a-z0-9]{5}$"), json!("prod")),
            (
                "Job".into(),
                json!("^(?:web\\.x-[a-z0-9]{5}|web\\.x-[0-9]{1}-[a-z0-9]{5})$"),
                json!("prod")
            ),
            (
                "CronJob".into(),
                json!("^tick-[0-9]{1,10}-[a-z0-9]{5}$"),
                json!("default")
            ),
            ("Pod".into(), json!("^gen-[a-z0-9]{5}$"), json!("default")),
        ]
    );
    // Every document comes back, the Service unchanged; each template gets the runtime class.
    let out: Vec<serde_yaml_ng::Value> = g
        .yaml
        .split("---\n")
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .collect();
    assert_eq!(out.len(), 9);
    assert_eq!(
        out[8]["kind"],
        serde_yaml_ng::Value::String("Service".into())
    );
    assert!(out[8].get("metadata").unwrap().get("annotations").is_none());
    assert_eq!(
        out[0]["spec"]["template"]["spec"]["runtimeClassName"],
        serde_yaml_ng::Value::String("coffer".into())
    );
}

#[tokio::test]
async fn initdata_annotation_and_reference_values() {
    use base64::Engine;
    use std::io::Read;
    let g = gen(&pod("  - name: c\n    image: busybox\n", "")).await;
    let p = &g.pods[0];
    assert_eq!(
        hex::encode(coffer_wire::initdata::digest(&p.initdata).unwrap()),
        p.initdata_digest
    );
    let parsed = coffer_wire::initdata::Initdata::parse(&p.initdata).unwrap();
    assert_eq!(parsed.data["policy.rego"], p.policy);
    assert!(parsed.data["cdh.toml"].contains("kbs:///default/key/app"));
    assert!(parsed.data["aa.toml"].contains("https://kbs.example:8080"));
    assert_eq!(p.initdata_digest.len(), 96);
    let out: serde_yaml_ng::Value = serde_yaml_ng::from_str(&g.yaml).unwrap();
    let annotation = out["metadata"]["annotations"][coffer_policy::INITDATA_ANNOTATION]
        .as_str()
        .unwrap();
    let gz = base64::engine::general_purpose::STANDARD
        .decode(annotation)
        .unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, p.initdata);
    assert_eq!(
        reference_values(&g.pods),
        json!({"init_data": [p.initdata_digest]})
    );
    // policy_for is the rules and the data.
    assert!(policy_for(&json!({})).starts_with(coffer_policy::RULES));
    // Options are checked.
    let bad = Options {
        kbs_url: "kbs.example".into(),
        ..opts(Settings::default())
    };
    assert!(generate(
        &[pod("  - name: c\n    image: busybox\n", "")],
        &images(),
        &bad
    )
    .await
    .is_err());
}

#[tokio::test]
async fn input_errors_name_the_document() {
    let e = err("kind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: c, image: busybox}]\n---\nkind: Deployment\nmetadata: {name: b}\nspec: {}\n").await;
    assert_eq!(e, "document 2: a Deployment without spec.template");
    let e = err(&pod("  - name: c\n    image: nowhere.example/x:1\n", "")).await;
    assert!(
        e.starts_with("image nowhere.example/x:1: not in the offline digests file"),
        "{e}"
    );
    let e = err(&pod(
        "  - name: c\n    image: busybox\n  - name: c\n    image: busybox\n",
        "",
    ))
    .await;
    assert!(e.contains("two containers named c"), "{e}");
    let e = err(&pod(
        "  - name: c\n    image: busybox\n    env: [{name: P, value: 8080}]\n",
        "",
    ))
    .await;
    assert!(e.starts_with("document 1: the pod spec:"), "{e}");
}
