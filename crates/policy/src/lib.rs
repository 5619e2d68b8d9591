//! `coffer policy generate`: from Kubernetes YAML, an agent policy that pins every container of
//! each workload (image digest, process, environment, user, capabilities, mounts, allowed
//! execs), the initdata carrying it, and the YAML with each pod template given
//! `runtimeClassName: coffer` and the initdata annotation.
//!
//! The policy is the rules ([`RULES`], package `agent_policy`) followed by the workload's data,
//! `policy_data := {…}` ([`policy_for`]). The data says what containerd 1.6 and the kubelet send
//! to the runtime for each container, derived from the pod spec, the image config (from the
//! registry, [`RegistryResolver`], or a file, [`OfflineImages`]) and the ConfigMaps of the
//! input. Secret values never enter the policy (the node can read it): variables from Secrets
//! are allowed with any value.
//!
//! Pod names are pinned to what the workload's controller generates (see the `names` module:
//! generated names are matched exactly, including the API server's cut of long bases at 58
//! characters; only an Indexed CronJob's are matched by a prefix).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod container;
mod expand;
mod names;
mod resolver;
mod spec;
mod workload;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

pub use resolver::{ImageResolver, OfflineImages, RegistryResolver, ResolveFuture, ResolvedImage};
pub use workload::{INITDATA_ANNOTATION, RUNTIME_CLASS};

/// The policy's rules; [`policy_for`] appends the data.
pub const RULES: &str = include_str!("rules.rego");

/// A generation failure; the message names the document, workload, container and field.
#[derive(Debug, thiserror::Error)]
pub enum PolicyGenError {
    /// An input document, settings or digests file cannot be read.
    #[error("{0}")]
    Input(String),
    /// A container's spec cannot be pinned, or breaks the settings.
    #[error("{context}: {message}")]
    Spec {
        /// "document 2 (deployment web), container app".
        context: String,
        /// What is wrong.
        message: String,
    },
    /// An image cannot be resolved.
    #[error("image {image}: {message}")]
    Image {
        /// The image as the spec writes it.
        image: String,
        /// Why.
        message: String,
    },
    /// The generated policy is refused (a bug in the rules or the data), or too large.
    #[error("policy: {0}")]
    Policy(String),
    /// The initdata cannot be built.
    #[error("initdata: {0}")]
    Initdata(String),
}

/// The attested mesh for every generated workload (`mesh` in the settings): each workload's
/// identity is `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`, as the pod spec names them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MeshSettings {
    /// The trust domain of the identities (e.g. `cluster.local`).
    pub trust_domain: String,
    /// Whom the workloads may talk to (identities, or prefixes ending in `*`); default: every
    /// identity of the workload's own namespace.
    #[serde(default)]
    pub peers: Option<Vec<String>>,
    /// The pod network's ranges (`ADDR/LEN`).
    pub cidrs: Vec<String>,
    /// Ports that take plaintext from outside the mesh (kubelet probes).
    #[serde(default)]
    pub open_ports: Vec<u16>,
}

impl MeshSettings {
    /// The `mesh.toml` of a workload in `namespace` running as `service_account`.
    pub fn mesh_toml(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<String, PolicyGenError> {
        let base = format!("spiffe://{}/ns/{namespace}", self.trust_domain);
        let config = coffer_wire::mesh::MeshConfig {
            identity: format!("{base}/sa/{service_account}"),
            peers: self
                .peers
                .clone()
                .unwrap_or_else(|| vec![format!("{base}/*")]),
            cidrs: self.cidrs.clone(),
            open_ports: self.open_ports.clone(),
        };
        let text = toml::to_string(&config)
            .map_err(|e| PolicyGenError::Input(format!("settings: mesh: {e}")))?;
        coffer_wire::mesh::MeshConfig::parse(&text)
            .map_err(|e| PolicyGenError::Input(format!("settings: mesh: {e}")))?;
        Ok(text)
    }
}

/// A mount the settings allow in every container.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExtraMount {
    /// Where it is mounted in the container.
    pub destination: String,
    /// Whether it is read-only.
    #[serde(default)]
    pub read_only: bool,
    /// A regex its source must match; none: any source.
    #[serde(default)]
    pub source_regex: Option<String>,
}

/// Generation settings (`--settings`, YAML). Everything is off by default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Extra environment patterns (`^NAME=value-regex$`) allowed in every container.
    pub env_patterns: Vec<String>,
    /// Allow hostPath volumes (pinned to their path).
    pub allow_host_path: bool,
    /// Allow privileged containers.
    pub allow_privileged: bool,
    /// Allow any exec in every container (debugging: the node can then run anything).
    pub exec_any: bool,
    /// Mounts allowed in every container.
    pub extra_mounts: Vec<ExtraMount>,
    /// Allow the pods in any namespace (the YAML's namespace is not pinned).
    pub any_namespace: bool,
    /// The KBS resource keying each encrypted block volume (`volumeDevices`), by the name of
    /// its PersistentVolumeClaim (or of the pod's volume).
    pub volume_keys: BTreeMap<String, String>,
    /// Put every workload in the attested mesh (docs/mesh.md).
    pub mesh: Option<MeshSettings>,
}

impl Settings {
    /// Parses settings (YAML or JSON) and checks their regexes compile.
    pub fn parse(text: &str) -> Result<Self, PolicyGenError> {
        let s: Settings = if text.trim().is_empty() {
            Settings::default()
        } else {
            serde_yaml_ng::from_str(text)
                .map_err(|e| PolicyGenError::Input(format!("settings: {e}")))?
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), PolicyGenError> {
        let regexes = self.env_patterns.iter().map(|p| ("env_patterns", p)).chain(
            self.extra_mounts
                .iter()
                .filter_map(|m| m.source_regex.as_ref().map(|r| ("extra_mounts", r))),
        );
        for (field, r) in regexes {
            regex::Regex::new(r)
                .map_err(|e| PolicyGenError::Input(format!("settings: {field}: {r:?}: {e}")))?;
        }
        for (name, uri) in &self.volume_keys {
            coffer_cdh::ResourceUri::parse(uri).map_err(|e| {
                PolicyGenError::Input(format!("settings: volume_keys: {name}: {e}"))
            })?;
        }
        if let Some(m) = &self.mesh {
            m.mesh_toml("default", "default")?;
        }
        for m in &self.extra_mounts {
            if !m.destination.starts_with('/') {
                return Err(PolicyGenError::Input(format!(
                    "settings: extra_mounts: destination {:?} is not an absolute path",
                    m.destination
                )));
            }
        }
        Ok(())
    }
}

/// What goes into every initdata besides the policy.
#[derive(Clone, Debug)]
pub struct Options {
    /// The KBS the guest attests to (`http(s)://HOST:PORT`).
    pub kbs_url: String,
    /// KBS resources holding image decryption keys (`kbs:///repo/type/tag`).
    pub image_keys: Vec<String>,
    /// Generation settings.
    pub settings: Settings,
    /// Initdata digest algorithm: `sha256`, `sha384` or `sha512`.
    pub algorithm: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kbs_url: String::new(),
            image_keys: Vec::new(),
            settings: Settings::default(),
            algorithm: "sha384".into(),
        }
    }
}

/// One workload's policy and initdata.
#[derive(Clone, Debug)]
pub struct GeneratedPod {
    /// `Deployment`, `Pod`, …
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, or `default`.
    pub namespace: String,
    /// The policy (Rego).
    pub policy: String,
    /// The initdata (TOML).
    pub initdata: String,
    /// The initdata's digest (hex) under [`Options::algorithm`].
    pub initdata_digest: String,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generated {
    /// Every input document (multi-document YAML), each workload's pod template given
    /// `runtimeClassName: coffer` and the initdata annotation, everything else unchanged (but
    /// written anew: comments and formatting are not kept).
    pub yaml: String,
    /// One entry per workload, in input order.
    pub pods: Vec<GeneratedPod>,
    /// Things the user should know (settings that loosen the policy, values the node
    /// chooses).
    pub warnings: Vec<String>,
}

/// The policy text for `data`: the rules and `policy_data := <data>`.
pub fn policy_for(data: &Value) -> String {
    // JSON is a Rego value; pretty for whoever reviews the policy.
    let json = serde_json::to_string_pretty(data).unwrap_or_else(|_| "null".into());
    format!("{RULES}\npolicy_data := {json}\n")
}

/// The KBS reference values of the generated pods: `{"init_data": [hex digests]}`, the key
/// `coffer measure` writes.
pub fn reference_values(pods: &[GeneratedPod]) -> Value {
    let mut digests: Vec<&str> = pods.iter().map(|p| p.initdata_digest.as_str()).collect();
    digests.sort();
    digests.dedup();
    json!({ "init_data": digests })
}

/// Checks that `policy` is one the agent accepts: within its size and nesting bounds, and
/// compiling as package `agent_policy`.
pub fn validate_policy(policy: &str) -> Result<(), PolicyGenError> {
    use coffer_wire::rego::{nesting_depth, MAX_BYTES, MAX_NESTING};
    if policy.len() > MAX_BYTES {
        return Err(PolicyGenError::Policy(format!(
            "{} bytes, more than the {MAX_BYTES} the agent accepts; split the workload",
            policy.len()
        )));
    }
    let depth = nesting_depth(policy);
    if depth > MAX_NESTING {
        return Err(PolicyGenError::Policy(format!(
            "brackets nest {depth} deep, more than the {MAX_NESTING} the agent accepts"
        )));
    }
    let mut engine = regorus::Engine::new();
    let package = engine
        .add_policy("policy.rego".into(), policy.to_string())
        .map_err(|e| PolicyGenError::Policy(e.to_string()))?;
    if package != "data.agent_policy" {
        return Err(PolicyGenError::Policy(format!(
            "package is {package}, not agent_policy"
        )));
    }
    engine
        .eval_rule("data.agent_policy.policy_data".into())
        .map_err(|e| PolicyGenError::Policy(e.to_string()))?;
    Ok(())
}

fn check_options(opts: &Options) -> Result<(), PolicyGenError> {
    if !(opts.kbs_url.starts_with("http://") || opts.kbs_url.starts_with("https://")) {
        return Err(PolicyGenError::Input(format!(
            "KBS URL {:?}: use http(s)://HOST:PORT",
            opts.kbs_url
        )));
    }
    for k in &opts.image_keys {
        coffer_cdh::ResourceUri::parse(k)
            .map_err(|e| PolicyGenError::Input(format!("image key {k}: {e}")))?;
    }
    opts.settings.check()
}

/// One parsed input document.
struct Doc {
    label: String,
    value: serde_yaml_ng::Value,
}

fn parse_documents(documents: &[String]) -> Result<Vec<Doc>, PolicyGenError> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for (f, text) in documents.iter().enumerate() {
        for (d, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml_ng::Value::deserialize(de).map_err(|e| {
                PolicyGenError::Input(format!("input {}, document {}: {e}", f + 1, d + 1))
            })?;
            if value.is_null() {
                continue;
            }
            docs.push(Doc {
                label: format!("document {}", docs.len() + 1),
                value,
            });
        }
    }
    Ok(docs)
}

/// Generates the policy and initdata of every workload in `documents` (each the text of one
/// file, multi-document YAML), resolving each image once with `resolver`.
pub async fn generate(
    documents: &[String],
    resolver: &dyn ImageResolver,
    opts: &Options,
) -> Result<Generated, PolicyGenError> {
    check_options(opts)?;
    let mut docs = parse_documents(documents)?;
    let mut inputs = container::Inputs::default();
    for d in &docs {
        workload::collect(&d.value, &d.label, &mut inputs)?;
    }
    let mut warnings = Vec::new();
    let settings = &opts.settings;
    if settings.exec_any {
        warnings.push("settings: exec_any: the node can run any command in every container".into());
    }
    if settings.any_namespace {
        warnings.push("settings: any_namespace: the pods may run in any namespace".into());
    }
    if settings.allow_privileged {
        warnings.push("settings: allow_privileged: privileged containers are allowed".into());
    }
    if settings.allow_host_path {
        warnings.push("settings: allow_host_path: hostPath volumes are allowed".into());
    }
    for p in &settings.env_patterns {
        warnings.push(format!(
            "settings: env_patterns: {p} is allowed in every container"
        ));
    }
    for m in &settings.extra_mounts {
        warnings.push(format!(
            "settings: extra_mounts: {} is allowed in every container",
            m.destination
        ));
    }

    // Every workload, then every image, each resolved once.
    let mut workloads = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        if let Some(w) = workload::workload(&d.value, &d.label)? {
            let label = format!("{} ({} {})", d.label, w.kind.to_lowercase(), w.name);
            workloads.push((i, label, w));
        }
    }
    let mut images: BTreeMap<String, ResolvedImage> = BTreeMap::new();
    for (_, label, w) in &workloads {
        for c in w.spec.init_containers.iter().chain(&w.spec.containers) {
            let image = c
                .image
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| PolicyGenError::Spec {
                    context: format!("{label}, container {}", c.name),
                    message: "no image".into(),
                })?;
            if !images.contains_key(image) {
                let resolved = resolver.resolve(&format!("docker://{image}")).await?;
                resolver::check_digest(&resolved.digest).map_err(|m| PolicyGenError::Image {
                    image: image.to_string(),
                    message: m,
                })?;
                images.insert(image.to_string(), resolved);
            }
        }
    }

    let mut pods = Vec::new();
    for (i, label, w) in workloads {
        let namespace = w.namespace.clone().unwrap_or_else(|| "default".into());
        let automount = w.spec.automount_service_account_token.or_else(|| {
            let sa = w
                .spec
                .service_account_name
                .clone()
                .or_else(|| w.spec.service_account.clone())
                .unwrap_or_else(|| "default".into());
            inputs
                .service_accounts
                .get(&(namespace.clone(), sa))
                .copied()
                .flatten()
        });
        let hostname_body = if w.spec.host_network == Some(true) {
            "[A-Za-z0-9._-]+".to_string()
        } else {
            let base = match w.spec.hostname.as_deref().filter(|h| !h.is_empty()) {
                Some(h) => names::escape(h),
                None => w.names.hostname_body(),
            };
            if w.spec.set_hostname_as_fqdn == Some(true) {
                format!("{base}(?:\\.[a-z0-9.-]+)?")
            } else {
                base
            }
        };
        let name_regex = w.names.name_regex();
        let pod = container::Pod {
            label: &label,
            namespace: &namespace,
            namespace_pinned: !settings.any_namespace,
            name_body: name_regex
                .trim_start_matches('^')
                .trim_end_matches('$')
                .to_string(),
            hostname_body,
            spec: &w.spec,
            inputs: &inputs,
            settings,
            service_account_token: automount != Some(false),
        };
        let mut containers = serde_json::Map::new();
        let mut block_volumes: BTreeMap<String, String> = BTreeMap::new();
        let all = w
            .spec
            .init_containers
            .iter()
            .map(|c| (c, true))
            .chain(w.spec.containers.iter().map(|c| (c, false)));
        for (c, init) in all {
            if c.name.is_empty() {
                return Err(PolicyGenError::Input(format!(
                    "{label}: a container without a name"
                )));
            }
            if containers.contains_key(&c.name) {
                return Err(PolicyGenError::Input(format!(
                    "{label}: two containers named {}",
                    c.name
                )));
            }
            let image = image_of(&label, c, &images)?;
            for (path, key) in pod.block_devices(c)? {
                match block_volumes.get(&path) {
                    Some(k) if *k != key => {
                        return Err(PolicyGenError::Input(format!(
                            "{label}: devicePath {path} is given two different volumes; the guest keys a block volume by its path"
                        )))
                    }
                    _ => {
                        block_volumes.insert(path, key);
                    }
                }
            }
            containers.insert(
                c.name.clone(),
                pod.container(c, init, &image, &mut warnings)?,
            );
        }
        if containers.is_empty() {
            return Err(PolicyGenError::Input(format!("{label}: no containers")));
        }
        let data = json!({
            "pod": {
                "namespace": if settings.any_namespace { Value::Null } else { Value::String(namespace.clone()) },
                "name_regex": name_regex,
            },
            "containers": containers,
        });
        let policy = policy_for(&data);
        validate_policy(&policy).map_err(|e| match e {
            PolicyGenError::Policy(m) => PolicyGenError::Policy(format!("{label}: {m}")),
            e => e,
        })?;
        let initdata = coffer_wire::initdata::build(&coffer_wire::initdata::InitdataSpec {
            kbs_url: opts.kbs_url.clone(),
            image_keys: opts.image_keys.clone(),
            policy: policy.clone(),
            algorithm: opts.algorithm.clone(),
            block_volumes,
            mesh: match &settings.mesh {
                Some(m) => Some(
                    m.mesh_toml(
                        &namespace,
                        &w.spec
                            .service_account_name
                            .clone()
                            .or_else(|| w.spec.service_account.clone())
                            .unwrap_or_else(|| "default".into()),
                    )?,
                ),
                None => None,
            },
            ..Default::default()
        })
        .map_err(|e| PolicyGenError::Initdata(e.to_string()))?;
        let digest = coffer_wire::initdata::digest(&initdata)
            .map_err(|e| PolicyGenError::Initdata(e.to_string()))?;
        let annotation = coffer_wire::initdata::encode_annotation(&initdata);
        if let Some(w) = workload::annotate(&mut docs[i].value, &annotation) {
            warnings.push(format!("{label}: {w}"));
        }
        pods.push(GeneratedPod {
            kind: w.kind,
            name: w.name,
            namespace,
            policy,
            initdata,
            initdata_digest: hex::encode(digest),
        });
    }

    let mut yaml = String::new();
    for d in &docs {
        let text = serde_yaml_ng::to_string(&d.value)
            .map_err(|e| PolicyGenError::Input(format!("{}: cannot write it: {e}", d.label)))?;
        if !yaml.is_empty() {
            yaml.push_str("---\n");
        }
        yaml.push_str(&text);
    }
    Ok(Generated {
        yaml,
        pods,
        warnings,
    })
}

/// The pinned image of container `c`.
fn image_of(
    label: &str,
    c: &spec::Container,
    images: &BTreeMap<String, ResolvedImage>,
) -> Result<container::Image, PolicyGenError> {
    let written = c.image.as_deref().unwrap_or_default();
    let err = |m: String| PolicyGenError::Spec {
        context: format!("{label}, container {}", c.name),
        message: format!("image {written:?}: {m}"),
    };
    let reference = coffer_image::reference::docker_reference(written).map_err(err)?;
    let resolved = images
        .get(written)
        .ok_or_else(|| err("not resolved".into()))?;
    // The same parts the agent derives from the image a request names.
    let parts = coffer_image::reference::PolicyParts::of(&reference);
    if let Some(d) = parts.digest {
        if d != resolved.digest {
            return Err(err(format!(
                "the spec names digest {d}, the resolver gives {}",
                resolved.digest
            )));
        }
    }
    Ok(container::Image {
        registry: parts.registry.to_string(),
        repository: parts.repository.to_string(),
        tag: parts.tag.map(str::to_string),
        digest: resolved.digest.clone(),
        config: if resolved.config.is_object() {
            resolved.config.clone()
        } else {
            Value::Object(Default::default())
        },
    })
}

/// One container as `coffer run` asks the agent for it (no pod, no CRI annotations): the
/// container id is its name, the args are the command given (empty: the image's Entrypoint and
/// Cmd, which the digest pins), and nothing else is set.
#[derive(Clone, Debug)]
pub struct RunContainer {
    /// The container's name (`coffer run --name`).
    pub name: String,
    /// The image (`docker://REG/REPO:TAG` or `…@sha256:…`).
    pub image: String,
    /// The command (`coffer run IMAGE COMMAND…`); empty: the image's.
    pub args: Vec<String>,
    /// `coffer run -t`.
    pub tty: bool,
    /// `coffer run -i`.
    pub stdin: bool,
}

/// The policy that allows exactly `c` (image pinned to the digest `resolver` gives), the
/// sandbox's lifecycle and reads, and no exec (an owner-signed exec stands on its signature).
pub async fn run_container_policy(
    c: &RunContainer,
    resolver: &dyn ImageResolver,
) -> Result<String, PolicyGenError> {
    let written = c.image.strip_prefix("docker://").ok_or_else(|| {
        PolicyGenError::Input(format!(
            "{}: only a registry image (docker://…) can be pinned by digest",
            c.image
        ))
    })?;
    // The agent's rule for container ids.
    let valid = !c.name.is_empty()
        && c.name.len() <= 64
        && c.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(PolicyGenError::Input(format!(
            "container name {:?}: use 1-64 letters, digits, '-' or '_'",
            c.name
        )));
    }
    let resolved = resolver.resolve(&c.image).await?;
    let mut images = BTreeMap::new();
    images.insert(written.to_string(), resolved);
    let spec = spec::Container {
        name: c.name.clone(),
        image: Some(written.to_string()),
        ..Default::default()
    };
    let image = image_of(&format!("container {}", c.name), &spec, &images)?;
    let (image_parts, pull) = image.policy_fields();
    let data = json!({
        "pod": null,
        "containers": {
            c.name.clone(): {
                "init": false,
                "image": image_parts,
                "pull": pull,
                "args": c.args,
                "working_dir": "",
                "env": {"pinned": {}, "any_value": [], "values": {}, "patterns": []},
                "user": {"uid": null, "gid": null},
                "read_only_rootfs": false,
                "privileged": false,
                "capabilities": [],
                "tty": c.tty,
                "stdin": c.stdin,
                "mounts": [],
                "exec": [],
                "exec_any": false,
            }
        }
    });
    let policy = policy_for(&data);
    validate_policy(&policy)?;
    Ok(policy)
}
