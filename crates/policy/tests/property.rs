//! Property: for random container specs, the generated policy allows the CreateContainerRequest
//! the kubelet and containerd 1.6 build for that spec (simulated here from their rules, written
//! independently of the generator), and refuses it after any one of these changes: an argument,
//! an extra environment variable, a pinned variable's value, the working directory, the uid,
//! an extra hostPath mount, privileged, the image tag or digest, another container's name.

use std::collections::{BTreeMap, BTreeSet};

use coffer_policy::{generate, OfflineImages, Options, ResolvedImage};
use proptest::prelude::*;
use serde_json::{json, Value};

const POD_NAME: &str = "web-5d8f7c9b4-x2x7z";
const POD_UID: &str = "6c1f4e38-1b6f-4bb0-a4d4-0c4b1d7c8e11";
const CONTAINER_ID: &str = "0f5a4c1e2d3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_CAPS: [&str; 14] = coffer_wire::capabilities::DEFAULT;
const CONFIG_DATA: [(&str, &str); 2] = [("level", "debug"), ("mode", "fast x")];

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

/// One environment entry of the spec.
#[derive(Clone, Debug)]
enum EnvSpec {
    Value(String),
    ConfigMapKey(&'static str),
    SecretKey,
    PodName,
}

#[derive(Clone, Debug)]
struct MountSpec {
    kind: &'static str,
    read_only: bool,
    sub_path: bool,
}

#[derive(Clone, Debug)]
struct Case {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    image_env: Vec<(String, String)>,
    image_workdir: String,
    image_user: &'static str,
    command: Option<Vec<String>>,
    args: Option<Vec<String>>,
    env_from: bool,
    env: Vec<(String, EnvSpec)>,
    working_dir: Option<String>,
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
    pod_run_as_user: Option<i64>,
    mounts: Vec<MountSpec>,
    read_only_rootfs: bool,
    add: Vec<&'static str>,
    drop: Vec<&'static str>,
    tty: bool,
    stdin: bool,
    links: bool,
    secret_values: Vec<String>,
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9/._=-]{0,6}",
        "[a-z ]{0,3}\\$\\((E0|E1|CFG_level|NOPE|token)\\)[a-z]{0,2}",
        Just("$$(E0)".to_string()),
        Just("a$b".to_string()),
    ]
}

fn words(max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(word(), 0..max)
}

fn env_spec() -> impl Strategy<Value = EnvSpec> {
    prop_oneof![
        3 => "[a-z0-9 =:/]{0,8}".prop_map(EnvSpec::Value),
        1 => "x\\$\\((E0|CFG_mode|NOPE)\\)".prop_map(EnvSpec::Value),
        1 => prop_oneof![Just("level"), Just("mode")].prop_map(EnvSpec::ConfigMapKey),
        1 => Just(EnvSpec::SecretKey),
        1 => Just(EnvSpec::PodName),
    ]
}

fn mount_spec() -> impl Strategy<Value = MountSpec> {
    (
        prop_oneof![
            Just("emptyDir"),
            Just("configMap"),
            Just("secret"),
            Just("projected")
        ],
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(kind, read_only, sub_path)| MountSpec {
            kind,
            read_only,
            sub_path,
        })
}

const CAPS: [&str; 6] = ["NET_ADMIN", "SYS_TIME", "CHOWN", "KILL", "net_raw", "ALL"];

fn case() -> impl Strategy<Value = Case> {
    let image = (
        prop::option::of(words(3)),
        prop::option::of(words(3)),
        prop::collection::vec(
            ("(PATH|IMG|E0|KUBERNETES_PORT|HOME)", "[a-z0-9/:]{0,6}"),
            0..4,
        ),
        prop_oneof![Just(String::new()), "/[a-z]{1,5}"],
        prop_oneof![
            Just(""),
            Just("0"),
            Just("1000"),
            Just("1000:2000"),
            Just("0:5")
        ],
    );
    let process = (
        prop::option::of(words(3)),
        prop::option::of(words(3)),
        any::<bool>(),
        prop::collection::vec(("E[0-2]|PATH|HOSTNAME|CFG_level", env_spec()), 0..5),
        prop::option::of("/[a-z]{0,5}"),
    );
    let security = (
        prop::option::of(0i64..3000),
        prop::option::of(0i64..3000),
        prop::option::of(0i64..3000),
        prop::collection::vec(mount_spec(), 0..4),
        any::<bool>(),
        prop::collection::vec(prop::sample::select(&CAPS[..]), 0..3),
        prop::collection::vec(prop::sample::select(&CAPS[..]), 0..3),
    );
    let rest = (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec("s3cr3t-[a-z0-9]{4,8}", 4),
    );
    (image, process, security, rest).prop_map(
        |(
            (entrypoint, cmd, image_env, image_workdir, image_user),
            (command, args, env_from, env, working_dir),
            (run_as_user, run_as_group, pod_run_as_user, mounts, read_only_rootfs, add, drop),
            (tty, stdin, links, secret_values),
        )| Case {
            entrypoint,
            cmd,
            image_env,
            image_workdir,
            image_user,
            command,
            args,
            env_from,
            env,
            working_dir,
            run_as_user,
            run_as_group,
            pod_run_as_user,
            mounts,
            read_only_rootfs,
            add,
            drop,
            tty,
            stdin,
            links,
            secret_values,
        },
    )
}

fn volume_name(i: usize) -> String {
    format!("vol{i}")
}

/// The Kubernetes YAML (as JSON, which YAML includes) of the case: a Deployment with the
/// container `app` from the case and a plain sidecar, a ConfigMap and a Secret.
fn documents(c: &Case) -> String {
    let mut env = Vec::new();
    for (name, spec) in &c.env {
        env.push(match spec {
            EnvSpec::Value(v) => json!({"name": name, "value": v}),
            EnvSpec::ConfigMapKey(k) => {
                json!({"name": name, "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": k}}})
            }
            EnvSpec::SecretKey => {
                json!({"name": name, "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}})
            }
            EnvSpec::PodName => {
                json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
            }
        });
    }
    let mut app = json!({
        "name": "app",
        "image": "127.0.0.1:5000/app:v1",
        "env": env,
        "tty": c.tty,
        "stdin": c.stdin,
        "volumeMounts": c.mounts.iter().enumerate().map(|(i, m)| {
            let mut v = json!({"name": volume_name(i), "mountPath": format!("/mnt/{i}"), "readOnly": m.read_only});
            if m.sub_path {
                v["subPath"] = json!("sub");
            }
            v
        }).collect::<Vec<_>>(),
        "securityContext": {
            "readOnlyRootFilesystem": c.read_only_rootfs,
            "capabilities": {"add": c.add, "drop": c.drop},
        },
        "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}},
    });
    if c.env_from {
        app["envFrom"] = json!([{"prefix": "CFG_", "configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}}]);
    }
    if let Some(v) = &c.command {
        app["command"] = json!(v);
    }
    if let Some(v) = &c.args {
        app["args"] = json!(v);
    }
    if let Some(v) = &c.working_dir {
        app["workingDir"] = json!(v);
    }
    if let Some(u) = c.run_as_user {
        app["securityContext"]["runAsUser"] = json!(u);
    }
    if let Some(g) = c.run_as_group {
        app["securityContext"]["runAsGroup"] = json!(g);
    }
    let volumes: Vec<Value> = c
        .mounts
        .iter()
        .enumerate()
        .map(|(i, m)| match m.kind {
            "emptyDir" => json!({"name": volume_name(i), "emptyDir": {}}),
            "configMap" => json!({"name": volume_name(i), "configMap": {"name": "cfg"}}),
            "secret" => json!({"name": volume_name(i), "secret": {"secretName": "sec"}}),
            _ => json!({"name": volume_name(i), "projected": {"sources": []}}),
        })
        .collect();
    let mut pod_spec = json!({
        "containers": [app, {"name": "side", "image": "127.0.0.1:5000/side:v1", "command": ["/side"]}],
        "volumes": volumes,
        "enableServiceLinks": c.links,
    });
    if let Some(u) = c.pod_run_as_user {
        pod_spec["securityContext"] = json!({"runAsUser": u});
    }
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec},
        },
    });
    let cfg = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
        "data": CONFIG_DATA.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    let sec = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"},
        "stringData": {"token": c.secret_values[0], "other": c.secret_values[1]},
    });
    format!("{deployment}\n---\n{cfg}\n---\n{sec}\n")
}

fn images(c: &Case) -> OfflineImages {
    let mut config = serde_json::Map::new();
    if let Some(v) = &c.entrypoint {
        config.insert("Entrypoint".into(), json!(v));
    }
    if let Some(v) = &c.cmd {
        config.insert("Cmd".into(), json!(v));
    }
    config.insert(
        "Env".into(),
        json!(c
            .image_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()),
    );
    config.insert("WorkingDir".into(), json!(c.image_workdir));
    config.insert("User".into(), json!(c.image_user));
    let mut images = OfflineImages::default();
    images.insert(
        "127.0.0.1:5000/app:v1",
        ResolvedImage {
            digest: digest('a'),
            config: Value::Object(config),
        },
    );
    images.insert(
        "127.0.0.1:5000/side:v1",
        ResolvedImage {
            digest: digest('b'),
            config: json!({}),
        },
    );
    images
}

/// Why the generator must refuse a case.
#[derive(Debug, PartialEq)]
enum Refused {
    /// Neither the spec nor the image names a process.
    NoCommand,
    /// A `$(VAR)` refers to a variable whose value is the node's (a Secret's, the pod name).
    Unpinned,
}

/// The kubelet's `$(VAR)` expansion (ASCII input): `$$` → `$`, `$(NAME)` → its value when
/// defined, anything else as written. A reference to one of `unpinned` is refused.
fn kubelet_expand(
    text: &str,
    vars: &BTreeMap<String, String>,
    unpinned: &BTreeSet<String>,
) -> Result<String, Refused> {
    let re = regex_lite();
    let mut out = String::new();
    let mut last = 0;
    for m in re.find_iter(text) {
        out.push_str(&text[last..m.start()]);
        let s = m.as_str();
        if s == "$$" {
            out.push('$');
        } else {
            let name = &s[2..s.len() - 1];
            if unpinned.contains(name) && vars.contains_key(name) {
                return Err(Refused::Unpinned);
            }
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(s),
            }
        }
        last = m.end();
    }
    out.push_str(&text[last..]);
    Ok(out)
}

fn regex_lite() -> regex::Regex {
    regex::Regex::new(r"\$\$|\$\([^)]*\)").unwrap()
}

fn set_env(env: &mut Vec<String>, name: &str, value: &str) {
    let kv = format!("{name}={value}");
    match env.iter_mut().find(|e| e.split('=').next() == Some(name)) {
        Some(e) => *e = kv,
        None => env.push(kv),
    }
}

/// What the kubelet and containerd send for `app`, or why the generator must refuse the case.
fn simulate(c: &Case) -> Result<Value, Refused> {
    // The kubelet: envFrom, then env, then the service variables it adds.
    let mut tmp: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut put = |tmp: &mut BTreeMap<String, String>, k: String, v: String| {
        if !tmp.contains_key(&k) {
            order.push(k.clone());
        }
        tmp.insert(k, v);
    };
    let mut unpinned: BTreeSet<String> = BTreeSet::new();
    if c.env_from {
        for (k, v) in CONFIG_DATA {
            put(&mut tmp, format!("CFG_{k}"), v.to_string());
            unpinned.remove(&format!("CFG_{k}"));
        }
        put(&mut tmp, "token".into(), c.secret_values[0].clone());
        put(&mut tmp, "other".into(), c.secret_values[1].clone());
        unpinned.extend(["token".to_string(), "other".to_string()]);
    }
    let mut service: BTreeMap<String, String> = BTreeMap::from([
        ("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into()),
        ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), "443".into()),
        ("KUBERNETES_PORT".into(), "tcp://10.96.0.1:443".into()),
        (
            "KUBERNETES_PORT_443_TCP".into(),
            "tcp://10.96.0.1:443".into(),
        ),
        ("KUBERNETES_PORT_443_TCP_PROTO".into(), "tcp".into()),
        ("KUBERNETES_PORT_443_TCP_PORT".into(), "443".into()),
        ("KUBERNETES_PORT_443_TCP_ADDR".into(), "10.96.0.1".into()),
    ]);
    if c.links {
        service.insert("REDIS_SERVICE_HOST".into(), "10.0.0.7".into());
        service.insert("REDIS_PORT_6379_TCP".into(), "tcp://10.0.0.7:6379".into());
    }
    unpinned.extend(service.keys().cloned());
    for (name, spec) in &c.env {
        let (v, node_chosen) = match spec {
            EnvSpec::Value(v) if !v.is_empty() => {
                let mut vars = service.clone();
                vars.extend(tmp.clone());
                (kubelet_expand(v, &vars, &unpinned)?, false)
            }
            EnvSpec::Value(_) => (String::new(), false),
            EnvSpec::ConfigMapKey(k) => (
                CONFIG_DATA
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default(),
                false,
            ),
            EnvSpec::SecretKey => (c.secret_values[2].clone(), true),
            EnvSpec::PodName => (POD_NAME.to_string(), true),
        };
        if node_chosen {
            unpinned.insert(name.clone());
        } else {
            unpinned.remove(name);
        }
        put(&mut tmp, name.clone(), v);
    }
    let mut kubelet_env: Vec<(String, String)> =
        order.iter().map(|k| (k.clone(), tmp[k].clone())).collect();
    for (k, v) in &service {
        if !tmp.contains_key(k) {
            kubelet_env.push((k.clone(), v.clone()));
        }
    }
    let mut all = service.clone();
    all.extend(tmp.clone());
    let command: Vec<String> = c
        .command
        .iter()
        .flatten()
        .map(|a| kubelet_expand(a, &all, &unpinned))
        .collect::<Result<_, _>>()?;
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| kubelet_expand(a, &all, &unpinned))
        .collect::<Result<_, _>>()?;

    // containerd's process.
    let (mut command, mut args) = (command, args);
    if command.is_empty() {
        if args.is_empty() {
            args = c.cmd.clone().unwrap_or_default();
        }
        let ep = c.entrypoint.clone().unwrap_or_default();
        if !(ep.len() == 1 && ep[0].is_empty()) {
            command = ep;
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(Refused::NoCommand);
    }
    let mut env: Vec<String> = vec![format!("PATH={DEFAULT_PATH}")];
    set_env(&mut env, "HOSTNAME", POD_NAME);
    for (k, v) in &c.image_env {
        set_env(&mut env, k, v);
    }
    for (k, v) in &kubelet_env {
        set_env(&mut env, k, v);
    }
    let working_dir = match (&c.working_dir, c.image_workdir.as_str()) {
        (Some(w), _) if !w.is_empty() => w.clone(),
        (_, w) if !w.is_empty() => w.to_string(),
        _ => "/".to_string(),
    };
    // The kubelet takes the uid from the image when the spec has none; containerd looks the
    // group up in the (empty, on the node) rootfs: 0.
    let uid = c.run_as_user.or(c.pod_run_as_user).unwrap_or_else(|| {
        c.image_user
            .split(':')
            .next()
            .filter(|u| !u.is_empty())
            .map(|u| u.parse().unwrap())
            .unwrap_or(0)
    });
    let gid = c.run_as_group.unwrap_or(0);
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    if c.add.iter().any(|a| a.eq_ignore_ascii_case("ALL")) {
        caps = ALL_CAPS.iter().map(|s| s.to_string()).collect();
    }
    if c.drop.iter().any(|a| a.eq_ignore_ascii_case("ALL")) {
        caps.clear();
    }
    for a in c.add.iter().filter(|a| !a.eq_ignore_ascii_case("ALL")) {
        let n = format!("CAP_{}", a.to_uppercase());
        if !caps.contains(&n) {
            caps.push(n);
        }
    }
    for d in c.drop.iter().filter(|a| !a.eq_ignore_ascii_case("ALL")) {
        let n = format!("CAP_{}", d.to_uppercase());
        caps.retain(|c| *c != n);
    }
    let pod_dir = format!("/var/lib/kubelet/pods/{POD_UID}");
    let bind = |dest: &str, source: String, ro: bool| {
        json!({"destination": dest, "type": "bind", "source": source,
               "options": ["rbind", "rprivate", if ro { "ro" } else { "rw" }]})
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        bind("/etc/hosts", format!("{pod_dir}/etc-hosts"), false),
        bind(
            "/dev/termination-log",
            format!("{pod_dir}/containers/app/1a2b3c4d"),
            false,
        ),
        bind(
            "/etc/hostname",
            "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/x/hostname".into(),
            false,
        ),
        bind(
            "/etc/resolv.conf",
            "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/x/resolv.conf".into(),
            false,
        ),
        bind(
            "/dev/shm",
            "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/x/shm".into(),
            false,
        ),
        bind(
            "/var/run/secrets/kubernetes.io/serviceaccount",
            format!("{pod_dir}/volumes/kubernetes.io~projected/kube-api-access-7xk2p"),
            true,
        ),
    ];
    for (i, m) in c.mounts.iter().enumerate() {
        let plugin = match m.kind {
            "emptyDir" => "empty-dir",
            "configMap" => "configmap",
            "secret" => "secret",
            _ => "projected",
        };
        let source = if m.sub_path {
            format!("{pod_dir}/volume-subpaths/{}/app/{i}", volume_name(i))
        } else {
            format!(
                "{pod_dir}/volumes/kubernetes.io~{plugin}/{}",
                volume_name(i)
            )
        };
        let ro = m.read_only || m.kind != "emptyDir";
        let mut b = bind(&format!("/mnt/{i}"), source, ro);
        if m.sub_path {
            // What the shim traces from the node's mount table.
            let opts = b["options"].as_array_mut().unwrap();
            opts.push(json!(format!("coffer.volume={plugin}/{}", volume_name(i))));
            opts.push(json!("coffer.subpath=sub"));
        }
        mounts.push(b);
    }
    Ok(json!({
        "container_id": CONTAINER_ID,
        "image": "docker://127.0.0.1:5000/app:v1",
        "args": command,
        "env": env,
        "working_dir": working_dir,
        "read_only_rootfs": c.read_only_rootfs,
        "tty": c.tty,
        "stdin": c.stdin,
        "memory_limit_bytes": 0,
        "mounts": mounts,
        "user": {"uid": uid, "gid": gid, "additional_gids": []},
        "capabilities": caps,
        "privileged": false,
        "annotations": {
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.sandbox-name": POD_NAME,
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.image-name": "127.0.0.1:5000/app:v1",
        },
        "image_ref": {"registry": "127.0.0.1:5000", "repository": "app", "tag": "v1", "digest": null},
    }))
}

const ALL_CAPS: [&str; 41] = coffer_wire::capabilities::ALL;

struct Policy {
    engine: regorus::Engine,
    data: Value,
}

impl Policy {
    fn new(text: &str) -> Self {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy("policy.rego".into(), text.to_string())
            .expect("the policy compiles");
        let data = text
            .split_once("\npolicy_data := ")
            .map(|(_, d)| serde_json::from_str(d.trim()).expect("the data is JSON"))
            .expect("policy_data");
        Self { engine, data }
    }

    fn eval(&self, rule: &str, input: &Value) -> Value {
        let mut e = self.engine.clone();
        e.set_input(regorus::Value::from(input.clone()));
        let v = e
            .eval_rule(format!("data.agent_policy.{rule}"))
            .expect("evaluates");
        serde_json::to_value(&v).expect("a JSON value")
    }

    fn allows(&self, input: &Value) -> bool {
        self.eval("CreateContainerRequest", input) == json!(true)
    }

    fn denial(&self, input: &Value) -> String {
        let mut e = self.engine.clone();
        e.set_input(regorus::Value::from(input.clone()));
        e.eval_rule("data.agent_policy.denial".into())
            .ok()
            .and_then(|v| serde_json::to_value(&v).ok())
            .map(|v| v.to_string())
            .unwrap_or_default()
    }
}

/// The single-field changes that must each be refused.
fn mutations(input: &Value, data: &Value) -> Vec<(&'static str, Value)> {
    let app = &data["containers"]["app"];
    let mut out = Vec::new();
    let mut m = input.clone();
    let a0 = m["args"][0].as_str().unwrap_or_default().to_string();
    m["args"][0] = json!(format!("{a0}x"));
    out.push(("an argument changed", m));
    let mut m = input.clone();
    m["args"].as_array_mut().unwrap().push(json!("--extra"));
    out.push(("an argument added", m));
    let mut m = input.clone();
    m["env"].as_array_mut().unwrap().push(json!("INJECTED=1"));
    out.push(("an extra variable", m));
    let mut m = input.clone();
    m["block_devices"] = json!([{"container_path": "/dev/sneaky", "serial": "coffer-vol0"}]);
    out.push(("a block device the pod does not claim", m));
    if let Some((name, _)) = app["env"]["pinned"]
        .as_object()
        .and_then(|p| p.iter().next())
    {
        let mut m = input.clone();
        for e in m["env"].as_array_mut().unwrap() {
            let s = e.as_str().unwrap().to_string();
            if s.split('=').next() == Some(name.as_str()) {
                *e = json!(format!("{s}-changed"));
            }
        }
        out.push(("a pinned value changed", m));
    }
    let mut m = input.clone();
    m["working_dir"] = json!(format!("{}x", input["working_dir"].as_str().unwrap()));
    out.push(("the working directory", m));
    if !app["user"]["uid"].is_null() {
        let mut m = input.clone();
        m["user"]["uid"] = json!(input["user"]["uid"].as_i64().unwrap() + 1);
        out.push(("the uid", m));
    }
    let mut m = input.clone();
    m["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/host", "type": "bind", "source": "/etc", "options": ["rbind", "ro"]}));
    out.push(("an extra hostPath mount", m));
    let mut m = input.clone();
    m["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/dev/shm", "type": "bind",
        "source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/other",
        "options": ["rbind", "rw"]}));
    out.push(("a volume over a runtime path", m));
    let mut m = input.clone();
    m["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/etc/hosts", "type": "bind",
        "source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/other",
        "options": ["rbind", "rw"]}));
    out.push(("a volume over the kubelet's hosts file", m));
    let mut m = input.clone();
    m["privileged"] = json!(true);
    out.push(("privileged", m));
    let mut m = input.clone();
    m["image_ref"]["tag"] = json!("v2");
    out.push(("the image tag", m));
    let mut m = input.clone();
    m["image_ref"]["digest"] = json!(digest('c'));
    out.push(("the image digest", m));
    let mut m = input.clone();
    m["annotations"]["io.kubernetes.cri.container-name"] = json!("intruder");
    out.push(("a third container", m));
    let mut m = input.clone();
    m["annotations"]["io.kubernetes.cri.sandbox-namespace"] = json!("other");
    out.push(("another namespace", m));
    let mut m = input.clone();
    m["tty"] = json!(!input["tty"].as_bool().unwrap());
    out.push(("tty", m));
    let mut m = input.clone();
    m["read_only_rootfs"] = json!(!input["read_only_rootfs"].as_bool().unwrap());
    out.push(("read_only_rootfs", m));
    out
}

fn check(c: &Case, rt: &tokio::runtime::Runtime) -> Result<(), TestCaseError> {
    let opts = Options {
        kbs_url: "http://127.0.0.1:8080".into(),
        ..Default::default()
    };
    let generated = rt.block_on(generate(&[documents(c)], &images(c), &opts));
    let (generated, input) = match (generated, simulate(c)) {
        (Ok(g), Ok(input)) => (g, input),
        (Err(e), Err(Refused::NoCommand)) => {
            prop_assert!(e.to_string().contains("no command"), "{e}");
            return Ok(());
        }
        (Err(e), Err(Refused::Unpinned)) => {
            let msg = e.to_string();
            prop_assert!(
                msg.contains("whose value is not known") && msg.contains("container app"),
                "{msg}"
            );
            return Ok(());
        }
        (Err(e), Ok(_)) => return Err(TestCaseError::fail(format!("refused: {e}"))),
        (Ok(_), Err(why)) => {
            return Err(TestCaseError::fail(format!(
                "generated, but expected {why:?}"
            )))
        }
    };
    let policy = Policy::new(&generated.pods[0].policy);
    for secret in &c.secret_values {
        prop_assert!(
            !generated.pods[0].policy.contains(&format!("\"{secret}\"")),
            "a Secret value is in the policy"
        );
    }
    prop_assert!(
        policy.allows(&input),
        "refused: {}\ninput: {input:#}\ndata: {:#}",
        policy.denial(&input),
        policy.data["containers"]["app"]
    );
    // The readiness probe's exec, and nothing else.
    let exec = json!({"container_id": CONTAINER_ID, "exec_id": "e1", "args": ["cat", "/tmp/ready"],
        "env": [], "tty": false, "stdin": false, "container": {"name": "app", "stdin": false, "tty": false}});
    prop_assert_eq!(policy.eval("ExecProcessRequest", &exec), json!(true));
    let mut other = exec.clone();
    other["args"] = json!(["sh"]);
    prop_assert_eq!(policy.eval("ExecProcessRequest", &other), json!(false));
    for (what, m) in mutations(&input, &policy.data) {
        prop_assert!(!policy.allows(&m), "allowed after {what}: {m:#}");
    }
    // What the shim says a subPath comes from must be that mount's volume and subPath; and
    // no other mount may claim one.
    let mounts = input["mounts"].as_array().unwrap();
    for (k, m) in mounts.iter().enumerate() {
        let opts: Vec<String> = m["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect();
        let claims = opts.iter().any(|o| o.starts_with("coffer.volume="));
        let changes: Vec<(&str, Vec<String>)> = if claims {
            vec![
                (
                    "another volume",
                    opts.iter()
                        .map(|o| {
                            if o.starts_with("coffer.volume=") {
                                format!("{}-x", o)
                            } else {
                                o.clone()
                            }
                        })
                        .collect(),
                ),
                (
                    "another subPath",
                    opts.iter()
                        .map(|o| {
                            if o.starts_with("coffer.subpath=") {
                                "coffer.subpath=other".into()
                            } else {
                                o.clone()
                            }
                        })
                        .collect(),
                ),
            ]
        } else {
            let mut more = opts.clone();
            more.push(format!("coffer.volume=empty-dir/{}", volume_name(0)));
            more.push("coffer.subpath=x".into());
            vec![("a subPath claim", more)]
        };
        for (what, new) in changes {
            let mut changed = input.clone();
            changed["mounts"][k]["options"] = json!(new);
            prop_assert!(
                !policy.allows(&changed),
                "allowed after {what} on {}",
                m["destination"]
            );
        }
    }
    // File volumes: the shim may copy in exactly those the containers mount, as their kind.
    let set_volume = |volume: &str, kind: &str| {
        policy.eval(
            "SetVolumeRequest",
            &json!({"volume": volume, "kind": kind, "files": [{"path": "a", "mode": 420, "size": 1}]}),
        )
    };
    for (i, m) in c.mounts.iter().enumerate() {
        let kind = match m.kind {
            "configMap" => "configmap",
            "secret" => "secret",
            "projected" => "projected",
            _ => continue,
        };
        // Mounted whole or only through a subPath: either way the shim copies it in.
        prop_assert_eq!(
            set_volume(&volume_name(i), kind),
            json!(true),
            "{} {}",
            kind,
            i
        );
        let other = if kind == "secret" {
            "configmap"
        } else {
            "secret"
        };
        let shared = c
            .mounts
            .iter()
            .enumerate()
            .any(|(j, n)| volume_name(j) == volume_name(i) && n.kind != m.kind);
        if !shared {
            prop_assert_eq!(set_volume(&volume_name(i), other), json!(false));
        }
    }
    prop_assert_eq!(
        set_volume("not-a-volume-of-the-pod", "configmap"),
        json!(false)
    );
    prop_assert_eq!(set_volume(&volume_name(0), "host-path"), json!(false));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_policy_allows_exactly_what_the_runtime_sends(c in case()) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        check(&c, &rt)?;
    }
}
