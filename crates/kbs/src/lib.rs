//! coffer-kbs: the Key Broker Service.
//!
//! Speaks the KBS attestation protocol 0.4.0 ([`api`]), verifies evidence with
//! `coffer-verifier`, appraises it with a Rego attestation policy ([`policy`]), issues EAR
//! tokens ([`token`]) and releases resources encrypted to the TEE's key when the resource
//! policy allows. State lives in a [`store::Store`]: embedded redb or PostgreSQL.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod audit;
pub mod config;
pub mod error;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod store;
pub mod token;

use std::sync::Arc;

use anyhow::Context;
use coffer_verifier::{Trust, Verifiers};

pub use config::Config;

/// The running service's state, shared by every request.
pub struct Kbs {
    /// Effective configuration.
    pub config: Config,
    /// Persistent state.
    pub store: store::Store,
    /// Evidence verifiers.
    pub verifiers: Verifiers,
    /// Token keys.
    pub tokens: token::TokenKeys,
    /// Admin authentication.
    pub admin: admin::AdminAuth,
    /// Compiled policies.
    pub policies: policy::PolicyCache,
    /// Audit log.
    pub audit: audit::AuditLog,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// The mesh CA.
    pub mesh: mesh::MeshCa,
    /// IBM Secure Execution: the hosts whose SE guests may attest (none: SE is off).
    pub se: Option<coffer_verifier::se::HostKeys>,
}

impl Kbs {
    /// Opens the store and builds the service from `config`.
    pub async fn new(config: Config) -> anyhow::Result<Arc<Self>> {
        config.validate()?;
        let store = match (&config.database_url, &config.data_dir) {
            (Some(url), _) => store::Store::Postgres(
                store::PgStore::connect(url, config.max_sessions)
                    .await
                    .context("cannot connect to PostgreSQL (--database-url)")?,
            ),
            (None, Some(dir)) => store::Store::Redb(
                store::RedbStore::open(dir, config.max_sessions)
                    .with_context(|| format!("cannot open the store in {}", dir.display()))?,
            ),
            (None, None) => anyhow::bail!("set --data-dir (embedded store) or --database-url"),
        };
        let tokens = token::TokenKeys::load(&store)
            .await
            .context("cannot load the token signing key")?;
        let admin = admin::AdminAuth::load(&config.admin_public_key)?;
        if !admin.enabled() {
            tracing::warn!("no --admin-public-key: every admin request will be refused");
        }
        let audit_path = config
            .audit_log
            .clone()
            .or_else(|| config.data_dir.as_ref().map(|d| d.join("audit.jsonl")));
        let audit = audit::AuditLog::open(audit_path.as_deref())?;
        let trust = Trust {
            allow_sample: config.allow_sample,
            allow_emulated: config.allow_emulated,
        };
        if trust.allow_sample {
            tracing::warn!(
                "--allow-sample: evidence of the sample TEE, which has NO security, is accepted"
            );
        }
        let mut verifiers = Verifiers::new(trust);
        let emulated_pem = match &config.emulated_root {
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the emulated PSP roots {}", path.display())
            })?),
            None => None,
        };
        if let Some(pem) = &emulated_pem {
            verifiers
                .trust_emulated_roots(pem)
                .context("invalid --emulated-root")?;
            tracing::warn!("--allow-emulated: SNP evidence from the EMULATED PSP, which gives NO confidentiality, is accepted (claims say emulated)");
        }
        if let Some(dir) = &config.snp_vcek_dir {
            verifiers
                .set_snp_vcek_dir(dir.clone(), emulated_pem.as_deref())
                .context("invalid --emulated-root")?;
        }
        if !config.dcap_collateral.is_empty() {
            let mut all = Vec::new();
            for path in &config.dcap_collateral {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read DCAP collateral {}", path.display()))?;
                all.push(
                    coffer_verifier::dcap::parse_collateral(&bytes)
                        .with_context(|| format!("invalid DCAP collateral {}", path.display()))?,
                );
            }
            verifiers.set_dcap_collateral(all);
        }
        if let Some(url) = &config.pccs_url {
            verifiers.set_pccs(
                coffer_verifier::pccs::PccsClient::new(url, coffer_verifier::pccs::DEFAULT_REFRESH)
                    .context("invalid --pccs-url")?,
            );
        }
        let se = se_hosts(&config)?;
        let mesh = mesh::MeshCa::load(&store)
            .await
            .context("cannot load the mesh CA")?;
        let kbs = Arc::new(Self {
            se,
            mesh,
            verifiers,
            policies: policy::PolicyCache::new(policy::PolicyLimits::of(&config)),
            metrics: metrics::Metrics::new(),
            config,
            store,
            tokens,
            admin,
            audit,
        });
        // Fail at start, not at the first request, if a stored policy no longer compiles.
        kbs.policies
            .get(&kbs.store)
            .await
            .context("stored policies do not compile")?;
        Ok(kbs)
    }
}

/// The configured IBM SE hosts: each host-key document read and, unless
/// `se-unverified-host-keys`, verified against IBM's signing chain and the CRLs.
fn se_hosts(config: &Config) -> anyhow::Result<Option<coffer_verifier::se::HostKeys>> {
    if config.se_host_key_document.is_empty() {
        return Ok(None);
    }
    let mut documents = Vec::new();
    for p in &config.se_host_key_document {
        let bytes = std::fs::read(p)
            .with_context(|| format!("cannot read SE host-key document {}", p.display()))?;
        documents.push((p.display().to_string(), bytes));
    }
    let verifier = if config.se_unverified_host_keys {
        tracing::warn!("--se-unverified-host-keys: IBM SE host-key documents are NOT checked against IBM's signing keys (tests only)");
        None
    } else {
        Some(
            coffer_verifier::se::signing_chain(
                &config.se_signing_cert,
                &config.se_crl,
                config.se_root_ca.as_deref(),
            )
            .context("cannot set up the IBM SE signing-key chain (--se-signing-cert, --se-crl, --se-root-ca)")?,
        )
    };
    let hosts = coffer_verifier::se::HostKeys::load(&documents, verifier.as_ref())?;
    tracing::info!(
        hosts = documents.len(),
        "IBM Secure Execution attestation enabled"
    );
    Ok(Some(hosts))
}
