//! What a provider does, and what every request is checked against before any provider call.

use std::{net::Ipv4Addr, path::PathBuf};

use coffer_podvm::remote::LaunchConfig;

use crate::config::InstanceType;

/// A provider failed, or a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The request is wrong; nothing was asked of the provider.
    #[error("{0}")]
    Invalid(String),
    /// The provider is out of quota or capacity for the instance type, or throttles; retried
    /// with back-off by the caller.
    #[error("{provider}: no {instance_type} now: {why}")]
    Capacity {
        /// The provider.
        provider: &'static str,
        /// The instance type asked for.
        instance_type: String,
        /// What the provider said.
        why: String,
    },
    /// The provider's API failed.
    #[error("{provider}: {why}")]
    Provider {
        /// The provider.
        provider: &'static str,
        /// What failed.
        why: String,
    },
}

/// What a VM is created for.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The sandbox's id (tagged).
    pub pod: String,
    /// The keeper's sandbox directory (tagged; [`crate::lease`]).
    pub sandbox_dir: PathBuf,
    /// Its size.
    pub instance: InstanceType,
    /// Its launch configuration (the provider adds the VM's interface where it assigns it).
    pub launch: LaunchConfig,
    /// The keeper's emulated PSP socket (emulated TEE, local libvirt only).
    pub psp_socket: Option<PathBuf>,
}

/// A VM as the provider lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// The provider's id.
    pub id: String,
    /// The sandbox it was made for (its tag).
    pub pod: String,
    /// The sandbox's directory (its tag).
    pub sandbox_dir: PathBuf,
    /// Its address, once known.
    pub address: Option<Ipv4Addr>,
    /// Its instance type.
    pub instance_type: String,
    /// Where its console is readable, if anywhere.
    pub console: Option<String>,
    /// Whether it runs.
    pub running: bool,
}

/// An infrastructure API that makes VMs. Calls block (they are made on the blocking pool) and
/// must be idempotent: `create` for a pod that has a VM returns that VM, `delete` of what is
/// gone succeeds.
pub trait Provider: Send + Sync + 'static {
    /// The provider's name, in messages.
    fn name(&self) -> &'static str;
    /// The largest launch configuration the provider can hand a VM (bytes).
    fn launch_limit(&self) -> usize;
    /// Creates and starts the VM for `spec.pod` (or finds it), tagged with this cluster, node,
    /// pod and sandbox directory before it runs; returns it once its address is known.
    fn create(&self, spec: &VmSpec) -> Result<Vm, CloudError>;
    /// Deletes the VM of `pod` and everything made for it; `false` when there was none.
    fn delete(&self, pod: &str) -> Result<bool, CloudError>;
    /// The VMs tagged with this cluster and node.
    fn list(&self) -> Result<Vec<Vm>, CloudError>;
    /// Removes what the provider keeps for VMs and no VM uses any more (libvirt: the volumes
    /// of pod VM images that were replaced); returns how many things went. The reconciler
    /// calls it after deleting orphan VMs. Providers that keep nothing of their own do nothing.
    fn tidy(&self) -> Result<usize, CloudError> {
        Ok(0)
    }
}

/// The launch configuration as a VM gets it (its user data, which holds the agent channel's key:
/// wiped when dropped) and its SHA-256 in hex, tagged on the VM: which keeper's keys it runs.
pub fn user_data(
    spec: &VmSpec,
    provider: &'static str,
) -> Result<(zeroize::Zeroizing<Vec<u8>>, String), CloudError> {
    use sha2::{Digest, Sha256};
    let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&spec.launch).map_err(|e| {
        CloudError::Provider {
            provider,
            why: format!("the launch configuration: {e}"),
        }
    })?);
    let digest = hex::encode(Sha256::digest(&*bytes));
    Ok((bytes, digest))
}

/// What makes one VM that VM: SHA-256 (hex) over the cluster, node, pod, sandbox directory and
/// launch digest. The same create asked again gives the same value (a name or idempotence
/// token); a new keeper's keys give another.
pub fn identity(cluster: &str, node: &str, spec: &VmSpec, launch: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        cluster,
        node,
        spec.pod.as_str(),
        &spec.sandbox_dir.display().to_string(),
        launch,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// A cloud VM cannot reach the emulated TEE's PSP, a socket on the node: refused, naming what the
/// provider `runs` instead.
pub fn no_emulated_tee(spec: &VmSpec, vm: &str, runs: &str) -> Result<(), CloudError> {
    if spec.psp_socket.is_some() {
        return Err(CloudError::Invalid(format!(
            "the emulated TEE's PSP is a socket on the node, which {vm} cannot reach: {runs}"
        )));
    }
    Ok(())
}

/// The launch configuration's size against the provider's limit (checked before it is read).
pub fn check_size(launch_bytes: usize, limit: usize, provider: &str) -> Result<(), CloudError> {
    if launch_bytes > limit {
        return Err(CloudError::Invalid(format!(
            "the launch configuration (user data) is {launch_bytes} bytes, over the {provider} provider's limit of {limit}"
        )));
    }
    Ok(())
}

/// The checks a create request passes before any provider call; names what is wrong.
pub fn check_spec(spec: &VmSpec) -> Result<(), CloudError> {
    if spec.pod.is_empty()
        || spec.pod.len() > 128
        || !spec
            .pod
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(CloudError::Invalid(format!(
            "pod id {:?}: use 1 to 128 letters, digits, '-', '_' or '.'",
            spec.pod
        )));
    }
    if !spec.sandbox_dir.is_absolute() {
        return Err(CloudError::Invalid(format!(
            "sandbox directory {}: must be absolute",
            spec.sandbox_dir.display()
        )));
    }
    if spec.launch.remote.is_none() {
        return Err(CloudError::Invalid(
            "the launch configuration has no agent channel (remote): the VM's agent could not be reached".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_refused_before_any_call_naming_what_is_wrong() {
        let spec = |pod: &str| VmSpec {
            pod: pod.into(),
            sandbox_dir: "/run/coffer/s".into(),
            instance: InstanceType {
                name: "small".into(),
                vcpus: 1,
                memory_mib: 512,
            },
            launch: LaunchConfig {
                initdata: String::new(),
                plain_http: false,
                tee: "emulated".into(),
                network: String::new(),
                remote: Some(
                    coffer_podvm::remote::Credentials::generate("t")
                        .unwrap()
                        .remote_agent(),
                ),
            },
            psp_socket: None,
        };
        assert!(check_spec(&spec("p1")).is_ok() && check_size(1000, 1000, "libvirt").is_ok());
        let e = check_size(2000, 1000, "libvirt").unwrap_err();
        assert!(
            e.to_string()
                .contains("2000 bytes, over the libvirt provider's limit of 1000"),
            "{e}"
        );
        let e = check_spec(&spec("../x")).unwrap_err();
        assert!(e.to_string().contains("pod id \"../x\""), "{e}");
        let mut s = spec("p1");
        s.launch.remote = None;
        assert!(check_spec(&s)
            .unwrap_err()
            .to_string()
            .contains("no agent channel"));
    }
}
