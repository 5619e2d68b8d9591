//! What the shim reads of a bundle's OCI spec and of an exec's process spec: the parts it hands
//! the agent.

use std::{collections::BTreeMap, path::Path};

use crate::ShimError;

/// The parts of the bundle's OCI spec the shim uses.
pub(super) struct Spec {
    pub(super) annotations: BTreeMap<String, String>,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<String>,
    pub(super) cwd: String,
    pub(super) readonly_rootfs: bool,
    /// `linux.resources.memory.limit` (0: none).
    pub(super) memory_limit: u64,
}

pub(super) fn read_spec(bundle: &Path) -> Result<Spec, ShimError> {
    let path = bundle.join("config.json");
    let bad = |why: String| ShimError::Invalid(format!("{}: {why}", path.display()));
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let annotations = v["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Spec {
        annotations,
        args: strings(&v["process"]["args"]),
        env: strings(&v["process"]["env"]),
        cwd: v["process"]["cwd"].as_str().unwrap_or_default().to_string(),
        readonly_rootfs: v["root"]["readonly"].as_bool().unwrap_or(false),
        memory_limit: v["linux"]["resources"]["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .unwrap_or(0) as u64,
    })
}

/// What the shim takes of an exec's process spec (runtime-spec `Process`, as JSON).
pub(super) struct ExecSpec {
    pub(super) args: Vec<String>,
    pub(super) env: Vec<String>,
}

/// Parses an exec's process spec; the error says what is wrong with it. Its working directory
/// and user are the container's: the agent runs execs as the container's process runs.
pub(super) fn exec_spec(json: &[u8]) -> Result<ExecSpec, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("is not JSON: {e}"))?;
    let strings = |key: &str| -> Result<Vec<String>, String> {
        match &v[key] {
            serde_json::Value::Null => Ok(Vec::new()),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(String::from)
                        .ok_or_else(|| format!("has a non-string in {key}"))
                })
                .collect(),
            _ => Err(format!("has {key} that is not a list")),
        }
    };
    let args = strings("args")?;
    if args.is_empty() {
        return Err("has no args".into());
    }
    Ok(ExecSpec {
        args,
        env: strings("env")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations;

    #[test]
    fn the_bundle_spec_gives_the_agent_its_request() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            serde_json::json!({
                "process": {"args": ["/bin/sh", "-c", "echo hi"], "env": ["A=1"], "cwd": "/srv"},
                "root": {"path": "rootfs", "readonly": true},
                "linux": {"resources": {"memory": {"limit": 33554432}}},
                "annotations": {annotations::CONTAINER_TYPE: "container", "n": "v"},
            })
            .to_string(),
        )
        .unwrap();
        let s = read_spec(d.path()).unwrap();
        assert_eq!(s.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            (s.env.as_slice(), s.cwd.as_str()),
            (&["A=1".to_string()][..], "/srv")
        );
        assert!(s.readonly_rootfs);
        assert_eq!(s.memory_limit, 32 << 20);
        assert_eq!(s.annotations["n"], "v");

        std::fs::write(d.path().join("config.json"), "{").unwrap();
        let e = read_spec(d.path()).err().unwrap().to_string();
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn an_exec_takes_args_and_env_from_its_process_spec_and_bad_specs_are_named() {
        let spec = exec_spec(
            br#"{"args":["/bin/sh","-c","id"],"env":["A=1"],"cwd":"/","terminal":false}"#,
        )
        .unwrap();
        assert_eq!(spec.args, ["/bin/sh", "-c", "id"]);
        assert_eq!(spec.env, ["A=1"]);
        assert_eq!(
            exec_spec(br#"{"args":["ls"]}"#).unwrap().env,
            Vec::<String>::new()
        );
        for (bad, why) in [
            (&b"not json"[..], "is not JSON"),
            (br#"{"env":["A=1"]}"#, "has no args"),
            (br#"{"args":[]}"#, "has no args"),
            (br#"{"args":"ls"}"#, "has args that is not a list"),
            (br#"{"args":["ls",1]}"#, "has a non-string in args"),
            (
                br#"{"args":["ls"],"env":[null]}"#,
                "has a non-string in env",
            ),
        ] {
            let err = exec_spec(bad).err().unwrap();
            assert!(err.starts_with(why), "{err}");
        }
    }
}
