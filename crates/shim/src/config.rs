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

/// The sandbox each pod gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    /// A pod VM (QEMU; `podvm` names the image).
    Vm,
    /// The process sandbox (development: no isolation from the host).
    Process,
}

/// `shim.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShimConfig {
    /// `vm` or `process`.
    pub sandbox: SandboxKind,
    /// The pod VM image (`coffer podvm build --out DIR`), for `sandbox = "vm"`.
    #[serde(default)]
    pub podvm: Option<PathBuf>,
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
    /// Launch sandboxes with the emulated TEE. Must be set: this build has no hardware attester
    /// in the guest yet, and the emulated TEE gives no confidentiality from this node.
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
    /// Reads the configuration file ([`CONFIG_ENV`] or [`DEFAULT_CONFIG`]).
    pub fn load() -> Result<Self, ShimError> {
        let path = std::env::var_os(CONFIG_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_CONFIG.into());
        Self::read(&path)
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
        if !self.emulated_tee {
            return Err(
                "no TEE attester is built into the pod VM yet; set `emulated_tee = true` \
                        to run sandboxes with the emulated TEE (development: no confidentiality)"
                    .into(),
            );
        }
        match (self.sandbox, &self.podvm) {
            (SandboxKind::Vm, None) => Err("sandbox = \"vm\" needs `podvm = DIR`".into()),
            (SandboxKind::Process, Some(_)) => Err("`podvm` belongs to sandbox = \"vm\"".into()),
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
}
