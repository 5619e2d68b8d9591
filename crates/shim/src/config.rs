//! The shim's node configuration (`/etc/coffer/shim.toml`, or the file `COFFER_SHIM_CONFIG`
//! names; `coffer install containerd` writes it).
//!
//! Everything here is the node's choice and untrusted by the sandbox: what runs inside is decided
//! by the measured pod VM and the attested initdata, never by this file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ShimError;

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "COFFER_SHIM_CONFIG";
/// The configuration file when [`CONFIG_ENV`] is unset.
pub const DEFAULT_CONFIG: &str = "/etc/coffer/shim.toml";

/// The shim's name for the peer-pod runtime handler (`coffer-remote`, runtime type
/// `io.containerd.coffer-remote.v2`): a link to this program, which then reads
/// [`REMOTE_CONFIG`] beside the configuration file.
pub const REMOTE_SHIM: &str = "containerd-shim-coffer-remote-v2";

/// The peer-pod handler's configuration file, beside `shim.toml`.
pub const REMOTE_CONFIG: &str = "shim-remote.toml";

/// The configuration this shim reads: [`CONFIG_ENV`] or [`DEFAULT_CONFIG`], and for a shim
/// started as [`REMOTE_SHIM`] the [`REMOTE_CONFIG`] beside it.
pub fn config_path() -> PathBuf {
    let base = std::env::var_os(CONFIG_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_CONFIG.into());
    let remote = std::env::args_os()
        .next()
        .is_some_and(|a| Path::new(&a).file_name() == Some(std::ffi::OsStr::new(REMOTE_SHIM)));
    if remote {
        base.with_file_name(REMOTE_CONFIG)
    } else {
        base
    }
}

/// The sandbox each pod gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    /// A pod VM (QEMU; `podvm` names the image).
    Vm,
    /// A peer pod: the pod VM (`podvm`) created by the `coffer-cloud` daemon (`cloud`) through
    /// its provider (docs/peer-pods.md).
    Remote,
    /// The process sandbox (development: no isolation from the host).
    Process,
}

/// The TEE each pod VM is launched in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeeKind {
    /// The keeper's emulated PSP (no confidentiality); needs `emulated_tee = true` as well.
    #[default]
    Emulated,
    /// AMD SEV-SNP (a pod VM under KVM on an SNP host).
    Snp,
    /// Intel TDX (a pod VM under KVM on a TDX host).
    Tdx,
}

impl TeeKind {
    /// The keeper's `--tee` value.
    pub fn as_str(self) -> &'static str {
        match self {
            TeeKind::Emulated => "emulated",
            TeeKind::Snp => "snp",
            TeeKind::Tdx => "tdx",
        }
    }
}

/// `shim.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShimConfig {
    /// `vm`, `remote` or `process`.
    pub sandbox: SandboxKind,
    /// The pod VM image (`coffer podvm build --out DIR`), for `sandbox = "vm"` or `"remote"`.
    #[serde(default)]
    pub podvm: Option<PathBuf>,
    /// The `coffer-cloud` daemon's socket, for `sandbox = "remote"` [default:
    /// /run/coffer/cloud.sock].
    #[serde(default)]
    pub cloud: Option<PathBuf>,
    /// The pod VM's accelerator: `kvm`, `tcg` or `auto`.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// The pod VM's memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// The `coffer` program (the sandbox keeper) [default: beside the shim].
    #[serde(default)]
    pub coffer: Option<PathBuf>,
    /// The `coffer-agent` program [default: beside the shim].
    #[serde(default)]
    pub agent: Option<PathBuf>,
    /// Where sandboxes keep their state.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The verified image blob cache of process sandboxes [default: beside `state_dir`].
    #[serde(default)]
    pub image_cache: Option<PathBuf>,
    /// The emulated PSP's directory.
    #[serde(default = "default_psp_dir")]
    pub psp_dir: PathBuf,
    /// The TEE pod VMs are launched in: `emulated` (default), `snp` or `tdx`.
    #[serde(default)]
    pub tee: TeeKind,
    /// The firmware a hardware TEE boots [default: the pod VM's firmware-snp.fd or
    /// firmware-tdx.fd].
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// An SEV-SNP pod VM's vCPU model (QEMU `-cpu`, default `EPYC-Milan`), which its launch
    /// digest covers.
    #[serde(default = "default_snp_cpu")]
    pub snp_cpu: String,
    /// Launch sandboxes with the emulated TEE. Must be set when `tee` is `emulated`: the
    /// emulated TEE gives no confidentiality from this node.
    #[serde(default)]
    pub emulated_tee: bool,
    /// Pull images over plain HTTP (development registries).
    #[serde(default)]
    pub plain_http: bool,
    /// The initdata of pods that carry none in their annotation; without it such pods are
    /// refused.
    #[serde(default)]
    pub default_initdata: Option<PathBuf>,
}

fn default_accel() -> String {
    "auto".into()
}

fn default_snp_cpu() -> String {
    "EPYC-Milan".into()
}

fn default_memory() -> u32 {
    512
}

fn default_state_dir() -> PathBuf {
    "/run/coffer/pods".into()
}

fn default_psp_dir() -> PathBuf {
    "/var/lib/coffer/psp".into()
}

impl ShimConfig {
    /// Reads the configuration file ([`config_path`]).
    pub fn load() -> Result<Self, ShimError> {
        Self::read(&config_path())
    }

    /// Reads and checks `path`.
    pub fn read(path: &Path) -> Result<Self, ShimError> {
        let bad = |why: String| ShimError::Config(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let config: Self = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        config.check().map_err(bad)?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        match (self.tee, self.sandbox) {
            (TeeKind::Emulated, _) if !self.emulated_tee => {
                return Err(
                    "tee = \"emulated\" (the default) gives no confidentiality: set `emulated_tee = true` \
                     to run sandboxes with it (development), or `tee = \"snp\"` / `tee = \"tdx\"` on such a host"
                        .into(),
                )
            }
            (TeeKind::Snp | TeeKind::Tdx, SandboxKind::Process) => {
                return Err(format!(
                    "tee = \"{}\" needs sandbox = \"vm\": a process sandbox has no TEE",
                    self.tee.as_str()
                ))
            }
            _ => {}
        }
        if self.sandbox == SandboxKind::Remote
            && !matches!(self.tee, TeeKind::Emulated | TeeKind::Snp)
        {
            return Err(format!(
                "tee = \"{}\" with sandbox = \"remote\": peer pods launch SEV-SNP (on a libvirt host that has it) or the emulated TEE",
                self.tee.as_str()
            ));
        }
        if self.cloud.is_some() && self.sandbox != SandboxKind::Remote {
            return Err("`cloud` belongs to sandbox = \"remote\"".into());
        }
        match (self.sandbox, &self.podvm) {
            (SandboxKind::Vm, None) => Err("sandbox = \"vm\" needs `podvm = DIR`".into()),
            (SandboxKind::Remote, None) => {
                Err("sandbox = \"remote\" needs `podvm = DIR` (the image its VMs boot)".into())
            }
            (SandboxKind::Process, Some(_)) => {
                Err("`podvm` belongs to sandbox = \"vm\" or \"remote\"".into())
            }
            _ => Ok(()),
        }
    }

    /// A program beside the shim unless configured.
    fn beside(configured: &Option<PathBuf>, name: &str) -> PathBuf {
        configured.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join(name)))
                .unwrap_or_else(|| name.into())
        })
    }

    /// The `coffer` program.
    pub fn coffer_bin(&self) -> PathBuf {
        Self::beside(&self.coffer, "coffer")
    }

    /// The `coffer-agent` program.
    pub fn agent_bin(&self) -> PathBuf {
        Self::beside(&self.agent, "coffer-agent")
    }

    /// The image blob cache.
    pub fn image_cache(&self) -> PathBuf {
        self.image_cache.clone().unwrap_or_else(|| {
            self.state_dir
                .parent()
                .unwrap_or(&self.state_dir)
                .join("image-cache")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ShimConfig, String> {
        let c: ShimConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check().map(|()| c)
    }

    #[test]
    fn the_emulated_tee_must_be_chosen_explicitly() {
        let e = parse("sandbox = \"process\"").unwrap_err();
        assert!(e.contains("emulated_tee = true"), "{e}");
        parse("sandbox = \"process\"\nemulated_tee = true").unwrap();
        let c = parse("sandbox = \"vm\"\npodvm = \"/p\"\ntee = \"snp\"").unwrap();
        assert_eq!(c.tee, TeeKind::Snp);
        let e = parse("sandbox = \"process\"\ntee = \"tdx\"").unwrap_err();
        assert!(e.contains("needs sandbox = \"vm\""), "{e}");
        let e = parse("sandbox = \"vm\"\npodvm = \"/p\"\ntee = \"sgx\"").unwrap_err();
        assert!(e.contains("sgx"), "{e}");
    }

    #[test]
    fn a_vm_sandbox_needs_its_image_and_unknown_keys_are_refused() {
        let e = parse("sandbox = \"vm\"\nemulated_tee = true").unwrap_err();
        assert!(e.contains("podvm"), "{e}");
        let e = parse("sandbox = \"process\"\nemulated_tee = true\npolicy = \"x\"").unwrap_err();
        assert!(e.contains("policy"), "{e}");
        let c = parse("sandbox = \"vm\"\nemulated_tee = true\npodvm = \"/p\"\nmemory_mib = 256")
            .unwrap();
        assert_eq!((c.sandbox, c.memory_mib), (SandboxKind::Vm, 256));
    }

    #[test]
    fn a_peer_pod_node_needs_its_image_and_only_it_names_coffer_cloud() {
        let e = parse("sandbox = \"remote\"\nemulated_tee = true").unwrap_err();
        assert!(e.contains("needs `podvm = DIR`"), "{e}");
        let e = parse("sandbox = \"vm\"\nemulated_tee = true\npodvm = \"/p\"\ncloud = \"/c.sock\"")
            .unwrap_err();
        assert!(e.contains("`cloud` belongs to sandbox = \"remote\""), "{e}");
        let e = parse("sandbox = \"remote\"\npodvm = \"/p\"\ntee = \"tdx\"").unwrap_err();
        assert!(e.contains("peer pods launch SEV-SNP"), "{e}");
        let c =
            parse("sandbox = \"remote\"\nemulated_tee = true\npodvm = \"/p\"\ncloud = \"/c.sock\"")
                .unwrap();
        assert_eq!(c.sandbox, SandboxKind::Remote);
        assert_eq!(c.cloud, Some("/c.sock".into()));
    }
}
