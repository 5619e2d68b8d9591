//! `coffer install containerd`: the containerd configuration that serves Coffer pods, and the
//! shim's own configuration.
//!
//! containerd gets the runtime handler `coffer` (`io.containerd.coffer.v2`, which finds
//! `containerd-shim-coffer-v2` on its PATH) and the proxy snapshotter `coffer`
//! (`coffer-snapshotter`'s socket), made the CRI plugin's snapshotter: containerd 1.6 has one
//! snapshotter for all CRI images, so such a node serves Coffer pods only. Pod and container
//! annotations under `io.katacontainers.` and `io.coffer.` are passed to the shim, which takes the
//! initdata from them and refuses every other one. The CRI streaming server listens on loopback.
//!
//! With `--root DIR` every path (containerd's root, state and sockets included) lies under DIR,
//! so that a private containerd can run beside the node's (tests, trials). Files are written
//! atomically; a containerd configuration this command did not write is never replaced.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

/// `coffer install` arguments.
#[derive(Args)]
pub struct InstallArgs {
    #[command(subcommand)]
    command: InstallCommand,
}

#[derive(Subcommand)]
enum InstallCommand {
    /// Configure containerd to run pods with Coffer (runtime handler and snapshotter `coffer`).
    Containerd(ContainerdArgs),
}

/// `coffer install containerd` arguments.
#[derive(Args)]
struct ContainerdArgs {
    /// Print containerd's configuration and write nothing.
    #[arg(long)]
    print_config: bool,
    /// Install under this root instead of `/` (every path, containerd's sockets included).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The pods' sandbox: `vm` (a pod VM, with --podvm), `remote` (a peer pod: a pod VM the
    /// `coffer-cloud` daemon at --cloud creates) or `process` (development).
    #[arg(long, default_value = "vm")]
    sandbox: String,
    /// The pod VM image (`coffer podvm build --out DIR`) [default: ROOT/opt/coffer/podvm].
    #[arg(long)]
    podvm: Option<PathBuf>,
    /// The `coffer-cloud` daemon's socket, for `--sandbox remote` or `--peer-pods` [default:
    /// ROOT/run/coffer/cloud.sock].
    #[arg(long)]
    cloud: Option<PathBuf>,
    /// Also register the runtime handler `coffer-remote` (RuntimeClass `coffer-remote`): peer
    /// pods, whatever --sandbox the handler `coffer` gets. Its shim is the link
    /// BIN_DIR/containerd-shim-coffer-remote-v2, its configuration ROOT/etc/coffer/shim-remote.toml.
    #[arg(long)]
    peer_pods: bool,
    /// Where containerd-shim-coffer-v2, coffer, coffer-agent and coffer-snapshotter are.
    #[arg(long, default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// The agent binary [default: BIN_DIR/coffer-agent].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The emulated PSP's directory [default: ROOT/var/lib/coffer/psp].
    #[arg(long)]
    psp_dir: Option<PathBuf>,
    /// The pod sandbox image containerd's CRI plugin resolves (only its manifest and config
    /// are fetched on the node).
    #[arg(long, default_value = "registry.k8s.io/pause:3.9")]
    sandbox_image: String,
    /// A registry (HOST:PORT) reached over plain HTTP, by containerd and by the sandboxes'
    /// agents (development registries).
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// The TEE pod VMs are launched in: `snp` or `tdx` on such a host (under KVM), or
    /// `emulated` with --emulated-tee.
    #[arg(long, default_value = "emulated")]
    tee: String,
    /// Launch sandboxes with the emulated TEE (required with `--tee emulated`, the default: it
    /// gives no confidentiality from the node).
    #[arg(long)]
    emulated_tee: bool,
}

/// The first line of files this command writes.
const MARK: &str = "# written by `coffer install containerd`";

/// Runs `coffer install`.
pub fn run(a: InstallArgs) -> anyhow::Result<()> {
    match a.command {
        InstallCommand::Containerd(a) => containerd(a),
    }
}

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// TOML's basic string.
fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

fn containerd(a: ContainerdArgs) -> anyhow::Result<()> {
    let root = &a.root;
    let sandbox = match a.sandbox.as_str() {
        "vm" | "remote" | "process" => a.sandbox.as_str(),
        other => bail!("--sandbox {other}: use `vm`, `remote` or `process`"),
    };
    if sandbox == "process" && a.podvm.is_some() && !a.peer_pods {
        bail!("--podvm belongs to --sandbox vm or remote, or --peer-pods");
    }
    if sandbox != "remote" && !a.peer_pods && a.cloud.is_some() {
        bail!("--cloud belongs to --sandbox remote or --peer-pods");
    }
    match (a.tee.as_str(), sandbox) {
        ("emulated", _) if !a.emulated_tee => bail!(
            "--tee emulated (the default) gives no confidentiality from this node: pass \
             --emulated-tee to run pods with it (development only), or --tee snp / --tee tdx on such a host"
        ),
        ("emulated", _) => {}
        ("snp" | "tdx", "vm") => {}
        ("snp", _) if a.peer_pods => {}
        ("snp", "remote") => {}
        ("tdx", _) if a.peer_pods => bail!(
            "--tee tdx with --peer-pods: peer pods launch SEV-SNP or the emulated TEE; TDX is not built"
        ),
        ("tdx", "remote") => bail!(
            "--tee tdx with --sandbox remote: peer pods launch SEV-SNP or the emulated TEE; TDX is not built"
        ),
        ("snp" | "tdx", _) => bail!("--tee {} needs --sandbox vm", a.tee),
        (other, _) => bail!("--tee {other}: use emulated, snp or tdx"),
    }
    for r in &a.insecure_registry {
        if r.is_empty() || r.contains(['/', '"', ' ']) {
            bail!("--insecure-registry {r:?}: give HOST:PORT");
        }
    }
    let containerd_config = containerd_config(&a);
    if a.print_config {
        print!("{containerd_config}");
        return Ok(());
    }

    let podvm = a
        .podvm
        .clone()
        .unwrap_or_else(|| under(root, "/opt/coffer/podvm"));
    let cloud = a
        .cloud
        .clone()
        .unwrap_or_else(|| under(root, coffer_cloud::DEFAULT_SOCKET));
    // The sandbox lines of a handler's configuration.
    let head = |sandbox: &str| {
        let mut shim = format!(
            "{MARK}\n# The node's choices for containerd-shim-coffer-v2; the sandbox trusts none of them.\n\
             sandbox = {}\n",
            q(sandbox)
        );
        if sandbox != "process" {
            shim.push_str(&format!("podvm = {}\n", q(podvm.display().to_string())));
        }
        if sandbox == "remote" {
            shim.push_str(&format!("cloud = {}\n", q(cloud.display().to_string())));
        }
        shim
    };
    let mut shim = String::new();
    let agent = a
        .agent
        .clone()
        .unwrap_or_else(|| a.bin_dir.join("coffer-agent"));
    let psp = a
        .psp_dir
        .clone()
        .unwrap_or_else(|| under(root, "/var/lib/coffer/psp"));
    shim.push_str(&format!(
        "coffer = {}\nagent = {}\nstate_dir = {}\npsp_dir = {}\ntee = {}\nemulated_tee = {}\nplain_http = {}\n",
        q(a.bin_dir.join("coffer").display().to_string()),
        q(agent.display().to_string()),
        q(under(root, "/run/coffer/pods").display().to_string()),
        q(psp.display().to_string()),
        q(&a.tee),
        a.tee == "emulated",
        !a.insecure_registry.is_empty(),
    ));

    let config_path = under(root, "/etc/containerd/config.toml");
    if let Ok(existing) = std::fs::read_to_string(&config_path) {
        if !existing.starts_with(MARK) {
            bail!(
                "{} exists and was not written by coffer; merge the output of \
                 `coffer install containerd --print-config` into it instead",
                config_path.display()
            );
        }
    }
    let mut files = vec![
        (config_path, containerd_config),
        (
            under(root, "/etc/coffer/shim.toml"),
            format!("{}{shim}", head(sandbox)),
        ),
    ];
    if a.peer_pods {
        files.push((
            under(root, "/etc/coffer").join(coffer_shim::config::REMOTE_CONFIG),
            format!("{}{shim}", head("remote")),
        ));
        let link = a.bin_dir.join(coffer_shim::config::REMOTE_SHIM);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("containerd-shim-coffer-v2", &link)
                .with_context(|| format!("cannot link {}", link.display()))?;
            eprintln!(
                "coffer: linked {} to containerd-shim-coffer-v2",
                link.display()
            );
        }
    }
    for (path, text) in files {
        let dir = path.parent().expect("an absolute path");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        coffer_fsutil::write_atomic(&path, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("coffer: wrote {}", path.display());
    }
    eprintln!(
        "coffer: start coffer-snapshotter --socket {} --root {}, then restart containerd",
        under(root, "/run/coffer/snapshotter.sock").display(),
        under(root, "/var/lib/coffer/snapshotter").display()
    );
    Ok(())
}

/// containerd's configuration (version 2, containerd 1.6 and later).
fn containerd_config(a: &ContainerdArgs) -> String {
    let root = &a.root;
    let p = |s: &str| q(under(root, s).display().to_string());
    let mut c = format!(
        r#"{MARK}
version = 2
root = {root_dir}
state = {state_dir}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {grpc}

# Image layers are never unpacked on this node: coffer-snapshotter records them and leaves the
# pull to the sandbox.
[proxy_plugins.coffer]
  type = "snapshot"
  address = {snap}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox_image}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    # containerd 1.6 has one snapshotter for all CRI images: this node runs Coffer pods only.
    snapshotter = "coffer"
    disable_snapshot_annotations = false
    default_runtime_name = "coffer"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.coffer]
      runtime_type = "io.containerd.coffer.v2"
      # Passed to the shim, which takes the initdata and refuses every other one.
      pod_annotations = ["io.katacontainers.*", "io.coffer.*"]
      container_annotations = ["io.katacontainers.*", "io.coffer.*"]
{remote}  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = {cni}
    bin_dir = "/usr/lib/cni"
"#,
        root_dir = p("/var/lib/containerd"),
        state_dir = p("/run/containerd"),
        grpc = p("/run/containerd/containerd.sock"),
        snap = p("/run/coffer/snapshotter.sock"),
        sandbox_image = q(&a.sandbox_image),
        cni = p("/etc/cni/net.d"),
        remote = if a.peer_pods {
            "    # Peer pods (RuntimeClass coffer-remote): the shim's link containerd-shim-coffer-remote-v2,\n    \
             # which reads shim-remote.toml.\n    \
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.coffer-remote]\n      \
             runtime_type = \"io.containerd.coffer-remote.v2\"\n      \
             pod_annotations = [\"io.katacontainers.*\", \"io.coffer.*\"]\n      \
             container_annotations = [\"io.katacontainers.*\", \"io.coffer.*\"]\n"
        } else {
            ""
        },
    );
    for r in &a.insecure_registry {
        c.push_str(&format!(
            "  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.{}]\n    endpoint = [{}]\n",
            q(r),
            q(format!("http://{r}"))
        ));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(root: &Path) -> ContainerdArgs {
        ContainerdArgs {
            print_config: false,
            root: root.to_path_buf(),
            sandbox: "process".into(),
            podvm: None,
            cloud: None,
            peer_pods: false,
            bin_dir: "/opt/bin".into(),
            agent: None,
            psp_dir: None,
            sandbox_image: "r.example/pause:3.9".into(),
            insecure_registry: vec!["127.0.0.1:5000".into()],
            tee: "emulated".into(),
            emulated_tee: true,
        }
    }

    #[test]
    fn the_config_is_valid_toml_with_everything_under_the_root() {
        let c = containerd_config(&args(Path::new("/srv/n")));
        let v: toml::Value = toml::from_str(&c).unwrap();
        assert_eq!(
            v["grpc"]["address"].as_str(),
            Some("/srv/n/run/containerd/containerd.sock")
        );
        assert_eq!(
            v["proxy_plugins"]["coffer"]["type"].as_str(),
            Some("snapshot")
        );
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["containerd"]["snapshotter"].as_str(), Some("coffer"));
        assert_eq!(
            cri["containerd"]["runtimes"]["coffer"]["runtime_type"].as_str(),
            Some("io.containerd.coffer.v2")
        );
        assert_eq!(cri["stream_server_address"].as_str(), Some("127.0.0.1"));
        assert_eq!(
            cri["registry"]["mirrors"]["127.0.0.1:5000"]["endpoint"][0].as_str(),
            Some("http://127.0.0.1:5000")
        );
        let d = containerd_config(&args(Path::new("/")));
        let v: toml::Value = toml::from_str(&d).unwrap();
        assert_eq!(v["root"].as_str(), Some("/var/lib/containerd"));
    }

    #[test]
    fn a_foreign_containerd_config_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("etc/containerd/config.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "version = 2\n").unwrap();
        let e = containerd(args(d.path())).unwrap_err().to_string();
        assert!(e.contains("--print-config"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "version = 2\n");
        std::fs::remove_file(&path).unwrap();
        containerd(args(d.path())).unwrap();
        // Written by us: replaced on the next install.
        containerd(args(d.path())).unwrap();
        // The shim reads what was written.
        let shim =
            coffer_shim::config::ShimConfig::read(&d.path().join("etc/coffer/shim.toml")).unwrap();
        assert!(shim.emulated_tee && shim.plain_http);
        assert_eq!(shim.state_dir, d.path().join("run/coffer/pods"));
    }

    #[test]
    fn the_emulated_tee_must_be_asked_for() {
        let d = tempfile::tempdir().unwrap();
        let mut a = args(d.path());
        a.emulated_tee = false;
        let e = containerd(a).unwrap_err().to_string();
        assert!(e.contains("--emulated-tee"), "{e}");

        // A hardware TEE needs no such switch, and the shim reads it back.
        let mut a = args(d.path());
        a.emulated_tee = false;
        a.tee = "snp".into();
        a.sandbox = "vm".into();
        containerd(a).unwrap();
        let shim =
            coffer_shim::config::ShimConfig::read(&d.path().join("etc/coffer/shim.toml")).unwrap();
        assert_eq!(shim.tee, coffer_shim::config::TeeKind::Snp);
        assert!(!shim.emulated_tee);
    }

    #[test]
    fn a_peer_pod_node_names_its_image_and_coffer_cloud() {
        let d = tempfile::tempdir().unwrap();
        let mut a = args(d.path());
        a.sandbox = "remote".into();
        containerd(a).unwrap();
        let shim =
            coffer_shim::config::ShimConfig::read(&d.path().join("etc/coffer/shim.toml")).unwrap();
        assert_eq!(shim.sandbox, coffer_shim::config::SandboxKind::Remote);
        assert_eq!(shim.podvm, Some(d.path().join("opt/coffer/podvm")));
        assert_eq!(shim.cloud, Some(d.path().join("run/coffer/cloud.sock")));
        // SEV-SNP or the emulated TEE, and --cloud only with remote.
        let mut a = args(d.path());
        a.sandbox = "remote".into();
        a.tee = "tdx".into();
        let e = containerd(a).unwrap_err().to_string();
        assert!(e.contains("TDX is not built"), "{e}");
        let mut a = args(d.path());
        a.cloud = Some("/run/x.sock".into());
        let e = containerd(a).unwrap_err().to_string();
        assert!(e.contains("--cloud belongs to --sandbox remote"), "{e}");
    }

    #[test]
    fn peer_pods_add_the_coffer_remote_handler_beside_coffer() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let mut a = args(d.path());
        a.bin_dir = bin.clone();
        a.peer_pods = true;
        containerd(a).unwrap();
        let read = |name: &str| {
            coffer_shim::config::ShimConfig::read(&d.path().join("etc/coffer").join(name)).unwrap()
        };
        assert_eq!(
            read("shim.toml").sandbox,
            coffer_shim::config::SandboxKind::Process
        );
        let remote = read(coffer_shim::config::REMOTE_CONFIG);
        assert_eq!(remote.sandbox, coffer_shim::config::SandboxKind::Remote);
        assert_eq!(remote.cloud, Some(d.path().join("run/coffer/cloud.sock")));
        let link = bin.join(coffer_shim::config::REMOTE_SHIM);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            std::path::PathBuf::from("containerd-shim-coffer-v2")
        );
        let config = std::fs::read_to_string(d.path().join("etc/containerd/config.toml")).unwrap();
        assert!(
            config.contains("runtime_type = \"io.containerd.coffer-remote.v2\""),
            "{config}"
        );
        // Installing again keeps the link.
        let mut a = args(d.path());
        a.bin_dir = bin;
        a.peer_pods = true;
        containerd(a).unwrap();
    }
}
