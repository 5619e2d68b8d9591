//! A private containerd (Debian's) with Coffer installed as `coffer install containerd` writes
//! it: the `coffer` runtime handler (containerd-shim-coffer-v2) and the `coffer` snapshotter
//! (coffer-snapshotter, started here), its own root, state and sockets under a test directory,
//! nothing listening beyond loopback. Driven through the CRI as the kubelet does, and with `ctr`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use coffer_shim::cri::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

/// containerd and the snapshotter, killed on drop.
pub struct Containerd {
    /// The test directory.
    pub dir: PathBuf,
    /// containerd's gRPC socket.
    pub sock: PathBuf,
    /// The shim's configuration.
    pub shim_config: PathBuf,
    /// containerd's log.
    pub log: PathBuf,
    containerd: Option<Child>,
    snapshotter: Option<Child>,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What containerd and the shims (whose logs containerd relays) said last.
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<_> = log.lines().collect();
            eprintln!(
                "--- containerd.log (last 40 lines) ---\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
            let _ = fs::write(
                std::env::temp_dir().join("coffer-failed-containerd.log"),
                &log,
            );
            // And what each pod VM's guest (kernel and agent) said last.
            for entry in fs::read_dir(self.dir.join("node/run/coffer/pods"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let console =
                    fs::read_to_string(entry.path().join("agent.log")).unwrap_or_default();
                if console.is_empty() {
                    continue;
                }
                let lines: Vec<_> = console.lines().collect();
                eprintln!(
                    "--- {} (last 40 lines) ---\n{}",
                    entry.path().join("agent.log").display(),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        // Shims outlive a killed containerd by design; a test that ends (or fails) early must
        // not leave them, and their sandboxes go with them.
        for line in processes_mentioning(&format!("-address {}", self.sock.display())) {
            if let Some(pid) = line.split(':').next() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        for c in [self.containerd.take(), self.snapshotter.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a sandbox of the shim needs: where the KBS's emulated PSP lives, and the registry.
pub struct ShimSetup<'a> {
    /// `process` or `vm`.
    pub sandbox: &'a str,
    /// The pod VM, for `vm`.
    pub podvm: Option<&'a Path>,
    /// The emulated PSP's directory.
    pub psp_dir: &'a Path,
    /// The registry's `host:port` (plain HTTP).
    pub registry: &'a str,
    /// The `coffer-cloud` socket, for `remote` or `peer_pods`.
    pub cloud: Option<&'a Path>,
    /// Also the runtime handler `coffer-remote` (peer pods).
    pub peer_pods: bool,
}

impl Containerd {
    /// Installs Coffer into a private containerd under `dir` with `coffer install containerd
    /// --root DIR`, and starts the snapshotter and containerd.
    pub fn start(dir: &Path, setup: &ShimSetup) -> Self {
        let shim = super::sibling_binary("coffer-shim", "containerd-shim-coffer-v2");
        let snapshotter = super::sibling_binary("coffer-snapshotter", "coffer-snapshotter");
        let agent = super::agent_binary();
        let root = dir.join("node");
        let mut install = Command::new(super::coffer_bin());
        install
            .args(["install", "containerd", "--root"])
            .arg(&root)
            .arg("--sandbox")
            .arg(setup.sandbox)
            .arg("--bin-dir")
            .arg(shim.parent().unwrap())
            .arg("--agent")
            .arg(&agent)
            .arg("--psp-dir")
            .arg(setup.psp_dir)
            .arg("--sandbox-image")
            .arg(format!("{}/pause:3.9", setup.registry))
            .arg("--insecure-registry")
            .arg(setup.registry)
            .arg("--emulated-tee");
        if let Some(p) = setup.podvm {
            install.arg("--podvm").arg(p);
        }
        if let Some(c) = setup.cloud {
            install.arg("--cloud").arg(c);
        }
        if setup.peer_pods {
            install.arg("--peer-pods");
        }
        super::run_ok(&mut install);
        let config = root.join("etc/containerd/config.toml");
        let shim_config = root.join("etc/coffer/shim.toml");
        let sock = root.join("run/containerd/containerd.sock");
        let snap_sock = root.join("run/coffer/snapshotter.sock");
        let snap = Command::new(&snapshotter)
            .arg("--socket")
            .arg(&snap_sock)
            .arg("--root")
            .arg(root.join("var/lib/coffer/snapshotter"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("snapshotter.log")).unwrap())
            .spawn()
            .unwrap();
        wait_for(&snap_sock, Duration::from_secs(10));
        let mut c = Self {
            dir: dir.to_path_buf(),
            sock,
            shim_config,
            log: dir.join("containerd.log"),
            containerd: None,
            snapshotter: Some(snap),
        };
        c.containerd = Some(c.spawn_containerd(&config, shim.parent().unwrap()));
        c
    }

    fn spawn_containerd(&self, config: &Path, bin_dir: &Path) -> Child {
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let _ = fs::remove_file(&self.sock);
        let child = Command::new("containerd")
            .arg("--config")
            .arg(config)
            .env("PATH", path)
            .env("COFFER_SHIM_CONFIG", &self.shim_config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .expect("containerd must be installed (scripts/test installs it)");
        // The socket file appears before containerd accepts on it.
        let until = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(Instant::now() < until, "containerd does not serve");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Kills containerd with SIGKILL (its shims go on).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts containerd again on the same root and state.
    pub fn restart(&mut self) {
        let config = self.dir.join("node/etc/containerd/config.toml");
        let shim = super::sibling_binary("coffer-shim", "containerd-shim-coffer-v2");
        self.containerd = Some(self.spawn_containerd(&config, shim.parent().unwrap()));
    }

    /// `ctr --address SOCK ARGS…`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A gRPC channel to containerd.
    pub async fn channel(&self) -> Channel {
        coffer_agent::api::unix_channel(&self.sock).await.unwrap()
    }

    /// Waits until the CRI plugin serves (it loads its state after containerd's socket is up).
    pub async fn cri_ready(&self) {
        let (mut rt, _) = self.cri().await;
        let until = Instant::now() + Duration::from_secs(30);
        while let Err(e) = rt
            .list_pod_sandbox(coffer_shim::cri::ListPodSandboxRequest::default())
            .await
        {
            assert!(
                Instant::now() < until,
                "the CRI does not serve: {}",
                e.message()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CRI clients (runtime and image services), as the kubelet has them.
    pub async fn cri(&self) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
        let ch = self.channel().await;
        (
            RuntimeServiceClient::new(ch.clone()),
            ImageServiceClient::new(ch),
        )
    }
}

/// Waits until `path` exists.
pub fn wait_for(path: &Path, timeout: Duration) {
    let until = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < until, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if c.contains(needle) {
            out.push(format!("{}: {c}", e.file_name().to_string_lossy()));
        }
    }
    out
}

/// Mount points (from /proc/self/mountinfo) under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&d))
        .map(str::to_string)
        .collect()
}

/// A KBS holding the image key and trusting the sandbox's measurement (a process sandbox, or
/// the pod VM `podvm`), a registry with
/// the encrypted app image and a plain pause image, containerd with Coffer installed.
pub struct Node {
    /// The KBS, registry and image.
    pub world: super::BenchWorld,
    /// containerd.
    pub containerd: Containerd,
    /// `host:port/app:v1` (encrypted).
    pub app: String,
    /// The initdata, as the pod annotation carries it.
    pub annotation: String,
    /// An initdata whose policy is the default one but allows the exec [`EXEC_ALLOWED`], as
    /// the pod annotation carries it.
    pub exec_annotation: String,
    /// A runtime for the CRI calls.
    pub rt: tokio::runtime::Runtime,
}

/// The one exec the policy of [`Node::exec_annotation`] allows.
pub const EXEC_ALLOWED: [&str; 3] = [
    "/bin/sh",
    "-c",
    "echo exec says hi; echo exec complains >&2; exit 4",
];

pub fn node(d: &Path, podvm: Option<&Path>) -> Node {
    node_at(d, podvm, "127.0.0.1")
}

/// A [`node`] whose KBS and registry listen on `ip` (an address of the test's network
/// namespace that the pods' network reaches, e.g. its CNI bridge's).
pub fn node_at(d: &Path, podvm: Option<&Path>, ip: &str) -> Node {
    node_with(d, podvm, ip, |_| {})
}

/// [`node_at`] whose KBS's configuration `tweak` changes.
pub fn node_with(
    d: &Path,
    podvm: Option<&Path>,
    ip: &str,
    tweak: impl FnOnce(&mut coffer_kbs::Config),
) -> Node {
    node_full(d, podvm, None, ip, tweak)
}

/// A node with two runtime handlers: `coffer` (process sandboxes) and `coffer-remote` (peer
/// pods: pod VMs that the `coffer-cloud` daemon at `cloud` creates).
pub fn node_remote(d: &Path, podvm: &Path, cloud: &Path, ip: &str) -> Node {
    node_full(d, Some(podvm), Some(cloud), ip, |_| {})
}

fn node_full(
    d: &Path,
    podvm: Option<&Path>,
    cloud: Option<&Path>,
    ip: &str,
    tweak: impl FnOnce(&mut coffer_kbs::Config),
) -> Node {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let world = super::bench_world_with(&rt, d, ip, tweak);
    // A second initdata: the default policy, plus one exec.
    let policy = d.join("exec.rego");
    fs::write(
        &policy,
        format!(
            "{}\nExecProcessRequest if input.args == {}\n",
            coffer_agent::policy::DEFAULT_POLICY,
            serde_json::to_string(&EXEC_ALLOWED).unwrap()
        ),
    )
    .unwrap();
    let (ok, text, err) = super::coffer(&[
        "initdata",
        "new",
        "--kbs-url",
        &world.kbs.url,
        "--image-key",
        "kbs:///default/image-keys/app",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let exec_initdata = d.join("exec-initdata.toml");
    fs::write(&exec_initdata, &text).unwrap();
    // Reference values for both (a peer-pod node's process sandboxes and pod VMs alike).
    let mut all = measured_refs(podvm, &world.psp_dir, &[&world.initdata, &exec_initdata]);
    if cloud.is_some() {
        let process = measured_refs(None, &world.psp_dir, &[&world.initdata, &exec_initdata]);
        for (k, v) in process.as_object().unwrap() {
            if let (Some(a), Some(more)) = (all[k].as_array_mut(), v.as_array()) {
                for x in more {
                    if !a.contains(x) {
                        a.push(x.clone());
                    }
                }
            }
        }
    }
    rt.block_on(
        world
            .kbs
            .admin
            .set_reference_values(all.to_string().as_bytes()),
    )
    .unwrap();
    let reg = world.registry.addr.clone();
    super::skopeo_push(
        &format!("oci:{}:v1", d.join("plain").display()),
        &format!("docker://{reg}/pause:3.9"),
        false,
    );
    let containerd = Containerd::start(
        d,
        &ShimSetup {
            sandbox: if podvm.is_some() && cloud.is_none() {
                "vm"
            } else {
                "process"
            },
            podvm,
            psp_dir: &world.psp_dir,
            registry: &reg,
            cloud,
            peer_pods: cloud.is_some(),
        },
    );
    let annotation = coffer_shim::annotations::encode_initdata(
        &std::fs::read_to_string(&world.initdata).unwrap(),
    );
    let exec_annotation = coffer_shim::annotations::encode_initdata(&text);
    Node {
        app: format!("{reg}/app:v1"),
        world,
        containerd,
        annotation,
        exec_annotation,
        rt,
    }
}

/// Initdata putting each of `ids` in the attested mesh (`spiffe://coffer.test/ns/default/sa/ID`,
/// peers: every identity of that namespace, the mesh's network `cidr`, `open_ports` open) with
/// the node's image key, plus `plain` (the node's initdata, outside the mesh): the pod
/// annotation of each, by name. Their reference values (for the pod VM `podvm`, else for
/// process sandboxes) are added to what the KBS holds.
pub fn mesh_initdata(
    n: &Node,
    d: &Path,
    ids: &[&str],
    cidr: &str,
    open_ports: &[u16],
    podvm: Option<&Path>,
) -> std::collections::BTreeMap<String, String> {
    let mut files = Vec::new();
    let mut annotations = std::collections::BTreeMap::new();
    let open: Vec<String> = open_ports.iter().map(u16::to_string).collect();
    let texts = ids.iter().map(|id| {
        let mesh = d.join(format!("{id}-mesh.toml"));
        fs::write(
            &mesh,
            format!(
                "identity = \"spiffe://coffer.test/ns/default/sa/{id}\"\npeers = [\"spiffe://coffer.test/ns/default/sa/*\"]\ncidrs = [\"{cidr}\"]\nopen_ports = [{}]\n",
                open.join(", ")
            ),
        )
        .unwrap();
        let (ok, text, err) = super::coffer(&[
            "initdata",
            "new",
            "--kbs-url",
            &n.world.kbs.url,
            "--image-key",
            "kbs:///default/image-keys/app",
            "--mesh",
            mesh.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        (id.to_string(), text)
    });
    let plain = (
        "plain".to_string(),
        fs::read_to_string(&n.world.initdata).unwrap(),
    );
    for (name, initdata) in texts.collect::<Vec<_>>().into_iter().chain([plain]) {
        let file = d.join(format!("{name}-initdata.toml"));
        fs::write(&file, &initdata).unwrap();
        annotations.insert(name, coffer_shim::annotations::encode_initdata(&initdata));
        files.push(file);
    }
    let refs = measured_refs(
        podvm,
        &n.world.psp_dir,
        &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    // Added to what is registered.
    let admin = &n.world.kbs.admin;
    let mut all =
        serde_json::to_value(n.rt.block_on(admin.get_reference_values()).unwrap()).unwrap();
    for (k, v) in refs.as_object().unwrap() {
        let list = all
            .as_object_mut()
            .unwrap()
            .entry(k.clone())
            .or_insert_with(|| serde_json::json!([]));
        for x in v.as_array().unwrap() {
            if !list.as_array().unwrap().contains(x) {
                list.as_array_mut().unwrap().push(x.clone());
            }
        }
    }
    n.rt.block_on(admin.set_reference_values(all.to_string().as_bytes()))
        .unwrap();
    annotations
}

/// The CRI calls a kubelet makes for one pod, with the test's choices: host network (no CNI
/// here), logs under `log_dir`, the initdata in the pod's annotation.
pub struct Pods {
    /// The runtime service.
    pub rt: RuntimeServiceClient<Channel>,
    /// The image service.
    pub img: ImageServiceClient<Channel>,
    /// The pods' log directory.
    pub log_dir: PathBuf,
}

impl Pods {
    /// CRI clients of `c`; pod logs go under `c.dir/logs`.
    pub async fn new(c: &Containerd) -> Self {
        c.cri_ready().await;
        let (rt, img) = c.cri().await;
        Self {
            rt,
            img,
            log_dir: c.dir.join("logs"),
        }
    }

    /// The sandbox configuration of pod `name` with `annotations`.
    pub fn sandbox_config(
        &self,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> coffer_shim::cri::PodSandboxConfig {
        use coffer_shim::cri::*;
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.log_dir.join(name).display().to_string(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Puts a pod on its own network (the CNI's) rather than the node's, with DNS settings as
    /// a kubelet sends them (server 10.96.0.10, search default.svc.cluster.local, ndots:5).
    pub fn on_pod_network(&self, config: &mut coffer_shim::cri::PodSandboxConfig) {
        use coffer_shim::cri::*;
        if let Some(ns) = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
        {
            ns.network = NamespaceMode::Pod as i32;
        }
        config.dns_config = Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        });
    }

    /// A pod's address and its network namespace (PodSandboxStatus, verbose).
    pub async fn address(&mut self, pod: &str) -> (String, String) {
        let r = self
            .rt
            .pod_sandbox_status(coffer_shim::cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner();
        let info: serde_json::Value = serde_json::from_str(&r.info["info"]).unwrap();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .unwrap_or_default()
            .to_string();
        (r.status.unwrap().network.unwrap_or_default().ip, netns)
    }

    /// PullImage (`image` without a transport: `host:port/repo:tag`).
    pub async fn pull(&mut self, image: &str) -> Result<String, tonic::Status> {
        use coffer_shim::cri::*;
        self.img
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().image_ref)
    }

    /// RunPodSandbox with the runtime handler `coffer`.
    pub async fn run_pod(
        &mut self,
        config: &coffer_shim::cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        self.run_pod_with(config, "coffer").await
    }

    /// RunPodSandbox with the runtime handler `handler` (a RuntimeClass's).
    pub async fn run_pod_with(
        &mut self,
        config: &coffer_shim::cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        self.rt
            .run_pod_sandbox(coffer_shim::cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// CreateContainer `name` from `image` running `command`, then StartContainer.
    pub async fn start_container(
        &mut self,
        pod: &str,
        config: &coffer_shim::cri::PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, tonic::Status> {
        self.start_limited(pod, config, name, image, command, 0)
            .await
    }

    /// [`Self::start_container`] with a memory limit (bytes; 0: none).
    pub async fn start_limited(
        &mut self,
        pod: &str,
        config: &coffer_shim::cri::PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
        memory_limit: i64,
    ) -> Result<String, tonic::Status> {
        let id = self
            .create(pod, config, name, image, command, memory_limit)
            .await?;
        self.start(&id).await?;
        Ok(id)
    }

    /// CreateContainer `name` from `image` running `command`, with a memory limit (bytes; 0:
    /// none); logs go to `NAME.log` in the pod's log directory.
    pub async fn create(
        &mut self,
        pod: &str,
        config: &coffer_shim::cri::PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
        memory_limit: i64,
    ) -> Result<String, tonic::Status> {
        use coffer_shim::cri::*;
        self.rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    log_path: format!("{name}.log"),
                    linux: Some(LinuxContainerConfig {
                        resources: Some(LinuxContainerResources {
                            memory_limit_in_bytes: memory_limit,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                sandbox_config: Some(config.clone()),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    /// CreateContainer with a configuration as the kubelet writes it.
    pub async fn create_config(
        &mut self,
        pod: &str,
        sandbox: &coffer_shim::cri::PodSandboxConfig,
        config: coffer_shim::cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        self.rt
            .create_container(coffer_shim::cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(sandbox.clone()),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    /// StartContainer.
    pub async fn start(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.rt
            .start_container(coffer_shim::cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// ContainerStatus.
    pub async fn status(&mut self, id: &str) -> coffer_shim::cri::ContainerStatus {
        self.rt
            .container_status(coffer_shim::cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    }

    /// `ExecSync` (as `kubectl exec` without a terminal): `cmd` in container `id`.
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
    ) -> Result<coffer_shim::cri::ExecSyncResponse, tonic::Status> {
        self.rt
            .exec_sync(coffer_shim::cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Waits (up to `timeout`) until the container has exited; returns its exit code.
    pub async fn wait_exited(&mut self, id: &str, timeout: Duration) -> i32 {
        let until = Instant::now() + timeout;
        loop {
            let s = self.status(id).await;
            if s.state == coffer_shim::cri::ContainerState::ContainerExited as i32 {
                return s.exit_code;
            }
            assert!(Instant::now() < until, "container {id} still {:?}", s.state);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// StopPodSandbox then RemovePodSandbox.
    pub async fn remove_pod(&mut self, pod: &str) -> Result<(), tonic::Status> {
        use coffer_shim::cri::*;
        self.rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await?;
        self.rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await?;
        Ok(())
    }
}

/// A network namespace of this test's own (`ip netns add`, loopback up), which the calling
/// thread enters and every thread and process it starts afterwards inherits: the registry, the
/// KBS, containerd, the CNI bridge and the pods' addresses then exist only there. Removed when
/// dropped. Call it first, before any runtime or server starts.
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Makes and enters the namespace.
    pub fn enter() -> Self {
        // Unique across the test cells that run at once (each its own PID namespace, where
        // the process id says little); network namespace names are the machine's.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("coffer-t{}-{nanos:x}", std::process::id());
        super::run_ok(Command::new("ip").args(["netns", "add", &name]));
        super::run_ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        let ns = fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("entering the test's network namespace");
        Self { name }
    }

    /// Makes the CNI's bridge `cfr0` ahead of the plugin, with the gateway address `cidr`
    /// (the plugin keeps both), so that the test's servers can listen on that address for the
    /// pods before the first pod exists.
    pub fn bridge(cidr: &str) {
        Self::bridge_named("cfr0", cidr);
    }

    /// Makes the bridge `name` with the address `cidr` in the test's namespace.
    ///
    /// Its MAC address is set, as a node's network setup does: a Linux bridge without one takes
    /// the lowest MAC of its ports, so it changed each time a pod's veth with a lower one came
    /// or went, and pods (a pod VM's guest included) that had resolved the gateway kept sending
    /// to the old address until their neighbour entry went stale: their connections to the node
    /// timed out for 10 to 25 s after another pod was removed.
    pub fn bridge_named(name: &str, cidr: &str) {
        let h = name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let mac = format!(
            "02:c0:ff:{:02x}:{:02x}:{:02x}",
            (h >> 16) as u8,
            (h >> 8) as u8,
            h as u8
        );
        super::run_ok(
            Command::new("ip").args(["link", "add", name, "address", &mac, "type", "bridge"]),
        );
        super::run_ok(Command::new("ip").args(["addr", "add", cidr, "dev", name]));
        super::run_ok(Command::new("ip").args(["link", "set", name, "up"]));
    }

    /// Writes a CNI configuration for the tests' containerd under `root`
    /// (`ROOT/etc/cni/net.d`): Debian's bridge plugin on bridge `cfr0` with host-local
    /// addresses from `subnet` (its state under `root`), portmap for hostPorts, and loopback;
    /// no masquerading.
    pub fn cni_config(root: &Path, subnet: &str) {
        Self::cni_config_with(root, subnet, &root.join("var/lib/cni"));
    }

    /// [`Self::cni_config`] whose address pool's state is at `pool` (nodes that share one
    /// bridge share their pool, so that their pods' addresses differ).
    pub fn cni_config_with(root: &Path, subnet: &str, pool: &Path) {
        let dir = root.join("etc/cni/net.d");
        fs::create_dir_all(&dir).unwrap();
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "coffer-test",
            "plugins": [
                {"type": "bridge", "bridge": "cfr0", "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "subnet": subnet,
                          "dataDir": pool.display().to_string(),
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "loopback"}
            ]
        });
        fs::write(dir.join("10-coffer-test.conflist"), conf.to_string()).unwrap();
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A container of `image` running `sh -c command`, logging to `<name>.log`; with `block`, the
/// node's block device at that path is given at `/dev/xvda`, as the kubelet sends
/// `volumeDevices: [{name: data, devicePath: /dev/xvda}]`.
pub fn shell_container(
    image: &str,
    name: &str,
    command: &str,
    block: Option<&str>,
) -> coffer_shim::cri::ContainerConfig {
    use coffer_shim::cri::*;
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into(), "-c".into(), command.into()],
        log_path: format!("{name}.log"),
        devices: block
            .map(|host| Device {
                container_path: "/dev/xvda".into(),
                host_path: host.into(),
                permissions: "mrw".into(),
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// The reference values `coffer measure` prints for each initdata file (the same launch), the
/// `init_data` lists joined.
fn measured_refs(podvm: Option<&Path>, psp_dir: &Path, initdata: &[&Path]) -> serde_json::Value {
    let mut all: Option<serde_json::Value> = None;
    for file in initdata {
        let mut measure = Command::new(super::coffer_bin());
        measure.arg("measure").arg("--initdata").arg(file);
        match podvm {
            Some(p) => measure.args(["--sandbox", "vm", "--podvm"]).arg(p),
            None => measure
                .args(["--sandbox", "process", "--agent"])
                .arg(super::agent_binary())
                .arg("--psp-dir")
                .arg(psp_dir),
        };
        let refs: serde_json::Value = serde_json::from_str(&super::run_ok(&mut measure)).unwrap();
        match &mut all {
            None => all = Some(refs),
            Some(a) => {
                let more = refs["init_data"].as_array().unwrap().clone();
                a["init_data"].as_array_mut().unwrap().extend(more);
            }
        }
    }
    all.expect("at least one initdata file")
}
