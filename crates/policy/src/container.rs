//! One container's policy data: what containerd 1.6 and the kubelet send to the runtime for
//! it, from its spec, its pod's spec, the image config and the ConfigMaps of the input.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::{
    expand::{expand, ExpandError, Var},
    names::escape,
    spec::{Container, PodSpec, Volume},
    PolicyGenError, Settings,
};

/// containerd's `PATH` when the image has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's capabilities for an unprivileged container.
pub use coffer_wire::capabilities::DEFAULT as DEFAULT_CAPABILITIES;

/// Every Linux capability (what `add: [ALL]` and privileged give).
pub use coffer_wire::capabilities::ALL as ALL_CAPABILITIES;

/// Where the service account token is mounted.
pub const SERVICE_ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The kubelet's default termination message file.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

const IP4: &str = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}";
const IP6: &str = r"[0-9a-fA-F:]+";
const PORT: &str = r"[0-9]{1,5}";
const PROTO: &str = "(?:tcp|udp|sctp)";
const SERVICE_NAME: &str = "[A-Z_][A-Z0-9_]*";

fn host() -> String {
    format!("(?:{IP4}|{IP6})")
}

fn url() -> String {
    format!("{PROTO}://(?:{IP4}|\\[{IP6}\\]):{PORT}")
}

/// The kubelet's variables for the `kubernetes` service: always set, whatever
/// `enableServiceLinks` says. (name, value regex).
pub fn kubernetes_service_env() -> Vec<(&'static str, String)> {
    vec![
        ("KUBERNETES_SERVICE_HOST", host()),
        ("KUBERNETES_SERVICE_PORT", PORT.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", PORT.to_string()),
        ("KUBERNETES_PORT", url()),
        ("KUBERNETES_PORT_443_TCP", url()),
        ("KUBERNETES_PORT_443_TCP_PROTO", "tcp".to_string()),
        ("KUBERNETES_PORT_443_TCP_PORT", PORT.to_string()),
        ("KUBERNETES_PORT_443_TCP_ADDR", host()),
    ]
}

/// The kubelet's service-link variables (Docker links style) of any service in the namespace,
/// as (name regex, value regex).
pub fn service_link_env() -> Vec<(String, String)> {
    let n = SERVICE_NAME;
    let port = format!("{n}_PORT_[0-9]+_(?:TCP|UDP|SCTP)");
    vec![
        (format!("{n}_SERVICE_HOST"), host()),
        (format!("{n}_SERVICE_PORT"), PORT.to_string()),
        (format!("{n}_SERVICE_PORT_[A-Z0-9_]+"), PORT.to_string()),
        (format!("{n}_PORT"), url()),
        (port.clone(), url()),
        (format!("{port}_PROTO"), PROTO.to_string()),
        (format!("{port}_PORT"), PORT.to_string()),
        (format!("{port}_ADDR"), host()),
    ]
}

/// The ConfigMaps, Secrets and ServiceAccounts of the input, by (namespace, name).
#[derive(Default)]
pub struct Inputs {
    /// ConfigMap `data`.
    pub config_maps: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// Secret key names (`data` and `stringData`); never their values.
    pub secrets: BTreeMap<(String, String), Vec<String>>,
    /// ServiceAccount `automountServiceAccountToken`.
    pub service_accounts: BTreeMap<(String, String), Option<bool>>,
}

/// The image a container runs, resolved.
pub struct Image {
    /// Registry (as the agent names it: `resolve_registry`).
    pub registry: String,
    /// Repository.
    pub repository: String,
    /// Tag, unless the spec names a digest.
    pub tag: Option<String>,
    /// The pinned manifest digest.
    pub digest: String,
    /// The image config's `config` section.
    pub config: Value,
}

impl Image {
    /// What a container's policy entry says of its image: `image` (the parts a request's image
    /// is compared by) and `pull` (the pinned reference the agent pulls instead).
    pub fn policy_fields(&self) -> (Value, String) {
        (
            json!({
                "registry": self.registry,
                "repository": self.repository,
                "tag": self.tag,
                "digest": self.digest,
            }),
            format!(
                "docker://{}/{}@{}",
                self.registry, self.repository, self.digest
            ),
        )
    }
}

/// What every container of one pod shares.
pub struct Pod<'a> {
    /// "document 2 (deployment web)".
    pub label: &'a str,
    /// The namespace the pod runs in (for references to ConfigMaps and the like).
    pub namespace: &'a str,
    /// Whether the namespace is pinned (else `metadata.namespace` is not known to the policy).
    pub namespace_pinned: bool,
    /// The regex body of the pod's name.
    pub name_body: String,
    /// The regex body of the pod's host name (`HOSTNAME`).
    pub hostname_body: String,
    /// The pod spec.
    pub spec: &'a PodSpec,
    /// The input's ConfigMaps etc.
    pub inputs: &'a Inputs,
    /// The settings.
    pub settings: &'a Settings,
    /// Whether the service account token is mounted.
    pub service_account_token: bool,
}

/// One variable of the environment as the policy knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Env {
    /// This exact value (and the variable must be there).
    Pinned(String),
    /// Any value (a Secret's, the node's), or absent.
    Any,
    /// A value matching this regex (unanchored body).
    Pattern(String),
}

/// The kubelet's variables with a known name, in the order it defines them (envFrom, env).
struct KubeletEnv {
    order: Vec<String>,
    vars: BTreeMap<String, Env>,
}

impl KubeletEnv {
    fn set(&mut self, name: String, value: Env) {
        if !self.vars.contains_key(&name) {
            self.order.push(name.clone());
        }
        self.vars.insert(name, value);
    }
}

fn is_service_link_name(name: &str, links: bool) -> bool {
    if kubernetes_service_env().iter().any(|(n, _)| *n == name) {
        return true;
    }
    static NAMES: std::sync::OnceLock<Vec<regex::Regex>> = std::sync::OnceLock::new();
    links
        && NAMES
            .get_or_init(|| {
                service_link_env()
                    .iter()
                    .filter_map(|(n, _)| regex::Regex::new(&format!("^{n}$")).ok())
                    .collect()
            })
            .iter()
            .any(|re| re.is_match(name))
}

impl Pod<'_> {
    fn links(&self) -> bool {
        self.spec.enable_service_links != Some(false)
    }

    fn err(&self, container: &str, message: String) -> PolicyGenError {
        PolicyGenError::Spec {
            context: format!("{}, container {container}", self.label),
            message,
        }
    }

    fn key(&self, name: &str) -> (String, String) {
        (self.namespace.to_string(), name.to_string())
    }

    /// The variable `name` as the kubelet's expansion sees it, in `env`.
    fn lookup(&self, env: &KubeletEnv, name: &str, warnings: &mut Vec<String>, what: &str) -> Var {
        match env.vars.get(name) {
            Some(Env::Pinned(v)) => Var::Value(v.clone()),
            Some(_) => Var::Unpinned,
            None if kubernetes_service_env().iter().any(|(n, _)| *n == name) => Var::Unpinned,
            None => {
                if is_service_link_name(name, self.links()) {
                    warnings.push(format!(
                        "{}: {what} refers to $({name}), left as written; if the namespace has a service of that name the kubelet expands it and the container is refused",
                        self.label
                    ));
                }
                Var::Unknown
            }
        }
    }

    fn expand_field(
        &self,
        container: &str,
        field: &str,
        text: &str,
        env: &KubeletEnv,
        warnings: &mut Vec<String>,
    ) -> Result<String, PolicyGenError> {
        let mut local = Vec::new();
        let r = expand(text, |n| {
            self.lookup(
                env,
                n,
                &mut local,
                &format!("container {container}: {field}"),
            )
        });
        warnings.extend(local);
        r.map_err(|e| match e {
            ExpandError::Unpinned(var) => self.err(
                container,
                format!(
                    "{field} refers to $({var}), whose value is not known when the policy is written (a Secret, a field of the running pod, the node's); the policy can only pin known values: use a literal, or read the variable in the process (sh -c '… \"$${var}\"')"
                ),
            ),
            ExpandError::NotUtf8 => self.err(
                container,
                format!("{field}: a '$' before a non-ASCII character, which the kubelet turns into invalid UTF-8"),
            ),
        })
    }

    /// The kubelet's environment for `c`: envFrom, then env, each resolved.
    fn kubelet_env(
        &self,
        c: &Container,
        warnings: &mut Vec<String>,
    ) -> Result<KubeletEnv, PolicyGenError> {
        let mut env = KubeletEnv {
            order: Vec::new(),
            vars: BTreeMap::new(),
        };
        for (i, from) in c.env_from.iter().enumerate() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                match self.inputs.config_maps.get(&self.key(&r.name)) {
                    Some(data) => {
                        for (k, v) in data {
                            env.set(format!("{prefix}{k}"), Env::Pinned(v.clone()));
                        }
                    }
                    None if r.optional == Some(true) => warnings.push(format!(
                        "{}, container {}: envFrom[{i}]: optional ConfigMap {} is not in the input; the policy assumes it does not exist",
                        self.label, c.name, r.name
                    )),
                    None => {
                        return Err(self.err(
                            &c.name,
                            format!(
                                "envFrom[{i}].configMapRef: ConfigMap {} is not in the input; add it with -f or mark it optional",
                                r.name
                            ),
                        ))
                    }
                }
            }
            if let Some(r) = &from.secret_ref {
                match self.inputs.secrets.get(&self.key(&r.name)) {
                    Some(keys) => {
                        for k in keys {
                            env.set(format!("{prefix}{k}"), Env::Any);
                        }
                    }
                    None if r.optional == Some(true) => warnings.push(format!(
                        "{}, container {}: envFrom[{i}]: optional Secret {} is not in the input; the policy assumes it does not exist",
                        self.label, c.name, r.name
                    )),
                    None => {
                        return Err(self.err(
                            &c.name,
                            format!(
                                "envFrom[{i}].secretRef: Secret {} is not in the input, so its key names are unknown; add it with -f (only its key names go into the policy) or mark it optional",
                                r.name
                            ),
                        ))
                    }
                }
            }
        }
        for (i, e) in c.env.iter().enumerate() {
            if e.name.is_empty() || e.name.contains('=') {
                return Err(self.err(&c.name, format!("env[{i}]: invalid name {:?}", e.name)));
            }
            let value = e.value.clone().unwrap_or_default();
            if !value.is_empty() {
                let v = self.expand_field(
                    &c.name,
                    &format!("env[{i}] ({}) value", e.name),
                    &value,
                    &env,
                    warnings,
                )?;
                env.set(e.name.clone(), Env::Pinned(v));
                continue;
            }
            let Some(from) = &e.value_from else {
                env.set(e.name.clone(), Env::Pinned(String::new()));
                continue;
            };
            if let Some(r) = &from.config_map_key_ref {
                let value = match self.inputs.config_maps.get(&self.key(&r.name)) {
                    Some(data) => match data.get(&r.key) {
                        Some(v) => Some(v.clone()),
                        None if r.optional == Some(true) => None,
                        None => {
                            return Err(self.err(
                                &c.name,
                                format!(
                                    "env[{i}] ({}) valueFrom.configMapKeyRef: ConfigMap {} has no key {:?}",
                                    e.name, r.name, r.key
                                ),
                            ))
                        }
                    },
                    None if r.optional == Some(true) => {
                        warnings.push(format!(
                            "{}, container {}: env[{i}] ({}): optional ConfigMap {} is not in the input; the policy assumes it does not exist",
                            self.label, c.name, e.name, r.name
                        ));
                        None
                    }
                    None => {
                        return Err(self.err(
                            &c.name,
                            format!(
                                "env[{i}] ({}) valueFrom.configMapKeyRef: ConfigMap {} is not in the input; add it with -f or mark it optional",
                                e.name, r.name
                            ),
                        ))
                    }
                };
                // An optional reference that resolves to nothing defines no variable.
                if let Some(v) = value {
                    env.set(e.name.clone(), Env::Pinned(v));
                }
            } else if from.secret_key_ref.is_some() || from.resource_field_ref.is_some() {
                env.set(e.name.clone(), Env::Any);
            } else if let Some(f) = &from.field_ref {
                let v = match f.field_path.as_str() {
                    "metadata.namespace" if self.namespace_pinned => {
                        Env::Pinned(self.namespace.to_string())
                    }
                    "metadata.name" => Env::Pattern(self.name_body.clone()),
                    "spec.serviceAccountName" => Env::Pinned(
                        self.spec
                            .service_account_name
                            .clone()
                            .or_else(|| self.spec.service_account.clone())
                            .unwrap_or_else(|| "default".into()),
                    ),
                    _ => Env::Any,
                };
                env.set(e.name.clone(), v);
            } else {
                return Err(self.err(
                    &c.name,
                    format!(
                        "env[{i}] ({}) valueFrom: no source this generator knows",
                        e.name
                    ),
                ));
            }
        }
        Ok(env)
    }

    /// The policy entry of container `c`.
    pub fn container(
        &self,
        c: &Container,
        init: bool,
        image: &Image,
        warnings: &mut Vec<String>,
    ) -> Result<Value, PolicyGenError> {
        let kubelet = self.kubelet_env(c, warnings)?;
        let config = &image.config;
        let strings = |key: &str| -> Result<Option<Vec<String>>, PolicyGenError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
                    self.err(
                        &c.name,
                        format!("the image config's {key} is not a list of strings"),
                    )
                }),
            }
        };

        // The process: containerd's merge of the spec's command and args with the image's
        // Entrypoint and Cmd; the spec's are expanded by the kubelet first.
        let mut command = Vec::new();
        for (i, a) in c.command.iter().flatten().enumerate() {
            command.push(self.expand_field(
                &c.name,
                &format!("command[{i}]"),
                a,
                &kubelet,
                warnings,
            )?);
        }
        let mut args = Vec::new();
        for (i, a) in c.args.iter().flatten().enumerate() {
            args.push(self.expand_field(&c.name, &format!("args[{i}]"), a, &kubelet, warnings)?);
        }
        if command.is_empty() {
            if args.is_empty() {
                args = strings("Cmd")?.unwrap_or_default();
            }
            let entrypoint = strings("Entrypoint")?.unwrap_or_default();
            if !(entrypoint.len() == 1 && entrypoint[0].is_empty()) {
                command = entrypoint;
            }
        }
        command.extend(args);
        if command.is_empty() {
            return Err(self.err(
                &c.name,
                "no command: neither the spec (command, args) nor the image (Entrypoint, Cmd) names one".into(),
            ));
        }

        let working_dir = match c.working_dir.as_deref() {
            Some(w) if !w.is_empty() => w.to_string(),
            _ => match config.get("WorkingDir").and_then(Value::as_str) {
                Some(w) if !w.is_empty() => w.to_string(),
                _ => "/".to_string(),
            },
        };

        let env = self.environment(c, config, &kubelet, warnings)?;
        let user = self.user(c, config, warnings);

        let sc = c.security_context.clone().unwrap_or_default();
        let privileged = sc.privileged == Some(true);
        if privileged && !self.settings.allow_privileged {
            return Err(self.err(
                &c.name,
                "securityContext.privileged: a privileged container can reach the pod VM's kernel and every device; refused unless the settings say allow_privileged: true".into(),
            ));
        }
        let capabilities = if privileged {
            Value::Null
        } else {
            json!(capabilities(sc.capabilities.as_ref()))
        };

        let mounts = self.mounts(c, warnings)?;
        let devices: Vec<String> = self
            .block_devices(c)?
            .into_iter()
            .map(|(path, _)| path)
            .collect();

        let mut exec: Vec<Vec<String>> = Vec::new();
        let lifecycle = c.lifecycle.clone().unwrap_or_default();
        for p in [
            &c.liveness_probe,
            &c.readiness_probe,
            &c.startup_probe,
            &lifecycle.post_start,
            &lifecycle.pre_stop,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(e) = &p.exec {
                if !e.command.is_empty() && !exec.contains(&e.command) {
                    exec.push(e.command.clone());
                }
            }
        }

        let (image_parts, pull) = image.policy_fields();
        Ok(json!({
            "init": init,
            "image": image_parts,
            "pull": pull,
            "args": command,
            "working_dir": working_dir,
            "env": env,
            "user": user,
            "read_only_rootfs": sc.read_only_root_filesystem == Some(true),
            "privileged": privileged,
            "capabilities": capabilities,
            "tty": c.tty == Some(true),
            "stdin": c.stdin == Some(true),
            "mounts": mounts,
            "devices": devices,
            "exec": exec,
            "exec_any": self.settings.exec_any,
        }))
    }

    /// The environment containerd gives the process: its default PATH, the image's, then the
    /// kubelet's (which override); and the variables whose values only the node knows.
    fn environment(
        &self,
        c: &Container,
        config: &Value,
        kubelet: &KubeletEnv,
        warnings: &mut Vec<String>,
    ) -> Result<Value, PolicyGenError> {
        let mut env: BTreeMap<String, Env> = BTreeMap::new();
        env.insert("PATH".into(), Env::Pinned(DEFAULT_PATH.into()));
        let image_env: Vec<String> = match config.get("Env") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                self.err(
                    &c.name,
                    "the image config's Env is not a list of strings".into(),
                )
            })?,
        };
        let links = self.links();
        for kv in image_env {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    // The kubelet's service variables come after the image's and replace them.
                    let value = if is_service_link_name(k, links) {
                        warnings.push(format!(
                            "{}, container {}: the image sets {k}, which the kubelet may replace with a service's address; any value is allowed",
                            self.label, c.name
                        ));
                        Env::Any
                    } else {
                        Env::Pinned(v.to_string())
                    };
                    env.insert(k.to_string(), value);
                }
                _ => {
                    warnings.push(format!(
                        "{}, container {}: the image's Env entry {kv:?} is not NAME=VALUE; any value is allowed for it",
                        self.label, c.name
                    ));
                    env.insert(kv.clone(), Env::Any);
                }
            }
        }
        for name in &kubelet.order {
            if let Some(v) = kubelet.vars.get(name) {
                env.insert(name.clone(), v.clone());
            }
        }
        let mut pinned = serde_json::Map::new();
        let mut any_value = Vec::new();
        // Variables whose name is known but whose value only matches a pattern: looked up by
        // name (one regex per variable at decision time, not every pattern for every one).
        let mut values = serde_json::Map::new();
        let mut patterns = Vec::new();
        for (k, v) in &env {
            match v {
                Env::Pinned(v) => {
                    pinned.insert(k.clone(), Value::String(v.clone()));
                }
                Env::Any => any_value.push(k.clone()),
                Env::Pattern(re) => {
                    values.insert(k.clone(), Value::String(format!("^{re}$")));
                }
            }
        }
        if !env.contains_key("HOSTNAME") {
            values.insert(
                "HOSTNAME".into(),
                Value::String(format!("^{}$", self.hostname_body)),
            );
        }
        for (name, value) in kubernetes_service_env() {
            if !env.contains_key(name) {
                values.insert(name.into(), Value::String(format!("^{value}$")));
            }
        }
        if links {
            for (name, value) in service_link_env() {
                patterns.push(format!("^{name}={value}$"));
            }
        }
        patterns.extend(self.settings.env_patterns.iter().cloned());
        Ok(
            json!({"pinned": pinned, "any_value": any_value, "values": values, "patterns": patterns}),
        )
    }

    /// The user: the security context's (container over pod), else what the kubelet takes from
    /// the image's `User` (its uid only: the kubelet passes no group from the image), else root.
    fn user(&self, c: &Container, config: &Value, warnings: &mut Vec<String>) -> Value {
        let sc = c.security_context.clone().unwrap_or_default();
        let psc = self.spec.security_context.clone().unwrap_or_default();
        let run_as_user = sc.run_as_user.or(psc.run_as_user);
        let run_as_group = sc.run_as_group.or(psc.run_as_group);
        let image_user = config.get("User").and_then(Value::as_str).unwrap_or("");
        let (image_uid_text, image_group) = match image_user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (image_user, None),
        };
        let uid: Option<i64> = match run_as_user {
            Some(u) => Some(u),
            None if image_uid_text.is_empty() => Some(0),
            None => match image_uid_text.parse::<i64>() {
                Ok(u) => Some(u),
                Err(_) => {
                    warnings.push(format!(
                        "{}, container {}: the image runs as user {image_uid_text:?}, a name resolved in the container's /etc/passwd; any uid is allowed (set securityContext.runAsUser to pin one)",
                        self.label, c.name
                    ));
                    None
                }
            },
        };
        // The group: runAsGroup; else containerd looks the uid up in the container's
        // /etc/passwd. Root's group is 0 in every image (and 0 when there is no passwd); any
        // other uid's depends on the image's files, and an image `User` of "uid:gid" does not
        // decide it either (the kubelet passes only the uid on).
        let gid = match run_as_group {
            Some(g) => Some(g),
            None if uid == Some(0) && (run_as_user.is_some() || image_group.is_none()) => Some(0),
            None => None,
        };
        json!({"uid": uid, "gid": gid})
    }

    /// The container's block volumes (`volumeDevices`): each device path and the KBS resource
    /// keying it (settings `volume_keys`, by claim name). Only PersistentVolumeClaims (and
    /// generic ephemeral volumes) can be block volumes; each needs a key.
    pub fn block_devices(&self, c: &Container) -> Result<Vec<(String, String)>, PolicyGenError> {
        let mut out = Vec::new();
        for (i, d) in c.volume_devices.iter().enumerate() {
            if !d.device_path.starts_with('/') {
                return Err(self.err(
                    &c.name,
                    format!(
                        "volumeDevices[{i}]: devicePath {:?} is not an absolute path",
                        d.device_path
                    ),
                ));
            }
            let volume = self
                .spec
                .volumes
                .iter()
                .find(|v| v.name == d.name)
                .ok_or_else(|| {
                    self.err(
                        &c.name,
                        format!(
                            "volumeDevices[{i}]: no volume named {:?} in the pod",
                            d.name
                        ),
                    )
                })?;
            let claim = match volume.source.iter().next() {
                Some((kind, v)) if kind == "persistentVolumeClaim" => v
                    .get("claimName")
                    .and_then(|n| n.as_str())
                    .unwrap_or(&d.name)
                    .to_string(),
                Some((kind, _)) if kind == "ephemeral" => d.name.clone(),
                Some((kind, _)) => {
                    return Err(self.err(
                        &c.name,
                        format!(
                            "volumeDevices[{i}]: volume {} ({kind}) is not a block volume claim (persistentVolumeClaim or ephemeral)",
                            d.name
                        ),
                    ))
                }
                None => return Err(self.err(&c.name, format!("volume {:?} has no source", d.name))),
            };
            let key = self
                .settings
                .volume_keys
                .get(&claim)
                .or_else(|| self.settings.volume_keys.get(&d.name))
                .ok_or_else(|| {
                    self.err(
                        &c.name,
                        format!(
                            "volumeDevices[{i}]: no key for block volume {claim}: the guest encrypts it under a KBS resource; name one in the settings (volume_keys: {{{claim}: kbs:///…}})"
                        ),
                    )
                })?;
            out.push((d.device_path.clone(), key.clone()));
        }
        Ok(out)
    }

    fn mounts(
        &self,
        c: &Container,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<Value>, PolicyGenError> {
        let mut out = Vec::new();
        for (i, m) in c.volume_mounts.iter().enumerate() {
            let volume: &Volume = self
                .spec
                .volumes
                .iter()
                .find(|v| v.name == m.name)
                .ok_or_else(|| {
                    self.err(
                        &c.name,
                        format!("volumeMounts[{i}]: no volume named {:?} in the pod", m.name),
                    )
                })?;
            let (plugin, forced_ro) = match volume.source.keys().next().map(String::as_str) {
                Some("emptyDir") => (Some("empty-dir"), false),
                Some("configMap") => (Some("configmap"), true),
                Some("secret") => (Some("secret"), true),
                Some("projected") => (Some("projected"), true),
                Some("downwardAPI") => (Some("downward-api"), true),
                Some("hostPath") => (None, false),
                Some(other) => {
                    warnings.push(format!(
                        "{}, container {}: volume {} ({other}): its source directory is the node's choice; any source is allowed at {}",
                        self.label, c.name, m.name, m.mount_path
                    ));
                    (None, false)
                }
                None => return Err(self.err(&c.name, format!("volume {:?} has no source", m.name))),
            };
            let host_path = volume.source.get("hostPath");
            if host_path.is_some() && !self.settings.allow_host_path {
                return Err(self.err(
                    &c.name,
                    format!(
                        "volumeMounts[{i}]: volume {} is a hostPath: the node's files in a confidential pod; refused unless the settings say allow_host_path: true",
                        m.name
                    ),
                ));
            }
            let sub_path = m
                .sub_path
                .as_deref()
                .filter(|s| !s.is_empty())
                .or(m.sub_path_expr.as_deref().filter(|s| !s.is_empty()));
            let source_regex = if sub_path.is_some() {
                // The kubelet binds a subpath from its own directory, one per mount.
                Some(format!(
                    "/volume-subpaths/{}/{}/{i}$",
                    escape(&m.name),
                    escape(&c.name)
                ))
            } else if let Some(hp) = host_path {
                let path = hp.get("path").and_then(|p| p.as_str()).ok_or_else(|| {
                    self.err(
                        &c.name,
                        format!("volume {}: hostPath without a path", m.name),
                    )
                })?;
                warnings.push(format!(
                    "{}, container {}: hostPath {path} is allowed at {} (containerd resolves symbolic links in it)",
                    self.label, c.name, m.mount_path
                ));
                Some(format!("^{}$", escape(&clean_path(path))))
            } else {
                plugin.map(|p| format!("/volumes/kubernetes\\.io~{p}/{}$", escape(&m.name)))
            };
            out.push(json!({
                "destination": m.mount_path,
                "source_regex": source_regex,
                "read_only": m.read_only == Some(true) || forced_ro,
                // The volume and its kind (the kubelet's plugin name), for SetVolume and for what
                // the shim says a subPath comes from; a static subPath is pinned, an expanded one
                // (subPathExpr) is any path inside the volume.
                "volume": m.name,
                "kind": plugin,
                "sub_path": m.sub_path.as_deref().filter(|s| !s.is_empty()),
                "sub_path_any": m.sub_path.as_deref().is_none_or(str::is_empty)
                    && m.sub_path_expr.as_deref().is_some_and(|s| !s.is_empty()),
            }));
        }
        let has = |out: &[Value], d: &str| out.iter().any(|m| m["destination"] == d);
        if !has(&out, "/etc/hosts") {
            out.push(
                json!({"destination": "/etc/hosts", "source_regex": null, "read_only": false}),
            );
        }
        let termination = c
            .termination_message_path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| TERMINATION_LOG.into());
        if !has(&out, &termination) {
            out.push(json!({"destination": termination, "source_regex": null, "read_only": false}));
        }
        if self.service_account_token && !has(&out, SERVICE_ACCOUNT_PATH) {
            out.push(json!({
                "destination": SERVICE_ACCOUNT_PATH,
                "source_regex": "/volumes/kubernetes\\.io~projected/kube-api-access-[a-z0-9]{5}$",
                "read_only": true,
            }));
        }
        for m in &self.settings.extra_mounts {
            out.push(json!({
                "destination": m.destination,
                "source_regex": m.source_regex,
                "read_only": m.read_only,
            }));
        }
        Ok(out)
    }
}

/// A path as Go's `filepath.Clean` writes it (what the kubelet passes on).
fn clean_path(p: &str) -> String {
    let absolute = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// containerd's capabilities for a non-privileged container with `caps` added and dropped.
pub fn capabilities(caps: Option<&crate::spec::Capabilities>) -> Vec<String> {
    let mut set: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    if let Some(caps) = caps {
        // As containerd: "ALL" (any case) first, then each name upper-cased with "CAP_".
        if caps.add.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
            set = ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect();
        }
        if caps.drop.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
            set.clear();
        }
        for c in &caps.add {
            if c.to_uppercase() == "ALL" {
                continue;
            }
            let name = format!("CAP_{}", c.to_uppercase());
            if !set.contains(&name) {
                set.push(name);
            }
        }
        for c in &caps.drop {
            if c.to_uppercase() == "ALL" {
                continue;
            }
            let name = format!("CAP_{}", c.to_uppercase());
            set.retain(|s| *s != name);
        }
    }
    set.sort();
    set.dedup();
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Capabilities;

    fn caps(add: &[&str], drop: &[&str]) -> Vec<String> {
        capabilities(Some(&Capabilities {
            add: add.iter().map(|s| s.to_string()).collect(),
            drop: drop.iter().map(|s| s.to_string()).collect(),
        }))
    }

    #[test]
    fn capabilities_follow_containerd() {
        let mut default: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
        default.sort();
        assert_eq!(capabilities(None), default);
        assert_eq!(caps(&[], &[]), default);
        assert_eq!(caps(&[], &["ALL"]), Vec::<String>::new());
        assert_eq!(caps(&["net_admin"], &["ALL"]), vec!["CAP_NET_ADMIN"]);
        assert_eq!(
            caps(&["NET_BIND_SERVICE"], &["all"]),
            vec!["CAP_NET_BIND_SERVICE"]
        );
        let all = caps(&["ALL"], &["CHOWN"]);
        assert_eq!(all.len(), 40);
        assert!(!all.contains(&"CAP_CHOWN".to_string()));
        assert!(!caps(&[], &["kill"]).contains(&"CAP_KILL".to_string()));
        assert_eq!(caps(&["all"], &[]).len(), 41);
        // A name already with "CAP_" gets another: containerd does the same.
        assert!(caps(&["CAP_SYS_ADMIN"], &[]).contains(&"CAP_CAP_SYS_ADMIN".to_string()));
    }

    #[test]
    fn paths_are_cleaned_as_go_does() {
        assert_eq!(clean_path("/var/log/"), "/var/log");
        assert_eq!(clean_path("/var//log/../lib/./x"), "/var/lib/x");
        assert_eq!(clean_path("/.."), "/");
    }

    #[test]
    fn service_patterns_compile_and_match() {
        for (name, value) in kubernetes_service_env() {
            regex::Regex::new(&format!("^{name}={value}$")).unwrap();
        }
        let all: Vec<regex::Regex> = service_link_env()
            .iter()
            .map(|(n, v)| regex::Regex::new(&format!("^{n}={v}$")).unwrap())
            .collect();
        let ok = |kv: &str| all.iter().any(|r| r.is_match(kv));
        assert!(ok("REDIS_MASTER_SERVICE_HOST=10.0.0.11"));
        assert!(ok("REDIS_MASTER_SERVICE_PORT=6379"));
        assert!(ok("REDIS_MASTER_SERVICE_PORT_HTTP=6379"));
        assert!(ok("REDIS_MASTER_PORT=tcp://10.0.0.11:6379"));
        assert!(ok("REDIS_MASTER_PORT_6379_TCP=tcp://10.0.0.11:6379"));
        assert!(ok("REDIS_MASTER_PORT_6379_TCP_PROTO=tcp"));
        assert!(ok("REDIS_MASTER_PORT_6379_TCP_PORT=6379"));
        assert!(ok("REDIS_MASTER_PORT_6379_TCP_ADDR=10.0.0.11"));
        assert!(ok("DB_PORT=tcp://[fd00::1]:5432"));
        assert!(!ok("LD_PRELOAD=/x.so"));
        assert!(!ok("REDIS_MASTER_SERVICE_HOST=10.0.0.11; rm -rf /"));
        assert!(!ok("PATH=/bin"));
    }
}
