//! Containers on a real OCI runtime (`runc`): the agent pulls the image itself (coffer-image,
//! with the pull options the agent was given: signature policy, keys), writes an OCI bundle whose
//! spec comes from the image config plus the (policy-checked) request, and runs it with the
//! runtime as a child process whose output it keeps for ReadStream.
//!
//! The submodules: the bundle's spec (`spec`), the image's pull options (`pull`), processes under
//! the runtime (`runtime`) and their output buffers (`output`), and a process's stdio (`stdio`);
//! this module keeps the table of containers and their lifecycle (create, list, remove).

pub mod block;
pub mod files;
mod output;
mod pull;
mod runtime;
mod spec;
mod stdio;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use coffer_image::{ImageRef, PullOptions};
use tokio::sync::watch;

pub use pull::KbsKeys;
use runtime::Process;
pub use runtime::Stats;
pub use spec::is_termination_log;
pub use spec::{
    check_capabilities, resolve_user, spec, ALL_CAPABILITIES, DEFAULT_CAPABILITIES, DENIED_SYSCALLS,
};
pub use stdio::Chunk;

use crate::proto::CreateContainerRequest;

/// A container problem, mapped to gRPC statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Bad request (id, image reference, …).
    #[error("{0}")]
    Invalid(String),
    /// No such container.
    #[error("no container {0}")]
    NotFound(String),
    /// Already exists.
    #[error("container {0} already exists")]
    Exists(String),
    /// Image keys could not be had from the KBS (attestation or policy refused, or unreachable).
    #[error("image keys: {0}")]
    Keys(String),
    /// The image could not be pulled.
    #[error("cannot pull the image: {0}")]
    Image(#[from] coffer_image::Error),
    /// The runtime failed.
    #[error("runtime: {0}")]
    Runtime(String),
}

type Result<T> = std::result::Result<T, ContainerError>;

/// A container's state, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// The container id.
    pub id: String,
    /// The image reference it was created from.
    pub image: String,
    /// `created`, `running` or `exited`.
    pub state: &'static str,
    /// The exit status once exited.
    pub exit_status: Option<i32>,
    /// Unix seconds of creation.
    pub created: i64,
}

struct Container {
    bundle: PathBuf,
    /// Keep the init process's stdin open.
    stdin: bool,
    /// The init process has a terminal.
    tty: bool,
    image: String,
    /// The container's name in its pod (the CRI annotation), else its id.
    name: String,
    created: i64,
    /// The init process once started.
    init: Option<Arc<Process>>,
    execs: HashMap<String, Arc<Process>>,
}

/// The containers of one sandbox.
pub struct Containers {
    root: PathBuf,
    runtime: PathBuf,
    cgroup_parent: String,
    pull: PullOptions,
    kbs: Option<KbsKeys>,
    map: Mutex<HashMap<String, Container>>,
    changed: watch::Sender<u64>,
    /// The pod's network namespace once made ([`make_pod_netns`]).
    netns: Mutex<Option<PathBuf>>,
    /// A pod network namespace given from outside (the CNI's): joined, never made or let go.
    given_netns: Option<PathBuf>,
    /// One volume write at a time: two writes of one volume would race for its generation.
    volume_writes: std::sync::Arc<Mutex<()>>,
    /// The encrypted block volumes opened in this sandbox.
    block: block::BlockVolumes,
    /// The attested mesh, once set up ([`crate::mesh`]).
    mesh: tokio::sync::OnceCell<Arc<crate::mesh::Identity>>,
}

impl Drop for Containers {
    fn drop(&mut self) {
        self.release_netns();
    }
}

/// Where the sandbox's emptyDir volumes live, under the containers' root (not a container id:
/// ids have no dot).
const VOLUMES: &str = ".volumes";
/// Where the file volumes copied in from the node live ([`files`]).
const FILES: &str = ".files";
/// Where the pod's own files copied in from the node live ([`files::POD_FILES`]).
const POD_FILES: &str = ".podfiles";
/// The pod's network namespace, bound to a file (as `ip netns add` does).
const POD_NETNS: &str = ".netns";

/// Makes a network namespace with its loopback interface up and keeps it by binding it to
/// `path`: the namespace the pod's containers share (so they reach each other on localhost,
/// as a Kubernetes pod's containers do), apart from the agent's own (where a process sandbox's
/// forwarder listens).
fn make_pod_netns(path: &Path) -> Result<()> {
    let fail = |what: &str, e: String| {
        ContainerError::Runtime(format!("the pod's network namespace: {what}: {e}"))
    };
    std::fs::File::create(path).map_err(|e| fail("creating its mount point", e.to_string()))?;
    let at = path.to_path_buf();
    // The namespace is made on a thread of its own, which then ends: the agent's other
    // threads stay in theirs.
    std::thread::spawn(move || -> Result<()> {
        // SAFETY: only the network namespace is unshared (not the file table, the case that
        // makes unshare unsafe for the other threads).
        #[allow(unsafe_code)]
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .map_err(|e| fail("unshare", e.to_string()))?;
        crate::egress::loopback_up().map_err(|e| fail("loopback", e))?;
        rustix::mount::mount_bind("/proc/thread-self/ns/net", &at)
            .map_err(|e| fail("binding it", e.to_string()))
    })
    .join()
    .map_err(|_| fail("its thread", "panicked".into()))?
}

/// Removes a container's bundle: first the subPath binds under it (lazily detached, so that
/// removing the bundle can never reach into the volume they show), then the rest. When a bind
/// cannot be detached the bundle is left in place rather than risk the volume's files.
fn remove_bundle(bundle: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(bundle.join(spec::SUBPATHS)) {
        for e in entries.flatten() {
            match rustix::mount::unmount(e.path(), rustix::mount::UnmountFlags::DETACH) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(err) => {
                    return Err(std::io::Error::other(format!(
                        "cannot detach the subPath bind {}: {err}; the bundle is kept",
                        e.path().display()
                    )))
                }
            }
        }
    }
    std::fs::remove_dir_all(bundle)
}

/// The CRI annotation naming a container within its pod.
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

/// Whether `id` is a usable container (or exec, or sandbox) name: 1-64 ASCII letters, digits,
/// `-` or `_` (it becomes a path component and a cgroup name).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_id(id: &str) -> Result<()> {
    if !is_valid_id(id) {
        return Err(ContainerError::Invalid(format!(
            "container id {id:?}: use 1-64 ASCII letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Containers {
    /// Containers kept under `root` (bundles, and the runtime's state in `root/.runtime`), run
    /// by `runtime` (e.g. `runc`) in cgroups under `/coffer`, images pulled with `pull`.
    pub fn new(root: PathBuf, runtime: PathBuf, pull: PullOptions) -> Self {
        // Detached (TTY) container processes are reparented here once the runtime exits.
        crate::tty::become_subreaper();
        Self {
            root,
            runtime,
            cgroup_parent: "/coffer".into(),
            pull,
            kbs: None,
            map: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            netns: Mutex::new(None),
            given_netns: None,
            volume_writes: Default::default(),
            block: Default::default(),
            mesh: Default::default(),
        }
    }

    /// Runs the containers in network namespace `path` (the pod network the CNI configured on
    /// the node, for a process sandbox) instead of one made here.
    pub fn with_pod_netns(mut self, path: PathBuf) -> Self {
        self.given_netns = Some(path);
        self
    }

    /// The pod's network namespace, made on first use.
    fn pod_netns(&self) -> Result<PathBuf> {
        if let Some(p) = &self.given_netns {
            return Ok(p.clone());
        }
        let mut slot = self.netns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = &*slot {
            return Ok(p.clone());
        }
        std::fs::create_dir_all(&self.root)
            .map_err(|e| ContainerError::Runtime(format!("{}: {e}", self.root.display())))?;
        let path = self.root.join(POD_NETNS);
        make_pod_netns(&path)?;
        *slot = Some(path.clone());
        Ok(path)
    }

    /// Lets the pod's network namespace go (when the sandbox ends).
    fn release_netns(&self) {
        let mut slot = self.netns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = slot.take() {
            let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_file(&p);
        }
    }

    /// Puts the containers' cgroups under `parent` (e.g. `/coffer/<sandbox>`), so that a
    /// launcher can remove what a killed sandbox left.
    pub fn with_cgroup_parent(mut self, parent: &str) -> Self {
        self.cgroup_parent = parent.to_string();
        self
    }

    /// Takes image keys from a KBS (attesting on first need).
    pub fn with_kbs(mut self, kbs: KbsKeys) -> Self {
        self.kbs = Some(kbs);
        self
    }

    /// Makes the KBS client now, in the background, when it is made on first need
    /// ([`KbsKeys::new`]): called once the agent serves. A failure is logged here and
    /// reported again to the first request that needs the KBS.
    pub fn warm_kbs(self: &Arc<Self>) {
        if self.kbs.is_none() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(kbs) = &me.kbs {
                if let Err(e) = kbs.client().await {
                    tracing::warn!(error = %e, "the KBS client");
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the containers.
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The containers and their states, by id.
    pub fn statuses(&self) -> Vec<Status> {
        let map = self.lock();
        let mut out: Vec<Status> = map
            .iter()
            .map(|(id, c)| {
                let exit = c.init.as_ref().and_then(|p| *p.exit.borrow());
                Status {
                    id: id.clone(),
                    image: c.image.clone(),
                    state: match (&c.init, exit) {
                        (None, _) => "created",
                        (Some(_), None) => "running",
                        (Some(_), Some(_)) => "exited",
                    },
                    exit_status: exit,
                    created: c.created,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Pulls the image and writes the bundle.
    pub async fn create(&self, req: &CreateContainerRequest) -> Result<()> {
        self.create_pinned(req, None).await
    }

    /// [`Self::create`], pulling `pinned` (a `docker://…@sha256:…` reference the policy gave
    /// for this request) instead of the image the request names; the pull must yield that
    /// digest.
    pub async fn create_pinned(
        &self,
        req: &CreateContainerRequest,
        pinned: Option<&str>,
    ) -> Result<()> {
        let id = req.container_id.as_str();
        valid_id(id)?;
        if self.lock().contains_key(id) {
            return Err(ContainerError::Exists(id.into()));
        }
        check_capabilities(&req.capabilities)?;
        let image = match pinned {
            None => ImageRef::parse(&req.image)?,
            Some(p) => match ImageRef::parse(p)? {
                ImageRef::Docker(r) if r.digest().is_some() => ImageRef::Docker(r),
                _ => {
                    return Err(ContainerError::Invalid(format!(
                        "the policy pins {p:?}, which is not a registry image by digest"
                    )))
                }
            },
        };
        let bundle = self.root.join(id);
        if bundle.exists() {
            return Err(ContainerError::Exists(id.into()));
        }
        std::fs::create_dir_all(&bundle)
            .map_err(|e| ContainerError::Runtime(format!("cannot create the bundle: {e}")))?;
        let pulled = match self.pull_options().await {
            Ok(opts) => coffer_image::pull(&image, &bundle.join("rootfs"), &opts)
                .await
                .map_err(ContainerError::from),
            Err(e) => Err(e),
        };
        let report = match pulled {
            Ok(r) => r,
            Err(e) => {
                let _ = remove_bundle(&bundle);
                return Err(e);
            }
        };
        if let Some(p) = pinned {
            let digest = p.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
            if report.manifest_digest != digest && report.index_digest.as_deref() != Some(digest) {
                let _ = remove_bundle(&bundle);
                return Err(ContainerError::Invalid(format!(
                    "pulled manifest {} for {p}, not the pinned digest",
                    report.manifest_digest
                )));
            }
        }
        let rootfs = bundle.join("rootfs");
        // The node's spec names the user (runAsUser, or what containerd resolved); without
        // one, the image config's User, resolved inside the image.
        let user = match &req.user {
            Some(u) => Ok((u.uid, u.gid)),
            None => resolve_user(&rootfs, report.config["User"].as_str().unwrap_or("")),
        };
        let user = match user {
            Ok(u) => u,
            Err(e) => {
                let _ = remove_bundle(&bundle);
                return Err(e);
            }
        };
        let mut spec = spec(id, &self.cgroup_parent, &report.config, user, req);
        // The pod's containers share one network namespace.
        let netns = match self.pod_netns() {
            Ok(p) => p,
            Err(e) => {
                let _ = remove_bundle(&bundle);
                return Err(e);
            }
        };
        if let Err(e) = self.join_mesh(&netns).await {
            let _ = remove_bundle(&bundle);
            return Err(e);
        }
        if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
            for n in ns.iter_mut().filter(|n| n["type"] == "network") {
                n["path"] = serde_json::json!(netns);
            }
        }
        match spec::volume_mounts(&self.root, &bundle, req) {
            Ok(volumes) => {
                if let Some(mounts) = spec["mounts"].as_array_mut() {
                    mounts.extend(volumes);
                }
            }
            Err(e) => {
                let _ = remove_bundle(&bundle);
                return Err(e);
            }
        }
        if let Err(e) = self.block_devices(req, &mut spec).await {
            let _ = remove_bundle(&bundle);
            return Err(e);
        }
        if let Err(e) = coffer_fsutil::write_atomic(
            &bundle.join("config.json"),
            spec.to_string().as_bytes(),
            0o600,
        ) {
            let _ = remove_bundle(&bundle);
            return Err(ContainerError::Runtime(format!(
                "cannot write the spec: {e}"
            )));
        }
        self.lock().insert(
            id.into(),
            Container {
                bundle,
                stdin: req.stdin,
                tty: req.tty,
                image: req.image.clone(),
                name: req
                    .annotations
                    .get(CONTAINER_NAME)
                    .cloned()
                    .unwrap_or_else(|| id.to_string()),
                created: now(),
                init: None,
                execs: HashMap::new(),
            },
        );
        tracing::info!(container = id, image = %image, pinned = pinned.is_some(), manifest = %report.manifest_digest, "container created");
        Ok(())
    }

    /// Opens the request's block volumes ([`block`]) and gives the container each plaintext
    /// device at its path.
    async fn block_devices(
        &self,
        req: &CreateContainerRequest,
        spec: &mut serde_json::Value,
    ) -> Result<()> {
        if req.block_devices.is_empty() {
            return Ok(());
        }
        if !crate::vm::booted() {
            return Err(ContainerError::Invalid(
                "block volumes need a pod VM: a process sandbox would hand the container the node's own device".into(),
            ));
        }
        for d in &req.block_devices {
            let path = Path::new(&d.container_path);
            if !path.is_absolute()
                || path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(ContainerError::Invalid(format!(
                    "block volume {}: the container path {:?} is not an absolute path",
                    d.serial, d.container_path
                )));
            }
            let kbs = self.kbs.as_ref().ok_or_else(|| {
                ContainerError::Invalid(format!(
                    "block volume at {}: the initdata names no KBS to get its key from; a confidential pod gets no unencrypted volume",
                    d.container_path
                ))
            })?;
            let uri = kbs.config.block_volumes.get(&d.container_path).ok_or_else(|| {
                ContainerError::Invalid(format!(
                    "block volume at {}: the initdata names no key for it (cdh.toml [block_volumes]); a confidential pod gets no unencrypted volume",
                    d.container_path
                ))
            })?;
            let key = kbs.client().await?.get_resource(uri).await.map_err(|e| {
                ContainerError::Keys(format!(
                    "the key {uri} of the block volume at {}: {e}",
                    d.container_path
                ))
            })?;
            let opened = self.block.open(&d.serial, uri, &key).await?;
            drop(key);
            spec::add_block_device(spec, &d.container_path, &opened);
        }
        Ok(())
    }

    /// Puts the pod in the attested mesh when its initdata says so (once, before its first
    /// container): certificate, proxy, redirect rules in the pod's namespace `netns`.
    async fn join_mesh(&self, netns: &Path) -> Result<()> {
        let Some(kbs) = &self.kbs else { return Ok(()) };
        let Some(config) = kbs.config.mesh.clone() else {
            return Ok(());
        };
        self.mesh
            .get_or_try_init(|| async {
                let fail = |e: crate::mesh::MeshError| {
                    tracing::warn!(error = %e, "the pod cannot join the mesh");
                    ContainerError::Keys(e.to_string())
                };
                let client = kbs.client().await?;
                let identity = crate::mesh::Identity::new(config, client.as_ref())
                    .await
                    .map_err(fail)?;
                let sockets = crate::mesh::NetnsSockets::new(netns.to_path_buf()).map_err(fail)?;
                crate::mesh::start(identity.clone(), sockets, netns, &self.cgroup_parent)
                    .await
                    .map_err(fail)?;
                let source: Arc<dyn crate::mesh::CertificateSource> = client;
                tokio::spawn(identity.clone().renew_forever(source));
                Ok(identity)
            })
            .await
            .map(|_| ())
    }

    /// Closes the sandbox's block volumes (at its end: what is cached is written back).
    pub async fn close_block_volumes(&self) {
        self.block.close_all().await;
    }

    /// What the policy learns of container `id` for requests that name it: its name in the
    /// pod, and whether its stdin is kept open and it has a terminal (`None`: no such container).
    pub fn describe(&self, id: &str) -> Option<serde_json::Value> {
        self.lock()
            .get(id)
            .map(|c| serde_json::json!({"name": c.name, "stdin": c.stdin, "tty": c.tty}))
    }

    /// Stops (if needed) and removes the container and its bundle.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self
            .lock()
            .remove(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if let Some(init) = &c.init {
            let _ = self.runtime(&["delete", "--force", id]).await;
            // The runtime's child is reaped before the bundle goes.
            let mut rx = init.exit.clone();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                rx.wait_for(|s| s.is_some()),
            )
            .await;
        }
        self.changed.send_modify(|g| *g += 1);
        remove_bundle(&c.bundle)
            .map_err(|e| ContainerError::Runtime(format!("cannot remove the bundle: {e}")))?;
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    /// What the container wrote to its termination log (the kubelet's limit: the first 4096
    /// bytes), when its spec had one.
    pub fn termination_message(&self, id: &str) -> Vec<u8> {
        let Some(bundle) = self.lock().get(id).map(|c| c.bundle.clone()) else {
            return Vec::new();
        };
        let mut buf = Vec::new();
        if let Ok(f) = std::fs::File::open(bundle.join(spec::TERMINATION_LOG)) {
            use std::io::Read;
            let _ = f.take(4096).read_to_end(&mut buf);
        }
        buf
    }

    /// Replaces the sandbox's copy of file volume `volume` ([`files`]), blocking I/O on a
    /// worker thread.
    pub async fn set_volume(
        &self,
        volume: String,
        kind: String,
        files: Vec<crate::proto::VolumeFile>,
    ) -> Result<()> {
        let root = self.root.join(if kind == files::POD_FILE {
            POD_FILES
        } else {
            FILES
        });
        let writes = self.volume_writes.clone();
        tokio::task::spawn_blocking(move || {
            let _one = writes.lock().unwrap_or_else(|p| p.into_inner());
            let list: Vec<files::File<'_>> = files.iter().map(files::File::from).collect();
            files::store(&root, &volume, &kind, &list)
        })
        .await
        .map_err(|e| ContainerError::Runtime(format!("the volume writer failed: {e}")))?
    }

    /// Removes every container.
    pub async fn remove_all(&self) -> Result<()> {
        let mut first_error = None;
        for id in self.list() {
            if let Err(e) = self.remove(&id).await {
                first_error.get_or_insert(e);
            }
        }
        self.release_netns();
        first_error.map_or(Ok(()), Err)
    }

    /// The bundle directory of a container (tests, diagnostics).
    pub fn bundle(&self, id: &str) -> Option<PathBuf> {
        self.lock().get(id).map(|c| c.bundle.clone())
    }

    /// Where bundles live.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
