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
use coffer_cloud::api::{CreateVmRequest, DeleteVmRequest, ListVmsRequest};
use coffer_podvm::{
    mux,
    remote::{client_config, Credentials, LaunchConfig, AGENT_TCP_PORT},
    PodVm,
};
use rustls::pki_types::ServerName;

use crate::{
    lifetime::owner_gone,
    podnet::PodNetwork,
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
    // The emulated TEE's PSP is the keeper's, reached over a libvirt channel; a hardware TEE's
    // launch (SEV-SNP: HOST_DATA, set by the provider from the initdata) has none.
    let vm = PodVm::open(podvm)?;
    let psp_chan = match a.tee.as_str() {
        "emulated" => {
            let mut host_data = [0u8; 32];
            host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(digest, 32));
            let psp_chan = a.dir.join("psp-chan.sock");
            start_emulated_psp(a, &vm, host_data, &psp_chan)?;
            Some(psp_chan)
        }
        "snp" => None,
        other => bail!(
            "--tee {other}: peer pods launch SEV-SNP (where the provider has it) or the emulated TEE"
        ),
    };
    let mut client = coffer_cloud::client::connect(cloud)
        .await
        .with_context(|| format!("cannot reach coffer-cloud at {}", cloud.display()))?;
    let served = run(a, &mut client, psp_chan.as_deref(), text).await;
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
    psp_chan: Option<&Path>,
    text: &str,
) -> anyhow::Result<()> {
    // The pod network, as the CNI configured it in the pod's namespace (read first: a bad one
    // fails before a VM is made).
    let podnet = match &a.pod_netns {
        Some(ns) => {
            let ns = ns.clone();
            Some(tokio::task::spawn_blocking(move || PodNetwork::read(&ns)).await??)
        }
        None => None,
    };
    let resolv = match (&podnet, &a.resolv_conf) {
        (Some(_), Some(p)) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the pod's resolver {}", p.display()))?,
        ),
        _ => None,
    };
    let creds = Credentials::generate(&a.name)?;
    let launch = serde_json::to_vec(&LaunchConfig {
        initdata: text.to_string(),
        plain_http: a.plain_http,
        tee: a.tee.clone(),
        // The pod network comes over a tunnel the agent makes when the keeper says so.
        network: if podnet.is_some() { "pod" } else { "none" }.into(),
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
            psp_socket: match psp_chan {
                Some(p) => std::path::absolute(p)?.display().to_string(),
                None => String::new(),
            },
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
                // Short: until the guest's interface has its address, nothing answers the
                // connection (no ARP reply) and it would hang until this bound.
                let tcp = tokio::time::timeout(
                    Duration::from_millis(500),
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
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    // A VM that stops while it boots (its agent failed) ends the wait at once, with its console.
    let mut watcher = client.clone();
    let vm_id = created.id.clone();
    let stopped = async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let Ok(list) = watcher.list_vms(ListVmsRequest {}).await else {
                continue;
            };
            match list.into_inner().vms.iter().find(|v| v.id == vm_id) {
                Some(v) if v.running => {}
                Some(_) => return "stopped",
                None => return "gone",
            }
        }
    };
    let tls = tokio::select! {
        t = connect => t,
        how = stopped => bail!(
            "the peer pod's VM {} before its agent answered at {addr}; {}",
            how,
            console(&created.console)
        ),
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
    // The pod's interface goes to the VM over VXLAN, from this end of the connection (the
    // node's address the VM reaches) to the VM's; one VNI per VM address.
    let mut tunnel = None;
    let _tunnelled = match podnet {
        Some(mut net) => {
            let (IpAddr::V4(node), IpAddr::V4(vm_ip)) = (tls.get_ref().0.local_addr()?.ip(), ip)
            else {
                bail!("a peer pod's pod network needs IPv4 between the node and the VM ({ip})");
            };
            let vni = (u32::from(vm_ip) & 0xff_ffff).max(1);
            let made =
                tokio::task::spawn_blocking(move || net.tunnel(vni, vm_ip).map(|t| (net, t)))
                    .await?;
            let (net, mut t) = made.context("cannot carry the pod network to the VM")?;
            t.remote = node.to_string();
            tracing::info!(vni, %node, vm = %vm_ip, "the pod network is tunnelled to the VM");
            tunnel = Some((net.request(resolv.as_deref()), t));
            Some(Tunnelled(net))
        }
        None => None,
    };
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
    if let Some((mut request, vxlan)) = tunnel {
        // The guest makes its end of the tunnel and takes the pod's addresses, routes and
        // resolver before anything else may ask it for work.
        request.tunnels = vec![vxlan];
        coffer_agent::api::connect_mux(opener.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the agent: {e}"))?
            .set_network(request)
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "the peer pod's agent did not take the pod network: {}",
                    s.message()
                )
            })?;
        tracing::info!(
            ms = t.elapsed().as_millis() as u64,
            "the peer pod is on the pod network"
        );
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

/// A pod network tunnelled to the VM; the tunnel and its redirection are removed when dropped.
struct Tunnelled(PodNetwork);

impl Drop for Tunnelled {
    fn drop(&mut self) {
        self.0.untunnel();
    }
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
