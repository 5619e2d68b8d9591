//! `coffer measure`: the reference values (launch measurement, initdata digest, TCB minimum) for
//! a sandbox and an initdata, in the format `coffer kbs set-reference-values` loads.
//!
//! The raw form, `coffer measure --tee snp --firmware OVMF.fd [--kernel K --initrd I --append S]
//! --vcpus N --cpu TYPE --guest-features F`, prints just the SEV-SNP launch digest (hex) of a QEMU
//! launch of those inputs, as AMD's `sev-snp-measure --mode snp` does ([`coffer_podvm::snp`]);
//! `--tee tdx --firmware TDVF --kernel K [--initrd I] [--append S]` prints the MRTD (for both
//! host page orders) and RTMR1/RTMR2 of a TDX direct boot ([`coffer_podvm::tdx`]).
//! `--tee se --se-image F [--initdata F]` prints an IBM Secure Execution image's header tags
//! (reference value `se_image_tags`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

/// `coffer measure` arguments.
#[derive(Args)]
pub struct MeasureArgs {
    /// The sandbox: `vm` (a pod VM) or `process` (development).
    #[arg(long, required_unless_present_any = ["firmware", "se_image", "tee"])]
    sandbox: Option<String>,
    /// The pod VM (`coffer podvm build --out DIR`), for `--sandbox vm`.
    #[arg(long)]
    podvm: Option<PathBuf>,
    /// The initdata the sandbox is launched with.
    #[arg(long, required_unless_present_any = ["firmware", "se_image", "tee"])]
    initdata: Option<PathBuf>,
    /// The agent binary [default: coffer-agent beside this program].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The emulated PSP's directory (its TCB becomes the minimum).
    #[arg(long, default_value = "coffer-psp")]
    psp_dir: PathBuf,
    /// The TEE: with `--sandbox vm`, `snp` gives the SEV-SNP launch digest of the pod VM's
    /// launch, `tdx` its MRTD, RTMR1 and RTMR2 (`emulated`, the default, the emulated PSP's
    /// measurement); in the raw form, the TEE whose values to print (`snp`, `tdx`); `se` with
    /// `--se-image`: an IBM Secure Execution image's header tags.
    #[arg(long)]
    tee: Option<String>,
    /// The firmware image QEMU is given with `-bios`: OVMF with SEV metadata for `snp`, a TDVF
    /// for `tdx` [with `--sandbox vm`: the pod VM's firmware-snp.fd or firmware-tdx.fd].
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// Raw form: the kernel of a measured direct boot (QEMU `-kernel`, `kernel-hashes=on`).
    #[arg(long, requires = "firmware")]
    kernel: Option<PathBuf>,
    /// Raw form: the initrd (QEMU `-initrd`); needs `--kernel`.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Raw form: the kernel command line (QEMU `-append`); needs `--kernel`.
    #[arg(long, requires = "kernel")]
    append: Option<String>,
    /// SEV-SNP: the number of vCPUs (QEMU `-smp`) [default: 1 in the raw form; with `--sandbox
    /// vm`, 2, as the launcher starts a pod VM under KVM].
    #[arg(long)]
    vcpus: Option<u32>,
    /// SEV-SNP: the vCPU model (QEMU `-cpu`): EPYC, EPYC-Rome, EPYC-Milan, EPYC-Genoa, EPYC-Turin
    /// or a versioned alias such as EPYC-Milan-v2; the default is what `coffer run --tee snp`
    /// launches with (`--snp-cpu`, shim.toml `snp_cpu`).
    #[arg(long, default_value = "EPYC-Milan")]
    cpu: coffer_podvm::snp::CpuType,
    /// SEV-SNP: the guest's SEV features (VMSA SEV_FEATURES), `0x`-prefixed hex or decimal
    /// [default: 0x1, SNPActive, as sev-snp-measure and QEMU].
    #[arg(long, value_parser = parse_features)]
    guest_features: Option<u64>,
    /// IBM SE (`--tee se`): the Secure Execution image (`pvimg create` output) whose header's
    /// tags become reference value `se_image_tags`.
    #[arg(long)]
    se_image: Option<PathBuf>,
}

/// `--tee se --se-image F [--initdata F]`: the SE image's header tags (and the initdata
/// digest) as reference values.
fn run_se(a: &MeasureArgs) -> anyhow::Result<()> {
    let Some(image) = &a.se_image else {
        bail!("--tee se needs --se-image FILE (the Secure Execution image made by pvimg create)");
    };
    if a.sandbox.is_some() || a.podvm.is_some() || a.firmware.is_some() || a.kernel.is_some() {
        bail!("--tee se measures an SE image (--se-image); --sandbox, --podvm, --firmware and --kernel do not apply");
    }
    let bytes = std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
    let tags = coffer_verifier::se::ImageTags::from_se_image(&bytes)
        .with_context(|| image.display().to_string())?;
    let mut out = json!({ "se_image_tags": [tags.to_hex()] });
    if let Some(initdata) = &a.initdata {
        let text = std::fs::read_to_string(initdata)
            .with_context(|| format!("cannot read {}", initdata.display()))?;
        let digest =
            coffer_wire::initdata::digest(&text).with_context(|| initdata.display().to_string())?;
        out["init_data"] = json!([hex::encode(digest)]);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// A `--guest-features` value: `0x`-prefixed hex or decimal (as `sev-snp-measure` reads it).
fn parse_features(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e} (give 0x-prefixed hex, e.g. 0x1, or decimal)"))
}

/// The TDX values of a direct boot: MRTD (both host page orders), RTMR1, RTMR2.
fn tdx_values(
    firmware: &Path,
    kernel: &[u8],
    initrd: &[u8],
    append: &str,
) -> anyhow::Result<serde_json::Value> {
    let fw =
        std::fs::read(firmware).with_context(|| format!("cannot read {}", firmware.display()))?;
    let m = coffer_podvm::tdx::measure(&coffer_podvm::tdx::LaunchInputs {
        firmware: &fw,
        kernel,
        initrd,
        append,
        memory_mib: coffer_podvm::tdx::DEFAULT_MEMORY_MIB,
    })
    .with_context(|| firmware.display().to_string())?;
    Ok(json!({
        "mr_td": m.mrtd.map(hex::encode),
        "rtmr1": [hex::encode(m.rtmr1)],
        "rtmr2": [hex::encode(m.rtmr2)],
    }))
}

/// The raw form: prints the SEV-SNP launch digest (or the TDX values) of `a`'s launch inputs.
fn run_raw(a: &MeasureArgs, firmware: &Path) -> anyhow::Result<()> {
    match a.tee.as_deref() {
        Some("snp" | "tdx") => {}
        Some(other) => bail!("--tee {other}: the raw form computes `snp` and `tdx` values"),
        None => bail!("--firmware needs --tee snp or --tee tdx"),
    }
    if a.podvm.is_some() || a.sandbox.is_some() || a.initdata.is_some() {
        bail!("--tee {} --firmware prints launch values only; --podvm, --sandbox and --initdata belong to the reference-values form", a.tee.as_deref().unwrap_or_default());
    }
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let kernel = a.kernel.as_deref().map(read).transpose()?;
    let initrd = a.initrd.as_deref().map(read).transpose()?;
    if a.tee.as_deref() == Some("tdx") {
        if a.vcpus.is_some() || a.guest_features.is_some() {
            bail!("--vcpus and --guest-features describe an SEV-SNP launch; TDX's MRTD and RTMR1/2 do not depend on them");
        }
        let Some(kernel) = kernel else {
            bail!("--tee tdx needs --kernel: Coffer's TDX launch is a measured direct boot");
        };
        let values = tdx_values(
            firmware,
            &kernel,
            initrd.as_deref().unwrap_or_default(),
            a.append.as_deref().unwrap_or_default(),
        )?;
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    let fw = read(firmware)?;
    let digest = coffer_podvm::snp::launch_digest(&coffer_podvm::snp::LaunchInputs {
        firmware: &fw,
        kernel: kernel.as_deref(),
        initrd: initrd.as_deref(),
        append: a.append.as_deref(),
        vcpus: a.vcpus.unwrap_or(1),
        cpu: a.cpu,
        guest_features: a
            .guest_features
            .unwrap_or(coffer_podvm::snp::DEFAULT_GUEST_FEATURES),
    })
    .with_context(|| firmware.display().to_string())?;
    println!("{}", hex::encode(digest));
    Ok(())
}

/// The SEV-SNP launch digest of the pod VM in `dir` as the launcher starts it with `--tee snp`:
/// its kernel, initrd and command line hashed into the firmware's kernel-hashes page, the
/// firmware (`--firmware` or the pod VM's firmware-snp.fd), one VMSA per vCPU.
fn snp_measurement(a: &MeasureArgs, dir: &Path) -> anyhow::Result<[u8; 48]> {
    let vm = coffer_podvm::PodVm::open(dir)?;
    let firmware = a
        .firmware
        .clone()
        .unwrap_or_else(|| dir.join(coffer_podvm::FIRMWARE_SNP));
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let fw = read(&firmware).context(
        "the pod VM has no SEV-SNP firmware: build it with `coffer podvm build --tee snp --firmware FILE` or give --firmware",
    )?;
    let kernel = read(&vm.kernel)?;
    let initrd = read(&vm.initrd)?;
    coffer_podvm::snp::launch_digest(&coffer_podvm::snp::LaunchInputs {
        firmware: &fw,
        kernel: Some(&kernel),
        initrd: Some(&initrd),
        append: Some(&vm.cmdline),
        vcpus: a.vcpus.unwrap_or(2),
        cpu: a.cpu,
        guest_features: a
            .guest_features
            .unwrap_or(coffer_podvm::snp::DEFAULT_GUEST_FEATURES),
    })
    .with_context(|| firmware.display().to_string())
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
    if a.tee.as_deref() == Some("se") || a.se_image.is_some() {
        return run_se(&a);
    }
    if let (None, Some(firmware)) = (&a.sandbox, &a.firmware) {
        return run_raw(&a, firmware);
    }
    if a.kernel.is_some() || a.initrd.is_some() || a.append.is_some() {
        bail!("--kernel, --initrd and --append belong to the raw form (--tee snp|tdx --firmware F without --sandbox); a pod VM's come from --podvm");
    }
    let (Some(sandbox), Some(initdata)) = (&a.sandbox, &a.initdata) else {
        bail!("give --sandbox and --initdata (or --tee snp --firmware F for a launch digest)");
    };
    let text = std::fs::read_to_string(initdata)
        .with_context(|| format!("cannot read {}", initdata.display()))?;
    let digest =
        coffer_wire::initdata::digest(&text).with_context(|| initdata.display().to_string())?;
    let tee = a.tee.as_deref().unwrap_or("emulated");
    match (sandbox.as_str(), tee) {
        (_, "emulated") | ("vm", "snp" | "tdx") => {}
        ("vm", other) => {
            bail!("--tee {other}: pod VM reference values are computed for emulated, snp and tdx")
        }
        (_, other) => bail!("--tee {other}: a process sandbox has only the emulated TEE"),
    }
    if tee == "tdx" {
        let Some(dir) = &a.podvm else {
            bail!("--sandbox vm needs --podvm DIR (coffer podvm build --out DIR)");
        };
        if a.vcpus.is_some() || a.guest_features.is_some() {
            bail!("--vcpus and --guest-features describe an SEV-SNP launch; TDX's MRTD and RTMR1/2 do not depend on them");
        }
        let vm = coffer_podvm::PodVm::open(dir)?;
        let firmware = a
            .firmware
            .clone()
            .unwrap_or_else(|| dir.join(coffer_podvm::FIRMWARE_TDX));
        if !firmware.exists() {
            bail!("the pod VM has no TDX firmware ({}): build it with `coffer podvm build --tee tdx` or give --firmware", firmware.display());
        }
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut values = tdx_values(
            &firmware,
            &read(&vm.kernel)?,
            &read(&vm.initrd)?,
            &vm.cmdline,
        )?;
        values["init_data"] = json!([hex::encode(digest)]);
        eprintln!("coffer: TDX reference values: mr_td lists the MRTD for both host page orders (see docs/attestation.md); RTMR0 (QEMU's machine and memory) is not computed: add rtmr0 from a known-good TD's event log if you pin it");
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    if tee == "snp" {
        let Some(dir) = &a.podvm else {
            bail!("--sandbox vm needs --podvm DIR (coffer podvm build --out DIR)");
        };
        let measurement = snp_measurement(&a, dir)?;
        eprintln!("coffer: SEV-SNP reference values: add snp_tcb_min (your platforms' minimum TCB) before the KBS accepts this launch");
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "measurement": [hex::encode(measurement)],
                "init_data": [hex::encode(digest)],
            }))?
        );
        return Ok(());
    }
    if a.firmware.is_some() || a.vcpus.is_some() || a.guest_features.is_some() {
        bail!("--firmware, --vcpus and --guest-features describe an SEV-SNP launch: add --tee snp");
    }
    let measurement = match (sandbox.as_str(), &a.podvm) {
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
