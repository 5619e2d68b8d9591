//! The IBM Cloud provider: pod VMs as IBM Cloud VPC virtual server instances (IBM Secure
//! Execution with an SE image on the s390x `bz2e` profiles, Intel TDX with
//! `confidential_compute_mode = "tdx"` on x86 profiles that offer it), through the VPC REST API
//! (`version` [`VPC_VERSION`], `generation=2`) over the shared JSON REST client
//! ([`crate::rest`]), authenticated by an IAM token exchanged for the API key
//! (`IBMCLOUD_API_KEY`) and renewed before it expires.
//!
//! - **Create**: `POST /v1/instances` (by image, with one network interface on the configured
//!   subnet, the pod's profile, the launch configuration as `user_data`, the metadata service
//!   on); the boot volume is deleted with the instance (the API's default, not overridden).
//!   Then `GET /v1/instances/{id}` until it runs with an address. An instance that fails to
//!   start is deleted before the failure is returned; `cannot_start_capacity` and the other
//!   capacity reasons come back as [`CloudError::Capacity`] naming the profile.
//! - **Delete**: `DELETE /v1/instances/{id}`.
//! - **List**: `GET /v1/instances?vpc.id=…` (following `next`), those whose name carries this
//!   cluster and node.
//!
//! The VPC API has no tags on an instance (user tags are another service, attached after
//! creation), so what a tag says elsewhere is carried by the name and a record on the node:
//! the name is `coffer-{cluster and node}-{pod, sandbox and launch}` (hashes, as the VPC's
//! name rules allow), and which sandbox the instance is for is written to `state_dir`
//! atomically before the create call. An instance of this cluster and node with no record (the
//! record was lost) counts as one without a live sandbox: the reconciler deletes it.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    config::IbmCloudConfig,
    provider::CloudError,
    rest::{check_endpoint, Answer, Http, TokenCache},
    Config, Provider, Vm, VmSpec,
};

const NAME: &str = "ibmcloud";
/// The VPC API version date every call names.
pub const VPC_VERSION: &str = "2026-10-06";
/// The VPC API's `user_data` limit.
const USER_DATA_LIMIT: usize = 64 << 10;
/// How long a new instance has to run with an address, and a delete to finish.
const RUNNING_BOUND: Duration = Duration::from_secs(600);
/// Status reasons that mean "not now, for this profile".
const CAPACITY_REASONS: [&str; 3] = [
    "cannot_start_capacity",
    "cannot_start_compute",
    "cannot_start_reservation_capacity",
];

/// What the node records of an instance it made.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    pod: String,
    sandbox_dir: PathBuf,
    launch: String,
}

/// The IBM Cloud provider.
pub struct IbmCloud {
    c: IbmCloudConfig,
    /// `coffer-{hash of cluster and node}-`: the names of this node's instances.
    prefix: String,
    cluster: String,
    node: String,
    endpoint: String,
    api_key: Zeroizing<String>,
    http: Http,
    token: TokenCache,
}

impl IbmCloud {
    /// The provider for `config` (the API key from the environment).
    pub fn open(config: &Config) -> Result<Self, CloudError> {
        let c = config
            .ibmcloud
            .clone()
            .ok_or_else(|| CloudError::Invalid("no [ibmcloud] section".into()))?;
        let endpoint = c
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{}.iaas.cloud.ibm.com", c.region));
        let endpoint = endpoint.trim_end_matches('/').to_string();
        check_endpoint("ibmcloud.endpoint", &endpoint).map_err(CloudError::Invalid)?;
        check_endpoint("ibmcloud.iam_endpoint", &c.iam_endpoint).map_err(CloudError::Invalid)?;
        let api_key = std::env::var("IBMCLOUD_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
            .map(Zeroizing::new)
            .ok_or_else(|| {
                CloudError::Invalid(
                    "ibmcloud: no credentials: set IBMCLOUD_API_KEY (an API key of a service ID allowed to create and delete VPC instances)".into(),
                )
            })?;
        std::fs::create_dir_all(&c.state_dir).map_err(|e| {
            CloudError::Invalid(format!("ibmcloud.state_dir {}: {e}", c.state_dir.display()))
        })?;
        let mut h = Sha256::new();
        h.update(config.cluster.as_bytes());
        h.update([0]);
        h.update(config.node.as_bytes());
        let prefix = format!("coffer-{}-", &hex::encode(h.finalize())[..10]);
        Ok(Self {
            c,
            prefix,
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            endpoint,
            api_key,
            http: Http::new(NAME),
            token: TokenCache::default(),
        })
    }

    /// An IAM token for the API key.
    fn bearer(&self) -> Result<Zeroizing<String>, CloudError> {
        self.token.get(|| {
            let form = Zeroizing::new(
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "urn:ibm:params:oauth:grant-type:apikey")
                    .append_pair("apikey", &self.api_key)
                    .finish(),
            );
            let url = format!(
                "{}/identity/token",
                self.c.iam_endpoint.trim_end_matches('/')
            );
            let a = self
                .http
                .once(
                    "POST",
                    &url,
                    &[("Accept", "application/json")],
                    Some(form.as_bytes()),
                    true,
                )
                .map_err(|e| self.http.fail(format!("IAM token from {url}: {e}")))?;
            let v = a.json();
            if a.status != 200 {
                return Err(self.http.fail(format!(
                    "IAM refused the API key (HTTP {}): {} {}",
                    a.status,
                    v["errorCode"].as_str().unwrap_or_default(),
                    v["errorMessage"].as_str().unwrap_or("no reason given")
                )));
            }
            let token = v["access_token"]
                .as_str()
                .ok_or_else(|| self.http.fail("IAM answered no access_token"))?;
            let life = v["expires_in"].as_u64().unwrap_or(300);
            Ok((Zeroizing::new(token.to_string()), life))
        })
    }

    /// One VPC call (retried while throttled, the token renewed once when refused).
    fn vpc(
        &self,
        what: &str,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        profile: &str,
    ) -> Result<Answer, CloudError> {
        self.vpc_passing(what, method, url, body, profile, &[])
    }

    /// As [`Self::vpc`], with the statuses in `pass` answered as they are, not as errors.
    fn vpc_passing(
        &self,
        what: &str,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        profile: &str,
        pass: &[u16],
    ) -> Result<Answer, CloudError> {
        for refused in [false, true] {
            let token = self.bearer()?;
            let auth = Zeroizing::new(format!("Bearer {}", token.as_str()));
            let a = self.http.call(
                what,
                method,
                url,
                &[
                    ("Authorization", auth.as_str()),
                    ("Accept", "application/json"),
                ],
                body,
            )?;
            if a.status == 401 && !refused {
                self.token.forget();
                continue;
            }
            if a.status < 300 || a.status == 404 || pass.contains(&a.status) {
                return Ok(a);
            }
            let v = a.json();
            let e = &v["errors"][0];
            let code = e["code"].as_str().unwrap_or("").to_string();
            let message = e["message"].as_str().unwrap_or("no message");
            let code = if code.is_empty() {
                format!("HTTP {}", a.status)
            } else {
                code
            };
            if a.status == 429 || code.contains("quota") || code.contains("capacity") {
                return Err(CloudError::Capacity {
                    provider: NAME,
                    instance_type: profile.into(),
                    why: format!("{code}: {message}"),
                });
            }
            return Err(self.http.fail(format!("{what}: {code}: {message}")));
        }
        unreachable!("the second try returns")
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("version", VPC_VERSION)
            .append_pair("generation", "2");
        for (k, v) in query {
            q.append_pair(k, v);
        }
        format!("{}/v1{path}?{}", self.endpoint, q.finish())
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.c.state_dir.join(format!("{name}.json"))
    }

    fn record(&self, name: &str) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(self.record_path(name)).ok()?).ok()
    }

    /// Writes the record of `name` atomically (a crash leaves the old file or the new one).
    fn write_record(&self, name: &str, r: &Record) -> Result<(), CloudError> {
        let path = self.record_path(name);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(r).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.c.state_dir)?.sync_all()
        };
        write().map_err(|e| {
            CloudError::Invalid(format!("ibmcloud: recording {}: {e}", path.display()))
        })
    }

    /// This node's instances (every page).
    fn instances(&self) -> Result<Vec<Value>, CloudError> {
        let mut url = Some(self.url("/instances", &[("vpc.id", &self.c.vpc_id), ("limit", "50")]));
        let mut out = Vec::new();
        while let Some(u) = url.take() {
            check_endpoint("next.href", &u).map_err(|e| self.http.fail(e))?;
            let v = self.vpc("list instances", "GET", &u, None, "-")?.json();
            out.extend(
                v["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|i| {
                        i["name"]
                            .as_str()
                            .is_some_and(|n| n.starts_with(&self.prefix))
                    })
                    .cloned(),
            );
            url = v["next"]["href"].as_str().map(str::to_string);
        }
        Ok(out)
    }

    /// The id of the instance named `name`, if there is one.
    fn by_name(&self, name: &str) -> Result<Option<String>, CloudError> {
        let v = self
            .vpc(
                "find instance",
                "GET",
                &self.url("/instances", &[("name", name)]),
                None,
                "-",
            )?
            .json();
        Ok(v["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["name"].as_str() == Some(name))
            .and_then(|i| i["id"].as_str())
            .map(str::to_string))
    }

    fn delete_instance(&self, i: &Value) -> Result<(), CloudError> {
        let (Some(id), Some(name)) = (i["id"].as_str(), i["name"].as_str()) else {
            return Ok(());
        };
        let a = self.vpc(
            "delete instance",
            "DELETE",
            &self.url(&format!("/instances/{id}"), &[]),
            None,
            "-",
        )?;
        if a.status != 204 && a.status != 404 {
            return Err(self
                .http
                .fail(format!("delete instance {id}: HTTP {}", a.status)));
        }
        // Deleted (the API finishes it on its side): the record goes.
        let _ = std::fs::remove_file(self.record_path(name));
        Ok(())
    }

    fn name(&self, spec: &VmSpec, launch: &str) -> String {
        let id = crate::provider::identity(&self.cluster, &self.node, spec, launch);
        format!("{}{}", self.prefix, &id[..32])
    }

    fn to_vm(&self, i: &Value) -> Vm {
        let name = i["name"].as_str().unwrap_or_default();
        let rec = self.record(name);
        let address = i["primary_network_interface"]["primary_ip"]["address"]
            .as_str()
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .filter(|a| !a.is_unspecified());
        let status = i["status"].as_str().unwrap_or_default();
        Vm {
            id: i["id"].as_str().unwrap_or_default().to_string(),
            pod: rec.as_ref().map(|r| r.pod.clone()).unwrap_or_default(),
            sandbox_dir: rec.map(|r| r.sandbox_dir).unwrap_or_default(),
            address,
            instance_type: i["profile"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            console: None,
            running: matches!(status, "pending" | "starting" | "running" | "restarting"),
        }
    }

    fn prototype(&self, spec: &VmSpec, name: &str, user_data: &str) -> Value {
        let mut nic = json!({
            "name": "coffer-pod",
            "subnet": { "id": self.c.subnet_id },
        });
        if !self.c.security_group_ids.is_empty() {
            nic["security_groups"] = self
                .c
                .security_group_ids
                .iter()
                .map(|g| json!({ "id": g }))
                .collect();
        }
        let mut p = json!({
            "name": name,
            "profile": { "name": spec.instance.name },
            "image": { "id": self.c.image_id },
            "zone": { "name": self.c.zone },
            "vpc": { "id": self.c.vpc_id },
            "primary_network_interface": nic,
            "user_data": user_data,
            "metadata_service": { "enabled": true },
        });
        if let Some(rg) = &self.c.resource_group_id {
            p["resource_group"] = json!({ "id": rg });
        }
        if let Some(mode) = &self.c.confidential_compute_mode {
            p["confidential_compute_mode"] = json!(mode);
        }
        p
    }
}

impl Provider for IbmCloud {
    fn name(&self) -> &'static str {
        NAME
    }

    fn launch_limit(&self) -> usize {
        USER_DATA_LIMIT
    }

    fn create(&self, spec: &VmSpec) -> Result<Vm, CloudError> {
        crate::provider::no_emulated_tee(
            spec,
            "an IBM Cloud instance",
            "the ibmcloud provider runs Secure Execution (or TDX) instances only",
        )?;
        let profile = spec.instance.name.as_str();
        let (bytes, launch) = crate::provider::user_data(spec, NAME)?;
        // JSON is UTF-8: the VPC API takes user data as a string.
        let user_data = Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned());
        drop(bytes);
        let name = self.name(spec, &launch);
        let mut mine = None;
        for i in self.instances()? {
            let n = i["name"].as_str().unwrap_or_default();
            if n == name {
                mine = Some(i);
            } else if self.record(n).is_some_and(|r| r.pod == spec.pod) {
                // A previous keeper's instance of this pod (other keys): it goes.
                tracing::info!(pod = %spec.pod, instance = n, "deleting a previous keeper's instance of this pod");
                self.delete_instance(&i)?;
            }
        }
        let id = match mine {
            Some(i) => i["id"].as_str().unwrap_or_default().to_string(),
            None => {
                self.write_record(
                    &name,
                    &Record {
                        pod: spec.pod.clone(),
                        sandbox_dir: spec.sandbox_dir.clone(),
                        launch: launch.clone(),
                    },
                )?;
                let body = Zeroizing::new(
                    serde_json::to_vec(&self.prototype(spec, &name, &user_data))
                        .map_err(|e| self.http.fail(e))?,
                );
                let a = self.vpc_passing(
                    "create instance",
                    "POST",
                    &self.url("/instances", &[]),
                    Some(&body),
                    profile,
                    &[409],
                )?;
                match a.status {
                    201 => a.json()["id"]
                        .as_str()
                        .ok_or_else(|| self.http.fail("create instance answered no id"))?
                        .to_string(),
                    // The name is taken: an earlier try of this very POST made the instance and
                    // its answer was lost (a retried 5xx or transport error). That one is ours.
                    409 => self.by_name(&name)?.ok_or_else(|| {
                        self.http.fail(format!(
                            "create instance: the name {name} is in use, but no instance of that name is listed"
                        ))
                    })?,
                    other => {
                        return Err(self
                            .http
                            .fail(format!("create instance: HTTP {other}")))
                    }
                }
            }
        };
        let until = Instant::now() + RUNNING_BOUND;
        loop {
            let a = self.vpc(
                "read instance",
                "GET",
                &self.url(&format!("/instances/{id}"), &[]),
                None,
                profile,
            )?;
            if a.status == 404 {
                return Err(self.http.fail(format!("instance {id} is gone")));
            }
            let i = a.json();
            let vm = self.to_vm(&i);
            match i["status"].as_str().unwrap_or_default() {
                "running" if vm.address.is_some() => return Ok(vm),
                "pending" | "starting" | "running" => {}
                other => {
                    let reason = &i["status_reasons"][0];
                    let code = reason["code"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string();
                    let message = reason["message"].as_str().unwrap_or_default().to_string();
                    // It may cost while it exists: it goes before the failure is returned.
                    if let Err(e) = self.delete_instance(&i) {
                        tracing::warn!(instance = %id, error = %e, "deleting an instance that failed to start failed; the reconciler retries");
                    }
                    return Err(if CAPACITY_REASONS.contains(&code.as_str()) {
                        CloudError::Capacity {
                            provider: NAME,
                            instance_type: profile.into(),
                            why: format!("{code}: {message}"),
                        }
                    } else {
                        self.http
                            .fail(format!("instance {id} is {other}: {code}: {message}"))
                    });
                }
            }
            if Instant::now() > until {
                return Err(self.http.fail(format!(
                    "instance {id} did not run within {}s",
                    RUNNING_BOUND.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn delete(&self, pod: &str) -> Result<bool, CloudError> {
        // An empty pod is the instances of this node with no record (the reconciler's).
        let found: Vec<Value> = self
            .instances()?
            .into_iter()
            .filter(|i| {
                let r = self.record(i["name"].as_str().unwrap_or_default());
                r.map(|r| r.pod).unwrap_or_default() == pod
            })
            .collect();
        for i in &found {
            self.delete_instance(i)?;
        }
        Ok(!found.is_empty())
    }

    fn list(&self) -> Result<Vec<Vm>, CloudError> {
        let all = self.instances()?;
        forget_stale(&self.c.state_dir, &all, RUNNING_BOUND);
        Ok(all.iter().map(|i| self.to_vm(i)).collect())
    }
}

/// Removes the records of instances that do not exist and were written long enough ago that
/// no create can still be making them.
fn forget_stale(dir: &Path, instances: &[Value], age: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let exists = instances.iter().any(|i| i["name"].as_str() == Some(name));
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > age);
        if !exists && old {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_goes_once_its_instance_is_gone_and_no_create_can_still_be_making_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for n in ["old-gone", "old-listed", "new-gone"] {
            std::fs::write(d.join(format!("{n}.json")), "{}").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        for n in ["old-gone", "old-listed"] {
            std::fs::File::options()
                .write(true)
                .open(d.join(format!("{n}.json")))
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        let listed = vec![json!({"name": "old-listed", "id": "0717_1"})];
        forget_stale(d, &listed, Duration::from_secs(3600));
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        // The listed instance's record stays; so does one a create may still be making.
        assert_eq!(left, ["new-gone.json", "old-listed.json"]);
    }
}
