//! Peer pods: the agent's channel over the network, and the launch configuration a pod VM reads.
//!
//! A local pod VM's agent is reached over a virtio-serial port that only its keeper holds. A
//! peer pod's VM runs elsewhere (a libvirt host, a cloud), so its agent listens on TCP
//! ([`AGENT_TCP_PORT`]) with mutual TLS 1.3 instead, and the same multiplexer
//! ([`crate::mux`]) runs over that one connection. The keys are made by the node's keeper for
//! this VM alone ([`Credentials::generate`]): the VM gets its own certificate and key and the
//! keeper's certificate in its launch configuration; the keeper keeps its key in memory. Each
//! side accepts exactly the other's certificate (pinned, no CA), so only the node that created
//! the VM can drive its agent, and the agent answers no one else. No secret of the workload
//! crosses this channel: the agent's policy gates every request as over vsock.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The TCP port a peer pod's agent listens on.
pub const AGENT_TCP_PORT: u16 = 15150;

/// What a pod VM reads at boot (QEMU's fw_cfg entry [`crate::launch::CONFIG_FW_CFG`]): written
/// by the keeper for a local VM, by `coffer-cloud` (with the keeper's part) for a peer pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// The initdata (TOML), checked by the agent against HOST_DATA.
    pub initdata: String,
    /// Pull over plain HTTP (development registries).
    #[serde(default)]
    pub plain_http: bool,
    /// `emulated` (the default), `snp` or `tdx`.
    #[serde(default = "emulated")]
    pub tee: String,
    /// `pod`: the pod network's interfaces are plugged in; else there is no network device
    /// (a local VM) or only the peer pod's own interface.
    #[serde(default)]
    pub network: String,
    /// For a peer pod: how its agent is reached over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteAgent>,
}

fn emulated() -> String {
    "emulated".into()
}

/// A peer pod's agent channel: mutual TLS on [`AGENT_TCP_PORT`] with pinned certificates.
#[derive(Clone, Serialize, Deserialize)]
pub struct RemoteAgent {
    /// The agent's certificate (PEM), made for this VM.
    pub cert: String,
    /// The agent's private key (PKCS#8 PEM).
    pub key: Zeroizing<String>,
    /// The one client certificate the agent accepts (PEM): the keeper's.
    pub client: String,
    /// The VM's interface, where the provider assigns the address (libvirt); absent where the
    /// platform configures it (DHCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<StaticInterface>,
}

impl std::fmt::Debug for RemoteAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteAgent")
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

/// A statically addressed interface of a peer pod VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticInterface {
    /// The interface's MAC address (`52:54:00:…`), which finds it in the guest.
    pub mac: String,
    /// Its address with prefix length (`10.99.0.5/24`): the node is on that subnet.
    pub address: String,
}

/// A remote channel's TLS set-up failed.
#[derive(Debug, thiserror::Error)]
#[error("peer pod agent channel: {0}")]
pub struct ChannelError(String);

fn err(e: impl std::fmt::Display) -> ChannelError {
    ChannelError(e.to_string())
}

/// One side's certificate and key.
pub struct Identity {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// The private key (PKCS#8 DER).
    key: Zeroizing<Vec<u8>>,
}

impl Identity {
    /// The certificate as PEM.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// The private key as PEM.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.key))
    }

    /// From PEM text.
    pub fn from_pem(cert: &str, key: &str) -> Result<Self, ChannelError> {
        Ok(Self {
            cert: CertificateDer::from(pem_decode(cert, "CERTIFICATE")?),
            key: Zeroizing::new(pem_decode(key, "PRIVATE KEY")?),
        })
    }

    fn key_der(&self) -> Result<PrivateKeyDer<'static>, ChannelError> {
        PrivateKeyDer::try_from(self.key.to_vec()).map_err(err)
    }
}

fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der))
}

fn pem_decode(text: &str, tag: &str) -> Result<Vec<u8>, ChannelError> {
    pem::parse_many(text)
        .map_err(|e| ChannelError(format!("{tag}: {e}")))?
        .into_iter()
        .find(|p| p.tag() == tag)
        .map(pem::Pem::into_contents)
        .ok_or_else(|| ChannelError(format!("no {tag} in the PEM text")))
}

/// The keys of one peer pod's channel: the agent's and the keeper's, each a fresh ECDSA P-256
/// key with a self-signed certificate.
pub struct Credentials {
    /// The agent's (goes to the VM).
    pub agent: Identity,
    /// The keeper's (stays on the node).
    pub keeper: Identity,
}

impl Credentials {
    /// Makes both key pairs, for the VM named `vm`.
    pub fn generate(vm: &str) -> Result<Self, ChannelError> {
        let one = |cn: String| -> Result<Identity, ChannelError> {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let cert = params.self_signed(&key).map_err(err)?;
            Ok(Identity {
                cert: cert.der().clone(),
                key: Zeroizing::new(key.serialize_der()),
            })
        };
        Ok(Self {
            agent: one(format!("coffer agent {vm}"))?,
            keeper: one(format!("coffer keeper {vm}"))?,
        })
    }

    /// The agent's part of the launch configuration.
    pub fn remote_agent(&self) -> RemoteAgent {
        RemoteAgent {
            cert: self.agent.cert_pem(),
            key: self.agent.key_pem(),
            client: self.keeper.cert_pem(),
            interface: None,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The agent's TLS configuration: its own certificate, and only `client` may connect.
pub fn server_config(remote: &RemoteAgent) -> Result<Arc<rustls::ServerConfig>, ChannelError> {
    let me = Identity::from_pem(&remote.cert, &remote.key)?;
    let client = CertificateDer::from(pem_decode(&remote.client, "CERTIFICATE")?);
    let provider = provider();
    let mut c = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_client_cert_verifier(Arc::new(Pinned {
            cert: client,
            provider,
        }))
        .with_single_cert(vec![me.cert.clone()], me.key_der()?)
        .map_err(err)?;
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

/// The keeper's TLS configuration: its own certificate, and only `agent` is accepted.
pub fn client_config(
    keeper: &Identity,
    agent: &CertificateDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, ChannelError> {
    let provider = provider();
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            cert: agent.clone(),
            provider,
        }))
        .with_client_auth_cert(vec![keeper.cert.clone()], keeper.key_der()?)
        .map_err(err)?;
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

/// Accepts exactly one certificate (either side), and checks the handshake's signature with it.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (Result<(), String>, Result<(), String>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let s = tokio::spawn(async move {
            let mut t = tokio_rustls::TlsAcceptor::from(server)
                .accept(a)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            t.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            t.write_all(&buf).await.map_err(|e| e.to_string())?;
            t.shutdown().await.map_err(|e| e.to_string())
        });
        let c = async move {
            let mut t = tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::try_from("agent").unwrap(), b)
                .await
                .map_err(|e| e.to_string())?;
            t.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            t.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            (&buf == b"ping")
                .then_some(())
                .ok_or_else(|| "echo".to_string())
        }
        .await;
        (s.await.unwrap(), c)
    }

    #[tokio::test]
    async fn only_the_pinned_keeper_and_agent_talk() {
        let creds = Credentials::generate("t").unwrap();
        let remote = creds.remote_agent();
        // The launch configuration round-trips, and its Debug form shows no key.
        let text = serde_json::to_string(&LaunchConfig {
            initdata: "x".into(),
            plain_http: false,
            tee: "emulated".into(),
            network: String::new(),
            remote: Some(remote.clone()),
        })
        .unwrap();
        let back: LaunchConfig = serde_json::from_str(&text).unwrap();
        let back = back.remote.unwrap();
        assert!(!format!("{back:?}").contains("PRIVATE"));

        let server = server_config(&back).unwrap();
        let good = client_config(&creds.keeper, &creds.agent.cert).unwrap();
        let (s, c) = handshake(server.clone(), good).await;
        assert_eq!((s, c), (Ok(()), Ok(())));

        // Another node's keeper is refused by the agent.
        let other = Credentials::generate("u").unwrap();
        let stranger = client_config(&other.keeper, &creds.agent.cert).unwrap();
        let (s, _) = handshake(server.clone(), stranger).await;
        assert!(s.is_err(), "{s:?}");

        // A keeper that expects another agent refuses this one.
        let wrong_agent = client_config(&creds.keeper, &other.agent.cert).unwrap();
        let (_, c) = handshake(server, wrong_agent).await;
        assert!(c.is_err(), "{c:?}");
    }

    #[test]
    fn pem_round_trips_and_names_what_is_missing() {
        let creds = Credentials::generate("t").unwrap();
        let pem = creds.agent.cert_pem();
        assert_eq!(
            pem_decode(&pem, "CERTIFICATE").unwrap(),
            creds.agent.cert.as_ref()
        );
        let e = pem_decode(&pem, "PRIVATE KEY").unwrap_err().to_string();
        assert!(e.contains("no PRIVATE KEY"), "{e}");
    }
}
