//! `coffer kbs …`

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use coffer_jose::TeeKeyAlgorithm;
use coffer_kbs_client::{
    generate_admin_key, http_client, AdminClient, Attester, EmulatedSnpAttester, KbsClient,
    SampleAttester,
};

/// `coffer kbs` arguments.
#[derive(Args)]
pub struct KbsArgs {
    /// KBS base URL, e.g. https://127.0.0.1:8080.
    #[arg(long, env = "COFFER_KBS_URL", global = true)]
    url: Option<String>,
    /// Trust only this CA certificate (PEM) for the KBS's TLS certificate.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// Admin private key (PEM) for admin commands.
    #[arg(long, global = true)]
    admin_key: Option<PathBuf>,
    #[command(subcommand)]
    command: KbsCommand,
}

#[derive(Subcommand)]
enum KbsCommand {
    /// Generate an Ed25519 admin key pair: OUT (private, PEM) and OUT.pub (public, PEM).
    Keygen {
        /// Output path of the private key; the public key goes to OUT.pub.
        #[arg(long)]
        out: PathBuf,
    },
    /// Store a resource (admin).
    SetResource {
        /// repository/type/tag
        path: String,
        /// File with the resource's bytes.
        #[arg(long)]
        file: PathBuf,
    },
    /// Delete a resource (admin).
    DeleteResource {
        /// repository/type/tag
        path: String,
    },
    /// Replace the resource policy (admin; Rego, package `policy`, rule `allow`).
    SetResourcePolicy {
        /// Rego file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Replace the attestation policy (admin; Rego, package `policy`, rule `status`).
    SetAttestationPolicy {
        /// Rego file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the policy in force (admin).
    GetPolicy {
        /// `resource` or `attestation`.
        which: String,
    },
    /// Set reference values from a JSON object of named arrays (admin).
    SetReferenceValues {
        /// JSON file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Print all reference values (admin).
    GetReferenceValues,
    /// Delete one named reference-value list (admin).
    DeleteReferenceValue {
        /// The name.
        name: String,
    },
    /// List the mesh certificates that have not expired (admin): identity, TEE, expiry,
    /// serial, attested initdata.
    MeshStatus,
    /// Attest as a TEE and write a resource's bytes to stdout.
    GetResource {
        /// repository/type/tag (or kbs:///repository/type/tag)
        path: String,
        #[command(flatten)]
        tee: TeeArgs,
    },
    /// Benchmark full handshakes (auth, attest, get-resource) with concurrent TEE clients.
    Bench {
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Duration in seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// The resource to fetch.
        #[arg(long)]
        resource: String,
        #[command(flatten)]
        tee: TeeArgs,
    },
}

impl KbsArgs {
    /// Whether the command is `bench` (which wants a runtime thread per core).
    pub fn is_bench(&self) -> bool {
        matches!(self.command, KbsCommand::Bench { .. })
    }
}

/// How the CLI acts as a TEE towards a KBS.
#[derive(Args, Clone)]
pub(crate) struct TeeArgs {
    /// Attester: `auto` (this guest's TEE, found by probing: configfs-tsm's `sev_guest` or
    /// `tdx_guest`, `/dev/sev-guest`, an Azure vTPM; never the emulated one), `tsm` (SEV-SNP
    /// through configfs-tsm), `sev-guest` (SEV-SNP through /dev/sev-guest), `sample` (unsigned; the KBS must
    /// run with --allow-sample) or `emulated` (SEV-SNP reports from the emulated PSP in
    /// --psp-dir; the KBS must run with --allow-emulated --emulated-root DIR/roots.pem).
    #[arg(long, default_value = "sample")]
    attester: String,
    /// The emulated PSP's state directory (created on first use).
    #[arg(long, default_value = "coffer-psp")]
    psp_dir: PathBuf,
    /// Launch measurement the emulated PSP reports (hex, 48 bytes) [default: zeros].
    #[arg(long)]
    measurement: Option<String>,
    /// TEE key type: ec-p256, ec-p521 or rsa2048.
    #[arg(long, default_value = "ec-p256")]
    key_type: String,
    /// Initdata (TOML) to present with the evidence.
    #[arg(long)]
    initdata: Option<PathBuf>,
}

fn attester(tee: &TeeArgs) -> anyhow::Result<Box<dyn Attester>> {
    match tee.attester.as_str() {
        "sample" => Ok(Box::new(SampleAttester::default())),
        "emulated" => {
            eprintln!("coffer: EMULATED TEE: the emulated PSP gives no confidentiality (development only)");
            let psp = coffer_psp::EmulatedPsp::load_or_generate(&tee.psp_dir)?;
            let mut measurement = [0u8; 48];
            if let Some(h) = &tee.measurement {
                let bytes = hex::decode(h).context("--measurement is not hex")?;
                if bytes.len() != 48 {
                    bail!("--measurement must be 48 bytes (96 hex digits)");
                }
                measurement.copy_from_slice(&bytes);
            }
            Ok(Box::new(EmulatedSnpAttester::new(psp, measurement)))
        }
        "auto" => Ok(coffer_attester::probe(&coffer_attester::Guest::default())?),
        "tsm" => Ok(Box::new(coffer_attester::TsmSnpAttester::new(
            std::path::Path::new(coffer_attester::TSM_REPORT_ROOT),
        ))),
        "sev-guest" => Ok(Box::new(coffer_attester::SevGuestAttester::new(
            std::path::Path::new(coffer_attester::SEV_GUEST_DEVICE),
        ))),
        other => {
            bail!("attester {other:?} is not available; supported: auto, tsm, sev-guest, sample, emulated")
        }
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

struct Ctx {
    url: String,
    http: reqwest::Client,
}

impl KbsArgs {
    fn ctx(&self) -> anyhow::Result<Ctx> {
        let url = self
            .url
            .clone()
            .context("--url is required (or set COFFER_KBS_URL)")?;
        let ca = match &self.cacert {
            Some(p) => Some(read(p, "CA certificate")?),
            None => None,
        };
        Ok(Ctx {
            url,
            http: http_client(ca.as_deref())?,
        })
    }

    fn admin(&self) -> anyhow::Result<AdminClient> {
        let ctx = self.ctx()?;
        let path = self.admin_key.as_ref().context(
            "admin commands need --admin-key (the private key from `coffer kbs keygen`)",
        )?;
        let pem = zeroize::Zeroizing::new(read(path, "admin key")?);
        Ok(AdminClient::new(&ctx.url, ctx.http, &pem)?)
    }

    fn tee_client(&self, tee: &TeeArgs) -> anyhow::Result<KbsClient> {
        let ctx = self.ctx()?;
        let alg: TeeKeyAlgorithm = tee.key_type.parse()?;
        let mut client = KbsClient::new(&ctx.url, ctx.http, attester(tee)?, alg)?;
        if let Some(p) = &tee.initdata {
            let text = String::from_utf8(read(p, "initdata")?).context("initdata is not UTF-8")?;
            client = client.with_initdata(text);
        }
        Ok(client)
    }
}

/// A TEE client of the KBS at `url` (`cacert`: its CA, for a self-signed certificate).
pub(crate) fn tee_client_for(
    url: &str,
    cacert: Option<&Path>,
    tee: &TeeArgs,
) -> anyhow::Result<KbsClient> {
    let ca = match cacert {
        Some(p) => Some(read(p, "CA certificate")?),
        None => None,
    };
    let alg: TeeKeyAlgorithm = tee.key_type.parse()?;
    let mut client = KbsClient::new(url, http_client(ca.as_deref())?, attester(tee)?, alg)?;
    if let Some(p) = &tee.initdata {
        let text = String::from_utf8(read(p, "initdata")?).context("initdata is not UTF-8")?;
        client = client.with_initdata(text);
    }
    Ok(client)
}

/// Runs `coffer kbs …`.
pub async fn run(args: KbsArgs) -> anyhow::Result<()> {
    match &args.command {
        KbsCommand::Keygen { out } => {
            let (private, public) = generate_admin_key()?;
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            write_private(out, private.as_bytes())?;
            std::fs::write(&pub_path, public)
                .with_context(|| format!("cannot write {}", pub_path.display()))?;
            eprintln!(
                "wrote {} (private) and {}",
                out.display(),
                pub_path.display()
            );
        }
        KbsCommand::SetResource { path, file } => {
            let bytes = read(file, "resource file")?;
            args.admin()?.set_resource(path, bytes).await?;
        }
        KbsCommand::DeleteResource { path } => args.admin()?.delete_resource(path).await?,
        KbsCommand::SetResourcePolicy { file } => {
            let text = String::from_utf8(read(file, "policy")?).context("policy is not UTF-8")?;
            args.admin()?.set_resource_policy(&text).await?;
        }
        KbsCommand::SetAttestationPolicy { file } => {
            let text = String::from_utf8(read(file, "policy")?).context("policy is not UTF-8")?;
            args.admin()?.set_attestation_policy(&text).await?;
        }
        KbsCommand::GetPolicy { which } => {
            let which = match which.as_str() {
                "resource" => "resource-policy",
                "attestation" => "attestation-policy",
                other => bail!("unknown policy {other:?}; use resource or attestation"),
            };
            print!("{}", args.admin()?.get_policy(which).await?);
        }
        KbsCommand::SetReferenceValues { file } => {
            let doc = read(file, "reference values")?;
            args.admin()?.set_reference_values(&doc).await?;
        }
        KbsCommand::GetReferenceValues => {
            let values = args.admin()?.get_reference_values().await?;
            println!("{}", serde_json_pretty(&values)?);
        }
        KbsCommand::DeleteReferenceValue { name } => {
            args.admin()?.delete_reference_value(name).await?
        }
        KbsCommand::MeshStatus => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            println!(
                "{:<52} {:<10} {:>12}  {:<32}  INITDATA",
                "IDENTITY", "TEE", "EXPIRES IN", "SERIAL"
            );
            for c in args.admin()?.mesh_certificates().await? {
                let left = c.not_after.saturating_sub(now);
                println!(
                    "{:<52} {:<10} {:>12}  {:<32}  {}",
                    c.identity,
                    c.tee,
                    format!("{}m{:02}s", left / 60, left % 60),
                    c.serial,
                    c.init_data.get(..16).unwrap_or(&c.init_data)
                );
            }
        }
        KbsCommand::GetResource { path, tee } => {
            let client = args.tee_client(tee)?;
            let bytes = client.get_resource(path).await?;
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)?;
            out.flush()?;
        }
        KbsCommand::Bench {
            clients,
            duration,
            resource,
            tee,
        } => bench(&args, *clients, *duration, resource, tee).await?,
    }
    Ok(())
}

fn serde_json_pretty<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)?)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    coffer_fsutil::write_atomic(path, bytes, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

async fn bench(
    args: &KbsArgs,
    clients: usize,
    duration: u64,
    resource: &str,
    tee: &TeeArgs,
) -> anyhow::Result<()> {
    if clients == 0 || duration == 0 {
        bail!("--clients and --duration must be positive");
    }
    // One handshake first, so a misconfiguration fails loudly instead of as a zero rate.
    args.tee_client(tee)?
        .handshake(resource)
        .await
        .context("first handshake failed")?;
    // The clients are made (HTTP clients with their trust roots) before the clock starts.
    let made = (0..clients)
        .map(|_| args.tee_client(tee).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(duration);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in made {
        let resource = resource.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut last_error = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.handshake(&resource).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        last_error = Some(e.to_string());
                    }
                }
            }
            (lat, errors, last_error)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut last_error = None;
    for t in tasks {
        let (l, e, le) = t.await?;
        lat.extend(l);
        errors += e;
        last_error = le.or(last_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    println!("clients: {clients}");
    println!("duration_s: {elapsed:.2}");
    println!("handshakes: {}", lat.len());
    println!("errors: {errors}");
    println!("handshakes/s: {:.0}", lat.len() as f64 / elapsed);
    println!("p50_ms: {:.2}", pct(0.50));
    println!("p90_ms: {:.2}", pct(0.90));
    println!("p99_ms: {:.2}", pct(0.99));
    println!("p99.9_ms: {:.2}", pct(0.999));
    if let Some(e) = last_error {
        println!("last_error: {e}");
    }
    if let Ok(metrics) = fetch_metrics(args).await {
        if let Some(rss) = metrics
            .lines()
            .find(|l| l.starts_with("kbs_process_resident_memory_bytes "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
        {
            println!("server_rss_mib: {:.1}", rss / (1024.0 * 1024.0));
        }
    }
    Ok(())
}

async fn fetch_metrics(args: &KbsArgs) -> anyhow::Result<String> {
    let ctx = args.ctx()?;
    let url = format!("{}/metrics", ctx.url.trim_end_matches('/'));
    Ok(ctx.http.get(url).send().await?.text().await?)
}
