//! `coffer initdata …`: write a complete initdata document, print its digest.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

/// `coffer initdata` arguments.
#[derive(Args)]
pub struct InitdataArgs {
    #[command(subcommand)]
    command: InitdataCommand,
}

#[derive(Subcommand)]
enum InitdataCommand {
    /// Print a complete initdata (TOML): the KBS the guest attests to, image keys, the agent
    /// policy (default: the built-in one), the workload owner's and log recipient's keys.
    New(Box<NewArgs>),
    /// Print the digest (hex) of an initdata file under its declared algorithm: what SNP
    /// HOST_DATA, TDX MRCONFIGID and the KBS's `init_data` reference value hold.
    Digest {
        /// The initdata file.
        file: PathBuf,
    },
}

/// `coffer initdata new` arguments.
#[derive(Args)]
struct NewArgs {
    /// The KBS the guest attests to.
    #[arg(long)]
    kbs_url: String,
    /// A KBS resource holding an image decryption key (kbs:///repo/type/tag); repeatable.
    #[arg(long = "image-key")]
    image_keys: Vec<String>,
    /// Agent policy (Rego, package agent_policy) [default: the built-in policy].
    #[arg(long, conflicts_with = "container")]
    policy: Option<PathBuf>,
    /// Pin the policy to one container, as `coffer run --name NAME [-t] [-i] IMAGE
    /// [COMMAND…]` will ask for it: this registry image by the digest its tag names now,
    /// this command (after `--`; none: the image's), nothing else and no exec.
    #[arg(long, value_name = "docker://…", requires = "name")]
    container: Option<String>,
    /// The pinned container's name (`coffer run --name`).
    #[arg(long)]
    name: Option<String>,
    /// The pinned container has a terminal (`coffer run -t`).
    #[arg(long, requires = "container")]
    tty: bool,
    /// The pinned container's stdin is open (`coffer run -i`).
    #[arg(long, requires = "container")]
    interactive: bool,
    /// Resolve the pinned image over plain HTTP (development registries).
    #[arg(long, requires = "container")]
    plain_http: bool,
    /// The pinned container's command.
    #[arg(last = true, requires = "container")]
    command: Vec<String>,
    /// The workload owner's public key (PEM: Ed25519, ECDSA P-256/P-384 or RSA), for
    /// owner-signed exec.
    #[arg(long)]
    owner_key: Option<PathBuf>,
    /// The X25519 public key (PEM) container output is sealed to (HPKE).
    #[arg(long)]
    log_recipient: Option<PathBuf>,
    /// KBS resource with the registry credentials (auth.json) the agent pulls with.
    #[arg(long, value_name = "kbs:///…")]
    registry_auth: Option<String>,
    /// KBS resource with the image signature policy (containers-policy.json) the agent
    /// enforces.
    #[arg(long, value_name = "kbs:///…")]
    signature_policy: Option<String>,
    /// Digest algorithm: sha256, sha384 or sha512.
    #[arg(long, default_value = "sha384")]
    algorithm: String,
    /// An encrypted block volume (a pod's `volumeDevices` entry): the container path it is given
    /// at and the KBS resource holding its key (at least 32 random bytes); repeatable.
    #[arg(long = "block-volume", value_name = "PATH=kbs:///…")]
    block_volumes: Vec<String>,
    /// Put the workload in the attested mesh: its mesh.toml (identity, peers, cidrs,
    /// open_ports; docs/mesh.md).
    #[arg(long, value_name = "mesh.toml")]
    mesh: Option<PathBuf>,
}

fn read(p: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// The policy pinning one container, its image resolved now.
fn pin(c: coffer_policy::RunContainer, plain_http: bool) -> anyhow::Result<String> {
    let resolver = coffer_policy::RegistryResolver {
        source: coffer_image::source::SourceOptions {
            plain_http,
            ..Default::default()
        },
        platform: coffer_image::pull::Platform::default(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(coffer_policy::run_container_policy(&c, &resolver))
        .context("--container")
}

/// Runs `coffer initdata …`.
pub fn run(args: InitdataArgs) -> anyhow::Result<()> {
    match args.command {
        InitdataCommand::Digest { file } => {
            let text = read(&file)?;
            let digest = coffer_wire::initdata::digest(&text)
                .with_context(|| format!("{}", file.display()))?;
            println!("{}", hex::encode(digest));
            Ok(())
        }
        InitdataCommand::New(new) => {
            let NewArgs {
                kbs_url,
                image_keys,
                policy,
                owner_key,
                log_recipient,
                registry_auth,
                signature_policy,
                algorithm,
                container,
                name,
                tty,
                interactive,
                plain_http,
                command,
                block_volumes,
                mesh,
            } = *new;
            let mesh = match &mesh {
                Some(p) => {
                    let text = read(p)?;
                    coffer_wire::mesh::MeshConfig::parse(&text)
                        .with_context(|| format!("--mesh {}", p.display()))?;
                    Some(text)
                }
                None => None,
            };
            if !(kbs_url.starts_with("http://") || kbs_url.starts_with("https://")) {
                bail!("--kbs-url {kbs_url}: use http(s)://HOST:PORT");
            }
            for k in &image_keys {
                coffer_cdh::ResourceUri::parse(k).with_context(|| format!("--image-key {k}"))?;
            }
            for (flag, uri) in [
                ("--registry-auth", &registry_auth),
                ("--signature-policy", &signature_policy),
            ] {
                if let Some(u) = uri {
                    coffer_cdh::ResourceUri::parse(u).with_context(|| format!("{flag} {u}"))?;
                }
            }
            let mut volumes = std::collections::BTreeMap::new();
            for v in &block_volumes {
                let (path, uri) = v.split_once('=').with_context(|| {
                    format!("--block-volume {v}: use CONTAINER_PATH=kbs:///REPO/TYPE/TAG")
                })?;
                if !path.starts_with('/') {
                    bail!("--block-volume {v}: {path} is not an absolute container path");
                }
                coffer_cdh::ResourceUri::parse(uri)
                    .with_context(|| format!("--block-volume {v}"))?;
                if volumes.insert(path.to_string(), uri.to_string()).is_some() {
                    bail!("--block-volume {v}: {path} is named twice");
                }
            }
            let block_volumes = volumes;
            let policy_text = match (&policy, container) {
                (Some(p), _) => read(p)?,
                (None, Some(image)) => pin(
                    coffer_policy::RunContainer {
                        name: name.unwrap_or_default(),
                        image,
                        args: command,
                        tty,
                        stdin: interactive,
                    },
                    plain_http,
                )?,
                (None, None) => {
                    eprintln!(
                        "coffer: no --policy: the built-in development policy lets whoever runs the node create any container in this sandbox (any image, command, environment or mount), with the keys the KBS releases to it; give the workload's own policy with --policy"
                    );
                    coffer_agent::policy::DEFAULT_POLICY.to_string()
                }
            };
            // Refuse a policy the agent would refuse at start.
            coffer_agent::policy::AgentPolicy::new(
                Some(&policy_text),
                std::sync::Arc::new(coffer_agent::policy::MemoryAudit::default()),
            )
            .context("--policy")?;
            let owner_key = match &owner_key {
                Some(p) => {
                    let pem_text = read(p)?;
                    coffer_agent::owner::validate_key(&pem_text)
                        .map_err(|e| anyhow::anyhow!("--owner-key {}: {e}", p.display()))?;
                    Some(pem_text)
                }
                None => None,
            };
            let log_recipient = match &log_recipient {
                Some(p) => {
                    let pem_text = read(p)?;
                    coffer_agent::sealed::Recipient::from_pem(&pem_text)
                        .with_context(|| format!("--log-recipient {}", p.display()))?;
                    Some(pem_text)
                }
                None => None,
            };
            // The one implementation, shared with `coffer policy generate`; the algorithm is
            // checked there.
            let text = coffer_wire::initdata::build(&coffer_wire::initdata::InitdataSpec {
                kbs_url,
                image_keys,
                policy: policy_text,
                owner_key,
                log_recipient,
                registry_auth,
                signature_policy,
                algorithm,
                block_volumes,
                mesh,
            })?;
            print!("{text}");
            Ok(())
        }
    }
}
