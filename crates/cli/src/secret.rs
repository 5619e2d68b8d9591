//! `coffer secret …`: sealed secrets in the upstream format.

use std::{io::Read, path::PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use coffer_cdh::{ResourceUri, Resources, Seal};
use zeroize::Zeroizing;

/// `coffer secret` arguments.
#[derive(Args)]
pub struct SecretArgs {
    #[command(subcommand)]
    command: SecretCommand,
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Seal a secret: envelope (encrypted under a KBS-held key) or vault (a pointer to a KBS
    /// resource). Prints `sealed.…`.
    Seal(SealArgs),
    /// Unseal a secret as an attested TEE (development tool; the guest agent does this inside
    /// the pod). Writes the plaintext to stdout.
    Unseal(UnsealArgs),
}

#[derive(Args)]
struct SealArgs {
    /// Envelope: the KBS resource holding the 32-byte key-encryption key.
    #[arg(long, requires = "kek_file", conflicts_with = "vault")]
    key_id: Option<String>,
    /// Envelope: that key (32 raw bytes), to be stored in the KBS at --key-id.
    #[arg(long, requires = "key_id")]
    kek_file: Option<PathBuf>,
    /// Envelope: the secret (default: standard input).
    #[arg(long, requires = "key_id")]
    file: Option<PathBuf>,
    /// Vault: the KBS resource that is the secret.
    #[arg(long, required_unless_present = "key_id")]
    vault: Option<String>,
    /// Sign with this P-256 private key (PEM) so that guests can require the signature.
    #[arg(long)]
    signing_key: Option<PathBuf>,
}

#[derive(Args)]
struct UnsealArgs {
    /// The sealed secret (or - to read it from standard input).
    sealed: String,
    /// The KBS.
    #[arg(long)]
    kbs: String,
    /// CA certificate of the KBS (PEM).
    #[arg(long)]
    kbs_cacert: Option<PathBuf>,
    /// Require an ES256 signature by one of these P-256 public keys (PEM); repeatable.
    #[arg(long = "verify-key")]
    verify_keys: Vec<PathBuf>,
    #[command(flatten)]
    tee: crate::kbs::TeeArgs,
}

struct Kbs(coffer_kbs_client::KbsClient);

impl Resources for Kbs {
    async fn get(&self, uri: &ResourceUri) -> Result<Zeroizing<Vec<u8>>, String> {
        self.0
            .get_resource(&uri.path())
            .await
            .map_err(|e| e.to_string())
    }
}

fn read(p: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

/// Runs `coffer secret …`.
pub async fn run(args: SecretArgs) -> anyhow::Result<()> {
    match args.command {
        SecretCommand::Seal(a) => {
            let signing = match &a.signing_key {
                Some(p) => Some(Zeroizing::new(read(p)?)),
                None => None,
            };
            let sealed = match (&a.key_id, &a.vault) {
                (Some(id), _) => {
                    let key_id = ResourceUri::parse(id)?;
                    let kek = Zeroizing::new(read(a.kek_file.as_ref().context("--kek-file")?)?);
                    if kek.len() != 32 {
                        bail!("--kek-file must hold exactly 32 bytes");
                    }
                    let secret = Zeroizing::new(match &a.file {
                        Some(p) => read(p)?,
                        None => {
                            let mut v = Vec::new();
                            std::io::stdin().read_to_end(&mut v)?;
                            v
                        }
                    });
                    coffer_cdh::seal(
                        Seal::Envelope {
                            key_id: &key_id,
                            kek: &kek,
                            secret: &secret,
                        },
                        signing.as_deref().map(|v| &v[..]),
                    )?
                }
                (None, Some(v)) => coffer_cdh::seal(
                    Seal::Vault {
                        name: &ResourceUri::parse(v)?,
                    },
                    signing.as_deref().map(|v| &v[..]),
                )?,
                (None, None) => bail!("give --key-id with --kek-file (envelope) or --vault"),
            };
            println!("{sealed}");
            Ok(())
        }
        SecretCommand::Unseal(a) => {
            let sealed = if a.sealed == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                a.sealed.clone()
            };
            let keys = a
                .verify_keys
                .iter()
                .map(read)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = crate::kbs::tee_client_for(&a.kbs, a.kbs_cacert.as_deref(), &a.tee)?;
            let secret = coffer_cdh::unseal(&sealed, &Kbs(client), &keys).await?;
            use std::io::Write;
            std::io::stdout().write_all(&secret)?;
            Ok(())
        }
    }
}
