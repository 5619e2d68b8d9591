//! The input's documents: which are workloads (and where their pod template is), which are
//! ConfigMaps, Secrets and ServiceAccounts the workloads refer to; and the edit each workload's
//! pod template gets (the runtime class and the initdata annotation).

use std::collections::BTreeMap;

use serde_yaml_ng::{Mapping, Value};

use crate::{container::Inputs, names::PodNames, spec::PodSpec, PolicyGenError};

/// The pod annotation carrying the initdata.
pub const INITDATA_ANNOTATION: &str = "io.katacontainers.config.hypervisor.cc_init_data";

/// The runtime class of Coffer's pods.
pub const RUNTIME_CLASS: &str = "coffer";

/// One workload of the input.
pub struct Workload {
    /// `Deployment`, `Pod`, …
    pub kind: String,
    /// `metadata.name` (a Pod's `generateName` when it has no name).
    pub name: String,
    /// `metadata.namespace`, if given.
    pub namespace: Option<String>,
    /// Its pods' names.
    pub names: PodNames,
    /// The pod spec.
    pub spec: PodSpec,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

/// The path of the pod template (its `metadata` and `spec` are under it) in a document of
/// `kind`; `None`: not a workload.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&["spec", "template"])
        }
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// The document's kind (`""` when it has none).
pub fn kind(doc: &Value) -> &str {
    str_at(doc, &["kind"]).unwrap_or("")
}

/// The workload in `doc`, if it is one; `label` names the document in errors.
pub fn workload(doc: &Value, label: &str) -> Result<Option<Workload>, PolicyGenError> {
    let kind = kind(doc);
    let Some(path) = template_path(kind) else {
        return Ok(None);
    };
    let bad = |m: String| PolicyGenError::Input(format!("{label}: {m}"));
    let namespace = str_at(doc, &["metadata", "namespace"]).map(str::to_string);
    let (name, names) = match (kind, str_at(doc, &["metadata", "name"])) {
        ("Pod", Some(n)) => (n.to_string(), PodNames::pod(n)),
        ("Pod", None) => match str_at(doc, &["metadata", "generateName"]) {
            Some(g) => (g.to_string(), PodNames::generated(g)),
            None => return Err(bad("a Pod without metadata.name or generateName".into())),
        },
        (_, None) => return Err(bad(format!("a {kind} without metadata.name"))),
        ("Deployment", Some(n)) => (n.to_string(), PodNames::deployment(n)),
        ("StatefulSet", Some(n)) => (n.to_string(), PodNames::stateful_set(n)),
        ("DaemonSet" | "ReplicaSet", Some(n)) => (n.to_string(), PodNames::replica_set(n)),
        ("Job", Some(n)) => {
            let indexed = str_at(doc, &["spec", "completionMode"]) == Some("Indexed");
            let names = if indexed {
                let completions = doc
                    .get("spec")
                    .and_then(|s| s.get("completions"))
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                PodNames::indexed_job(n, completions)
            } else {
                PodNames::replica_set(n)
            };
            (n.to_string(), names)
        }
        ("CronJob", Some(n)) => {
            let indexed =
                str_at(doc, &["spec", "jobTemplate", "spec", "completionMode"]) == Some("Indexed");
            let names = if indexed {
                PodNames::indexed_cron_job(n)
            } else {
                PodNames::cron_job(n)
            };
            (n.to_string(), names)
        }
        _ => return Ok(None),
    };
    let mut template = doc;
    for p in path {
        template = template
            .get(*p)
            .ok_or_else(|| bad(format!("a {kind} without {}", path.join("."))))?;
    }
    let spec_value = template
        .get("spec")
        .ok_or_else(|| bad(format!("a {kind} without a pod spec")))?;
    let mut spec: PodSpec = serde_yaml_ng::from_value(spec_value.clone())
        .map_err(|e| bad(format!("the pod spec: {e}")))?;
    // A StatefulSet's claim templates become its pods' persistentVolumeClaim volumes.
    if kind == "StatefulSet" {
        if let Some(Value::Sequence(claims)) =
            doc.get("spec").and_then(|s| s.get("volumeClaimTemplates"))
        {
            for claim in claims {
                let name = str_at(claim, &["metadata", "name"])
                    .ok_or_else(|| bad("a volumeClaimTemplate without metadata.name".into()))?;
                if !spec.volumes.iter().any(|v| v.name == name) {
                    spec.volumes.push(crate::spec::Volume {
                        name: name.to_string(),
                        source: BTreeMap::from([(
                            "persistentVolumeClaim".to_string(),
                            Value::Null,
                        )]),
                    });
                }
            }
        }
    }
    Ok(Some(Workload {
        kind: kind.to_string(),
        name,
        namespace,
        names,
        spec,
    }))
}

/// Records `doc` in `inputs` if it is a ConfigMap, Secret or ServiceAccount (Secret values are
/// never read: only their key names).
pub fn collect(doc: &Value, label: &str, inputs: &mut Inputs) -> Result<(), PolicyGenError> {
    let kind = kind(doc);
    if !matches!(kind, "ConfigMap" | "Secret" | "ServiceAccount") {
        return Ok(());
    }
    let bad = |m: String| PolicyGenError::Input(format!("{label}: {m}"));
    let name = str_at(doc, &["metadata", "name"])
        .ok_or_else(|| bad(format!("a {kind} without metadata.name")))?
        .to_string();
    let namespace = str_at(doc, &["metadata", "namespace"])
        .unwrap_or("default")
        .to_string();
    let keys_of = |field: &str| -> Result<Vec<(String, &Value)>, PolicyGenError> {
        match doc.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Mapping(m)) => m
                .iter()
                .map(|(k, v)| {
                    k.as_str()
                        .map(|k| (k.to_string(), v))
                        .ok_or_else(|| bad(format!("{kind} {name}: a {field} key is not a string")))
                })
                .collect(),
            Some(_) => Err(bad(format!("{kind} {name}: {field} is not a mapping"))),
        }
    };
    match kind {
        "ConfigMap" => {
            let mut data = BTreeMap::new();
            for (k, v) in keys_of("data")? {
                let v = v.as_str().ok_or_else(|| {
                    bad(format!(
                        "ConfigMap {name}: data.{k} is not a string (quote it)"
                    ))
                })?;
                data.insert(k, v.to_string());
            }
            inputs.config_maps.insert((namespace, name), data);
        }
        "Secret" => {
            let mut keys: Vec<String> = keys_of("data")?
                .into_iter()
                .chain(keys_of("stringData")?)
                .map(|(k, _)| k)
                .collect();
            keys.sort();
            keys.dedup();
            inputs.secrets.insert((namespace, name), keys);
        }
        _ => {
            let automount = doc
                .get("automountServiceAccountToken")
                .and_then(Value::as_bool);
            inputs.service_accounts.insert((namespace, name), automount);
        }
    }
    Ok(())
}

fn mapping_at<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Mapping> {
    let m = v.as_mapping_mut()?;
    let entry = m
        .entry(Value::String(key.into()))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry.as_mapping_mut()
}

/// Gives the pod template of `doc` (a workload) `runtimeClassName: coffer` and the initdata
/// annotation; returns a warning when it had another runtime class.
pub fn annotate(doc: &mut Value, initdata_annotation: &str) -> Option<String> {
    let path = template_path(kind(doc))?;
    let mut template = &mut *doc;
    for p in path {
        template = template.get_mut(*p)?;
    }
    let mut warning = None;
    if let Some(spec) = mapping_at(template, "spec") {
        let key = Value::String("runtimeClassName".into());
        if let Some(old) = spec.get(&key).and_then(Value::as_str) {
            if old != RUNTIME_CLASS {
                warning = Some(format!(
                    "runtimeClassName {old} replaced by {RUNTIME_CLASS}"
                ));
            }
        }
        spec.insert(key, Value::String(RUNTIME_CLASS.into()));
    }
    if mapping_at(template, "metadata").is_some() {
        if let Some(a) = template
            .get_mut("metadata")
            .and_then(|m| mapping_at(m, "annotations"))
        {
            a.insert(
                Value::String(INITDATA_ANNOTATION.into()),
                Value::String(initdata_annotation.into()),
            );
        }
    }
    warning
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotate_sets_the_class_and_the_annotation_only() {
        let mut doc: Value = serde_yaml_ng::from_str(
            "kind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      runtimeClassName: kata\n      containers: [{name: app, image: app}]\n",
        )
        .unwrap();
        let w = annotate(&mut doc, "ZZZ").unwrap();
        assert!(w.contains("kata"));
        let t = &doc["spec"]["template"];
        assert_eq!(
            t["spec"]["runtimeClassName"],
            Value::String("coffer".into())
        );
        assert_eq!(
            t["metadata"]["annotations"][INITDATA_ANNOTATION],
            Value::String("ZZZ".into())
        );
        assert_eq!(t["metadata"]["labels"]["app"], Value::String("web".into()));
        assert_eq!(doc["spec"]["replicas"], Value::Number(2.into()));

        // A Pod without metadata.annotations, and a CronJob.
        let mut pod: Value =
            serde_yaml_ng::from_str("kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n")
                .unwrap();
        assert!(annotate(&mut pod, "A").is_none());
        assert_eq!(
            pod["metadata"]["annotations"][INITDATA_ANNOTATION],
            Value::String("A".into())
        );
        let mut cj: Value = serde_yaml_ng::from_str(
            "kind: CronJob\nmetadata: {name: c}\nspec:\n  jobTemplate:\n    spec:\n      template:\n        spec: {containers: []}\n",
        )
        .unwrap();
        annotate(&mut cj, "B");
        assert_eq!(
            cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["runtimeClassName"],
            Value::String("coffer".into())
        );
    }
}
