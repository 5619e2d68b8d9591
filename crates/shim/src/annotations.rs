//! The OCI annotations the shim reads: containerd's CRI plugin's (which container of which pod,
//! from which image) and the pod's initdata. Annotations are the node's (and anyone who can
//! create pods') to set, so none of them may change the policy or the sandbox's security
//! settings: those come only from the initdata, whose digest the TEE evidence binds.

use std::{collections::BTreeMap, io::Read};

use base64::Engine;

use crate::ShimError;

/// `sandbox` for a pod's sandbox (pause) container, `container` for its other containers.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The image reference a container was created from, as the pod spec names it.
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// The pod's initdata: base64 of the gzip of the initdata TOML (the Confidential Containers
/// annotation).
pub const INITDATA: &str = "io.katacontainers.config.hypervisor.cc_init_data";

/// Annotation prefixes whose keys configure a sandbox; only [`INITDATA`] is accepted among them.
const GUARDED_PREFIXES: [&str; 2] = ["io.katacontainers.", "io.coffer."];

/// The largest initdata accepted (decompressed).
const MAX_INITDATA: u64 = 1 << 20;

/// A container's role, from the CRI annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A pod's sandbox container: the sandbox itself (no pause process is run).
    Sandbox,
    /// A container of the pod sandbox with this id.
    PodContainer {
        /// The pod sandbox's id.
        sandbox_id: String,
        /// The image reference.
        image: String,
    },
    /// A container outside any pod (`ctr run`): it gets a sandbox of its own.
    Standalone,
}

/// Reads a container's role; refuses a pod container that does not say its sandbox or image.
pub fn role(annotations: &BTreeMap<String, String>) -> Result<Role, ShimError> {
    match annotations.get(CONTAINER_TYPE).map(String::as_str) {
        Some("sandbox") => Ok(Role::Sandbox),
        Some("container") => {
            let get = |k: &str| {
                annotations
                    .get(k)
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .ok_or_else(|| ShimError::Invalid(format!("a pod container without {k}")))
            };
            Ok(Role::PodContainer {
                sandbox_id: get(SANDBOX_ID)?,
                image: get(IMAGE_NAME)?,
            })
        }
        None => Ok(Role::Standalone),
        Some(other) => Err(ShimError::Invalid(format!(
            "{CONTAINER_TYPE} = {other:?}: expected sandbox or container"
        ))),
    }
}

/// Refuses annotations that try to configure the sandbox (its policy, kernel, hypervisor,
/// devices, debug console, …): the only one accepted is the initdata, which is attested.
pub fn refuse_overrides(annotations: &BTreeMap<String, String>) -> Result<(), ShimError> {
    for key in annotations.keys() {
        if key != INITDATA && GUARDED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            return Err(ShimError::Refused(format!(
                "annotation {key} is refused: the policy and the sandbox's settings come only \
                 from the attested initdata ({INITDATA})"
            )));
        }
    }
    Ok(())
}

/// The initdata TOML the [`INITDATA`] annotation carries, if any: checked to be base64 of gzip
/// of a parseable initdata document.
pub fn initdata(annotations: &BTreeMap<String, String>) -> Result<Option<String>, ShimError> {
    let Some(value) = annotations.get(INITDATA) else {
        return Ok(None);
    };
    let bad = |why: String| ShimError::Invalid(format!("annotation {INITDATA}: {why}"));
    let gz = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| bad(format!("not base64 ({e})")))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .take(MAX_INITDATA + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("not gzip-compressed UTF-8 ({e})")))?;
    if text.len() as u64 > MAX_INITDATA {
        return Err(bad(format!("larger than {MAX_INITDATA} bytes")));
    }
    coffer_wire::initdata::Initdata::parse(&text).map_err(|e| bad(e.to_string()))?;
    Ok(Some(text))
}

/// Encodes initdata as the [`INITDATA`] annotation's value (for tools and tests).
pub fn encode_initdata(text: &str) -> String {
    coffer_wire::initdata::encode_annotation(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const INITDATA_TOML: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n";

    #[test]
    fn initdata_round_trips_and_bad_encodings_are_named() {
        let a = map(&[(INITDATA, &encode_initdata(INITDATA_TOML))]);
        assert_eq!(initdata(&a).unwrap().as_deref(), Some(INITDATA_TOML));
        assert_eq!(initdata(&map(&[])).unwrap(), None);
        let e = initdata(&map(&[(INITDATA, "%%%")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(INITDATA) && e.contains("base64"), "{e}");
        let plain = base64::engine::general_purpose::STANDARD.encode(INITDATA_TOML);
        let e = initdata(&map(&[(INITDATA, &plain)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gzip"), "{e}");
        let e = initdata(&map(&[(INITDATA, &encode_initdata("version = 3"))]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(INITDATA), "{e}");
    }

    #[test]
    fn annotations_that_configure_the_sandbox_are_refused() {
        for key in [
            "io.katacontainers.config.agent.policy",
            "io.katacontainers.config.hypervisor.kernel_params",
            "io.coffer.sandbox",
        ] {
            let e = refuse_overrides(&map(&[(key, "x")])).unwrap_err();
            assert!(matches!(e, ShimError::Refused(_)));
            assert!(e.to_string().contains(key), "{e}");
        }
        refuse_overrides(&map(&[
            (INITDATA, "x"),
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("example.com/team", "a"),
        ]))
        .unwrap();
    }

    #[test]
    fn roles_follow_the_cri_annotations() {
        assert_eq!(role(&map(&[])).unwrap(), Role::Standalone);
        assert_eq!(
            role(&map(&[(CONTAINER_TYPE, "sandbox")])).unwrap(),
            Role::Sandbox
        );
        assert_eq!(
            role(&map(&[
                (CONTAINER_TYPE, "container"),
                (SANDBOX_ID, "p1"),
                (IMAGE_NAME, "r/app:v1")
            ]))
            .unwrap(),
            Role::PodContainer {
                sandbox_id: "p1".into(),
                image: "r/app:v1".into()
            }
        );
        assert!(role(&map(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p1")])).is_err());
    }
}
