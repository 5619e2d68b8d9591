//! The keeper of a peer pod (`--cloud SOCKET`): the pod VM is created by `coffer-cloud` through
//! its provider, not started here, and its agent is reached over the network.
//!
//! The keeper makes the channel's keys for this VM alone (`coffer_podvm::remote::Credentials`),
//! hands the VM its part in the launch configuration through `coffer-cloud`, and keeps its own
//! key in memory. It then connects to the agent's TCP port with mutual TLS (each side accepts
//! only the other's certificate) and runs the host–guest multiplexer over that connection, so
//! everything after is as for a local pod VM ([`crate::vm`]): the ready notice, the guest's
//! egress through the keeper's logged forwarder, the agent API on `agent.sock`. The emulated
//! TEE's PSP is served on `psp-chan.sock`, which a VM on a local libvirt host connects to.
//!
//! The VM is deleted when the sandbox ends, however it ends; a keeper killed outright leaves it
//! to `coffer-cloud`'s reconciler, which deletes VMs whose keeper no longer holds
//! `keeper.lock`. A lost connection to the agent ends the sandbox (and the agent powers its VM
//! off).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use coffer_cloud::api::{CreateVmRequest, DeleteVmRequest};
use coffer_podvm::{
    mux,
    remote::{client_config, Credentials, LaunchConfig, AGENT_TCP_PORT},
    PodVm,
};
use rustls::pki_types::ServerName;

use crate::{
    lifetime::owner_gone,
    vm::{guest_streams, serve_agent_sock, start_emulated_psp},
    KeeperArgs,
};

/// Runs the peer pod until it ends (or the keeper is asked to stop), then deletes its VM.
pub(crate) async fn serve(
    a: &KeeperArgs,
    podvm: &Path,
    cloud: &Path,
    text: &str,
    digest: &[u8],
) -> anyhow::Result<()> {
    if a.tee != "emulated" {
        bail!(
            "--tee {}: peer pods launch the emulated TEE only for now (the providers' confidential VM options are not built yet)",
            a.tee
        );
    }
    let vm = PodVm::open(podvm)?;
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(digest, 32));
    let psp_chan = a.dir.join("psp-chan.sock");
    start_emulated_psp(a, &vm, host_data, &psp_chan)?;
    let mut client = coffer_cloud::client::connect(cloud)
        .await
        .with_context(|| format!("cannot reach coffer-cloud at {}", cloud.display()))?;
    let served = run(a, &mut client, &psp_chan, text).await;
    // However the sandbox ended, its VM goes (the reconciler retries if this fails).
    let deleted = tokio::time::timeout(
        Duration::from_secs(120),
        client.delete_vm(DeleteVmRequest {
            pod: a.name.clone(),
        }),
    )
    .await;
    match deleted {
        Ok(Ok(_)) => tracing::info!("the peer pod's VM is deleted"),
        Ok(Err(s)) => {
            tracing::warn!(error = %s.message(), "cannot delete the peer pod's VM; coffer-cloud's reconciler will")
        }
        Err(_) => {
            tracing::warn!("deleting the peer pod's VM timed out; coffer-cloud's reconciler will")
        }
    }
    served
}

async fn run(
    a: &KeeperArgs,
    client: &mut coffer_cloud::client::Client,
    psp_chan: &Path,
    text: &str,
) -> anyhow::Result<()> {
    let creds = Credentials::generate(&a.name)?;
    let launch = serde_json::to_vec(&LaunchConfig {
        initdata: text.to_string(),
        plain_http: a.plain_http,
        tee: a.tee.clone(),
        network: "none".into(),
        remote: Some(creds.remote_agent()),
    })?;
    let dir = std::path::absolute(&a.dir)?;
    let t = Instant::now();
    let created = client
        .create_vm(CreateVmRequest {
            pod: a.name.clone(),
            sandbox_dir: dir.display().to_string(),
            instance_type: String::new(),
            memory_mib: a.memory,
            vcpus: a.cpus,
            launch_config: launch,
            psp_socket: std::path::absolute(psp_chan)?.display().to_string(),
            pod_namespace: String::new(),
            pod_name: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("coffer-cloud did not create the VM: {}", s.message()))?
        .into_inner();
    let ip: IpAddr = created.address.parse().with_context(|| {
        format!(
            "coffer-cloud gave VM {} no usable address ({:?})",
            created.id, created.address
        )
    })?;
    tracing::info!(id = %created.id, provider = %created.provider, instance_type = %created.instance_type, %ip, ms = t.elapsed().as_millis() as u64, "the peer pod's VM is created");
    if !created.console.is_empty() {
        // Where to look when it does not come up (on the provider's host).
        std::fs::write(a.dir.join("console.path"), &created.console).ok();
    }

    let watch = owner_gone(a.watch_stdin);
    tokio::pin!(watch);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let bound = a.ready_bound(false);
    let addr = SocketAddr::new(ip, AGENT_TCP_PORT);
    let config = client_config(&creds.keeper, &creds.agent.cert)?;
    drop(creds);
    let connect = async {
        let connector = tokio_rustls::TlsConnector::from(config);
        loop {
            let tried = async {
                let tcp = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .map_err(|_| std::io::Error::other("connect timed out"))??;
                tcp.set_nodelay(true)?;
                tokio::time::timeout(
                    Duration::from_secs(10),
                    connector.connect(ServerName::IpAddress(ip.into()), tcp),
                )
                .await
                .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
            };
            match tried.await {
                Ok(tls) => return tls,
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "the agent does not answer yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    };
    let tls = tokio::select! {
        t = connect => t,
        _ = tokio::time::sleep(bound) => bail!(
            "the peer pod's agent did not answer at {addr} within {}s; {}",
            bound.as_secs(),
            console(&created.console)
        ),
        _ = &mut watch => { tracing::info!("the launcher went away"); return Ok(()) }
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    tracing::info!(%addr, ms = t.elapsed().as_millis() as u64, "connected to the agent (mutual TLS)");
    let (opener, inbound) = mux::start(tls, mux::Side::Host);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    let ended = tokio::spawn(guest_streams(
        inbound,
        Some(a.dir.join("egress.log")),
        ready_tx,
    ));
    tokio::pin!(ended);
    tokio::select! {
        _ = tokio::time::sleep(bound) => bail!("the peer pod's agent did not become ready within {}s", bound.as_secs()),
        r = ready_rx.recv() => if r.is_none() {
            bail!("the peer pod's agent closed its channel before it served")
        },
        _ = &mut watch => { tracing::info!("the launcher went away"); return Ok(()) }
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    }
    serve_agent_sock(&a.dir, opener)?;
    tracing::info!(ms = t.elapsed().as_millis() as u64, "the agent serves");
    tokio::select! {
        _ = &mut ended => tracing::info!("the peer pod's channel ended"),
        _ = &mut watch => tracing::info!("the launcher went away"),
        _ = term.recv() => tracing::info!("asked to stop"),
        _ = int.recv() => tracing::info!("interrupted"),
    }
    Ok(())
}

/// The VM's console as the provider keeps it: its last lines where this host can read it (a
/// local libvirt host), else where it is.
fn console(path: &str) -> String {
    if path.is_empty() {
        return "the provider keeps no console".into();
    }
    match std::fs::read(path) {
        Ok(text) => {
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            format!(
                "the end of its console ({path}):\n{}",
                lines[lines.len().saturating_sub(crate::CONSOLE_LINES)..].join("\n")
            )
        }
        Err(_) => format!("its console is {path} on the provider's host"),
    }
}
