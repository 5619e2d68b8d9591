//! `coffer image …`: pull images into a root filesystem.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Args, Subcommand};
use coffer_image::{
    crypt::Keyring,
    pull::{KeyBroker, Progress},
    source::{AuthFile, SourceOptions},
    unpack::Limits,
    ImageRef, PullOptions,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// `coffer image` arguments.
#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Pull an image (docker://REG/REPO:TAG or oci:DIR or oci:DIR:TAG) into a new root filesystem.
    Pull(Box<PullArgs>),
    /// Copy an image, encrypting its layers (ocicrypt) for JWE recipients and/or a KBS key.
    Encrypt(EncryptArgs),
    /// Sign an image: GPG simple signing (lookaside store) or a cosign key (`.sig` tag).
    Sign(SignArgs),
    /// Generate a cosign key pair (PREFIX.key, encrypted as cosign and skopeo read it; PREFIX.pub).
    GenerateCosignKey {
        /// Output prefix.
        #[arg(long)]
        output_prefix: PathBuf,
        /// File holding the passphrase [default: COSIGN_PASSWORD].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct SignArgs {
    /// The image (docker://REG/REPO:TAG).
    image: String,
    /// Talk to the registry over plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials in the containers auth.json format.
    #[arg(long)]
    authfile: Option<PathBuf>,
    /// Sign with this GPG key (fingerprint; from gpg's keyring, GNUPGHOME applies).
    #[arg(
        long,
        conflicts_with = "cosign_key",
        required_unless_present = "cosign_key"
    )]
    gpg_key: Option<String>,
    /// Sign with this cosign key (an encrypted cosign/sigstore key file, or a PEM EC P-256/P-384
    /// private key).
    #[arg(long)]
    cosign_key: Option<PathBuf>,
    /// File holding the cosign key's passphrase [default: COSIGN_PASSWORD].
    #[arg(long, requires = "cosign_key")]
    passphrase_file: Option<PathBuf>,
    /// registries.d directory naming the lookaside store GPG signatures are written to [default:
    /// ~/.config/containers/registries.d, else /etc/containers/registries.d].
    #[arg(long)]
    registries_d: Option<PathBuf>,
}

#[derive(Args)]
struct EncryptArgs {
    /// Source image (docker://…, oci:DIR or oci:DIR:TAG).
    src: String,
    /// Destination image (docker://…, oci:DIR or oci:DIR:TAG).
    dst: String,
    /// Talk to registries over plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials in the containers auth.json format.
    #[arg(long)]
    authfile: Option<PathBuf>,
    /// A JWE recipient: jwe:PUBLIC_KEY.pem (EC P-256/P-384/P-521 or RSA); repeatable.
    #[arg(long = "recipient")]
    recipients: Vec<String>,
    /// Wrap the layer keys with the key-encryption key the KBS holds at this resource
    /// (kbs:///repo/type/tag); the same key must be given with --kek-file.
    #[arg(long, requires = "kek_file")]
    kbs_kek: Option<String>,
    /// The 32-byte key-encryption key (raw bytes), to be stored in the KBS at --kbs-kek.
    #[arg(long, requires = "kbs_kek")]
    kek_file: Option<PathBuf>,
    /// Platform to pick from an image index.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
}

#[derive(Args)]
struct PullArgs {
    /// The image: docker://REGISTRY/REPOSITORY:TAG (or @sha256:…) or oci:DIRECTORY or oci:DIRECTORY:TAG.
    image: String,
    /// The root filesystem to create (must not exist, or be empty).
    #[arg(long)]
    rootfs: PathBuf,
    /// Talk to the registry over plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials in the containers auth.json format: a file, or a KBS resource
    /// (kbs:///repo/type/tag, with --kbs).
    #[arg(long)]
    authfile: Option<PathBuf>,
    /// Keep verified blobs in this content-addressed cache.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Platform to pick from an image index.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Most entries in all layers.
    #[arg(long, default_value_t = Limits::default().max_entries)]
    max_entries: u64,
    /// Most bytes of file content in all layers.
    #[arg(long, default_value_t = Limits::default().max_bytes)]
    max_bytes: u64,
    /// Signature policy (containers-policy.json); without one any image is accepted.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Directory of registries.d YAML files naming signature lookaside stores [default:
    /// ~/.config/containers/registries.d, else /etc/containers/registries.d].
    #[arg(long)]
    registries_d: Option<PathBuf>,
    /// A private key (PEM: PKCS#8, SEC 1 or PKCS#1; EC or RSA) for JWE-wrapped layer keys;
    /// repeatable.
    #[arg(long = "decryption-key")]
    decryption_keys: Vec<PathBuf>,
    /// A KBS to fetch keys from after attesting: layers' key-encryption keys (by the `kid` in
    /// their annotation) and each --key.
    #[arg(long)]
    kbs: Option<String>,
    /// CA certificate of the KBS (PEM).
    #[arg(long, requires = "kbs")]
    kbs_cacert: Option<PathBuf>,
    /// A KBS resource holding a decryption key (PEM private key, or a 32-byte key-encryption
    /// key for layers naming it): kbs:///repo/type/tag; repeatable.
    #[arg(long = "key", requires = "kbs")]
    kbs_keys: Vec<String>,
    #[command(flatten)]
    tee: crate::kbs::TeeArgs,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Layer keys from the KBS, fetched with the CLI's TEE client.
struct KbsBroker(coffer_kbs_client::KbsClient);

impl KeyBroker for KbsBroker {
    fn get<'a>(&'a self, uri: &'a str) -> coffer_image::pull::KeyFuture<'a> {
        Box::pin(async move { self.0.get_resource(uri).await.map_err(|e| e.to_string()) })
    }
}

/// Progress bars: one per layer, on stderr.
struct Bars {
    multi: MultiProgress,
    bars: std::sync::Mutex<Vec<ProgressBar>>,
}

impl Progress for Bars {
    fn layers(&self, layers: &[(String, u64)]) {
        let style = ProgressStyle::with_template("{prefix:.bold} {msg:12} {bytes:>10}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for (digest, size) in layers {
            let bar = self.multi.add(ProgressBar::new(*size));
            bar.set_style(style.clone());
            bar.set_prefix(digest.chars().take(19).collect::<String>());
            bar.set_message("fetching");
            bar.set_position(0);
            bars.push(bar);
        }
    }

    fn fetched(&self, index: usize, from_cache: bool) {
        if let Some(b) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
        {
            b.set_position(b.length().unwrap_or(0));
            b.set_message(if from_cache { "cached" } else { "fetched" });
        }
    }

    fn applied(&self, index: usize) {
        if let Some(b) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
        {
            b.finish_with_message("applied");
        }
    }
}

/// Runs `coffer image …`.
pub async fn run(args: ImageArgs) -> anyhow::Result<()> {
    match args.command {
        ImageCommand::Pull(a) => pull(*a).await,
        ImageCommand::Encrypt(a) => encrypt(a).await,
        ImageCommand::Sign(a) => sign(a).await,
        ImageCommand::GenerateCosignKey {
            output_prefix,
            passphrase_file,
        } => {
            let pass = passphrase(&passphrase_file)?
                .context("give the passphrase in COSIGN_PASSWORD or with --passphrase-file")?;
            let (private, public) = coffer_image::cosign_key::generate(&pass)?;
            let key = PathBuf::from(format!("{}.key", output_prefix.display()));
            let pub_path = PathBuf::from(format!("{}.pub", output_prefix.display()));
            write_new(&key, private.as_bytes(), 0o600)?;
            write_new(&pub_path, public.as_bytes(), 0o644)?;
            println!("{}\n{}", key.display(), pub_path.display());
            Ok(())
        }
    }
}

/// registries.d: the directory given, else the first of the user's and the system's that exists
/// (`~/.config/containers/registries.d`, `/etc/containers/registries.d`), as skopeo looks.
fn registries_d(dir: &Option<PathBuf>) -> anyhow::Result<coffer_image::signature::RegistriesD> {
    if let Some(d) = dir {
        return Ok(coffer_image::signature::RegistriesD::load(d)?);
    }
    let user =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/containers/registries.d"));
    for d in user
        .into_iter()
        .chain([PathBuf::from("/etc/containers/registries.d")])
    {
        if d.is_dir() {
            return Ok(coffer_image::signature::RegistriesD::load(&d)?);
        }
    }
    Ok(Default::default())
}

fn auth_file(path: &Option<PathBuf>) -> anyhow::Result<AuthFile> {
    Ok(match path {
        Some(p) => AuthFile::parse(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )?,
        None => AuthFile::default(),
    })
}

/// A passphrase from a file (trailing newline dropped) or COSIGN_PASSWORD.
fn passphrase(file: &Option<PathBuf>) -> anyhow::Result<Option<zeroize::Zeroizing<Vec<u8>>>> {
    if let Some(p) = file {
        let mut v = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            v.pop();
        }
        return Ok(Some(zeroize::Zeroizing::new(v)));
    }
    Ok(
        std::env::var_os("COSIGN_PASSWORD")
            .map(|v| zeroize::Zeroizing::new(v.into_encoded_bytes())),
    )
}

/// Creates `path` (refusing to overwrite) with `mode`.
fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

async fn sign(a: SignArgs) -> anyhow::Result<()> {
    let image = ImageRef::parse(&a.image)?;
    let opts = SourceOptions {
        plain_http: a.plain_http,
        auth: auth_file(&a.authfile)?,
        ..Default::default()
    };
    if let Some(fpr) = &a.gpg_key {
        let registries = registries_d(&a.registries_d)?;
        let path = coffer_image::sign::sign_gpg(&image, &opts, &registries, fpr)
            .await
            .with_context(|| format!("cannot sign {image}"))?;
        println!("{}", path.display());
    } else if let Some(key) = &a.cosign_key {
        let pem = zeroize::Zeroizing::new(
            std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?,
        );
        let pass = passphrase(&a.passphrase_file)?;
        let tag =
            coffer_image::sign::sign_cosign(&image, &opts, &pem, pass.as_deref().map(|p| &p[..]))
                .await
                .with_context(|| format!("cannot sign {image}"))?;
        println!("{tag}");
    }
    Ok(())
}

async fn encrypt(a: EncryptArgs) -> anyhow::Result<()> {
    let src = ImageRef::parse(&a.src)?;
    let dst = ImageRef::parse(&a.dst)?;
    let mut recipients = Vec::new();
    for r in &a.recipients {
        let path = r
            .strip_prefix("jwe:")
            .with_context(|| format!("--recipient {r}: use jwe:PUBLIC_KEY.pem"))?;
        let pem = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        recipients.push(
            coffer_jose::json::RecipientPublicKey::from_pem(&pem)
                .with_context(|| format!("--recipient {r}"))?,
        );
    }
    let kek = match &a.kek_file {
        Some(p) => {
            let k = zeroize::Zeroizing::new(
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            );
            if k.len() != 32 {
                anyhow::bail!("--kek-file {} must hold exactly 32 bytes", p.display());
            }
            Some(k)
        }
        None => None,
    };
    if let Some(kid) = &a.kbs_kek {
        if !kid.starts_with("kbs:///") {
            anyhow::bail!("--kbs-kek {kid}: use kbs:///REPOSITORY/TYPE/TAG");
        }
    }
    if recipients.is_empty() && kek.is_none() {
        anyhow::bail!("give at least one --recipient jwe:PUB.pem or --kbs-kek with --kek-file");
    }
    let wrap = coffer_image::crypt::WrapWith {
        recipients: &recipients,
        kbs: a.kbs_kek.as_deref().zip(kek.as_deref().map(|k| &k[..])),
    };
    let opts = SourceOptions {
        plain_http: a.plain_http,
        auth: auth_file(&a.authfile)?,
        ..Default::default()
    };
    let digest =
        coffer_image::encrypt::encrypt_image(&src, &dst, &opts, &a.platform.parse()?, &wrap)
            .await
            .with_context(|| format!("cannot encrypt {src} to {dst}"))?;
    println!("{digest}");
    Ok(())
}

async fn pull(a: PullArgs) -> anyhow::Result<()> {
    let image = ImageRef::parse(&a.image)?;
    let authfile_in_kbs = a
        .authfile
        .as_ref()
        .and_then(|p| p.to_str())
        .filter(|p| p.starts_with("kbs:///"))
        .map(str::to_string);
    let mut auth = match authfile_in_kbs {
        Some(_) => AuthFile::default(),
        None => auth_file(&a.authfile)?,
    };
    let progress: Option<Arc<dyn Progress>> = if a.quiet {
        None
    } else {
        Some(Arc::new(Bars {
            multi: MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr()),
            bars: Default::default(),
        }))
    };
    let mut keys = Keyring::default();
    for p in &a.decryption_keys {
        let pem = zeroize::Zeroizing::new(
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        );
        keys.private_keys.push(
            coffer_jose::json::RecipientKey::from_pem(&pem)
                .with_context(|| format!("--decryption-key {}", p.display()))?,
        );
    }
    let mut key_broker: Option<Arc<dyn KeyBroker>> = None;
    if let Some(url) = &a.kbs {
        let client = crate::kbs::tee_client_for(url, a.kbs_cacert.as_deref(), &a.tee)?;
        for uri in &a.kbs_keys {
            if !uri.starts_with("kbs:///") {
                anyhow::bail!("--key {uri}: use kbs:///REPOSITORY/TYPE/TAG");
            }
            let bytes = client
                .get_resource(uri)
                .await
                .with_context(|| format!("cannot get {uri} from the KBS"))?;
            match coffer_jose::json::RecipientKey::from_pem(&bytes) {
                Ok(k) => keys.private_keys.push(k),
                Err(_) => {
                    keys.kbs_keks.insert(uri.clone(), bytes);
                }
            }
        }
        if let Some(uri) = &authfile_in_kbs {
            let bytes = client.get_resource(uri).await.with_context(|| {
                format!("cannot get the registry credentials {uri} from the KBS")
            })?;
            auth = AuthFile::parse(&bytes).with_context(|| uri.to_string())?;
        }
        key_broker = Some(Arc::new(KbsBroker(client)));
    } else if let Some(uri) = &authfile_in_kbs {
        anyhow::bail!("--authfile {uri} needs --kbs");
    }
    let policy = match &a.policy {
        Some(p) => Some(Arc::new(coffer_image::signature::Policy::parse(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )?)),
        None => None,
    };
    let registries_d = registries_d(&a.registries_d)?;
    let opts = PullOptions {
        policy,
        registries_d: Arc::new(registries_d),
        keys: Arc::new(keys),
        key_broker,
        source: SourceOptions {
            plain_http: a.plain_http,
            auth,
            proxy: None,
        },
        platform: a.platform.parse()?,
        cache_dir: a.cache_dir,
        limits: Limits {
            max_entries: a.max_entries,
            max_bytes: a.max_bytes,
        },
        concurrency: 3,
        progress,
        gzip: Some(Arc::new(Igzip)),
    };
    let report = coffer_image::pull(&image, &a.rootfs, &opts)
        .await
        .with_context(|| format!("cannot pull {image}"))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "image": image.to_string(),
            "manifest_digest": report.manifest_digest,
            "index_digest": report.index_digest,
            "config_digest": report.config_digest,
            "layers": report.layers,
            "cached_layers": report.cached_layers,
            "entries": report.totals.entries,
            "bytes": report.totals.bytes,
            "rootfs": a.rootfs,
            "policy": match &report.policy {
                Some(d) => serde_json::json!({"scope": d.scope, "satisfied": d.satisfied}),
                None => serde_json::json!("none: no --policy given, any image accepted"),
            },
        }))?
    );
    Ok(())
}

/// The host's pulls inflate gzip layers with ISA-L's igzip (`coffer-isal`), about 1.6 times as
/// fast as zlib-rs here; the pod VM's agent keeps zlib-rs (docs/images.md).
struct Igzip;

impl coffer_image::GzipInflater for Igzip {
    fn inflate(
        &self,
        compressed: Box<dyn std::io::BufRead>,
    ) -> std::io::Result<Box<dyn std::io::Read>> {
        Ok(Box::new(coffer_isal::GzipDecoder::new(compressed)?))
    }
}
