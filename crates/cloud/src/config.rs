//! The daemon's configuration (TOML).
//!
//! ```toml
//! cluster = "prod-1"            # tagged on every VM, with the node
//! node = "worker-3"             # default: the host name
//! provider = "libvirt"
//! reconcile_secs = 30
//!
//! [[instance_types]]            # the allowed list, smallest first
//! name = "small"
//! vcpus = 1
//! memory_mib = 1024
//!
//! [libvirt]
//! uri = "qemu:///system"
//! # ...
//! ```

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The daemon's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cluster's id, tagged on every VM.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// This node's name, tagged on every VM [default: the host name; it must stay the same
    /// across restarts, or the VMs made before are no longer found].
    #[serde(default)]
    pub node: String,
    /// Which provider creates the VMs: `libvirt`, `aws`, `azure` or `ibmcloud`.
    pub provider: String,
    /// How often VMs without a live sandbox are looked for (seconds).
    #[serde(default = "default_reconcile")]
    pub reconcile_secs: u64,
    /// The instance types pods may get, smallest first; a pod's request or annotation chooses
    /// only among them.
    pub instance_types: Vec<InstanceType>,
    /// The libvirt provider's settings.
    #[serde(default)]
    pub libvirt: Option<LibvirtConfig>,
    /// The AWS provider's settings.
    #[serde(default)]
    pub aws: Option<AwsConfig>,
    /// The Azure provider's settings.
    #[serde(default)]
    pub azure: Option<AzureConfig>,
    /// The IBM Cloud VPC provider's settings.
    #[serde(default)]
    pub ibmcloud: Option<IbmCloudConfig>,
}

/// The Azure provider: confidential VMs through Azure Resource Manager.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The subscription.
    pub subscription_id: String,
    /// The resource group the VMs (and their NICs and disks) are made in.
    pub resource_group: String,
    /// The region (`eastus`).
    pub location: String,
    /// The pod VM image: a specialized Azure Compute Gallery image version's resource id.
    pub image_id: String,
    /// The subnet's resource id (the VMs' NIC joins it).
    pub subnet_id: String,
    /// `client-secret` (a service principal: tenant and client id here or in `AZURE_TENANT_ID`
    /// and `AZURE_CLIENT_ID`, the secret in `AZURE_CLIENT_SECRET`) or `managed-identity` (the
    /// node's; `client_id` picks a user-assigned one).
    #[serde(default = "default_azure_auth")]
    pub auth: String,
    /// The tenant (client-secret auth).
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// The client id (service principal, or user-assigned managed identity).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Confidential VMs (`securityType = ConfidentialVM`); `false` makes Trusted Launch VMs,
    /// which are not confidential (for trying the provider where no CVM size is available).
    #[serde(default = "yes")]
    pub confidential: bool,
    /// UEFI secure boot. The pod VM's unified kernel image is not signed: with it on, the
    /// gallery image's UEFI signature database must admit it.
    #[serde(default = "yes")]
    pub secure_boot: bool,
    /// The OS disk's confidential encryption: `VMGuestStateOnly` or `DiskWithVMGuestState`.
    #[serde(default = "default_disk_encryption")]
    pub disk_encryption: String,
    /// The OS disk's storage type.
    #[serde(default = "default_disk_type")]
    pub disk_type: String,
    /// Azure Resource Manager.
    #[serde(default = "default_arm")]
    pub endpoint: String,
    /// The identity platform (client-secret auth).
    #[serde(default = "default_authority")]
    pub authority: String,
    /// The managed identity token endpoint (the instance metadata service).
    #[serde(default = "default_identity_endpoint")]
    pub identity_endpoint: String,
}

fn default_azure_auth() -> String {
    "client-secret".into()
}
fn yes() -> bool {
    true
}
fn default_disk_encryption() -> String {
    "VMGuestStateOnly".into()
}
fn default_disk_type() -> String {
    "Premium_LRS".into()
}
fn default_arm() -> String {
    "https://management.azure.com".into()
}
fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_identity_endpoint() -> String {
    "http://169.254.169.254/metadata/identity/oauth2/token".into()
}

/// The IBM Cloud provider: VPC virtual server instances (IBM Secure Execution on s390x).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IbmCloudConfig {
    /// The region (`us-south`); the endpoint is that region's VPC API unless set.
    pub region: String,
    /// The zone instances are placed in (`us-south-1`).
    pub zone: String,
    /// The VPC.
    pub vpc_id: String,
    /// The subnet (in the zone).
    pub subnet_id: String,
    /// The pod VM image (an SE image for the `bz2e` profiles).
    pub image_id: String,
    /// The resource group [default: the account's default].
    #[serde(default)]
    pub resource_group_id: Option<String>,
    /// `confidential_compute_mode` of the instances (`tdx` on x86 profiles that offer it);
    /// unset: the profile's default (Secure Execution comes with the `bz2e` profile and an SE
    /// image).
    #[serde(default)]
    pub confidential_compute_mode: Option<String>,
    /// Security groups of the instances' interface [default: the VPC's default].
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// The VPC API [default: `https://REGION.iaas.cloud.ibm.com`].
    #[serde(default)]
    pub endpoint: Option<String>,
    /// IAM (the API key is exchanged here for a token; the key is `IBMCLOUD_API_KEY` in the
    /// environment, never in this file).
    #[serde(default = "default_iam")]
    pub iam_endpoint: String,
    /// Where this daemon records which sandbox each instance was made for (the VPC API has no
    /// tags; the instance's name carries the cluster and node).
    #[serde(default = "default_ibm_state")]
    pub state_dir: PathBuf,
}

fn default_iam() -> String {
    "https://iam.cloud.ibm.com".into()
}
fn default_ibm_state() -> PathBuf {
    "/var/lib/coffer-cloud/ibmcloud".into()
}

/// The AWS provider: EC2 instances (credentials from the environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// The region (`us-east-2`).
    pub region: String,
    /// The EC2 endpoint [default: `https://ec2.REGION.amazonaws.com`].
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The pod VM's AMI.
    pub image_id: String,
    /// The subnet instances are placed in [default: the account's default].
    #[serde(default)]
    pub subnet_id: Option<String>,
    /// Their security groups.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// Launch with AMD SEV-SNP (`CpuOptions.AmdSevSnp = enabled`; m6a, c6a and r6a types).
    #[serde(default)]
    pub sev_snp: bool,
}

fn default_cluster() -> String {
    "coffer".into()
}

fn default_reconcile() -> u64 {
    30
}

/// An instance type: a provider's name for a VM size.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    /// The provider's name for it (libvirt: a name of this configuration's own).
    pub name: String,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its memory (MiB).
    pub memory_mib: u32,
}

/// The libvirt provider: VMs on a libvirt host, local or remote (`qemu+ssh://`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// The connection URI.
    #[serde(default = "default_uri")]
    pub uri: String,
    /// The storage pool for the pod VM image and each VM's disks (a directory pool, made at
    /// `pool_dir` when it does not exist).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Where a pool this daemon makes keeps its files (on the libvirt host).
    #[serde(default = "default_pool_dir")]
    pub pool_dir: PathBuf,
    /// The pod VM (`coffer podvm build --out DIR`), uploaded to the pool as volumes.
    pub podvm: PathBuf,
    /// The bridge on the libvirt host the VMs' interface joins.
    pub bridge: String,
    /// The VMs' subnet on that bridge (`10.99.0.0/24`); addresses are given out from it.
    pub subnet: String,
    /// The bridge's address in that subnet (the VMs' gateway, and never given out).
    pub gateway: String,
    /// `kvm` or `tcg` (software emulation, where the libvirt host has no usable KVM).
    #[serde(default = "default_accel")]
    pub accel: String,
    /// The scratch disk of each VM (MiB; kernel boot).
    #[serde(default = "default_scratch")]
    pub scratch_mib: u64,
    /// How the VMs boot: `kernel` (direct boot of the image's kernel, initramfs and command
    /// line) or `disk` (UEFI firmware boots the image's `disk.qcow2`, as a cloud boots it:
    /// `coffer podvm build --disk qcow2`; each VM writes to its own overlay of it).
    #[serde(default = "default_boot")]
    pub boot: String,
    /// The UEFI firmware of `boot = "disk"` on the libvirt host (code and variables in one
    /// file, loaded as a ROM).
    #[serde(default = "default_uefi")]
    pub firmware: PathBuf,
    /// The vCPU model of SEV-SNP guests (`tee = "snp"`): the launch digest covers it, so it is
    /// named, not the host's (`coffer measure --tee snp --cpu` takes the same).
    #[serde(default = "default_snp_cpu")]
    pub snp_cpu: String,
}

fn default_snp_cpu() -> String {
    "EPYC-Milan".into()
}

fn default_boot() -> String {
    "kernel".into()
}
fn default_uefi() -> PathBuf {
    "/usr/share/ovmf/OVMF.fd".into()
}

fn default_uri() -> String {
    "qemu:///system".into()
}
fn default_pool() -> String {
    "coffer".into()
}
fn default_pool_dir() -> PathBuf {
    "/var/lib/coffer-cloud/pool".into()
}
fn default_accel() -> String {
    "kvm".into()
}
fn default_scratch() -> u64 {
    2048
}

/// The configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("coffer-cloud configuration {path}: {why}")]
pub struct ConfigError {
    path: String,
    why: String,
}

impl Config {
    /// Reads and checks the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let e = |why: String| ConfigError {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|x| e(x.to_string()))?;
        let mut c: Self = toml::from_str(&text).map_err(|x| e(x.to_string()))?;
        if c.node.is_empty() {
            c.node = rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned();
        }
        c.check().map_err(e)?;
        Ok(c)
    }

    /// Checks what can be checked without calling the provider.
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in [("cluster", &self.cluster), ("node", &self.node)] {
            if v.is_empty()
                || v.len() > 63
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(format!(
                    "{what} {v:?}: use 1 to 63 letters, digits, '-', '_' or '.'"
                ));
            }
        }
        if self.instance_types.is_empty() {
            return Err("no instance_types: list the ones pods may get".into());
        }
        if self.reconcile_secs == 0 {
            return Err("reconcile_secs must be at least 1".into());
        }
        match self.provider.as_str() {
            "libvirt" => {
                let l = self.libvirt.as_ref().ok_or(
                    "provider libvirt needs a [libvirt] section (uri, podvm, bridge, subnet, gateway)",
                )?;
                Subnet::parse(&l.subnet, &l.gateway)?;
                if !matches!(l.accel.as_str(), "kvm" | "tcg") {
                    return Err(format!("libvirt.accel {:?}: use kvm or tcg", l.accel));
                }
                if !matches!(l.boot.as_str(), "kernel" | "disk") {
                    return Err(format!("libvirt.boot {:?}: use kernel or disk", l.boot));
                }
                Ok(())
            }
            "aws" => {
                let a = self
                    .aws
                    .as_ref()
                    .ok_or("provider aws needs an [aws] section (region, image_id)")?;
                if a.region.is_empty() || a.image_id.is_empty() {
                    return Err("aws: region and image_id must not be empty".into());
                }
                Ok(())
            }
            "azure" => {
                let a = self.azure.as_ref().ok_or(
                    "provider azure needs an [azure] section (subscription_id, resource_group, location, image_id, subnet_id)",
                )?;
                for (k, v) in [
                    ("subscription_id", &a.subscription_id),
                    ("resource_group", &a.resource_group),
                    ("location", &a.location),
                    ("image_id", &a.image_id),
                    ("subnet_id", &a.subnet_id),
                ] {
                    if v.is_empty() {
                        return Err(format!("azure.{k} must not be empty"));
                    }
                }
                if !matches!(
                    a.disk_encryption.as_str(),
                    "VMGuestStateOnly" | "DiskWithVMGuestState"
                ) {
                    return Err(format!(
                        "azure.disk_encryption {:?}: use VMGuestStateOnly or DiskWithVMGuestState",
                        a.disk_encryption
                    ));
                }
                Ok(())
            }
            "ibmcloud" => {
                let i = self.ibmcloud.as_ref().ok_or(
                    "provider ibmcloud needs an [ibmcloud] section (region, zone, vpc_id, subnet_id, image_id)",
                )?;
                for (k, v) in [
                    ("region", &i.region),
                    ("zone", &i.zone),
                    ("vpc_id", &i.vpc_id),
                    ("subnet_id", &i.subnet_id),
                    ("image_id", &i.image_id),
                ] {
                    if v.is_empty() {
                        return Err(format!("ibmcloud.{k} must not be empty"));
                    }
                }
                Ok(())
            }
            other => Err(format!(
                "unknown provider {other:?}: use libvirt, aws, azure or ibmcloud"
            )),
        }
    }

    /// The instance type for a pod: the one it names (it must be allowed), else the smallest
    /// that holds its request.
    pub fn instance_type(
        &self,
        named: &str,
        memory_mib: u32,
        vcpus: u32,
    ) -> Result<&InstanceType, String> {
        let allowed = || {
            self.instance_types
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let t = if named.is_empty() {
            self.instance_types
                .iter()
                .find(|t| t.memory_mib >= memory_mib && t.vcpus >= vcpus)
                .ok_or_else(|| {
                    format!(
                        "no allowed instance type holds {memory_mib} MiB and {vcpus} vCPUs (allowed: {})",
                        allowed()
                    )
                })?
        } else {
            self.instance_types
                .iter()
                .find(|t| t.name == named)
                .ok_or_else(|| {
                    format!(
                        "instance type {named:?} is not allowed on this node (allowed: {})",
                        allowed()
                    )
                })?
        };
        if t.memory_mib < memory_mib || t.vcpus < vcpus {
            return Err(format!(
                "instance type {} ({} MiB, {} vCPUs) is smaller than the pod's request ({memory_mib} MiB, {vcpus} vCPUs)",
                t.name, t.memory_mib, t.vcpus
            ));
        }
        Ok(t)
    }
}

/// An IPv4 subnet that VM addresses are given out from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
    /// The gateway (never given out).
    pub gateway: Ipv4Addr,
}

impl Subnet {
    /// `10.99.0.0/24` with gateway `10.99.0.1`.
    pub fn parse(cidr: &str, gateway: &str) -> Result<Self, String> {
        let (net, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| format!("subnet {cidr:?}: use ADDRESS/PREFIX"))?;
        let network: Ipv4Addr = net
            .parse()
            .map_err(|_| format!("subnet {cidr:?}: not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("subnet {cidr:?}: the prefix must be 8 to 30"))?;
        let gateway: Ipv4Addr = gateway
            .parse()
            .map_err(|_| format!("gateway {gateway:?}: not an IPv4 address"))?;
        let s = Self {
            network,
            prefix,
            gateway,
        };
        if u32::from(network) & !s.mask() != 0 {
            return Err(format!("subnet {cidr:?}: host bits are set"));
        }
        if !s.contains(gateway) {
            return Err(format!("gateway {gateway} is not in subnet {cidr}"));
        }
        Ok(s)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    /// Whether `a` is a host address of the subnet.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        let n = u32::from(self.network);
        a & self.mask() == n && a != n && a != n | !self.mask()
    }

    /// The lowest host address that is neither the gateway nor in `used`.
    pub fn free(&self, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        let n = u32::from(self.network);
        (n + 1..n | !self.mask())
            .map(Ipv4Addr::from)
            .find(|a| *a != self.gateway && !used.contains(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<Config, String> {
        let text = format!(
            "cluster = \"c1\"\nnode = \"n1\"\nprovider = \"libvirt\"\n{extra}\n\
             [[instance_types]]\nname = \"small\"\nvcpus = 1\nmemory_mib = 512\n\
             [[instance_types]]\nname = \"large\"\nvcpus = 4\nmemory_mib = 4096\n\
             [libvirt]\npodvm = \"/p\"\nbridge = \"br0\"\nsubnet = \"10.99.0.0/24\"\ngateway = \"10.99.0.1\"\n"
        );
        let c: Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn a_pod_gets_an_allowed_type_that_holds_it_or_a_reason() {
        let c = config("").unwrap();
        assert_eq!(c.instance_type("", 0, 0).unwrap().name, "small");
        assert_eq!(c.instance_type("", 1024, 1).unwrap().name, "large");
        assert_eq!(c.instance_type("large", 0, 0).unwrap().name, "large");
        let e = c.instance_type("huge", 0, 0).unwrap_err();
        assert!(
            e.contains("\"huge\" is not allowed") && e.contains("small, large"),
            "{e}"
        );
        let e = c.instance_type("small", 1024, 1).unwrap_err();
        assert!(e.contains("smaller than the pod's request"), "{e}");
        let e = c.instance_type("", 8192, 1).unwrap_err();
        assert!(e.contains("no allowed instance type holds 8192 MiB"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let e = toml::from_str::<Config>("provider = \"gce\"\ninstance_types = []\n")
            .unwrap()
            .check()
            .unwrap_err();
        assert!(
            e.contains("cluster") || e.contains("node") || e.contains("gce"),
            "{e}"
        );
        let mut c = config("").unwrap();
        c.provider = "gce".into();
        assert!(c.check().unwrap_err().contains("unknown provider \"gce\""));
        let mut c = config("").unwrap();
        c.libvirt.as_mut().unwrap().gateway = "10.98.0.1".into();
        assert!(
            c.check().unwrap_err().contains("10.98.0.1"),
            "gateway outside the subnet"
        );
        let mut c = config("").unwrap();
        c.node = "a b".into();
        assert!(c.check().unwrap_err().contains("node \"a b\""));
    }

    #[test]
    fn addresses_are_given_out_below_the_broadcast_never_the_gateway_or_twice() {
        let s = Subnet::parse("10.99.0.0/30", "10.99.0.1").unwrap();
        let a = s.free(&[]).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(s.free(&[a]), None, "a /30 has two host addresses");
        assert!(Subnet::parse("10.99.0.1/24", "10.99.0.1")
            .unwrap_err()
            .contains("host bits"));
        assert!(Subnet::parse("10.99.0.0/24", "10.99.0.255")
            .unwrap_err()
            .contains("not in subnet"));
    }
}
