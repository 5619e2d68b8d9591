//! Keys from the KBS, fetched by the agent after attesting with its own TEE and its initdata.
//!
//! The KBS is the one `aa.toml` names (`[token_configs.kbs] url`); the image keys are the
//! resources `cdh.toml` lists (`[image] decryption_keys`). Attestation happens on first need and
//! the token is kept (coffer-kbs-client); nothing is fetched before a container needs it.

use std::sync::Arc;

use coffer_image::{crypt::Keyring, pull::KeyBroker, pull::KeyFuture};
use coffer_kbs_client::KbsClient;
use coffer_wire::initdata::Initdata;

/// The KBS and image keys an initdata names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KbsConfig {
    /// The KBS URL, if the initdata names one.
    pub url: Option<String>,
    /// KBS resources holding image decryption keys.
    pub image_keys: Vec<String>,
    /// KBS resource holding the registry credentials (containers `auth.json` format).
    pub registry_auth: Option<String>,
    /// KBS resource holding the image signature policy (containers-policy.json).
    pub signature_policy: Option<String>,
    /// The key of each encrypted block volume, by the container path it is given at
    /// (`cdh.toml` `[block_volumes]`).
    pub block_volumes: std::collections::BTreeMap<String, String>,
    /// The attested mesh's settings (`mesh.toml`), when the pod is in the mesh.
    pub mesh: Option<coffer_wire::mesh::MeshConfig>,
}

/// Reads `aa.toml` and `cdh.toml` from the initdata.
pub fn kbs_config(initdata: &Initdata) -> Result<KbsConfig, String> {
    let table = |name: &str| -> Result<Option<toml::Table>, String> {
        initdata
            .data
            .get(name)
            .map(|t| toml::from_str::<toml::Table>(t).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    let mut cfg = KbsConfig::default();
    if let Some(text) = initdata.data.get(coffer_wire::mesh::MESH_TOML) {
        cfg.mesh = Some(coffer_wire::mesh::MeshConfig::parse(text).map_err(|e| e.to_string())?);
    }
    if let Some(aa) = table("aa.toml")? {
        cfg.url = aa
            .get("token_configs")
            .and_then(|t| t.get("kbs"))
            .and_then(|k| k.get("url"))
            .and_then(|u| u.as_str())
            .map(str::to_string);
    }
    if let Some(cdh) = table("cdh.toml")? {
        if cfg.url.is_none() {
            cfg.url = cdh
                .get("kbc")
                .and_then(|k| k.get("url"))
                .and_then(|u| u.as_str())
                .map(str::to_string);
        }
        let image = cdh.get("image");
        let uri = |name: &str| -> Result<Option<String>, String> {
            match image.and_then(|i| i.get(name)) {
                None => Ok(None),
                Some(v) => {
                    let u = v
                        .as_str()
                        .ok_or_else(|| format!("cdh.toml: [image] {name} must be a string"))?;
                    coffer_cdh::ResourceUri::parse(u)
                        .map_err(|e| format!("cdh.toml: [image] {name}: {e}"))?;
                    Ok(Some(u.to_string()))
                }
            }
        };
        cfg.registry_auth = uri("authenticated_registry_credentials_uri")?;
        cfg.signature_policy = uri("image_security_policy_uri")?;
        if let Some(keys) = image
            .and_then(|i| i.get("decryption_keys"))
            .and_then(|k| k.as_array())
        {
            for k in keys {
                let k = k
                    .as_str()
                    .ok_or("cdh.toml: decryption_keys must be strings")?;
                coffer_cdh::ResourceUri::parse(k).map_err(|e| e.to_string())?;
                cfg.image_keys.push(k.to_string());
            }
        }
        if let Some(v) = cdh.get("block_volumes") {
            let t = v.as_table().ok_or(
                "cdh.toml: [block_volumes] must be a table of container path = \"kbs:///…\"",
            )?;
            for (path, uri) in t {
                let uri = uri.as_str().ok_or_else(|| {
                    format!("cdh.toml: [block_volumes] {path:?} must be a kbs:/// resource")
                })?;
                if !path.starts_with('/') {
                    return Err(format!(
                        "cdh.toml: [block_volumes] {path:?} is not an absolute container path"
                    ));
                }
                coffer_cdh::ResourceUri::parse(uri)
                    .map_err(|e| format!("cdh.toml: [block_volumes] {path:?}: {e}"))?;
                cfg.block_volumes.insert(path.clone(), uri.to_string());
            }
        }
    }
    Ok(cfg)
}

/// What the initdata asks the KBS for before pulling: keys, and optionally registry credentials
/// and the signature policy. Fails closed: a resource the initdata names but the KBS does not
/// release stops the pull.
pub async fn pull_settings(
    client: &KbsClient,
    cfg: &KbsConfig,
) -> Result<
    (
        Keyring,
        Option<coffer_image::source::AuthFile>,
        Option<coffer_image::signature::Policy>,
    ),
    String,
> {
    let keys = image_keyring(client, &cfg.image_keys).await?;
    let auth = match &cfg.registry_auth {
        Some(uri) => Some(
            coffer_image::source::AuthFile::parse(&fetch(client, uri).await?)
                .map_err(|e| format!("registry credentials {uri}: {e}"))?,
        ),
        None => None,
    };
    let policy = match &cfg.signature_policy {
        Some(uri) => Some(
            coffer_image::signature::Policy::parse(&fetch(client, uri).await?)
                .map_err(|e| format!("signature policy {uri}: {e}"))?,
        ),
        None => None,
    };
    Ok((keys, auth, policy))
}

async fn fetch(client: &KbsClient, uri: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    client
        .get_resource(uri)
        .await
        .map_err(|e| format!("cannot get {uri} from the KBS: {e}"))
}

/// The attested KBS client as a key broker for image pulls.
pub struct Broker(pub Arc<KbsClient>);

impl KeyBroker for Broker {
    fn get<'a>(&'a self, uri: &'a str) -> KeyFuture<'a> {
        Box::pin(async move { self.0.get_resource(uri).await.map_err(|e| e.to_string()) })
    }
}

/// Fetches the image keys: PEM private keys become JWE recipients, other resources
/// key-encryption keys under their URI.
pub async fn image_keyring(client: &KbsClient, uris: &[String]) -> Result<Keyring, String> {
    let mut keys = Keyring::default();
    for uri in uris {
        let bytes = fetch(client, uri).await?;
        match coffer_jose::json::RecipientKey::from_pem(&bytes) {
            Ok(k) => keys.private_keys.push(k),
            Err(_) => {
                keys.kbs_keks.insert(uri.clone(), bytes);
            }
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kbs_and_image_keys_come_from_aa_and_cdh_toml() {
        let text = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = \"[token_configs.kbs]\\nurl = \\\"http://kbs:8080\\\"\\n\"\n\"cdh.toml\" = \"[image]\\ndecryption_keys = [\\\"kbs:///default/k/1\\\"]\\n\"\n";
        let cfg = kbs_config(&Initdata::parse(text).unwrap()).unwrap();
        assert_eq!(cfg.url.as_deref(), Some("http://kbs:8080"));
        assert_eq!(cfg.image_keys, vec!["kbs:///default/k/1".to_string()]);
        let more = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = \"[image]\\nimage_security_policy_uri = \\\"kbs:///default/policy/p\\\"\\nauthenticated_registry_credentials_uri = \\\"kbs:///default/cred/c\\\"\\n\"\n";
        let cfg = kbs_config(&Initdata::parse(more).unwrap()).unwrap();
        assert_eq!(
            cfg.signature_policy.as_deref(),
            Some("kbs:///default/policy/p")
        );
        assert_eq!(cfg.registry_auth.as_deref(), Some("kbs:///default/cred/c"));
        let bad = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = \"[image]\\ndecryption_keys = [\\\"http://x\\\"]\\n\"\n";
        assert!(kbs_config(&Initdata::parse(bad).unwrap()).is_err());
    }

    #[test]
    fn block_volume_keys_come_from_cdh_toml_by_container_path() {
        let doc = |cdh: &str| {
            format!(
                "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = '''{cdh}'''\n"
            )
        };
        let cfg = kbs_config(
            &Initdata::parse(&doc(
                "[block_volumes]\n\"/dev/xvda\" = \"kbs:///default/pv/data\"\n",
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg.block_volumes.get("/dev/xvda").map(String::as_str),
            Some("kbs:///default/pv/data")
        );
        for (bad, names) in [
            (
                "[block_volumes]\n\"/dev/xvda\" = \"http://x\"\n",
                "/dev/xvda",
            ),
            (
                "[block_volumes]\n\"xvda\" = \"kbs:///default/pv/data\"\n",
                "absolute",
            ),
            ("block_volumes = 1\n", "[block_volumes]"),
        ] {
            let e = kbs_config(&Initdata::parse(&doc(bad)).unwrap()).unwrap_err();
            assert!(e.contains(names), "{e}");
        }
    }
}
