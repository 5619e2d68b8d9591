//! The keeper of a pod VM sandbox (`coffer run --sandbox vm`): QEMU instead of `unshare`.
//!
//! The keeper computes the launch measurement from the kernel, initrd and command line it hands
//! to QEMU and gives it to the emulated PSP with HOST_DATA = the initdata digest; the PSP's
//! channel is a virtio-serial port of this VM alone (`psp-chan.sock`, QEMU connects). The
//! agent's port (`agent-chan.sock`) carries, multiplexed (`coffer_podvm::mux`), the API
//! connections the keeper accepts on `agent.sock` once the agent said it serves, and the
//! guest's outbound connections (SOCKS5, each destination logged to `egress.log`) when the VM
//! has no network device. On a pod network (`--pod-netns`) the VM instead takes over the
//! interfaces the CNI configured ([`crate::podnet`]) and its own traffic goes there.
//! `scratch.img` is the guest's scratch disk, which the guest encrypts and integrity-protects;
//! `agent.log` is the VM's console (kernel and agent). QEMU dies with the keeper (parent-death
//! signal); the sandbox ends when QEMU does (the agent powers the VM off after DestroySandbox).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use coffer_podvm::{mux, Accel, Launch, PodVm, Tee};
use tokio::io::AsyncReadExt;

use crate::{
    egress::forward,
    lifetime::{die_with_keeper, owner_gone},
    podnet::PodNetwork,
    KeeperArgs,
};
use coffer_fsutil::last_line;

/// The QEMU binary pod VMs run in (found on PATH).
pub const QEMU: &str = "qemu-system-x86_64";

/// Whether a KVM guest runs here: with the CPU model the launch uses (`host`), a 64 KiB
/// firmware whose reset vector writes to QEMU's isa-debug-exit port must make QEMU exit with
/// status 3 within two seconds. (Nested KVM on this project's CI machine fails this.) PVM
/// (`kvm_pvm` without a hardware KVM) does not count: it runs only kernels built for it.
/// `dev_kvm` is the KVM device, `modules` `/sys/module`, `dir` a writable directory for the
/// probe's firmware, `qemu` the QEMU binary (paths of a host mounted elsewhere, as `coffer
/// doctor --root` checks). Says why a guest does not run.
pub async fn kvm_probe(
    qemu: &Path,
    dev_kvm: &Path,
    modules: &Path,
    dir: &Path,
) -> Result<(), String> {
    if kvm_is_pvm(modules) {
        return Err("KVM here is PVM (kvm_pvm), which runs only PVM guest kernels".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm)
    {
        return Err(format!("cannot open {}: {e}", dev_kvm.display()));
    }
    let mut fw = vec![0u8; 65536];
    // At 0xfffffff0: mov al, 1; out 0xf4, al; hlt; jmp $-1.
    fw[0xfff0..0xfff7].copy_from_slice(&[0xb0, 0x01, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]);
    let path = dir.join("kvm-probe.fd");
    if let Err(e) = std::fs::write(&path, &fw) {
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    let child = tokio::process::Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-machine",
            "q35",
            "-nodefaults",
            "-nographic",
            "-display",
            "none",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-bios"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let outcome = match child {
        Ok(mut c) => match tokio::time::timeout(Duration::from_secs(2), c.wait()).await {
            Ok(Ok(s)) if s.code() == Some(3) => Ok(()),
            Ok(Ok(s)) => Err(format!("a KVM guest did not run ({s})")),
            Ok(Err(e)) => Err(format!("cannot wait for {}: {e}", qemu.display())),
            Err(_) => Err("a KVM guest hung (nested KVM that does not run guests)".into()),
        },
        Err(e) => Err(format!("cannot run {}: {e}", qemu.display())),
    };
    let _ = std::fs::remove_file(&path);
    outcome
}

/// Whether the host's KVM is PVM (the `kvm_pvm` module, pagetable-based virtualization for
/// nested cloud machines) without a hardware KVM beside it. PVM runs only guest kernels built
/// for it: the pod VM's Debian kernel stops in its decompressor (the host logs "kvm-pvm:
/// INTERNAL_ERROR"), although the reset-vector probe above passes. `modules` is `/sys/module`.
fn kvm_is_pvm(modules: &Path) -> bool {
    modules.join("kvm_pvm").exists()
        && !modules.join("kvm_intel").exists()
        && !modules.join("kvm_amd").exists()
}

/// The TEE of this launch from `--tee`: the emulated PSP, or SEV-SNP / TDX with the firmware
/// (`--firmware`, else the pod VM's `firmware-snp.fd` / `firmware-tdx.fd`) and the initdata
/// digest as HOST_DATA / MRCONFIGID.
fn launch_tee(a: &KeeperArgs, podvm: &Path, vm: &PodVm, digest: &[u8]) -> anyhow::Result<Tee> {
    if matches!(a.tee.as_str(), "snp" | "tdx") && vm.arch != coffer_podvm::build::Arch::X86_64 {
        bail!(
            "--tee {}: an x86-64 TEE; this pod VM is for {}",
            a.tee,
            vm.arch.name()
        );
    }
    let firmware = |name: &str| -> anyhow::Result<PathBuf> {
        let f = a.firmware.clone().unwrap_or_else(|| podvm.join(name));
        if !f.is_file() {
            bail!(
                "--tee {}: no firmware at {} (build the pod VM with `coffer podvm build --tee {} --firmware FILE`, or pass --firmware)",
                a.tee,
                f.display(),
                a.tee
            );
        }
        Ok(f)
    };
    Ok(match a.tee.as_str() {
        "emulated" => Tee::Emulated,
        "snp" => {
            let mut host_data = [0u8; 32];
            host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(digest, 32));
            Tee::SevSnp {
                firmware: firmware(coffer_podvm::FIRMWARE_SNP)?,
                host_data,
                cpu: a
                    .snp_cpu
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--snp-cpu: {e}"))?,
            }
        }
        "tdx" => {
            let mut mrconfigid = [0u8; 48];
            mrconfigid.copy_from_slice(&coffer_wire::binding::fit_report_data(digest, 48));
            Tee::Tdx {
                firmware: firmware(coffer_podvm::FIRMWARE_TDX)?,
                mrconfigid,
            }
        }
        "se" => {
            match (vm.arch, vm.se_image.clone()) {
                (coffer_podvm::build::Arch::S390x, Some(image)) => Tee::Se { image },
                (coffer_podvm::build::Arch::S390x, None) => bail!(
                    "--tee se: the pod VM has no Secure Execution image (build it with `coffer podvm build --arch s390x --tee se --host-key-document …`)"
                ),
                _ => bail!("--tee se (IBM Secure Execution) runs an s390x pod VM; this one is for x86-64"),
            }
        }
        other => bail!("--tee {other}: use emulated, snp, tdx or se"),
    })
}

/// Serves the emulated PSP to this VM alone on the unix socket `psp_chan` (QEMU connects), with
/// the launch measurement of `vm` and HOST_DATA.
pub(crate) fn start_emulated_psp(
    a: &KeeperArgs,
    vm: &PodVm,
    host_data: [u8; 32],
    psp_chan: &Path,
) -> anyhow::Result<()> {
    let mut psp = coffer_psp::EmulatedPsp::load_or_generate(&a.psp_dir)?;
    let psp_listener = std::os::unix::net::UnixListener::bind(psp_chan)
        .with_context(|| format!("cannot listen on {}", psp_chan.display()))?;
    // The launch measurement hashes the kernel and the initramfs (about 100 MB): it is
    // computed while the VM starts, and the emulated PSP answers nothing before it has it
    // (the guest asks for its first report seconds later).
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("coffer-psp".into())
        .spawn(move || {
            let measured = match vm.measurement() {
                Ok(m) => m,
                Err(e) => {
                    // The files were there a moment ago: without a measurement the guest
                    // could never attest, so the sandbox ends now, saying why.
                    tracing::error!(error = %e, "cannot measure the pod VM; stopping it");
                    std::process::exit(1);
                }
            };
            tracing::info!(measurement = %hex::encode(measured), "emulated launch measurement");
            psp.set_launch(coffer_psp::Launch {
                measurement: measured,
                host_data,
                ..coffer_psp::Launch::default()
            });
            coffer_psp::channel::serve(Arc::new(psp), psp_listener)
        })
        .context("cannot start the emulated PSP")?;
    Ok(())
}

/// Serves the agent API on `agent.sock` in `dir` (renamed into place once it listens), each
/// connection a new stream of the host–guest channel.
pub(crate) fn serve_agent_sock(dir: &Path, opener: mux::Opener) -> anyhow::Result<()> {
    let sock = dir.join("agent.sock");
    let tmp = dir.join("agent.sock.tmp");
    let api = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::rename(&tmp, &sock)?;
    tokio::spawn(async move {
        loop {
            let mut c = match api.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    coffer_agent::egress::after_accept_error(&e).await;
                    continue;
                }
            };
            let opener = opener.clone();
            tokio::spawn(async move {
                match opener.open().await {
                    Ok(mut s) => {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                    Err(e) => tracing::info!(error = %e, "the agent channel is gone"),
                }
            });
        }
    });
    Ok(())
}

/// Runs the pod VM until it ends (or the keeper is asked to stop).
pub(crate) async fn serve(
    a: &KeeperArgs,
    podvm: &Path,
    text: &str,
    digest: &[u8],
) -> anyhow::Result<()> {
    let vm = PodVm::open(podvm)?;
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(digest, 32));
    let tee = launch_tee(a, podvm, &vm, digest)?;
    let psp_chan = a.dir.join("psp-chan.sock");
    if matches!(tee, Tee::Emulated) {
        start_emulated_psp(a, &vm, host_data, &psp_chan)?;
    }

    let agent_chan = a.dir.join("agent-chan.sock");
    let chan = tokio::net::UnixListener::bind(&agent_chan)
        .with_context(|| format!("cannot listen on {}", agent_chan.display()))?;
    let scratch = a.dir.join("scratch.img");
    std::fs::File::create(&scratch)
        .and_then(|f| f.set_len(a.scratch_mib << 20))
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    // The pod network, as the CNI configured it in the pod's namespace.
    let t = std::time::Instant::now();
    let podnet = match &a.pod_netns {
        Some(ns) => {
            let ns = ns.clone();
            Some(tokio::task::spawn_blocking(move || PodNetwork::read(&ns)).await??)
        }
        None => None,
    };
    let read_ms = t.elapsed().as_millis() as u64;
    // The pod's resolver, for the guest's SetNetwork (read now: a bad path fails before boot).
    let resolv = match (&podnet, &a.resolv_conf) {
        (Some(_), Some(p)) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the pod's resolver {}", p.display()))?,
        ),
        _ => None,
    };
    let config = a.dir.join("launch.json");
    let json = serde_json::to_vec(&coffer_podvm::remote::LaunchConfig {
        initdata: text.to_string(),
        plain_http: a.plain_http,
        tee: a.tee.clone(),
        network: if podnet.is_some() { "pod" } else { "none" }.into(),
        remote: None,
    })?;
    // An s390x machine has no fw_cfg: the configuration travels on a disk of its own.
    std::fs::write(
        &config,
        match vm.arch {
            coffer_podvm::build::Arch::X86_64 => json,
            coffer_podvm::build::Arch::S390x => coffer_podvm::launch::config_disk(&json),
        },
    )?;
    let native = match vm.arch {
        coffer_podvm::build::Arch::X86_64 => cfg!(target_arch = "x86_64"),
        coffer_podvm::build::Arch::S390x => cfg!(target_arch = "s390x"),
    };
    let accel = match a.accel.as_str() {
        "kvm" if !native => bail!(
            "--accel kvm: this pod VM is for {}, which this host's KVM cannot run; use --accel tcg or auto",
            vm.arch.name()
        ),
        "kvm" if kvm_is_pvm(Path::new("/sys/module")) => bail!(
            "--accel kvm: this host's KVM is PVM (kvm_pvm), which cannot run the pod VM's kernel; use --accel tcg or auto"
        ),
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        "auto" if !native => {
            tracing::info!(arch = vm.arch.name(), "a pod VM for another machine: it runs under TCG");
            Accel::Tcg
        }
        // An IBM Z host (the probe below boots an x86 reset vector): KVM where /dev/kvm opens.
        "auto" if vm.arch != coffer_podvm::build::Arch::X86_64 => {
            match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
                Ok(_) => Accel::Kvm,
                Err(why) => {
                    tracing::info!(%why, "no usable KVM here: the pod VM runs under TCG");
                    Accel::Tcg
                }
            }
        }
        "auto" => match kvm_probe(
            Path::new(QEMU),
            Path::new("/dev/kvm"),
            Path::new("/sys/module"),
            &a.dir,
        )
        .await
        {
            Ok(()) => Accel::Kvm,
            Err(why) => {
                tracing::info!(%why, "no usable KVM here: the pod VM runs under TCG");
                Accel::Tcg
            }
        },
        other => bail!("--accel {other}: use kvm, tcg or auto"),
    };
    if accel == Accel::Tcg && !matches!(tee, Tee::Emulated) {
        bail!(
            "--tee {}: a hardware TEE runs only under KVM on a host with that TEE; this launch would use TCG",
            a.tee
        );
    }
    tracing::info!(?accel, "starting the pod VM");
    let launch = Launch {
        vm,
        scratch,
        agent_channel: agent_chan,
        psp_channel: psp_chan,
        console: a.dir.join("agent.log"),
        config,
        memory_mib: a.memory,
        cpus: a.vcpus(accel == Accel::Kvm),
        accel,
        tee,
        nics: podnet.as_ref().map(PodNetwork::nics).unwrap_or_default(),
        qmp: Some(a.dir.join(crate::dir::QMP_SOCK)),
    };
    let spawned = std::time::Instant::now();
    let qemu_bin = launch.qemu_binary();
    // On a pod network QEMU runs in the pod's namespace, where it makes its taps.
    let mut cmd = match &podnet {
        Some(net) => {
            let mut c = tokio::process::Command::new("nsenter");
            c.arg(format!("--net={}", net.netns.display()))
                .arg("--")
                .arg(qemu_bin);
            c
        }
        None => tokio::process::Command::new(qemu_bin),
    };
    cmd.args(launch.qemu_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(a.dir.join("qemu.log"))?)
        .kill_on_drop(true);
    die_with_keeper(&mut cmd);
    let mut qemu = cmd.spawn().with_context(|| {
        format!(
            "cannot start {qemu_bin} (Debian: apt-get install {})",
            qemu_bin.trim_end_matches("_64")
        )
    })?;
    // The taps take the pod's traffic once QEMU made them; the redirection is removed when
    // the keeper ends (and goes with the pod's namespace if the keeper is killed).
    let t = std::time::Instant::now();
    let _plugged = match podnet.clone() {
        Some(net) => {
            let plugged = tokio::task::spawn_blocking(move || {
                net.connect(Duration::from_secs(30)).map(|()| Plugged(net))
            })
            .await?;
            match plugged {
                Ok(p) => Some(p),
                Err(e) => {
                    stop(&mut qemu).await?;
                    return Err(e.context(format!(
                        "cannot plug the pod network into the VM ({})",
                        qemu_error(&a.dir)
                    )));
                }
            }
        }
        None => None,
    };
    let plug_ms = t.elapsed().as_millis() as u64;

    let conn = tokio::select! {
        c = chan.accept() => c?.0,
        s = qemu.wait() => bail!("QEMU exited ({s:?}): {}", qemu_error(&a.dir)),
    };
    let (opener, inbound) = mux::start(conn, mux::Side::Host);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    // On a pod network the guest's traffic is its own: no forwarding on the host.
    let egress = podnet.is_none().then(|| a.dir.join("egress.log"));
    tokio::spawn(guest_streams(inbound, egress, ready_tx));

    let watch = owner_gone(a.watch_stdin);
    tokio::pin!(watch);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Until the agent serves, nothing is accepted on agent.sock (it does not exist yet); a
    // guest that does not get there in the bound is stopped, with its console kept.
    let bound = a.ready_bound(accel == Accel::Kvm);
    tokio::select! {
        _ = tokio::time::sleep(bound) => {
            stop(&mut qemu).await?;
            bail!(
                "the pod VM's agent did not become ready within {}s ({accel:?}); its console is {}",
                bound.as_secs(),
                a.dir.join("agent.log").display()
            )
        }
        r = ready_rx.recv() => if r.is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(5), qemu.wait()).await;
            let _ = qemu.start_kill();
            bail!("the pod VM's agent did not start: {}", guest_error(&a.dir))
        },
        s = qemu.wait() => bail!(
            "the pod VM stopped before its agent served ({s:?}): {} {}",
            qemu_error(&a.dir),
            guest_error(&a.dir)
        ),
        _ = &mut watch => { tracing::info!("the launcher went away"); return stop(&mut qemu).await }
        _ = term.recv() => return stop(&mut qemu).await,
        _ = int.recv() => return stop(&mut qemu).await,
    }
    if let Some(net) = &podnet {
        // The guest takes the pod's addresses, routes and resolver before anything else may
        // ask it for work.
        let configured = async {
            coffer_agent::api::connect_mux(opener.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach the agent: {e}"))?
                .set_network(net.request(resolv.as_deref()))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
        };
        let t = std::time::Instant::now();
        if let Err(e) = configured.await {
            stop(&mut qemu).await?;
            return Err(e.context("the pod VM's agent did not take the pod network"));
        }
        // What networking adds to the start: reading the CNI's namespace, plugging the taps
        // in, the guest's SetNetwork.
        tracing::info!(
            ms = spawned.elapsed().as_millis() as u64,
            interfaces = net.links.len(),
            read_ms,
            plug_ms,
            configure_ms = t.elapsed().as_millis() as u64,
            "the pod VM is on the pod network"
        );
    }
    serve_agent_sock(&a.dir, opener)?;
    // With the guest's own marks (the kernel's uptime when the agent started and when it had
    // booted), the phases of a start: QEMU and firmware, kernel and initramfs, the agent's boot.
    tracing::info!(
        ms = spawned.elapsed().as_millis() as u64,
        "the agent serves"
    );
    tokio::select! {
        s = qemu.wait() => {
            tracing::info!(status = ?s, last = %guest_error(&a.dir), "the pod VM stopped");
            return Ok(());
        }
        _ = &mut watch => tracing::info!("the launcher went away"),
        _ = term.recv() => tracing::info!("asked to stop"),
        _ = int.recv() => tracing::info!("interrupted"),
    }
    stop(&mut qemu).await
}

/// The pod network plugged into the VM; unplugged when dropped.
struct Plugged(PodNetwork);

impl Drop for Plugged {
    fn drop(&mut self) {
        self.0.disconnect();
    }
}

/// Serves the streams the guest opens: egress (SOCKS5, logged to `log`; refused without one)
/// and the ready notice.
pub(crate) async fn guest_streams(
    mut inbound: tokio::sync::mpsc::UnboundedReceiver<mux::MuxStream>,
    log: Option<std::path::PathBuf>,
    ready: tokio::sync::mpsc::Sender<()>,
) {
    while let Some(mut s) = inbound.recv().await {
        let log = log.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut tag = [0u8; 1];
            if s.read_exact(&mut tag).await.is_err() {
                return;
            }
            match tag[0] {
                mux::GUEST_READY => {
                    let _ = ready.send(()).await;
                }
                mux::GUEST_EGRESS => match log {
                    Some(log) => {
                        if let Err(e) = forward(s, &log).await {
                            tracing::info!(error = %e, "a forwarded connection failed");
                        }
                    }
                    None => tracing::warn!(
                        "the guest asked for the host's forwarder, which a VM on the pod network does not have"
                    ),
                },
                t => tracing::warn!(tag = t, "the guest opened a stream of unknown kind"),
            }
        });
    }
}

pub(crate) async fn stop(qemu: &mut tokio::process::Child) -> anyhow::Result<()> {
    let _ = qemu.start_kill();
    let _ = qemu.wait().await;
    Ok(())
}

/// The last line QEMU wrote to its error output.
fn qemu_error(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
    last_line(&log).to_string()
}

/// Why the guest stopped: the agent's last error on the console, else the console's last line.
fn guest_error(dir: &Path) -> String {
    let console = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    console
        .lines()
        .rev()
        .find(|l| l.starts_with("coffer-agent: "))
        .unwrap_or_else(|| last_line(&console))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn pvm_without_a_hardware_kvm_is_not_taken_for_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        assert!(!kvm_is_pvm(m), "no KVM modules at all");
        std::fs::create_dir(m.join("kvm")).unwrap();
        std::fs::create_dir(m.join("kvm_pvm")).unwrap();
        assert!(kvm_is_pvm(m));
        std::fs::create_dir(m.join("kvm_intel")).unwrap();
        assert!(
            !kvm_is_pvm(m),
            "a hardware KVM beside PVM is left to the probe"
        );
    }

    #[tokio::test]
    async fn the_guests_http_clients_reach_the_host_through_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let (host_io, guest_io) = tokio::io::duplex(64 * 1024);
        let (_host, inbound) = mux::start(host_io, mux::Side::Host);
        let (ready_tx, _ready_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(guest_streams(
            inbound,
            Some(dir.path().join("egress.log")),
            ready_tx,
        ));
        let (guest, _) = mux::start(guest_io, mux::Side::Guest);
        let proxy = coffer_agent::egress::start(coffer_agent::egress::Channel::Mux(guest))
            .await
            .unwrap();
        // A web server on the host answering every request of a kept-alive connection.
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = c.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&seen[..end]).to_string();
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length: ")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            if seen.len() < end + 4 + len {
                                break;
                            }
                            seen.drain(..end + 4 + len);
                            let body = format!("{len}");
                            let _ = c
                                .write_all(
                                    format!(
                                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await;
                        }
                    }
                });
            }
        });
        let client = coffer_kbs_client::http_client_via(None, Some(&proxy)).unwrap();
        for size in [10usize, 300_000, 7] {
            let r = client
                .post(format!("http://{addr}/x"))
                .body(vec![b'a'; size])
                .send()
                .await
                .unwrap();
            assert_eq!(r.text().await.unwrap(), size.to_string());
        }
        let log = std::fs::read_to_string(dir.path().join("egress.log")).unwrap();
        assert!(log.contains(&addr.to_string()), "{log}");
    }
}
