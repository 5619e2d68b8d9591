//! The parts of the Kubernetes pod spec the generator reads (API `core/v1`), as serde types.
//! Unknown fields are ignored: the API has many that do not change what a container runs.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `PodSpec`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    pub containers: Vec<Container>,
    pub init_containers: Vec<Container>,
    pub volumes: Vec<Volume>,
    pub security_context: Option<PodSecurityContext>,
    pub enable_service_links: Option<bool>,
    pub automount_service_account_token: Option<bool>,
    pub service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName`.
    pub service_account: Option<String>,
    pub hostname: Option<String>,
    pub set_hostname_as_fqdn: Option<bool>,
    pub host_network: Option<bool>,
}

/// `PodSecurityContext` (the fields that decide a container's user).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
}

/// `Container`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Container {
    pub name: String,
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub env: Vec<EnvVar>,
    pub env_from: Vec<EnvFromSource>,
    pub volume_mounts: Vec<VolumeMount>,
    pub volume_devices: Vec<VolumeDevice>,
    pub security_context: Option<SecurityContext>,
    pub tty: Option<bool>,
    pub stdin: Option<bool>,
    pub liveness_probe: Option<Probe>,
    pub readiness_probe: Option<Probe>,
    pub startup_probe: Option<Probe>,
    pub lifecycle: Option<Lifecycle>,
    pub termination_message_path: Option<String>,
}

/// `EnvVar`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<EnvVarSource>,
}

/// `EnvVarSource`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvVarSource {
    pub config_map_key_ref: Option<KeyRef>,
    pub secret_key_ref: Option<KeyRef>,
    pub field_ref: Option<FieldRef>,
    pub resource_field_ref: Option<serde_yaml_ng::Value>,
}

/// `ConfigMapKeySelector` / `SecretKeySelector`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KeyRef {
    pub name: String,
    pub key: String,
    pub optional: Option<bool>,
}

/// `ObjectFieldSelector`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FieldRef {
    pub field_path: String,
}

/// `EnvFromSource`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvFromSource {
    pub prefix: Option<String>,
    pub config_map_ref: Option<NameRef>,
    pub secret_ref: Option<NameRef>,
}

/// `ConfigMapEnvSource` / `SecretEnvSource`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NameRef {
    pub name: String,
    pub optional: Option<bool>,
}

/// `VolumeDevice` (a `volumeMode: Block` claim given to the container as a device).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeDevice {
    pub name: String,
    pub device_path: String,
}

/// `VolumeMount`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    pub read_only: Option<bool>,
    pub sub_path: Option<String>,
    pub sub_path_expr: Option<String>,
}

/// `Volume`: its name and its one source (`emptyDir`, `configMap`, `hostPath`, …).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Volume {
    #[serde(default)]
    pub name: String,
    #[serde(flatten)]
    pub source: BTreeMap<String, serde_yaml_ng::Value>,
}

/// `SecurityContext` (a container's).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub privileged: Option<bool>,
    pub read_only_root_filesystem: Option<bool>,
    pub capabilities: Option<Capabilities>,
}

/// `Capabilities`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    pub add: Vec<String>,
    pub drop: Vec<String>,
}

/// `Probe` (only its exec action matters here).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Probe {
    pub exec: Option<ExecAction>,
}

/// `Lifecycle`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Lifecycle {
    pub post_start: Option<Probe>,
    pub pre_stop: Option<Probe>,
}

/// `ExecAction`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ExecAction {
    pub command: Vec<String>,
}
