//! Image references with their transport, as skopeo writes them: `docker://REG/REPO:TAG`,
//! `docker://REG/REPO@sha256:…`, and `oci:DIR[:TAG]` for an OCI image layout directory.

use std::{fmt, path::PathBuf};

use oci_client::Reference;

use crate::Error;

/// Where an image comes from.
#[derive(Clone, Debug)]
pub enum ImageRef {
    /// A registry image.
    Docker(Reference),
    /// An OCI image layout directory and the tag (`org.opencontainers.image.ref.name`) or
    /// digest within it; `None` when the layout holds exactly one manifest.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The tag or digest.
        name: Option<String>,
    },
}

impl ImageRef {
    /// Parses `docker://…` or `oci:DIR[:TAG]`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::Reference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = s.strip_prefix("docker://") {
            let r: Reference = rest.parse().map_err(|e| bad(&format!("{e}")))?;
            return Ok(Self::Docker(r));
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(bad("oci: needs a directory"));
            }
            let (dir, name) = match rest.rsplit_once(':') {
                Some((d, n)) if !d.is_empty() && !n.contains('/') => (d, Some(n.to_string())),
                _ => (rest, None),
            };
            return Ok(Self::Layout {
                dir: PathBuf::from(dir),
                name,
            });
        }
        Err(bad(
            "use docker://REGISTRY/REPOSITORY:TAG or oci:DIRECTORY[:TAG]",
        ))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Docker(r) => write!(f, "docker://{}", r.whole()),
            Self::Layout { dir, name: Some(n) } => write!(f, "oci:{}:{n}", dir.display()),
            Self::Layout { dir, name: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse() {
        let ImageRef::Docker(r) = ImageRef::parse("docker://127.0.0.1:5000/app/web:v1").unwrap()
        else {
            panic!()
        };
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "app/web");
        assert_eq!(r.tag(), Some("v1"));
        let ImageRef::Layout { dir, name } = ImageRef::parse("oci:/tmp/layout:v2").unwrap() else {
            panic!()
        };
        assert_eq!(
            (dir.to_str().unwrap(), name.as_deref()),
            ("/tmp/layout", Some("v2"))
        );
        assert!(ImageRef::parse("busybox").is_err());
        assert!(ImageRef::parse("docker://reg/Bad Name").is_err());
    }
}
