//! The mesh CA: workload certificates for attested guests ([`coffer_wire::mesh`]).
//!
//! * The CA is an ECDSA P-256 key and a self-signed certificate made on first use and kept in
//!   the store beside the token key (`mesh-ca`, inserted only if absent): every replica of a
//!   shared store, and every restart, signs with the same CA, which the store's backups keep.
//!   The CA key never leaves the KBS: it is not a resource, so no resource policy can release
//!   it.
//! * A certificate is issued for a PKCS#10 request whose signature verifies (the key was made
//!   in the guest and never leaves it), to a caller holding an attestation token; it names the
//!   identity of the attested initdata's `mesh.toml` (one URI subject alternative name, as
//!   SPIFFE X.509 documents), for client and server authentication, valid for the configured
//!   lifetime. What the request itself asks for (names, usages) is ignored.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};

/// What the store keeps: the CA's key (PKCS#8 PEM) and certificate (PEM).
#[derive(Serialize, Deserialize)]
struct Stored {
    key: String,
    certificate: String,
}

/// A mesh CA failure.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The stored CA cannot be used.
    #[error("the mesh CA in the store is unusable: {0}")]
    Ca(String),
    /// The certificate request is malformed or its signature does not verify.
    #[error("the certificate request: {0}")]
    Request(String),
    /// Signing failed.
    #[error("cannot sign the certificate: {0}")]
    Sign(String),
}

/// The loaded CA.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    certificate: String,
}

fn random_serial() -> [u8; 16] {
    let mut s = [0u8; 16];
    aws_lc_rs::rand::fill(&mut s).expect("the system random generator");
    // Positive, and never zero.
    s[0] = (s[0] & 0x7f) | 0x01;
    s
}

/// A new CA: (PKCS#8 PEM key, certificate PEM), valid for 20 years.
fn generate() -> Result<(String, String), MeshError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| MeshError::Ca(e.to_string()))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Coffer mesh CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::days(20 * 365);
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let cert = p
        .self_signed(&key)
        .map_err(|e| MeshError::Ca(e.to_string()))?;
    Ok((key.serialize_pem(), cert.pem()))
}

impl MeshCa {
    /// The store's CA, made and stored first when there is none.
    pub async fn load(store: &crate::store::Store) -> anyhow::Result<Self> {
        let mut failure = None;
        let bytes = store
            .mesh_ca(|| match generate() {
                Ok((key, certificate)) => {
                    serde_json::to_vec(&Stored { key, certificate }).unwrap_or_default()
                }
                Err(e) => {
                    failure = Some(e);
                    Vec::new()
                }
            })
            .await?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        let stored: Stored =
            serde_json::from_slice(&bytes).map_err(|e| MeshError::Ca(e.to_string()))?;
        let key = KeyPair::from_pem(&stored.key).map_err(|e| MeshError::Ca(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&stored.certificate, key)
            .map_err(|e| MeshError::Ca(e.to_string()))?;
        Ok(Self {
            issuer,
            certificate: stored.certificate,
        })
    }

    /// The CA certificate (PEM): the mesh's trust anchor, public.
    pub fn certificate(&self) -> &str {
        &self.certificate
    }

    /// Issues a certificate for the key of `csr_pem` naming `identity`, valid for `ttl`:
    /// (certificate PEM, serial hex, expiry in seconds since the epoch).
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: Duration,
    ) -> Result<(String, String, u64), MeshError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| MeshError::Request(e.to_string()))?;
        let serial = random_serial();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names =
            vec![SanType::URI(identity.try_into().map_err(
                |e: rcgen::Error| MeshError::Sign(format!("{identity}: {e}")),
            )?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let not_after = now + ttl;
        let at = |d: Duration| {
            time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64)
                .map_err(|e| MeshError::Sign(e.to_string()))
        };
        p.not_before = at(now.saturating_sub(Duration::from_secs(60)))?;
        p.not_after = at(not_after)?;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        csr.params = p;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| MeshError::Sign(e.to_string()))?;
        Ok((cert.pem(), hex::encode(serial), not_after.as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec!["asks-for-this.example".into()]).unwrap();
        p.is_ca = IsCa::NoCa;
        let req = p.serialize_request(&key).unwrap();
        (key, req.pem().unwrap())
    }

    #[tokio::test]
    async fn one_ca_per_store_and_certificates_name_only_the_attested_identity() {
        let d = tempfile::tempdir().unwrap();
        let store = crate::store::Store::Redb(crate::store::RedbStore::open(d.path(), 16).unwrap());
        let ca = MeshCa::load(&store).await.unwrap();
        let again = MeshCa::load(&store).await.unwrap();
        assert_eq!(
            ca.certificate(),
            again.certificate(),
            "the stored CA is reused"
        );
        let (_, req) = csr();
        let (pem_text, serial, not_after) = ca
            .issue(
                &req,
                "spiffe://cluster.local/ns/shop/sa/web",
                Duration::from_secs(600),
            )
            .unwrap();
        assert_eq!(serial.len(), 32);
        let der = ::pem::parse(&pem_text).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["URI(spiffe://cluster.local/ns/shop/sa/web)"]);
        assert_eq!(cert.validity().not_after.timestamp() as u64, not_after);
        let ca_der = ::pem::parse(ca.certificate()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca_der.contents()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        // A request whose signature does not verify is refused.
        let mut bad = ::pem::parse(&req).unwrap().contents().to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let bad = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", bad));
        assert!(matches!(
            ca.issue(&bad, "spiffe://a/b", Duration::from_secs(60)),
            Err(MeshError::Request(_))
        ));
    }
}
