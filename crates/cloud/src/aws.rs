//! The AWS provider: pod VMs as EC2 instances, through the EC2 Query API (`2016-11-15`), each
//! request signed with Signature Version 4 (`aws-sigv4`, AWS's own signing library) and sent with
//! `ureq`; responses read with `quick-xml`. The AWS SDK for Rust was not taken: its EC2 crate
//! alone is a large build for the four calls made here.
//!
//! - **Create**: `RunInstances` (one instance of the pod's instance type, the configured AMI,
//!   subnet and security groups, SEV-SNP through `CpuOptions.AmdSevSnp=enabled` when
//!   configured), tagged at creation (`TagSpecification`: `coffer:cluster`, `coffer:node`,
//!   `coffer:pod`, `coffer:sandbox-dir`, `Name`), the launch configuration as user data, and a
//!   `ClientToken` derived from the cluster, node, pod and sandbox so that a retried create makes
//!   no second instance. An instance already tagged for the pod is returned instead. Then
//!   `DescribeInstances` until it runs with a private address.
//! - **Delete**: `TerminateInstances` of every instance tagged for the pod that is not
//!   terminated.
//! - **List**: `DescribeInstances` filtered by the cluster and node tags (paginated).
//!
//! Capacity, quota and throttling errors (`InsufficientInstanceCapacity`,
//! `InstanceLimitExceeded`, `VcpuLimitExceeded`, `RequestLimitExceeded`, …) come back as
//! [`CloudError::Capacity`] naming the instance type and AWS's message; throttled and 5xx calls
//! are retried with exponential back-off first. Credentials come from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`); without them the
//! provider refuses to start.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{sign, SignableBody, SignableRequest, SigningSettings},
    sign::v4,
};
use serde::Deserialize;

use crate::{config::AwsConfig, provider::CloudError, Config, Provider, Vm, VmSpec};

const NAME: &str = "aws";
/// EC2's user-data limit (raw, before base64).
const USER_DATA_LIMIT: usize = 16 << 10;
const API_VERSION: &str = "2016-11-15";
/// How long a new instance has to run with an address.
const RUNNING_BOUND: Duration = Duration::from_secs(300);

fn fail(why: impl std::fmt::Display) -> CloudError {
    CloudError::Provider {
        provider: NAME,
        why: why.to_string(),
    }
}

/// The AWS provider.
pub struct Aws {
    c: AwsConfig,
    cluster: String,
    node: String,
    endpoint: String,
    creds: Credentials,
    http: ureq::Agent,
}

/// An EC2 error response.
#[derive(Deserialize)]
struct ErrorResponse {
    #[serde(rename = "Errors")]
    errors: ErrorList,
}

#[derive(Deserialize)]
struct ErrorList {
    #[serde(rename = "Error", default)]
    error: Vec<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(rename = "Code")]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

#[derive(Deserialize)]
struct Items<T> {
    #[serde(rename = "item", default = "Vec::new")]
    item: Vec<T>,
}

impl<T> Default for Items<T> {
    fn default() -> Self {
        Self { item: Vec::new() }
    }
}

#[derive(Deserialize)]
struct RunInstancesResponse {
    #[serde(rename = "instancesSet", default)]
    instances: Items<Instance>,
}

#[derive(Deserialize)]
struct DescribeInstancesResponse {
    #[serde(rename = "reservationSet", default)]
    reservations: Items<Reservation>,
    #[serde(rename = "nextToken", default)]
    next_token: Option<String>,
}

#[derive(Deserialize)]
struct Reservation {
    #[serde(rename = "instancesSet", default)]
    instances: Items<Instance>,
}

#[derive(Deserialize)]
struct Instance {
    #[serde(rename = "instanceId")]
    id: String,
    #[serde(rename = "instanceState")]
    state: InstanceState,
    #[serde(rename = "instanceType", default)]
    instance_type: String,
    #[serde(rename = "privateIpAddress", default)]
    private_ip: Option<String>,
    #[serde(rename = "tagSet", default)]
    tags: Items<Tag>,
}

#[derive(Deserialize)]
struct InstanceState {
    name: String,
}

#[derive(Deserialize)]
struct Tag {
    key: String,
    #[serde(default)]
    value: String,
}

impl Instance {
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .item
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }

    fn vm(&self) -> Vm {
        Vm {
            id: self.id.clone(),
            pod: self.tag(TAG_POD).unwrap_or_default().to_string(),
            sandbox_dir: PathBuf::from(self.tag(TAG_SANDBOX).unwrap_or_default()),
            address: self.private_ip.as_deref().and_then(|a| a.parse().ok()),
            instance_type: self.instance_type.clone(),
            console: None,
            running: self.state.name == "running",
        }
    }
}

const TAG_CLUSTER: &str = "coffer:cluster";
const TAG_NODE: &str = "coffer:node";
const TAG_POD: &str = "coffer:pod";
const TAG_SANDBOX: &str = "coffer:sandbox-dir";
/// SHA-256 of the user data (the launch configuration, so the keeper's keys) it was made with.
const TAG_LAUNCH: &str = "coffer:launch";

/// The states of an instance that is (or may again be) running.
const LIVE_STATES: [&str; 5] = ["pending", "running", "shutting-down", "stopping", "stopped"];

impl Aws {
    /// The provider for `config` (credentials from the environment).
    pub fn open(config: &Config) -> Result<Self, CloudError> {
        let c = config
            .aws
            .clone()
            .ok_or_else(|| CloudError::Invalid("no [aws] section".into()))?;
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(CloudError::Invalid(
                "aws: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)".into(),
            ));
        };
        let creds = Credentials::new(id, secret, var("AWS_SESSION_TOKEN"), None, "coffer-cloud");
        let endpoint = c
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://ec2.{}.amazonaws.com", c.region));
        // ureq's TLS takes the process's rustls provider.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            c,
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            creds,
            http,
        })
    }

    /// One signed Query API call; retried with back-off while throttled or failing on AWS's
    /// side. Returns the response body.
    fn call(&self, action: &str, params: &[(String, String)]) -> Result<String, CloudError> {
        let mut body = form_urlencoded::Serializer::new(String::new());
        body.append_pair("Action", action);
        body.append_pair("Version", API_VERSION);
        for (k, v) in params {
            body.append_pair(k, v);
        }
        // A create's body holds the user data: wiped once sent.
        let body = zeroize::Zeroizing::new(body.finish());
        let url = format!("{}/", self.endpoint);
        let mut delay = Duration::from_millis(200);
        for attempt in 0.. {
            let headers = [(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )];
            let identity = self.creds.clone().into();
            let signing = v4::SigningParams::builder()
                .identity(&identity)
                .region(&self.c.region)
                .name("ec2")
                .time(SystemTime::now())
                .settings(SigningSettings::default())
                .build()
                .map_err(fail)?
                .into();
            let signable = SignableRequest::new(
                "POST",
                &url,
                headers.iter().copied(),
                SignableBody::Bytes(body.as_bytes()),
            )
            .map_err(fail)?;
            let (instructions, _) = sign(signable, &signing).map_err(fail)?.into_parts();
            let mut req = self.http.post(&url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            for (k, v) in instructions.headers() {
                req = req.header(k, v);
            }
            let (status, text) = match req.send(body.as_str()) {
                Ok(mut r) => (
                    r.status().as_u16(),
                    r.body_mut().read_to_string().map_err(fail)?,
                ),
                Err(e) if attempt < 4 => {
                    tracing::warn!(action, error = %e, "EC2 unreachable; retrying");
                    std::thread::sleep(delay);
                    delay *= 2;
                    continue;
                }
                Err(e) => return Err(fail(format!("{action}: {e}"))),
            };
            if status < 300 {
                return Ok(text);
            }
            let err = quick_xml::de::from_str::<ErrorResponse>(&text)
                .ok()
                .and_then(|r| r.errors.error.into_iter().next());
            let (code, message) = err
                .map(|e| (e.code, e.message))
                .unwrap_or_else(|| (format!("HTTP {status}"), text.chars().take(200).collect()));
            let throttled = matches!(code.as_str(), "RequestLimitExceeded" | "Throttling");
            if (throttled || status >= 500) && attempt < 4 {
                tracing::warn!(action, %code, "EC2 throttles or fails; backing off");
                std::thread::sleep(delay);
                delay *= 2;
                continue;
            }
            return Err(match code.as_str() {
                "InsufficientInstanceCapacity"
                | "InstanceLimitExceeded"
                | "VcpuLimitExceeded"
                | "RequestLimitExceeded"
                | "Throttling"
                | "Unsupported" => CloudError::Capacity {
                    provider: NAME,
                    instance_type: params_value(params, "InstanceType").unwrap_or("-").into(),
                    why: format!("{code}: {message}"),
                },
                _ => fail(format!("{action}: {code}: {message}")),
            });
        }
        unreachable!("the loop returns")
    }

    /// Instances tagged with this cluster and node (and `pod`, when given), not terminated.
    fn describe(&self, pod: Option<&str>) -> Result<Vec<Instance>, CloudError> {
        let mut filters = vec![
            (TAG_CLUSTER.to_string(), vec![self.cluster.clone()]),
            (TAG_NODE.to_string(), vec![self.node.clone()]),
        ];
        if let Some(p) = pod {
            filters.push((TAG_POD.to_string(), vec![p.to_string()]));
        }
        let mut params: Vec<(String, String)> = Vec::new();
        for (i, (tag, values)) in filters.iter().enumerate() {
            params.push((format!("Filter.{}.Name", i + 1), format!("tag:{tag}")));
            for (j, v) in values.iter().enumerate() {
                params.push((format!("Filter.{}.Value.{}", i + 1, j + 1), v.clone()));
            }
        }
        let n = filters.len() + 1;
        params.push((format!("Filter.{n}.Name"), "instance-state-name".into()));
        for (j, s) in LIVE_STATES.iter().enumerate() {
            params.push((format!("Filter.{n}.Value.{}", j + 1), s.to_string()));
        }
        self.describe_pages(params)
    }

    fn describe_pages(&self, params: Vec<(String, String)>) -> Result<Vec<Instance>, CloudError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut p = params.clone();
            if let Some(t) = &token {
                p.push(("NextToken".into(), t.clone()));
            }
            let text = self.call("DescribeInstances", &p)?;
            let r: DescribeInstancesResponse = quick_xml::de::from_str(&text)
                .map_err(|e| fail(format!("DescribeInstances: unreadable answer: {e}")))?;
            out.extend(
                r.reservations
                    .item
                    .into_iter()
                    .flat_map(|r| r.instances.item),
            );
            match r.next_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// The idempotence token of one create: this cluster, node, pod, sandbox and launch
    /// configuration (a new keeper's keys make a new instance, not the old one again).
    fn client_token(&self, spec: &VmSpec, launch: &str) -> String {
        let id = crate::provider::identity(&self.cluster, &self.node, spec, launch);
        format!("coffer-{}", &id[..40])
    }
}

fn params_value<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Provider for Aws {
    fn name(&self) -> &'static str {
        NAME
    }

    fn launch_limit(&self) -> usize {
        USER_DATA_LIMIT
    }

    fn create(&self, spec: &VmSpec) -> Result<Vm, CloudError> {
        crate::provider::no_emulated_tee(
            spec,
            "an EC2 instance",
            "the aws provider runs hardware-TEE VMs only",
        )?;
        let (user_data, launch) = crate::provider::user_data(spec, NAME)?;
        let sandbox = spec.sandbox_dir.display().to_string();
        let (same, stale): (Vec<Instance>, Vec<Instance>) =
            self.describe(Some(&spec.pod))?.into_iter().partition(|i| {
                i.tag(TAG_LAUNCH) == Some(&launch) && i.tag(TAG_SANDBOX) == Some(&sandbox)
            });
        if !stale.is_empty() {
            // A previous keeper's instances of this pod (other keys): they go.
            tracing::info!(pod = %spec.pod, count = stale.len(), "terminating a previous keeper's instances of this pod");
            let p: Vec<(String, String)> = stale
                .iter()
                .enumerate()
                .map(|(i, inst)| (format!("InstanceId.{}", i + 1), inst.id.clone()))
                .collect();
            self.call("TerminateInstances", &p)?;
        }
        let id = match same.into_iter().next() {
            Some(i) => i.id,
            None => {
                use base64::Engine;
                let s = |v: &str| v.to_string();
                // It holds the user data (the agent channel's key): wiped once sent.
                let mut p: zeroize::Zeroizing<Vec<(String, String)>> =
                    zeroize::Zeroizing::new(vec![
                        (s("ImageId"), self.c.image_id.clone()),
                        (s("InstanceType"), spec.instance.name.clone()),
                        (s("MinCount"), s("1")),
                        (s("MaxCount"), s("1")),
                        (s("ClientToken"), self.client_token(spec, &launch)),
                        (
                            s("UserData"),
                            base64::engine::general_purpose::STANDARD.encode(&*user_data),
                        ),
                        (s("TagSpecification.1.ResourceType"), s("instance")),
                    ]);
                let name = format!("coffer-{}-{}", self.node, spec.pod);
                for (i, (k, v)) in [
                    (TAG_CLUSTER, self.cluster.as_str()),
                    (TAG_NODE, self.node.as_str()),
                    (TAG_POD, spec.pod.as_str()),
                    (TAG_SANDBOX, sandbox.as_str()),
                    (TAG_LAUNCH, launch.as_str()),
                    ("Name", name.as_str()),
                ]
                .iter()
                .enumerate()
                {
                    p.push((format!("TagSpecification.1.Tag.{}.Key", i + 1), s(k)));
                    p.push((format!("TagSpecification.1.Tag.{}.Value", i + 1), s(v)));
                }
                if let Some(subnet) = &self.c.subnet_id {
                    p.push((s("SubnetId"), subnet.clone()));
                }
                for (i, g) in self.c.security_group_ids.iter().enumerate() {
                    p.push((format!("SecurityGroupId.{}", i + 1), g.clone()));
                }
                if self.c.sev_snp {
                    p.push((s("CpuOptions.AmdSevSnp"), s("enabled")));
                }
                let text = self.call("RunInstances", &p)?;
                let r: RunInstancesResponse = quick_xml::de::from_str(&text)
                    .map_err(|e| fail(format!("RunInstances: unreadable answer: {e}")))?;
                r.instances
                    .item
                    .into_iter()
                    .next()
                    .map(|i| i.id)
                    .ok_or_else(|| fail("RunInstances answered no instance"))?
            }
        };
        let until = Instant::now() + RUNNING_BOUND;
        loop {
            let p = vec![("InstanceId.1".to_string(), id.clone())];
            // EC2 lists a new instance a moment after RunInstances answered (eventual
            // consistency): not found yet is not an error.
            let found = match self.describe_pages(p) {
                Ok(f) => f,
                Err(e) if e.to_string().contains("InvalidInstanceID.NotFound") => Vec::new(),
                Err(e) => return Err(e),
            };
            if let Some(inst) = found.into_iter().find(|i| i.id == id) {
                match inst.state.name.as_str() {
                    "running" if inst.private_ip.is_some() => return Ok(inst.vm()),
                    "pending" | "running" => {}
                    other => {
                        return Err(fail(format!("instance {id} is {other} instead of running")))
                    }
                }
            }
            if Instant::now() > until {
                return Err(fail(format!(
                    "instance {id} did not run within {}s",
                    RUNNING_BOUND.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn delete(&self, pod: &str) -> Result<bool, CloudError> {
        let found = self.describe(Some(pod))?;
        if found.is_empty() {
            return Ok(false);
        }
        let p: Vec<(String, String)> = found
            .iter()
            .enumerate()
            .map(|(i, inst)| (format!("InstanceId.{}", i + 1), inst.id.clone()))
            .collect();
        self.call("TerminateInstances", &p)?;
        Ok(true)
    }

    fn list(&self) -> Result<Vec<Vm>, CloudError> {
        Ok(self.describe(None)?.iter().map(Instance::vm).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ec2_answers_are_read_as_aws_documents_them() {
        let run = r#"<?xml version="1.0" encoding="UTF-8"?>
<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r-1</requestId>
  <instancesSet><item>
    <instanceId>i-0abc</instanceId>
    <instanceState><code>0</code><name>pending</name></instanceState>
    <instanceType>m6a.large</instanceType>
    <privateIpAddress>10.0.1.7</privateIpAddress>
    <tagSet><item><key>coffer:pod</key><value>p1</value></item>
            <item><key>coffer:sandbox-dir</key><value>/run/coffer/pods/p1</value></item></tagSet>
  </item></instancesSet>
</RunInstancesResponse>"#;
        let r: RunInstancesResponse = quick_xml::de::from_str(run).unwrap();
        let vm = r.instances.item[0].vm();
        assert_eq!(vm.id, "i-0abc");
        assert_eq!(vm.pod, "p1");
        assert_eq!(vm.sandbox_dir, PathBuf::from("/run/coffer/pods/p1"));
        assert_eq!(vm.address, Some(Ipv4Addr::new(10, 0, 1, 7)));
        assert!(!vm.running);
        let err = r#"<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>We currently do not have sufficient m6a.large capacity</Message></Error></Errors><RequestID>x</RequestID></Response>"#;
        let e: ErrorResponse = quick_xml::de::from_str(err).unwrap();
        assert_eq!(e.errors.error[0].code, "InsufficientInstanceCapacity");
        let empty = r#"<DescribeInstancesResponse><requestId>r</requestId><reservationSet/></DescribeInstancesResponse>"#;
        let d: DescribeInstancesResponse = quick_xml::de::from_str(empty).unwrap();
        assert!(d.reservations.item.is_empty() && d.next_token.is_none());
    }
}
