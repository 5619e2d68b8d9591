//! `coffer policy generate`: the agent policy and initdata of each workload in Kubernetes YAML,
//! written into the YAML (runtime class and initdata annotation).

use std::{io::Read, path::PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use coffer_image::source::{AuthFile, SourceOptions};

/// `coffer policy` arguments.
#[derive(Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Pin every container of each workload (Pod, Deployment, StatefulSet, DaemonSet,
    /// ReplicaSet, Job, CronJob) in an agent policy: image digest, process, environment,
    /// user, capabilities, mounts, probe execs. Writes the YAML with each pod template given
    /// `runtimeClassName: coffer` and the initdata annotation.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct GenerateArgs {
    /// Kubernetes YAML (multi-document); `-` reads stdin; repeatable. ConfigMaps, Secrets
    /// (only their key names are used) and ServiceAccounts among them are read too.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
    /// The KBS the pods attest to (http(s)://HOST:PORT).
    #[arg(long)]
    kbs_url: String,
    /// A KBS resource holding an image decryption key (kbs:///repo/type/tag); repeatable.
    #[arg(long = "image-key")]
    image_keys: Vec<String>,
    /// Generation settings (YAML): env_patterns, allow_host_path, allow_privileged, exec_any,
    /// extra_mounts, any_namespace.
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Image digests and configs from this file instead of the registries (YAML or JSON:
    /// {"IMAGE": {"digest": "sha256:…", "config": {…}}}).
    #[arg(long)]
    offline_digests: Option<PathBuf>,
    /// Write the YAML here instead of stdout.
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// Write the KBS reference values (`{"init_data": [DIGEST, …]}`) here.
    #[arg(long)]
    reference_values: Option<PathBuf>,
    /// Talk to registries over plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials in the containers auth.json format.
    #[arg(long)]
    authfile: Option<PathBuf>,
    /// Platform whose image config is read from an image index.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Initdata digest algorithm: sha256, sha384 or sha512.
    #[arg(long, default_value = "sha384")]
    algorithm: String,
}

fn read_input(name: &str) -> anyhow::Result<String> {
    if name == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(name).with_context(|| format!("cannot read {name}"))
}

fn read(p: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// Runs `coffer policy …`.
pub async fn run(args: PolicyArgs) -> anyhow::Result<()> {
    let PolicyCommand::Generate(a) = args.command;
    let documents = a
        .files
        .iter()
        .map(|f| read_input(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = match &a.settings {
        Some(p) => coffer_policy::Settings::parse(&read(p)?)
            .with_context(|| format!("--settings {}", p.display()))?,
        None => coffer_policy::Settings::default(),
    };
    let opts = coffer_policy::Options {
        kbs_url: a.kbs_url,
        image_keys: a.image_keys,
        settings,
        algorithm: a.algorithm,
    };
    let resolver: Box<dyn coffer_policy::ImageResolver> = match &a.offline_digests {
        Some(p) => Box::new(
            coffer_policy::OfflineImages::parse(&read(p)?)
                .with_context(|| format!("--offline-digests {}", p.display()))?,
        ),
        None => Box::new(coffer_policy::RegistryResolver {
            source: SourceOptions {
                plain_http: a.plain_http,
                auth: match &a.authfile {
                    Some(p) => AuthFile::parse(
                        &std::fs::read(p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                    )?,
                    None => AuthFile::default(),
                },
                proxy: None,
            },
            platform: a.platform.parse()?,
        }),
    };
    let generated = coffer_policy::generate(&documents, resolver.as_ref(), &opts).await?;
    for w in &generated.warnings {
        eprintln!("coffer: warning: {w}");
    }
    for p in &generated.pods {
        eprintln!(
            "coffer: {} {}/{}: policy {} bytes, initdata {} {}",
            p.kind.to_lowercase(),
            p.namespace,
            p.name,
            p.policy.len(),
            opts.algorithm,
            p.initdata_digest
        );
    }
    if let Some(path) = &a.reference_values {
        let refs = serde_json::to_string_pretty(&coffer_policy::reference_values(&generated.pods))?;
        coffer_fsutil::write_atomic(path, format!("{refs}\n").as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    match &a.output {
        Some(path) => coffer_fsutil::write_atomic(path, generated.yaml.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{}", generated.yaml),
    }
    Ok(())
}
