//! Image references with their transport, as skopeo writes them: `docker://REG/REPO:TAG`,
//! `docker://REG/REPO@sha256:…`, and `oci:DIR[:TAG]` for an OCI image layout directory.

use std::{fmt, path::PathBuf, sync::OnceLock};

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
            return docker_reference(rest)
                .map(Self::Docker)
                .map_err(|e| bad(&e));
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

/// The distribution reference grammar (`name[:tag][@digest]`, from the distribution project's
/// `reference` package), with ASCII character classes as in its definition. oci-spec's parser
/// writes the tag with Unicode `\w`, which compiles to an automaton of about 18 MiB in about
/// 40 ms on first use — more than the rest of the agent's start-up together — and accepts
/// non-ASCII tags registries refuse; this one compiles in well under a millisecond.
fn reference_regex() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| {
        let alnum = "[a-z0-9]+";
        let separator = "(?:[._]|__|-+)";
        let path_component = format!("{alnum}(?:{separator}{alnum})*");
        let domain_component = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
        let domain = format!("{domain_component}(?:\\.{domain_component})*(?::[0-9]+)?");
        let name = format!("(?:{domain}/)?{path_component}(?:/{path_component})*");
        let tag = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
        let digest = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";
        regex::Regex::new(&format!("^({name})(?::({tag}))?(?:@({digest}))?$"))
            .expect("the reference grammar compiles")
    })
}

/// Parses a registry image reference the way the distribution project and Docker do: the
/// first path component is a registry when it contains `.` or `:`, is `localhost` or has
/// upper-case letters; otherwise the registry is `docker.io`, where single names are under
/// `library/`. Without tag or digest the tag is `latest`.
pub fn docker_reference(s: &str) -> Result<Reference, String> {
    const NAME_MAX: usize = 255;
    if s.is_empty() {
        return Err("the reference is empty".into());
    }
    let caps = reference_regex()
        .captures(s)
        .ok_or("not a valid reference: REGISTRY/REPOSITORY[:TAG][@DIGEST]")?;
    let name = &caps[1];
    let tag = caps.get(2).map(|m| m.as_str().to_string());
    let digest = caps.get(3).map(|m| m.as_str().to_string());
    let (mut registry, mut repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if registry == "index.docker.io" {
        registry = "docker.io".into();
    }
    if registry == "docker.io" && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    if repository.len() > NAME_MAX {
        return Err(format!(
            "the repository name is longer than {NAME_MAX} characters"
        ));
    }
    if let Some(d) = &digest {
        let want = match d.split_once(':') {
            Some(("sha256", _)) => 64,
            Some(("sha384", _)) => 96,
            Some(("sha512", _)) => 128,
            _ => return Err(format!("digest {d}: use sha256, sha384 or sha512")),
        };
        if d.len() - d.find(':').unwrap_or(0) - 1 != want {
            return Err(format!("digest {d}: wrong length"));
        }
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t, d),
        (None, Some(d)) => Reference::with_digest(registry, repository, d),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest".into())),
    })
}

/// What a pod policy compares of a registry image: the registry as it is reached
/// (`index.docker.io` for Docker Hub), the repository, the tag (`latest` when the reference
/// names neither tag nor digest; none when it names a digest) and the digest. The agent derives
/// these from the image a request names and the generator from the image a pod spec names, so
/// both sides of a comparison come from this one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyParts<'a> {
    /// The registry as it is reached.
    pub registry: &'a str,
    /// The repository.
    pub repository: &'a str,
    /// The tag; `None` when the reference names a digest.
    pub tag: Option<&'a str>,
    /// The digest, when the reference names one.
    pub digest: Option<&'a str>,
}

impl<'a> PolicyParts<'a> {
    /// The parts of `r`.
    pub fn of(r: &'a Reference) -> Self {
        Self {
            registry: r.resolve_registry(),
            repository: r.repository(),
            tag: match r.digest() {
                Some(_) => None,
                None => Some(r.tag().unwrap_or("latest")),
            },
            digest: r.digest(),
        }
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
    fn references_parse_as_oci_spec_parses_them() {
        let hex = "a".repeat(64);
        let long = format!("x/{}", "a".repeat(300));
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox:1.36".into(),
            "docker.io/busybox".into(),
            "index.docker.io/team/app:v2".into(),
            "localhost/app".into(),
            "localhost:5000/app".into(),
            "127.0.0.1:5000/app/web:v1".into(),
            "Reg.Example/app".into(),
            "quay.io/a_b/c__d/e-f---g.h:T_a.g-1".into(),
            format!("app@sha256:{hex}"),
            format!("reg.example:443/app:v1@sha256:{hex}"),
            format!("app@sha384:{}", "b".repeat(96)),
            // Refused by both.
            "app:".into(),
            ":tag".into(),
            "app//x".into(),
            "app:v1:v2".into(),
            "UPPER".into(),
            "app:tag with space".into(),
            "app@sha256:abc".into(),
            format!("app@md5:{}", "c".repeat(32)),
            format!("app:{}", "t".repeat(129)),
            "-app".into(),
            "app_".into(),
            long,
        ];
        for c in &cases {
            let ours = docker_reference(c);
            let theirs: Result<Reference, _> = c.parse();
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(
                        (a.registry(), a.repository(), a.tag(), a.digest()),
                        (b.registry(), b.repository(), b.tag(), b.digest()),
                        "{c}"
                    );
                }
                (Err(_), Err(_)) => {}
                _ => panic!("{c}: ours {ours:?}, oci-spec {theirs:?}"),
            }
        }
        // Tags are ASCII, as registries have them.
        assert!(docker_reference("app:t\u{e9}g").is_err());
    }

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
