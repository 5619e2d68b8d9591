//! The attested mesh: a workload's identity and its peers, as the initdata's `mesh.toml` names
//! them, and the KBS's mesh CA endpoint (`POST /kbs/v0/mesh/certificate`), which issues a
//! workload certificate to an attested guest for the identity its initdata names.
//!
//! ```toml
//! # mesh.toml in the initdata
//! identity = "spiffe://cluster.local/ns/shop/sa/web"   # this workload (a URI)
//! peers = ["spiffe://cluster.local/ns/shop/*"]          # whom it may talk to, both ways
//! cidrs = ["10.88.0.0/16"]                              # the pod network: TCP there is meshed
//! open_ports = [8081]                                   # plaintext allowed in (e.g. kubelet probes)
//! ```

use serde::{Deserialize, Serialize};

/// The initdata entry holding the mesh settings.
pub const MESH_TOML: &str = "mesh.toml";

/// The path (under the KBS base path) where an attested guest asks for its certificate.
pub const CERTIFICATE_PATH: &str = "/mesh/certificate";
/// The path (under the KBS base path) serving the mesh CA's certificate (public).
pub const CA_PATH: &str = "/mesh/ca";

/// The TCP port a sandbox's mesh proxy takes mutual-TLS connections on.
pub const MESH_PORT: u16 = 15443;

/// A workload's mesh settings (`mesh.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// The workload's identity, a URI (`spiffe://TRUST-DOMAIN/…`).
    pub identity: String,
    /// Identities it may talk to: exact URIs, or a prefix ending in `*`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The networks whose TCP goes through the mesh (`ADDR/LEN`).
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Ports that take plaintext from outside the mesh (each connection logged).
    #[serde(default)]
    pub open_ports: Vec<u16>,
}

/// A bad `mesh.toml`.
#[derive(Debug, thiserror::Error)]
#[error("mesh.toml: {0}")]
pub struct MeshError(pub String);

/// Whether `s` is an identity URI: `scheme://authority/path`, printable ASCII without spaces,
/// at most 512 bytes.
pub fn valid_identity(s: &str) -> bool {
    s.len() <= 512
        && s.bytes().all(|b| b.is_ascii_graphic())
        && s.split_once("://").is_some_and(|(scheme, rest)| {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
                && !rest.is_empty()
                && !rest.contains('*')
        })
}

/// Whether identity `id` matches peer pattern `pattern` (exact, or a prefix ending in `*`).
pub fn peer_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

impl MeshConfig {
    /// Parses and checks `mesh.toml`.
    pub fn parse(text: &str) -> Result<Self, MeshError> {
        let c: MeshConfig = toml::from_str(text).map_err(|e| MeshError(e.to_string()))?;
        if !valid_identity(&c.identity) {
            return Err(MeshError(format!(
                "identity {:?} is not a URI like spiffe://cluster.local/ns/NS/sa/NAME",
                c.identity
            )));
        }
        for p in &c.peers {
            let exact = p.strip_suffix('*').unwrap_or(p);
            if exact.contains('*') || !(p.ends_with('*') || valid_identity(p)) || exact.is_empty() {
                return Err(MeshError(format!(
                    "peer {p:?} is neither an identity URI nor a prefix ending in *"
                )));
            }
        }
        for n in &c.cidrs {
            let ok = n.split_once('/').is_some_and(|(a, l)| {
                let len: Option<u8> = l.parse().ok();
                match a.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(_)) => len.is_some_and(|l| l <= 32),
                    Ok(std::net::IpAddr::V6(_)) => len.is_some_and(|l| l <= 128),
                    Err(_) => false,
                }
            });
            if !ok {
                return Err(MeshError(format!("cidr {n:?} is not ADDRESS/LENGTH")));
            }
        }
        if c.open_ports.contains(&0) || c.open_ports.contains(&MESH_PORT) {
            return Err(MeshError(format!(
                "open_ports may not hold 0 or the mesh port {MESH_PORT}"
            )));
        }
        Ok(c)
    }

    /// Whether this workload may talk to `id`.
    pub fn allows(&self, id: &str) -> bool {
        self.peers.iter().any(|p| peer_matches(p, id))
    }
}

/// `POST /kbs/v0/mesh/certificate`: a PKCS#10 request (PEM) whose key the guest made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The CSR, PEM.
    pub csr: String,
}

/// The KBS's answer: the workload certificate and what the guest needs to use it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The certificate (PEM), for the CSR's key, naming the attested identity.
    pub certificate: String,
    /// The mesh CA's certificate (PEM): the only trust anchor of the mesh.
    pub ca: String,
    /// The identity the certificate names.
    pub identity: String,
    /// The identities the workload may talk to (patterns), as the KBS decided.
    pub peers: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub not_after: u64,
}

/// One issued certificate, as `coffer kbs mesh-status` lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The certificate's serial number (hex).
    pub serial: String,
    /// The identity it names.
    pub identity: String,
    /// The attested initdata's digest (hex).
    pub init_data: String,
    /// The TEE that attested.
    pub tee: String,
    /// Issued at, seconds since the epoch.
    pub issued_at: u64,
    /// Expiry, seconds since the epoch.
    pub not_after: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_toml_is_checked_and_peers_match_by_prefix() {
        let c = MeshConfig::parse(
            "identity = \"spiffe://cluster.local/ns/shop/sa/web\"\npeers = [\"spiffe://cluster.local/ns/shop/*\", \"spiffe://cluster.local/ns/ops/sa/probe\"]\ncidrs = [\"10.88.0.0/16\"]\nopen_ports = [8081]\n",
        )
        .unwrap();
        assert!(c.allows("spiffe://cluster.local/ns/shop/sa/db"));
        assert!(c.allows("spiffe://cluster.local/ns/ops/sa/probe"));
        assert!(!c.allows("spiffe://cluster.local/ns/ops/sa/probe2"));
        assert!(!c.allows("spiffe://cluster.local/ns/other/sa/db"));
        for (bad, names) in [
            ("identity = \"web\"\n", "identity \"web\""),
            ("identity = \"spiffe://a/*\"\n", "identity"),
            (
                "identity = \"spiffe://a/b\"\npeers = [\"*x\"]\n",
                "peer \"*x\"",
            ),
            (
                "identity = \"spiffe://a/b\"\ncidrs = [\"10.0.0.0\"]\n",
                "cidr",
            ),
            (
                "identity = \"spiffe://a/b\"\nopen_ports = [15443]\n",
                "open_ports",
            ),
            ("identity = \"spiffe://a/b\"\nother = 1\n", "unknown field"),
        ] {
            let e = MeshConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }
}
