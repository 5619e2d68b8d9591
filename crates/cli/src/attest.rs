//! `coffer attest …`: offline evidence verification.

use std::{path::PathBuf, time::SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use coffer_verifier::{dcap, snp::SnpVerifier, Expected, Verifier};
use coffer_wire::Tee;

/// `coffer attest` arguments.
#[derive(Args)]
pub struct AttestArgs {
    #[command(subcommand)]
    command: AttestCommand,
}

#[derive(Subcommand)]
enum AttestCommand {
    /// Verify evidence against the vendor's roots; print its claims as JSON.
    Verify(VerifyArgs),
    /// Fetch the VCEK for an SNP report from AMD's key distribution service into an offline
    /// cache directory (the one coffer-kbs reads with --snp-vcek-dir).
    FetchVcek(FetchVcekArgs),
}

#[derive(Args)]
struct FetchVcekArgs {
    /// SNP evidence JSON (or use --report).
    #[arg(long, conflicts_with = "report")]
    evidence: Option<PathBuf>,
    /// Raw SNP report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Cache directory.
    #[arg(long)]
    vcek_dir: PathBuf,
    /// Processor generation when the report does not say (milan, genoa, turin).
    #[arg(long)]
    product: Option<String>,
    /// KDS base URL.
    #[arg(long, default_value = "https://kdsintf.amd.com")]
    kds_url: String,
}

#[derive(Args)]
struct VerifyArgs {
    /// TEE type: snp, az-snp-vtpm, az-tdx-vtpm, tdx, sgx or nvidia.
    #[arg(long)]
    tee: String,
    /// Raw attestation report (SNP: 1184 bytes; NVIDIA: the SPDM report as hex text).
    #[arg(long, conflicts_with = "evidence")]
    report: Option<PathBuf>,
    /// Endorsement key certificate for --report (SNP: VCEK or VLEK, DER or PEM).
    #[arg(long, requires = "report")]
    cert: Option<PathBuf>,
    /// Device certificate chain for --report (NVIDIA: PEM, leaf first).
    #[arg(long, requires = "report")]
    cert_chain: Option<PathBuf>,
    /// Evidence JSON as upstream attestation agents send it.
    #[arg(long)]
    evidence: Option<PathBuf>,
    /// Raw DCAP quote (TDX or SGX).
    #[arg(long)]
    quote: Option<PathBuf>,
    /// DCAP collateral JSON (TCB info, QE identity, CRLs, issuer chains) for the quote's platform.
    #[arg(long, conflicts_with = "pccs_url")]
    collateral: Option<PathBuf>,
    /// Fetch the DCAP collateral for the quote's platform from this PCCS (or Intel PCS) URL.
    #[arg(long)]
    pccs_url: Option<String>,
    /// Expected report data (hex); omitted, only the binding check is skipped.
    #[arg(long)]
    report_data: Option<String>,
    /// Expected initdata digest (hex), checked against HOST_DATA.
    #[arg(long)]
    init_data_digest: Option<String>,
    /// Verification time (RFC 3339), default now.
    #[arg(long)]
    now: Option<String>,
    /// Also trust this emulated PSP's roots (PEM) — evidence from it proves no confidentiality.
    #[arg(long)]
    emulated_root: Option<PathBuf>,
}

/// The DCAP collateral for `quote` from `--collateral` or `--pccs-url` (fetched now); `None`
/// when neither was given.
async fn collateral_source(
    v: &VerifyArgs,
    quote: &[u8],
) -> anyhow::Result<Option<std::sync::Arc<dcap::CollateralSource>>> {
    let source = match (&v.collateral, &v.pccs_url) {
        (Some(path), _) => dcap::CollateralSource::new(
            vec![dcap::parse_collateral(&read(path, "collateral")?).map_err(anyhow::Error::msg)?],
            None,
        ),
        (None, Some(url)) => {
            let client = coffer_verifier::pccs::PccsClient::new(
                url,
                coffer_verifier::pccs::DEFAULT_REFRESH,
            )?;
            dcap::CollateralSource::new(Vec::new(), Some(std::sync::Arc::new(client)))
        }
        (None, None) => return Ok(None),
    };
    source.prefetch(quote).await.map_err(anyhow::Error::msg)?;
    Ok(Some(std::sync::Arc::new(source)))
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn hex_arg(value: &Option<String>, what: &str) -> anyhow::Result<Option<Vec<u8>>> {
    value
        .as_deref()
        .map(|h| hex::decode(h.trim()).with_context(|| format!("{what} is not hex")))
        .transpose()
}

/// Runs `coffer attest …`; the claims go to stdout.
pub async fn run(args: AttestArgs) -> anyhow::Result<()> {
    let v = match args.command {
        AttestCommand::Verify(v) => v,
        AttestCommand::FetchVcek(f) => return fetch_vcek(f).await,
    };
    let now = match &v.now {
        Some(t) => humantime::parse_rfc3339(t)
            .with_context(|| format!("--now {t:?} is not an RFC 3339 time"))?,
        None => SystemTime::now(),
    };
    let report_data = hex_arg(&v.report_data, "--report-data")?;
    let init = hex_arg(&v.init_data_digest, "--init-data-digest")?;
    let expected = Expected {
        report_data: report_data.as_deref(),
        init_data_digest: init.as_deref(),
        now,
    };
    let claims = match v.tee.as_str() {
        "snp" => {
            let verifier = match &v.emulated_root {
                Some(p) => {
                    let pem = String::from_utf8(read(p, "emulated root")?)
                        .context("emulated root is not PEM")?;
                    SnpVerifier::with_emulated_roots(&pem).map_err(anyhow::Error::msg)?
                }
                None => SnpVerifier::default(),
            };
            match (&v.report, &v.evidence) {
                (Some(report), None) => {
                    let cert_path = v
                        .cert
                        .as_ref()
                        .context("--report needs --cert (the VCEK or VLEK)")?;
                    let mut cert = read(cert_path, "certificate")?;
                    if cert.starts_with(b"-----BEGIN") {
                        cert = coffer_verifier::snp::certs::parse_pem(&cert, "certificate")
                            .map_err(anyhow::Error::msg)
                            .and_then(|c| x509_der(&c).context("certificate does not re-encode"))?;
                    }
                    verifier.verify_report(&read(report, "report")?, &cert, &expected)
                }
                (None, Some(evidence)) => {
                    let ev: serde_json::Value =
                        serde_json::from_slice(&read(evidence, "evidence")?)
                            .context("evidence is not JSON")?;
                    verifier.verify(&ev, &expected)
                }
                _ => bail!("give --report with --cert, or --evidence"),
            }
        }
        "az-snp-vtpm" => {
            let evidence = v
                .evidence
                .as_ref()
                .context("--tee az-snp-vtpm needs --evidence")?;
            let ev: serde_json::Value = serde_json::from_slice(&read(evidence, "evidence")?)
                .context("evidence is not JSON")?;
            coffer_verifier::az_snp::AzSnpVtpmVerifier::default().verify(&ev, &expected)
        }
        "nvidia" => {
            let report = v
                .report
                .as_ref()
                .context("--tee nvidia needs --report and --cert-chain")?;
            let chain = v
                .cert_chain
                .as_ref()
                .context("--tee nvidia needs --cert-chain")?;
            let text =
                String::from_utf8(read(report, "report")?).context("report is not hex text")?;
            let raw = hex::decode(text.trim()).context("report is not hex")?;
            coffer_verifier::nvidia::verify_gpu(
                &raw,
                &read(chain, "certificate chain")?,
                coffer_verifier::nvidia::NVIDIA_DEVICE_ROOT,
                &expected,
            )
        }
        "az-tdx-vtpm" => {
            let evidence = v
                .evidence
                .as_ref()
                .context("--tee az-tdx-vtpm needs --evidence")?;
            let ev: serde_json::Value = serde_json::from_slice(&read(evidence, "evidence")?)
                .context("evidence is not JSON")?;
            let quote = coffer_verifier::az_tdx::evidence_td_quote(&ev).map_err(anyhow::Error::msg)?;
            match collateral_source(&v, &quote).await? {
                Some(source) => coffer_verifier::az_tdx::AzTdxVtpmVerifier::with_source(source)
                    .verify(&ev, &expected),
                None => {
                    eprintln!("warning: no --collateral or --pccs-url: the TD quote's DCAP signature chain is NOT verified (claims say tdx.dcap_verified: false)");
                    coffer_verifier::az_tdx::inspect_without_dcap(&ev, &expected)
                }
            }
        }
        tee @ ("tdx" | "sgx") => {
            let quote = v
                .quote
                .as_ref()
                .context("--tee tdx|sgx needs --quote and --collateral or --pccs-url")?;
            let quote = read(quote, "quote")?;
            let source = collateral_source(&v, &quote)
                .await?
                .context("--quote needs --collateral or --pccs-url")?;
            let kind = if tee == "tdx" { Tee::Tdx } else { Tee::Sgx };
            dcap::DcapVerifier::with_source(kind, source).verify_raw(&quote, &expected)
        }
        other => bail!(
            "TEE {other:?} is not supported by this build; supported: snp, az-snp-vtpm, tdx, sgx"
        ),
    }
    .map_err(|e| anyhow::anyhow!("verification failed: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&claims)?);
    Ok(())
}

fn x509_der(cert: &coffer_verifier::snp::certs::Certificate) -> anyhow::Result<Vec<u8>> {
    coffer_verifier::snp::certs::to_der(cert).map_err(anyhow::Error::msg)
}

async fn fetch_vcek(f: FetchVcekArgs) -> anyhow::Result<()> {
    use coffer_verifier::snp::{Generation, SnpVerifier};
    use sev::{firmware::guest::AttestationReport, parser::ByteParser};
    let report: AttestationReport = match (&f.evidence, &f.report) {
        (Some(e), _) => {
            let v: serde_json::Value =
                serde_json::from_slice(&read(e, "evidence")?).context("evidence is not JSON")?;
            serde_json::from_value(v["attestation_report"].clone())
                .context("evidence has no SNP attestation_report")?
        }
        (None, Some(r)) => AttestationReport::from_bytes(&read(r, "report")?)
            .map_err(|e| anyhow::anyhow!("not an SNP report: {e}"))?,
        (None, None) => bail!("give --evidence or --report"),
    };
    let product = match f.product.as_deref() {
        None => None,
        Some("milan") => Some(Generation::Milan),
        Some("genoa") => Some(Generation::Genoa),
        Some("turin") => Some(Generation::Turin),
        Some(other) => bail!("unknown product {other:?}; use milan, genoa or turin"),
    };
    let path = SnpVerifier::kds_vcek_path(&report, product).map_err(anyhow::Error::msg)?;
    let url = format!("{}{path}", f.kds_url.trim_end_matches('/'));
    let resp = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot fetch the VCEK from AMD KDS at {url} (no network?)"))?;
    if !resp.status().is_success() {
        bail!("AMD KDS answered HTTP {} for {url}", resp.status());
    }
    let der = resp
        .bytes()
        .await
        .context("reading the VCEK from AMD KDS")?;
    coffer_verifier::snp::certs::parse_der(&der, "VCEK from AMD KDS")
        .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&f.vcek_dir)
        .with_context(|| format!("cannot create {}", f.vcek_dir.display()))?;
    let file = f.vcek_dir.join(SnpVerifier::vcek_file_name(&report));
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, &der).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("cannot write {}", file.display()))?;
    println!("{}", file.display());
    Ok(())
}
