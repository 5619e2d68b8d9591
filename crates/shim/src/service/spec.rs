//! What the shim reads of a bundle's OCI spec and of an exec's process spec: the parts it hands
//! the agent.

use std::{collections::BTreeMap, path::Path};

use coffer_agent::api::proto::{Mount, User};

use crate::ShimError;

/// The CRI annotations passed on to the agent (the policy decides on them): every
/// `io.kubernetes.cri.*` key but the sandbox's own initdata and the like.
const CRI_PREFIX: &str = "io.kubernetes.cri.";

/// The parts of the bundle's OCI spec the shim uses.
pub(super) struct Spec {
    pub(super) annotations: BTreeMap<String, String>,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<String>,
    pub(super) cwd: String,
    pub(super) readonly_rootfs: bool,
    /// `linux.resources.memory.limit` (0: none).
    pub(super) memory_limit: u64,
    /// `mounts`, as the node asks them.
    pub(super) mounts: Vec<Mount>,
    /// `process.user` (absent: the image's User applies).
    pub(super) user: Option<User>,
    /// `process.capabilities.bounding`.
    pub(super) capabilities: Vec<String>,
    /// Whether the spec is a privileged container's: no masked or read-only /proc paths and
    /// CAP_SYS_ADMIN (what containerd's CRI writes for `privileged: true`).
    pub(super) privileged: bool,
    /// The network namespace the spec joins (`linux.namespaces` of type `network` with a
    /// path): for a pod sandbox, the one the CRI made and the CNI configured.
    pub(super) netns: Option<String>,
    /// `linux.devices`: the device nodes the node asks to give the container (the CRI's
    /// `devices`, a claim's `volumeDevices`).
    pub(super) devices: Vec<Device>,
}

/// A device node of the spec (`linux.devices[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Device {
    /// Where the container sees it.
    pub(super) path: String,
    /// `b`, `c`, `u` or `p`.
    pub(super) kind: String,
    /// The node's device number.
    pub(super) major: u64,
    pub(super) minor: u64,
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
    let mounts = v["mounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| Mount {
                    destination: m["destination"].as_str().unwrap_or_default().into(),
                    r#type: m["type"].as_str().unwrap_or_default().into(),
                    source: m["source"].as_str().unwrap_or_default().into(),
                    options: strings(&m["options"]),
                })
                .collect()
        })
        .unwrap_or_default();
    let user = match &v["process"]["user"] {
        serde_json::Value::Object(u) => {
            let id = |k: &str| -> Result<u32, ShimError> {
                match u.get(k) {
                    None | Some(serde_json::Value::Null) => Ok(0),
                    Some(n) => n
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(format!("process.user.{k} is not a uid/gid"))),
                }
            };
            Some(User {
                uid: id("uid")?,
                gid: id("gid")?,
                additional_gids: u
                    .get("additionalGids")
                    .and_then(|g| g.as_array())
                    .map(|g| {
                        g.iter()
                            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        }
        _ => None,
    };
    let capabilities = strings(&v["process"]["capabilities"]["bounding"]);
    let empty = |k: &str| v["linux"][k].as_array().is_none_or(|a| a.is_empty());
    let privileged = capabilities.iter().any(|c| c == "CAP_SYS_ADMIN")
        && empty("maskedPaths")
        && empty("readonlyPaths");
    let netns = v["linux"]["namespaces"].as_array().and_then(|ns| {
        ns.iter()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(String::from)
    });
    let devices = v["linux"]["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| Device {
                    path: d["path"].as_str().unwrap_or_default().into(),
                    kind: d["type"].as_str().unwrap_or_default().into(),
                    major: d["major"].as_u64().unwrap_or_default(),
                    minor: d["minor"].as_u64().unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Spec {
        annotations,
        netns,
        devices,
        mounts,
        user,
        capabilities,
        privileged,
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

impl Spec {
    /// The CRI annotations the agent's policy sees (which container of which pod).
    pub(super) fn cri_annotations(&self) -> std::collections::HashMap<String, String> {
        self.annotations
            .iter()
            .filter(|(k, _)| k.starts_with(CRI_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
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
        assert_eq!(
            s.cri_annotations().into_iter().collect::<Vec<_>>(),
            [(
                annotations::CONTAINER_TYPE.to_string(),
                "container".to_string()
            )]
        );
        assert!(s.user.is_none() && s.mounts.is_empty() && !s.privileged);

        // What containerd's CRI writes: the user, the mounts, the capabilities; privileged
        // when nothing is masked and CAP_SYS_ADMIN is given.
        let spec = |masked: serde_json::Value| {
            serde_json::json!({
                "process": {"args": ["/app"], "user": {"uid": 1000, "gid": 3000, "additionalGids": [3000, 4]},
                            "capabilities": {"bounding": ["CAP_SYS_ADMIN", "CAP_KILL"]}},
                "mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/k/etc-hosts",
                            "options": ["rbind", "rprivate", "ro"]}],
                "linux": {"maskedPaths": masked, "readonlyPaths": []},
            })
        };
        std::fs::write(
            d.path().join("config.json"),
            spec(serde_json::json!(["/proc/kcore"])).to_string(),
        )
        .unwrap();
        let s = read_spec(d.path()).unwrap();
        let u = s.user.clone().unwrap();
        assert_eq!(
            (u.uid, u.gid, u.additional_gids),
            (1000, 3000, vec![3000, 4])
        );
        assert_eq!(s.mounts[0].destination, "/etc/hosts");
        assert_eq!(s.mounts[0].options, ["rbind", "rprivate", "ro"]);
        assert_eq!(s.capabilities, ["CAP_SYS_ADMIN", "CAP_KILL"]);
        assert!(!s.privileged);
        std::fs::write(
            d.path().join("config.json"),
            spec(serde_json::json!([])).to_string(),
        )
        .unwrap();
        assert!(read_spec(d.path()).unwrap().privileged);

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
