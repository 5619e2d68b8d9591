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
    #[arg(long, requires = "collateral")]
    quote: Option<PathBuf>,
    /// DCAP collateral JSON (TCB info, QE identity, CRLs, issuer chains) for the quote's platform.
    #[arg(long)]
    collateral: Option<PathBuf>,
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
pub fn run(args: AttestArgs) -> anyhow::Result<()> {
    let AttestCommand::Verify(v) = args.command;
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
            match &v.collateral {
                Some(coll_path) => {
                    let collateral = dcap::parse_collateral(&read(coll_path, "collateral")?)
                        .map_err(anyhow::Error::msg)?;
                    coffer_verifier::az_tdx::AzTdxVtpmVerifier::new(vec![collateral])
                        .verify(&ev, &expected)
                }
                None => {
                    eprintln!("warning: no --collateral: the TD quote's DCAP signature chain is NOT verified (claims say tdx.dcap_verified: false)");
                    coffer_verifier::az_tdx::inspect_without_dcap(&ev, &expected)
                }
            }
        }
        tee @ ("tdx" | "sgx") => {
            let quote = v
                .quote
                .as_ref()
                .context("--tee tdx|sgx needs --quote and --collateral")?;
            let coll_path = v
                .collateral
                .as_ref()
                .context("--quote needs --collateral")?;
            let collateral = dcap::parse_collateral(&read(coll_path, "collateral")?)
                .map_err(anyhow::Error::msg)?;
            let kind = if tee == "tdx" { Tee::Tdx } else { Tee::Sgx };
            dcap::DcapVerifier::new(kind, Vec::new()).verify_quote(
                &read(quote, "quote")?,
                &collateral,
                &expected,
            )
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
