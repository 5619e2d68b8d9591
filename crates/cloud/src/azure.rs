//! The Azure provider: pod VMs as Azure confidential VMs through Azure Resource Manager's REST
//! API (`Microsoft.Compute/virtualMachines`, api-version [`COMPUTE_API`]), over the shared JSON
//! REST client ([`crate::rest`]). The Azure SDK for Rust was not taken: its management crates are
//! not maintained for Compute, and the four calls made here are plain ARM REST.
//!
//! - **Create**: `PUT virtualMachines/{name}` of the pod's size with
//!   `securityProfile.securityType = ConfidentialVM`, secure boot and vTPM on, the OS disk from
//!   the configured (specialized) gallery image with the confidential encryption type
//!   configured, one NIC made with the VM on the configured subnet, and the launch
//!   configuration as `userData`. Everything made with it has `deleteOption = Delete`, so
//!   deleting the VM deletes its NIC and disk: nothing is left to cost money. Tagged at creation
//!   (`coffer-cluster`, `coffer-node`, `coffer-pod`, `coffer-sandbox-dir`, `coffer-launch`). The
//!   name is derived from the cluster, node, pod, sandbox and launch configuration, so a retried
//!   create is the same PUT; a VM of the pod made with other keys (a previous keeper's) is
//!   deleted first. The long-running operation is followed through `Azure-AsyncOperation`
//!   (honouring `Retry-After`); then the VM's NIC is read for its private address. A VM whose
//!   provisioning failed is deleted before the failure is returned.
//! - **Delete**: `DELETE virtualMachines/{name}?forceDeletion=true`, followed to its end.
//! - **List**: `GET virtualMachines?$expand=instanceView` in the resource group (following
//!   `nextLink`), those tagged with this cluster and node; running unless its power state is stopped or
//!   deallocated or its provisioning failed.
//!
//! Throttling (429) is retried as `Retry-After` says; capacity and quota errors (`SkuNotAvailable`,
//! `AllocationFailed`, `QuotaExceeded`, …) come back as [`CloudError::Capacity`] naming the VM size
//! and Azure's message. Authentication: a service principal's client credentials
//! (`AZURE_CLIENT_SECRET` from the environment, never from the file) or the node's managed
//! identity (the instance metadata service's token endpoint); the token is cached and renewed.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::{
    config::AzureConfig,
    provider::CloudError,
    rest::{check_endpoint, Answer, Http, TokenCache},
    Config, Provider, Vm, VmSpec,
};

const NAME: &str = "azure";
/// The Compute API version every call uses.
pub const COMPUTE_API: &str = "2024-07-01";
/// The Network API version the VM's NIC is read with.
pub const NETWORK_API: &str = "2026-03-01";
/// `networkProfile.networkApiVersion`: the NIC is made by Compute with this version.
const NIC_API: &str = "2020-11-01";
/// Azure's `userData` limit is 64 KiB of base64; this is the raw size that encodes within it.
const USER_DATA_LIMIT: usize = 48 << 10;
/// How long a create or delete may take to finish.
const OPERATION_BOUND: Duration = Duration::from_secs(900);
/// The ARM scope a token is asked for.
const ARM_RESOURCE: &str = "https://management.azure.com/";

const TAG_CLUSTER: &str = "coffer-cluster";
const TAG_NODE: &str = "coffer-node";
const TAG_POD: &str = "coffer-pod";
const TAG_SANDBOX: &str = "coffer-sandbox-dir";
/// SHA-256 of the user data (the launch configuration, so the keeper's keys) it was made with.
const TAG_LAUNCH: &str = "coffer-launch";

/// ARM error codes that mean "not now, for this size": quota, capacity, throttling.
const CAPACITY_CODES: [&str; 9] = [
    "SkuNotAvailable",
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
    "QuotaExceeded",
    "OperationNotAllowed",
    "TooManyRequests",
    "ResourceQuotaExceeded",
];

/// How the provider authenticates.
enum Auth {
    /// A service principal: tenant, client id, secret.
    ClientSecret {
        tenant: String,
        client: String,
        secret: Zeroizing<String>,
    },
    /// The node's managed identity (a user-assigned one when a client id is set).
    ManagedIdentity { client: Option<String> },
}

/// The Azure provider.
pub struct Azure {
    c: AzureConfig,
    cluster: String,
    node: String,
    auth: Auth,
    http: Http,
    token: TokenCache,
}

fn var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

impl Azure {
    /// The provider for `config`; credentials as its `auth` says.
    pub fn open(config: &Config) -> Result<Self, CloudError> {
        let c = config
            .azure
            .clone()
            .ok_or_else(|| CloudError::Invalid("no [azure] section".into()))?;
        for (what, url) in [
            ("azure.endpoint", &c.endpoint),
            ("azure.authority", &c.authority),
            ("azure.identity_endpoint", &c.identity_endpoint),
        ] {
            check_endpoint(what, url).map_err(CloudError::Invalid)?;
        }
        let auth = match c.auth.as_str() {
            "client-secret" => {
                let tenant = c.tenant_id.clone().or_else(|| var("AZURE_TENANT_ID"));
                let client = c.client_id.clone().or_else(|| var("AZURE_CLIENT_ID"));
                let secret = var("AZURE_CLIENT_SECRET").map(Zeroizing::new);
                match (tenant, client, secret) {
                    (Some(tenant), Some(client), Some(secret)) => Auth::ClientSecret {
                        tenant,
                        client,
                        secret,
                    },
                    _ => {
                        return Err(CloudError::Invalid(
                            "azure: no credentials: auth = \"client-secret\" needs a tenant and client id (azure.tenant_id and azure.client_id, or AZURE_TENANT_ID and AZURE_CLIENT_ID) and AZURE_CLIENT_SECRET in the environment; or use auth = \"managed-identity\"".into(),
                        ))
                    }
                }
            }
            "managed-identity" => Auth::ManagedIdentity {
                client: c.client_id.clone(),
            },
            other => {
                return Err(CloudError::Invalid(format!(
                    "azure.auth {other:?}: use client-secret or managed-identity"
                )))
            }
        };
        Ok(Self {
            c,
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            auth,
            http: Http::new(NAME),
            token: TokenCache::default(),
        })
    }

    /// A bearer token for ARM.
    fn bearer(&self) -> Result<Zeroizing<String>, CloudError> {
        self.token.get(|| {
            let a = match &self.auth {
                Auth::ClientSecret {
                    tenant,
                    client,
                    secret,
                } => {
                    let form = Zeroizing::new(
                        form_urlencoded::Serializer::new(String::new())
                            .append_pair("grant_type", "client_credentials")
                            .append_pair("client_id", client)
                            .append_pair("client_secret", secret)
                            .append_pair("scope", &format!("{ARM_RESOURCE}.default"))
                            .finish(),
                    );
                    let url = format!(
                        "{}/{tenant}/oauth2/v2.0/token",
                        self.c.authority.trim_end_matches('/')
                    );
                    self.http
                        .once("POST", &url, &[], Some(form.as_bytes()), true)
                        .map_err(|e| self.http.fail(format!("token from {url}: {e}")))?
                }
                Auth::ManagedIdentity { client } => {
                    let mut q = form_urlencoded::Serializer::new(String::new());
                    q.append_pair("api-version", "2018-02-01")
                        .append_pair("resource", ARM_RESOURCE);
                    if let Some(c) = client {
                        q.append_pair("client_id", c);
                    }
                    let url = format!("{}?{}", self.c.identity_endpoint, q.finish());
                    self.http
                        .once("GET", &url, &[("Metadata", "true")], None, false)
                        .map_err(|e| {
                            self.http
                                .fail(format!("managed identity token from {url}: {e}"))
                        })?
                }
            };
            let v = a.json();
            if a.status != 200 {
                // The identity platform's error, never the request (it holds the secret).
                let why = v["error_description"]
                    .as_str()
                    .or(v["error"].as_str())
                    .unwrap_or("no reason given");
                return Err(self.http.fail(format!(
                    "the token endpoint refused (HTTP {}): {}",
                    a.status,
                    why.lines().next().unwrap_or_default()
                )));
            }
            let token = v["access_token"].as_str().ok_or_else(|| {
                self.http
                    .fail("the token endpoint answered no access_token")
            })?;
            // expires_in is a number from Entra ID and a string from the metadata service.
            let life = v["expires_in"]
                .as_u64()
                .or_else(|| v["expires_in"].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(300);
            Ok((Zeroizing::new(token.to_string()), life))
        })
    }

    /// One ARM call (retried while throttled, the token renewed once when refused); an ARM
    /// error becomes a [`CloudError`] naming it, with `size` for capacity errors.
    fn arm(
        &self,
        what: &str,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        size: &str,
    ) -> Result<Answer, CloudError> {
        for refused in [false, true] {
            let token = self.bearer()?;
            let auth = Zeroizing::new(format!("Bearer {}", token.as_str()));
            let a = self
                .http
                .call(what, method, url, &[("Authorization", auth.as_str())], body)?;
            if a.status == 401 && !refused {
                self.token.forget();
                continue;
            }
            if a.status < 300 || a.status == 404 {
                return Ok(a);
            }
            return Err(self.arm_error(what, a.status, &a.json(), size));
        }
        unreachable!("the second try returns")
    }

    fn arm_error(&self, what: &str, status: u16, v: &Value, size: &str) -> CloudError {
        let e = &v["error"];
        let code = e["code"].as_str().unwrap_or("").to_string();
        let message = e["message"].as_str().unwrap_or("no message").to_string();
        let code = if code.is_empty() {
            format!("HTTP {status}")
        } else {
            code
        };
        if status == 429 || CAPACITY_CODES.contains(&code.as_str()) {
            CloudError::Capacity {
                provider: NAME,
                instance_type: size.to_string(),
                why: format!("{code}: {message}"),
            }
        } else {
            self.http.fail(format!("{what}: {code}: {message}"))
        }
    }

    fn vms_url(&self) -> String {
        format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines",
            self.c.endpoint.trim_end_matches('/'),
            self.c.subscription_id,
            self.c.resource_group
        )
    }

    /// Follows a long-running operation to its end: `Ok` when it succeeded, the ARM error
    /// otherwise.
    fn follow(&self, what: &str, a: &Answer, size: &str) -> Result<(), CloudError> {
        let Some(url) = a.async_operation.clone().or_else(|| a.location.clone()) else {
            return Ok(()); // done at once
        };
        check_endpoint("Azure-AsyncOperation", &url).map_err(|e| self.http.fail(e))?;
        let until = Instant::now() + OPERATION_BOUND;
        let mut wait = a.retry_after.unwrap_or(1);
        loop {
            std::thread::sleep(Duration::from_secs(wait.clamp(1, 30)));
            let s = self.arm(what, "GET", &url, None, size)?;
            let v = s.json();
            match v["status"].as_str().unwrap_or("") {
                "Succeeded" => return Ok(()),
                "Failed" | "Canceled" => return Err(self.arm_error(what, 200, &v, size)),
                // A Location poll answers 202 until done, then the resource (200/204).
                "" if s.status == 200 || s.status == 204 => return Ok(()),
                _ => {}
            }
            if Instant::now() > until {
                return Err(self.http.fail(format!(
                    "{what}: not done within {}s",
                    OPERATION_BOUND.as_secs()
                )));
            }
            wait = s.retry_after.unwrap_or(wait);
        }
    }

    /// The VMs of this cluster and node in the resource group (and of `pod`, when given).
    fn vms(&self, pod: Option<&str>) -> Result<Vec<Value>, CloudError> {
        let mut url = Some(format!(
            "{}?api-version={COMPUTE_API}&$expand=instanceView",
            self.vms_url()
        ));
        let mut out = Vec::new();
        while let Some(u) = url.take() {
            check_endpoint("nextLink", &u).map_err(|e| self.http.fail(e))?;
            let v = self.arm("list VMs", "GET", &u, None, "-")?.json();
            for vm in v["value"].as_array().into_iter().flatten() {
                let tags = &vm["tags"];
                if tags[TAG_CLUSTER] == self.cluster.as_str()
                    && tags[TAG_NODE] == self.node.as_str()
                    && pod.is_none_or(|p| tags[TAG_POD] == p)
                {
                    out.push(vm.clone());
                }
            }
            url = v["nextLink"].as_str().map(str::to_string);
        }
        Ok(out)
    }

    fn delete_named(&self, name: &str) -> Result<(), CloudError> {
        let url = format!(
            "{}/{name}?api-version={COMPUTE_API}&forceDeletion=true",
            self.vms_url()
        );
        let a = self.arm("delete VM", "DELETE", &url, None, "-")?;
        if a.status == 404 || a.status == 204 {
            return Ok(());
        }
        self.follow("delete VM", &a, "-")
    }

    /// The VM's private address, from its primary NIC.
    fn address(&self, vm: &Value) -> Result<Option<std::net::Ipv4Addr>, CloudError> {
        let nics = vm["properties"]["networkProfile"]["networkInterfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(nic) = nics
            .iter()
            .find(|n| n["properties"]["primary"].as_bool() != Some(false))
            .and_then(|n| n["id"].as_str())
        else {
            return Ok(None);
        };
        if !nic.starts_with('/') {
            return Err(self
                .http
                .fail(format!("a NIC id that is not a path: {nic}")));
        }
        let url = format!(
            "{}{nic}?api-version={NETWORK_API}",
            self.c.endpoint.trim_end_matches('/')
        );
        let v = self
            .arm("read the VM's NIC", "GET", &url, None, "-")?
            .json();
        let configs = v["properties"]["ipConfigurations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(configs
            .iter()
            .find(|c| c["properties"]["primary"].as_bool() != Some(false))
            .and_then(|c| c["properties"]["privateIPAddress"].as_str())
            .and_then(|a| a.parse().ok()))
    }

    /// The VM's name: derived from what makes it this VM, so a retried create is the same PUT
    /// (Azure: at most 64 characters).
    fn vm_name(&self, spec: &VmSpec, launch: &str) -> String {
        let id = crate::provider::identity(&self.cluster, &self.node, spec, launch);
        format!("coffer-{}", &id[..32])
    }

    /// The PUT body of a new VM.
    fn vm_body(&self, spec: &VmSpec, user_data: &[u8], launch: &str) -> Value {
        use base64::Engine;
        let mut os_disk = json!({
            "createOption": "FromImage",
            "deleteOption": "Delete",
            "managedDisk": { "storageAccountType": self.c.disk_type },
        });
        let mut security = json!({
            "uefiSettings": { "secureBootEnabled": self.c.secure_boot, "vTpmEnabled": true },
        });
        if self.c.confidential {
            os_disk["managedDisk"]["securityProfile"] =
                json!({ "securityEncryptionType": self.c.disk_encryption });
            security["securityType"] = json!("ConfidentialVM");
        } else {
            security["securityType"] = json!("TrustedLaunch");
        }
        json!({
            "location": self.c.location,
            "tags": {
                TAG_CLUSTER: self.cluster,
                TAG_NODE: self.node,
                TAG_POD: spec.pod,
                TAG_SANDBOX: spec.sandbox_dir.display().to_string(),
                TAG_LAUNCH: launch,
            },
            "properties": {
                "hardwareProfile": { "vmSize": spec.instance.name },
                "storageProfile": {
                    "imageReference": { "id": self.c.image_id },
                    "osDisk": os_disk,
                },
                "securityProfile": security,
                "networkProfile": {
                    "networkApiVersion": NIC_API,
                    "networkInterfaceConfigurations": [{
                        "name": "coffer-pod",
                        "properties": {
                            "primary": true,
                            "deleteOption": "Delete",
                            "ipConfigurations": [{
                                "name": "coffer-pod",
                                "properties": {
                                    "primary": true,
                                    "subnet": { "id": self.c.subnet_id },
                                },
                            }],
                        },
                    }],
                },
                "diagnosticsProfile": { "bootDiagnostics": { "enabled": true } },
                "userData": base64::engine::general_purpose::STANDARD.encode(user_data),
            },
        })
    }

    fn to_vm(&self, v: &Value, address: Option<std::net::Ipv4Addr>) -> Vm {
        let tag = |k: &str| v["tags"][k].as_str().unwrap_or_default().to_string();
        let statuses = v["properties"]["instanceView"]["statuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // Starting counts as running (on its way); stopped, deallocated or failed does not.
        let stopped = statuses.iter().any(|s| {
            matches!(
                s["code"].as_str(),
                Some(
                    "PowerState/stopped"
                        | "PowerState/stopping"
                        | "PowerState/deallocated"
                        | "PowerState/deallocating"
                )
            )
        });
        let running = !stopped && v["properties"]["provisioningState"].as_str() != Some("Failed");
        Vm {
            id: v["name"].as_str().unwrap_or_default().to_string(),
            pod: tag(TAG_POD),
            sandbox_dir: PathBuf::from(tag(TAG_SANDBOX)),
            address,
            instance_type: v["properties"]["hardwareProfile"]["vmSize"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            console: None,
            running,
        }
    }
}

impl Provider for Azure {
    fn name(&self) -> &'static str {
        NAME
    }

    fn launch_limit(&self) -> usize {
        USER_DATA_LIMIT
    }

    fn create(&self, spec: &VmSpec) -> Result<Vm, CloudError> {
        crate::provider::no_emulated_tee(
            spec,
            "an Azure VM",
            "the azure provider runs confidential VMs only",
        )?;
        let size = spec.instance.name.as_str();
        let (user_data, launch) = crate::provider::user_data(spec, NAME)?;
        let name = self.vm_name(spec, &launch);
        for old in self.vms(Some(&spec.pod))? {
            if old["name"].as_str() != Some(name.as_str()) {
                // A previous keeper's VM of this pod (other keys): it goes.
                let n = old["name"].as_str().unwrap_or_default();
                tracing::info!(pod = %spec.pod, vm = n, "deleting a previous keeper's VM of this pod");
                self.delete_named(n)?;
            }
        }
        let url = format!("{}/{name}?api-version={COMPUTE_API}", self.vms_url());
        let existing = self.arm("read VM", "GET", &url, None, size)?;
        let state = existing.json()["properties"]["provisioningState"]
            .as_str()
            .map(str::to_string);
        match state.as_deref() {
            Some("Succeeded") => {}
            Some("Failed") => {
                self.delete_named(&name)?;
                return self.create(spec);
            }
            Some(_) if existing.status == 200 => {
                // Being made by an earlier call: wait for it.
                let until = Instant::now() + OPERATION_BOUND;
                loop {
                    std::thread::sleep(Duration::from_secs(2));
                    let v = self.arm("read VM", "GET", &url, None, size)?.json();
                    match v["properties"]["provisioningState"].as_str() {
                        Some("Succeeded") => break,
                        Some("Failed") | None => {
                            self.delete_named(&name)?;
                            return Err(self.http.fail(format!("VM {name} failed to provision")));
                        }
                        _ if Instant::now() > until => {
                            return Err(self.http.fail(format!(
                                "VM {name} is not made within {}s",
                                OPERATION_BOUND.as_secs()
                            )))
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                let body = Zeroizing::new(
                    serde_json::to_vec(&self.vm_body(spec, &user_data, &launch))
                        .map_err(|e| self.http.fail(e))?,
                );
                let a = self.arm("create VM", "PUT", &url, Some(&body), size)?;
                if let Err(e) = self.follow("create VM", &a, size) {
                    // A VM that failed to provision still exists (and may cost): it goes.
                    if let Err(d) = self.delete_named(&name) {
                        tracing::warn!(vm = %name, error = %d, "deleting a VM that failed to provision failed; the reconciler retries");
                    }
                    return Err(e);
                }
            }
        }
        let vm = self
            .arm(
                "read VM",
                "GET",
                &format!("{url}&$expand=instanceView"),
                None,
                size,
            )?
            .json();
        let address = self.address(&vm)?;
        if address.is_none() {
            return Err(self
                .http
                .fail(format!("VM {name} has no private address on its NIC")));
        }
        Ok(self.to_vm(&vm, address))
    }

    fn delete(&self, pod: &str) -> Result<bool, CloudError> {
        let found = self.vms(Some(pod))?;
        for name in found.iter().filter_map(|vm| vm["name"].as_str()) {
            self.delete_named(name)?;
        }
        Ok(!found.is_empty())
    }

    fn list(&self) -> Result<Vec<Vm>, CloudError> {
        Ok(self
            .vms(None)?
            .iter()
            .map(|v| self.to_vm(v, None))
            .collect())
    }
}
