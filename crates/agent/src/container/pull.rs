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

/// Makes the agent's KBS client (a TEE key pair and an HTTP client with the trust roots).
pub type MakeKbsClient =
    dyn Fn() -> std::result::Result<coffer_kbs_client::KbsClient, String> + Send + Sync;

/// The KBS the agent attests to for image keys, registry credentials and the signature policy,
/// on first need.
pub struct KbsKeys {
    /// The attested client (keeps its token), made on first need.
    client: tokio::sync::OnceCell<Arc<coffer_kbs_client::KbsClient>>,
    make: Arc<MakeKbsClient>,
    /// What the initdata names.
    pub config: crate::keys::KbsConfig,
    settings: tokio::sync::OnceCell<PullSettings>,
}

impl KbsKeys {
    /// Keys from the KBS of the client `make` makes: the resources `config` names fetched on
    /// first need, layer KEKs by their kid. The client itself is made on first need too, on a
    /// blocking thread: loading its trust roots takes tens of milliseconds under TCG, which a
    /// pod VM's agent spends after it told the host it serves ([`Containers::warm_kbs`])
    /// instead of before.
    pub fn new(
        make: impl Fn() -> std::result::Result<coffer_kbs_client::KbsClient, String>
            + Send
            + Sync
            + 'static,
        config: crate::keys::KbsConfig,
    ) -> Self {
        Self {
            client: tokio::sync::OnceCell::new(),
            make: Arc::new(make),
            config,
            settings: tokio::sync::OnceCell::new(),
        }
    }

    /// The client, made now if it is not yet.
    pub async fn client(&self) -> Result<Arc<coffer_kbs_client::KbsClient>> {
        self.client
            .get_or_try_init(|| async {
                let make = self.make.clone();
                tokio::task::spawn_blocking(move || make())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|made| made)
                    .map(Arc::new)
                    .map_err(|e| ContainerError::Keys(format!("cannot make the KBS client: {e}")))
            })
            .await
            .cloned()
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
                    let client = kbs.client().await.map_err(|e| e.to_string())?;
                    let (keyring, auth, policy) =
                        crate::keys::pull_settings(&client, &kbs.config).await?;
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
            opts.key_broker = Some(Arc::new(crate::keys::Broker(kbs.client().await?)));
        }
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn client() -> coffer_kbs_client::KbsClient {
        coffer_kbs_client::KbsClient::new(
            "http://127.0.0.1:1",
            coffer_kbs_client::http_client_via(None, None).unwrap(),
            Box::new(coffer_kbs_client::SampleAttester::default()),
            coffer_jose::TeeKeyAlgorithm::EcP256,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_deferred_client_is_made_once_on_first_need_and_a_failure_is_retried() {
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let keys = KbsKeys::new(
            move || match m.fetch_add(1, Ordering::SeqCst) {
                0 => Err("no trust roots".into()),
                _ => Ok(client()),
            },
            Default::default(),
        );
        assert_eq!(made.load(Ordering::SeqCst), 0, "made before it was needed");
        let Err(ContainerError::Keys(e)) = keys.client().await else {
            panic!("a failed client was taken");
        };
        assert!(e.contains("no trust roots"), "{e}");
        let a = keys.client().await.unwrap();
        let b = keys.client().await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }
}
