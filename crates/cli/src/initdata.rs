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
    New {
        /// The KBS the guest attests to.
        #[arg(long)]
        kbs_url: String,
        /// A KBS resource holding an image decryption key (kbs:///repo/type/tag); repeatable.
        #[arg(long = "image-key")]
        image_keys: Vec<String>,
        /// Agent policy (Rego, package agent_policy) [default: the built-in policy].
        #[arg(long)]
        policy: Option<PathBuf>,
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
    },
    /// Print the digest (hex) of an initdata file under its declared algorithm: what SNP
    /// HOST_DATA, TDX MRCONFIGID and the KBS's `init_data` reference value hold.
    Digest {
        /// The initdata file.
        file: PathBuf,
    },
}

fn read(p: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
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
        InitdataCommand::New {
            kbs_url,
            image_keys,
            policy,
            owner_key,
            log_recipient,
            registry_auth,
            signature_policy,
            algorithm,
        } => {
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
            let policy_text = match &policy {
                Some(p) => read(p)?,
                None => {
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
            })?;
            print!("{text}");
            Ok(())
        }
    }
}
