//! The pull options of a container's image: the agent's own, or, when the initdata names a KBS,
//! with the image keys, registry credentials and signature policy the agent attests for (once).

use std::sync::Arc;

use coffer_image::PullOptions;

use super::{ContainerError, Containers, Result};

/// What the pulls take from the KBS, fetched once.
struct PullSettings {
    keyring: Arc<coffer_image::crypt::Keyring>,
    auth: Option<coffer_image::source::AuthFile>,
    policy: Option<Arc<coffer_image::signature::Policy>>,
}

/// The KBS the agent attests to for image keys, registry credentials and the signature policy,
/// on first need.
pub struct KbsKeys {
    /// The attested client (keeps its token).
    pub client: Arc<coffer_kbs_client::KbsClient>,
    /// What the initdata names.
    pub config: crate::keys::KbsConfig,
    settings: tokio::sync::OnceCell<PullSettings>,
}

impl KbsKeys {
    /// Keys from `client`'s KBS: the resources `config` names fetched on first need, layer KEKs
    /// by their kid.
    pub fn new(client: coffer_kbs_client::KbsClient, config: crate::keys::KbsConfig) -> Self {
        Self {
            client: Arc::new(client),
            config,
            settings: tokio::sync::OnceCell::new(),
        }
    }
}

impl Containers {
    /// The pull options for one image: with the KBS's keys, registry credentials and signature
    /// policy when the initdata names them.
    pub(super) async fn pull_options(&self) -> Result<PullOptions> {
        let mut opts = self.pull.clone();
        if let Some(kbs) = &self.kbs {
            let s = kbs
                .settings
                .get_or_try_init(|| async {
                    let (keyring, auth, policy) =
                        crate::keys::pull_settings(&kbs.client, &kbs.config).await?;
                    tracing::info!(
                        keys = kbs.config.image_keys.len(),
                        registry_auth = auth.is_some(),
                        signature_policy = policy.is_some(),
                        "attested; resources from the KBS"
                    );
                    Ok::<_, String>(PullSettings {
                        keyring: Arc::new(keyring),
                        auth,
                        policy: policy.map(Arc::new),
                    })
                })
                .await
                .map_err(ContainerError::Keys)?;
            tracing::debug!("pull settings from the KBS in hand");
            opts.keys = s.keyring.clone();
            if let Some(a) = &s.auth {
                opts.source.auth = a.clone();
            }
            if let Some(p) = &s.policy {
                opts.policy = Some(p.clone());
            }
            opts.key_broker = Some(Arc::new(crate::keys::Broker(kbs.client.clone())));
        }
        Ok(opts)
    }
}
