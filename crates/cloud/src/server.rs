//! The daemon: the local API and the reconciler.
//!
//! A VM is made only for a sandbox that lives ([`crate::lease`]) and is deleted once it does not:
//! by its keeper's DeleteVm at teardown, else by the reconciler, which runs at start and every
//! `reconcile_secs`. So a keeper or daemon killed at any point of a create leaves no VM running
//! past the next reconcile: the VM is tagged before it runs, and its sandbox's lock is gone.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use coffer_podvm::remote::LaunchConfig;
use tonic::{Request, Response, Status};

use crate::{
    api::{
        cloud_server::{Cloud, CloudServer},
        CreateVmRequest, DeleteVmRequest, DeleteVmResponse, ListVmsRequest, ListVmsResponse,
    },
    provider::{check_size, check_spec},
    CloudError, Config, Provider, Vm, VmSpec,
};

/// The daemon's state.
pub struct Daemon {
    config: Config,
    provider: Arc<dyn Provider>,
    /// Pods whose create is under way (the reconciler leaves them alone).
    creating: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

fn status(e: CloudError) -> Status {
    match &e {
        CloudError::Invalid(_) => Status::invalid_argument(e.to_string()),
        CloudError::Capacity { .. } => Status::resource_exhausted(e.to_string()),
        CloudError::Provider { .. } => Status::unavailable(e.to_string()),
    }
}

fn to_api(vm: Vm, provider: &str) -> crate::api::Vm {
    crate::api::Vm {
        id: vm.id,
        pod: vm.pod,
        sandbox_dir: vm.sandbox_dir.display().to_string(),
        address: vm.address.map(|a| a.to_string()).unwrap_or_default(),
        instance_type: vm.instance_type,
        provider: provider.into(),
        console: vm.console.unwrap_or_default(),
        running: vm.running,
    }
}

/// Removes a pod from the creating set when dropped: it travels with the provider's call, so a
/// caller that goes away (a cancelled request) does not release the pod while that call still
/// runs — a second create of the pod, or the reconciler, would race it and could leave two VMs.
struct Creating(Arc<Mutex<HashSet<String>>>, String);

impl Drop for Creating {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

impl Daemon {
    /// The daemon for `config` over `provider`.
    pub fn new(config: Config, provider: Arc<dyn Provider>) -> Arc<Self> {
        Arc::new(Self {
            config,
            provider,
            creating: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Provider) -> Result<T, CloudError> + Send + 'static,
    ) -> Result<T, CloudError> {
        let p = self.provider.clone();
        tokio::task::spawn_blocking(move || f(p.as_ref()))
            .await
            .map_err(|e| CloudError::Provider {
                provider: "coffer-cloud",
                why: e.to_string(),
            })?
    }

    /// Deletes every VM of this node whose sandbox no longer lives; returns how many.
    pub async fn reconcile(&self) -> Result<usize, CloudError> {
        let vms = self.blocking(|p| p.list()).await?;
        let mut deleted = 0;
        for vm in vms {
            let creating = self
                .creating
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&vm.pod);
            if creating || crate::lease::alive(&vm.sandbox_dir) {
                continue;
            }
            tracing::warn!(pod = %vm.pod, id = %vm.id, sandbox = %vm.sandbox_dir.display(), "deleting a VM whose sandbox is gone");
            let pod = vm.pod.clone();
            match self.blocking(move |p| p.delete(&pod)).await {
                Ok(_) => deleted += 1,
                Err(e) => {
                    tracing::warn!(pod = %vm.pod, error = %e, "cannot delete an orphan VM; retrying at the next reconcile")
                }
            }
        }
        match self.blocking(|p| p.tidy()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed what no VM uses any more"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tidy the provider's leftovers; retrying at the next reconcile")
            }
        }
        Ok(deleted)
    }

    /// Creates the VM for a request, after every check that needs no provider call.
    pub async fn create(&self, r: CreateVmRequest) -> Result<Vm, CloudError> {
        let instance = self
            .config
            .instance_type(&r.instance_type, r.memory_mib, r.vcpus)
            .map_err(CloudError::Invalid)?
            .clone();
        check_size(
            r.launch_config.len(),
            self.provider.launch_limit(),
            self.provider.name(),
        )?;
        let launch: LaunchConfig = serde_json::from_slice(&r.launch_config).map_err(|e| {
            CloudError::Invalid(format!("the launch configuration is not valid: {e}"))
        })?;
        let spec = VmSpec {
            pod: r.pod.clone(),
            sandbox_dir: PathBuf::from(&r.sandbox_dir),
            instance,
            launch,
            psp_socket: (!r.psp_socket.is_empty()).then(|| PathBuf::from(&r.psp_socket)),
        };
        check_spec(&spec)?;
        if !crate::lease::alive(&spec.sandbox_dir) {
            return Err(CloudError::Invalid(format!(
                "no live sandbox at {}: a VM is made only for a sandbox whose keeper holds its keeper.lock",
                spec.sandbox_dir.display()
            )));
        }
        if !self
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.pod.clone())
        {
            return Err(CloudError::Invalid(format!(
                "a create for pod {} is under way",
                spec.pod
            )));
        }
        let creating = Creating(self.creating.clone(), spec.pod.clone());
        let t = std::time::Instant::now();
        let vm = self
            .blocking(move |p| {
                let _creating = creating;
                p.create(&spec)
            })
            .await?;
        tracing::info!(pod = %vm.pod, id = %vm.id, address = ?vm.address, instance_type = %vm.instance_type, ms = t.elapsed().as_millis() as u64, "VM created");
        Ok(vm)
    }

    /// Serves the API on the unix socket `socket` (mode 0600) after a first reconcile, and
    /// reconciles every `reconcile_secs`, until the process ends.
    pub async fn serve(self: Arc<Self>, socket: &Path) -> anyhow::Result<()> {
        match self.reconcile().await {
            Ok(n) => tracing::info!(deleted = n, "first reconcile done"),
            Err(e) => tracing::warn!(error = %e, "the first reconcile failed"),
        }
        let me = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(me.config.reconcile_secs);
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = me.reconcile().await {
                    tracing::warn!(error = %e, "reconcile failed");
                }
            }
        });
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = socket.with_extension("sock.tmp");
        let _ = std::fs::remove_file(&tmp);
        let listener = tokio::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        std::fs::rename(&tmp, socket)?;
        tracing::info!(socket = %socket.display(), provider = self.provider.name(), cluster = %self.config.cluster, node = %self.config.node, "coffer-cloud serves");
        tonic::transport::Server::builder()
            .add_service(CloudServer::new(Service(self)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await?;
        Ok(())
    }
}

/// The gRPC service over the daemon.
struct Service(Arc<Daemon>);

#[tonic::async_trait]
impl Cloud for Service {
    async fn create_vm(
        &self,
        request: Request<CreateVmRequest>,
    ) -> Result<Response<crate::api::Vm>, Status> {
        let r = request.into_inner();
        let pod = r.pod.clone();
        match self.0.create(r).await {
            Ok(vm) => Ok(Response::new(to_api(vm, self.0.provider.name()))),
            Err(e) => {
                tracing::warn!(%pod, error = %e, "create refused or failed");
                Err(status(e))
            }
        }
    }

    async fn delete_vm(
        &self,
        request: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        let pod = request.into_inner().pod;
        let p = pod.clone();
        let deleted = self
            .0
            .blocking(move |prov| prov.delete(&p))
            .await
            .map_err(status)?;
        tracing::info!(%pod, deleted, "VM deleted");
        Ok(Response::new(DeleteVmResponse { deleted }))
    }

    async fn list_vms(
        &self,
        _: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        let vms = self.0.blocking(|p| p.list()).await.map_err(status)?;
        let name = self.0.provider.name();
        Ok(Response::new(ListVmsResponse {
            vms: vms.into_iter().map(|v| to_api(v, name)).collect(),
        }))
    }
}
