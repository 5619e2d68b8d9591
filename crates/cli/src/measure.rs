//! `coffer measure`: the reference values (launch measurement, initdata digest, TCB minimum) for
//! a sandbox and an initdata, in the format `coffer kbs set-reference-values` loads.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

/// `coffer measure` arguments.
#[derive(Args)]
pub struct MeasureArgs {
    /// The sandbox: `vm` (a pod VM) or `process` (development).
    #[arg(long)]
    sandbox: String,
    /// The pod VM (`coffer podvm build --out DIR`), for `--sandbox vm`.
    #[arg(long)]
    podvm: Option<PathBuf>,
    /// The initdata the sandbox is launched with.
    #[arg(long)]
    initdata: PathBuf,
    /// The agent binary [default: coffer-agent beside this program].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The emulated PSP's directory (its TCB becomes the minimum).
    #[arg(long, default_value = "coffer-psp")]
    psp_dir: PathBuf,
}

/// The agent binary: given, or `coffer-agent` next to this executable.
pub fn agent_path(given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let p = me.with_file_name("coffer-agent");
    if !p.exists() {
        bail!("{} not found; give --agent", p.display());
    }
    Ok(p)
}

/// Runs `coffer measure`.
pub fn run(a: MeasureArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.initdata)
        .with_context(|| format!("cannot read {}", a.initdata.display()))?;
    let digest =
        coffer_wire::initdata::digest(&text).with_context(|| a.initdata.display().to_string())?;
    let measurement = match (a.sandbox.as_str(), &a.podvm) {
        ("vm", Some(dir)) => coffer_podvm::PodVm::open(dir)?.measurement()?,
        ("vm", None) => bail!("--sandbox vm needs --podvm DIR (coffer podvm build --out DIR)"),
        ("process", None) => {
            let agent = agent_path(&a.agent)?;
            let binary = std::fs::read(&agent)
                .with_context(|| format!("cannot read {}", agent.display()))?;
            coffer_agent::sandbox::process_measurement(&binary)
        }
        ("process", Some(_)) => bail!("--podvm belongs to --sandbox vm"),
        (other, _) => bail!("--sandbox {other}: use `vm` or `process`"),
    };
    let tcb = match coffer_psp::EmulatedPsp::load(&a.psp_dir) {
        Ok(psp) => psp.tcb(),
        Err(_) => coffer_psp::Tcb::default(),
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "measurement": [hex::encode(measurement)],
            "init_data": [hex::encode(digest)],
            "snp_tcb_min": [{"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp, "microcode": tcb.microcode}],
        }))?
    );
    Ok(())
}
