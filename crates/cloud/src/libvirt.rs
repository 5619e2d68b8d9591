//! The libvirt provider: pod VMs as libvirt domains, on a local or remote libvirt host (the
//! seed product's path on IBM Z KVM hosts), through the libvirt C library (`virt`).
//!
//! Everything goes through libvirt's API, so a `qemu+ssh://` host works as a local one:
//!
//! - **The pod VM image** is uploaded once into the storage pool as volumes named by its content
//!   (`coffer-podvm-<digest>-vmlinux|-initrd|-root`), then a `-ready` marker volume: an upload cut
//!   short leaves no marker and is redone.
//! - **A VM** is a persistent domain `coffer-<node>-<pod>`, *defined first*, with its tags
//!   (cluster, node, pod, sandbox directory, address, instance type) as JSON in its
//!   `<description>`; then its volumes are made (`<domain>-scratch`, `<domain>-launch.json`) and
//!   it is started. A create cut short at any point leaves a tagged domain, which the
//!   reconciler deletes with every volume of its name once its sandbox is gone.
//! - **Boot**: direct kernel boot of the image's kernel, initramfs and measured command line;
//!   the root volume read-only (serial `coffer-root`), the scratch volume (`coffer-scratch`),
//!   the launch configuration as the fw_cfg entry the agent reads, one virtio NIC on the
//!   configured bridge with an address from the configured subnet (handed to the agent in that
//!   configuration), the serial console in a file of the pool, and, for the emulated TEE, a
//!   virtio-serial channel to the keeper's emulated PSP (a local libvirt host only).
//! - **Disk boot** (`boot = "disk"`): as a cloud boots it, UEFI firmware (OVMF as a ROM) boots
//!   the image's `disk.qcow2` (`coffer_podvm::disk`: the unified kernel image on its EFI system
//!   partition, the verity root and scratch partitions), uploaded once like the other files;
//!   each VM runs on its own qcow2 overlay of it (`<domain>-disk`), deleted with it.
//! - **Old images** go at a reconcile: the volumes of an image that is not this daemon's
//!   current one, that no domain on the host and no other volume of the pool (an overlay's
//!   backing file) names, and whose upload is more than [`IMAGE_GRACE`] old (another node's
//!   daemon sharing the pool may have just uploaded it and not yet defined its domain). An image
//!   whose age the pool does not report stays.

use std::{
    io::Read,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use coffer_podvm::{
    disk::DiskFormat,
    launch::{CONFIG_FW_CFG, PSP_PORT},
    remote::StaticInterface,
    PodVm,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use virt::{
    connect::Connect, domain::Domain, storage_pool::StoragePool, storage_vol::StorageVol,
    stream::Stream,
};

use crate::{
    config::{LibvirtConfig, Subnet},
    provider::CloudError,
    Config, Provider, Vm, VmSpec,
};

const NAME: &str = "libvirt";
/// The largest launch configuration handed to a VM (fw_cfg has no small limit; this matches the
/// clouds' user-data limits).
const LAUNCH_LIMIT: usize = 64 << 10;
/// How long an image's volumes stay after their upload even when nothing names them.
pub const IMAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
/// The prefix of an image volume's name: `coffer-podvm-<16 hex digits>-<part>`.
const IMAGE_PREFIX: &str = "coffer-podvm-";

fn fail(why: impl std::fmt::Display) -> CloudError {
    CloudError::Provider {
        provider: NAME,
        why: why.to_string(),
    }
}

/// The tags of a domain (its `<description>`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Tags {
    coffer_cloud: u32,
    cluster: String,
    node: String,
    pod: String,
    sandbox_dir: PathBuf,
    address: Ipv4Addr,
    instance_type: String,
    /// SHA-256 of the launch configuration it was made with (the keeper's keys).
    #[serde(default)]
    launch: String,
}

/// What a domain's XML is made of, besides the request.
#[derive(Clone, Copy)]
struct DomainParts<'a> {
    name: &'a str,
    tags: &'a Tags,
    /// The image volumes' paths: kernel, initrd, root.
    image: &'a [String],
    launch_path: &'a str,
    mac: &'a str,
    console: &'a str,
}

/// The libvirt provider.
pub struct Libvirt {
    /// The connection, opened again when it is found gone ([`Libvirt::conn`]).
    conn: Mutex<Connect>,
    cluster: String,
    node: String,
    c: LibvirtConfig,
    subnet: Subnet,
    podvm: PodVm,
    /// Address allocation and image upload happen one at a time.
    lock: Mutex<()>,
    /// The image's content id for each kind of boot (kernel, SEV-SNP, disk), with the sizes and
    /// modification times it was computed for.
    image_id: Mutex<std::collections::HashMap<&'static str, (Vec<FileStamp>, String)>>,
}

/// A file's size and modification time: whether it changed since it was hashed.
type FileStamp = (u64, Option<std::time::SystemTime>);

impl Libvirt {
    /// Connects to the configured libvirt host and checks the pod VM.
    pub fn open(config: &Config) -> Result<Self, CloudError> {
        let c = config
            .libvirt
            .clone()
            .ok_or_else(|| CloudError::Invalid("no [libvirt] section".into()))?;
        let subnet = Subnet::parse(&c.subnet, &c.gateway).map_err(CloudError::Invalid)?;
        let podvm = PodVm::open(&c.podvm).map_err(|e| CloudError::Invalid(e.to_string()))?;
        if c.boot == "disk" {
            let disk = c.podvm.join(DiskFormat::Qcow2.file_name());
            qcow2_size(&disk).map_err(|e| {
                CloudError::Invalid(format!(
                    "libvirt.boot = \"disk\" needs {}: {e} (build it with `coffer podvm build --disk qcow2`)",
                    disk.display()
                ))
            })?;
        }
        // Errors come back as values with their message; the library's default handler would
        // also print every one (a volume looked up and not found is routine here).
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&c.uri))
            .map_err(|e| fail(format!("cannot connect to {}: {e}", c.uri)))?;
        Ok(Self {
            conn: Mutex::new(conn),
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            c,
            subnet,
            podvm,
            lock: Mutex::new(()),
            image_id: Mutex::new(Default::default()),
        })
    }

    fn domain_name(&self, pod: &str) -> String {
        format!("coffer-{}-{}", self.node, pod)
    }

    /// The connection to libvirtd, opened again when the last one is gone (libvirtd restarted,
    /// or a remote host's connection dropped). A connection learns that its peer went away only
    /// when it next talks to it: one cheap call (the library version) asks first.
    fn conn(&self) -> Result<Connect, CloudError> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if !c.is_alive().unwrap_or(false) || c.lib_version().is_err() {
            tracing::warn!(uri = %self.c.uri, "the libvirt connection is gone; connecting again");
            *c = Connect::open(Some(&self.c.uri))
                .map_err(|e| fail(format!("cannot connect to {}: {e}", self.c.uri)))?;
        }
        Ok(c.clone())
    }

    /// The storage pool, defined (a directory pool) and started if need be.
    fn pool(&self) -> Result<StoragePool, CloudError> {
        let conn = self.conn()?;
        let pool = match conn.lookup_storage_pool_by_name(&self.c.pool) {
            Ok(p) => p,
            Err(_) => {
                let xml = format!(
                    "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
                    esc(&self.c.pool),
                    esc(&self.c.pool_dir.display().to_string())
                );
                let p = conn.define_storage_pool_xml(&xml, 0).map_err(|e| {
                    fail(format!("cannot define storage pool {}: {e}", self.c.pool))
                })?;
                p.build(0)
                    .map_err(|e| fail(format!("cannot build storage pool {}: {e}", self.c.pool)))?;
                p
            }
        };
        if !pool.is_active().map_err(fail)? {
            pool.create(0)
                .map_err(|e| fail(format!("cannot start storage pool {}: {e}", self.c.pool)))?;
        }
        Ok(pool)
    }

    /// Uploads `data` (read from `from`, `len` bytes) as a new raw volume `name`.
    fn upload(
        &self,
        pool: &StoragePool,
        name: &str,
        len: u64,
        from: &mut dyn Read,
    ) -> Result<StorageVol, CloudError> {
        if let Ok(old) = pool.lookup_storage_vol_by_name(name) {
            old.delete(0)
                .map_err(|e| fail(format!("cannot replace volume {name}: {e}")))?;
        }
        let vol = StorageVol::create_xml(pool, &volume_xml(name, len, len), 0)
            .map_err(|e| fail(format!("cannot create volume {name}: {e}")))?;
        let stream = Stream::new(&self.conn()?, 0).map_err(fail)?;
        vol.upload(&stream, 0, len, 0)
            .map_err(|e| fail(format!("cannot upload volume {name}: {e}")))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        while sent < len {
            let n = from
                .read(&mut buf)
                .map_err(|e| fail(format!("reading what goes into volume {name}: {e}")))?;
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off < n {
                let w = stream
                    .send(&buf[off..n])
                    .map_err(|e| fail(format!("uploading volume {name}: {e}")))?;
                if w <= 0 {
                    return Err(fail(format!("uploading volume {name}: the stream closed")));
                }
                off += w as usize;
            }
            sent += n as u64;
        }
        stream
            .finish()
            .map_err(|e| fail(format!("uploading volume {name}: {e}")))?;
        if sent != len {
            return Err(fail(format!(
                "volume {name}: {sent} of {len} bytes uploaded"
            )));
        }
        Ok(vol)
    }

    /// The pod VM image's volumes (kernel, initrd, root) in the pool, uploaded if need be;
    /// returns their paths on the libvirt host.
    fn image(&self, pool: &StoragePool, snp: bool) -> Result<Vec<String>, CloudError> {
        let disk = self.c.podvm.join(DiskFormat::Qcow2.file_name());
        let firmware = self.c.podvm.join(coffer_podvm::FIRMWARE_SNP);
        let (kind, files): (&str, Vec<(&str, &Path)>) = if self.disk_boot() {
            ("disk", vec![("disk", &disk)])
        } else if snp {
            // TEE firmware boots the bzImage through its EFI stub (the kernel hashes are of it).
            (
                "snp",
                vec![
                    ("vmlinuz", &self.podvm.kernel),
                    ("initrd", &self.podvm.initrd),
                    ("root", &self.podvm.root),
                    ("firmware-snp", &firmware),
                ],
            )
        } else {
            (
                "kernel",
                vec![
                    ("vmlinux", &self.podvm.pvh_kernel),
                    ("initrd", &self.podvm.initrd),
                    ("root", &self.podvm.root),
                ],
            )
        };
        // The content id is hashed once per version of the files (about 80 MB).
        let stamp: Vec<FileStamp> = files
            .iter()
            .map(|(_, p)| {
                std::fs::metadata(p)
                    .map(|m| (m.len(), m.modified().ok()))
                    .map_err(|e| CloudError::Invalid(format!("pod VM {}: {e}", p.display())))
            })
            .collect::<Result<_, _>>()?;
        let mut cached = self.image_id.lock().unwrap_or_else(|p| p.into_inner());
        let id = match cached.get(kind).filter(|(s, _)| *s == stamp) {
            Some((_, id)) => id.clone(),
            None => {
                let mut h = Sha256::new();
                for (part, p) in &files {
                    h.update(part.as_bytes());
                    let mut f = std::fs::File::open(p)
                        .map_err(|e| CloudError::Invalid(format!("pod VM {}: {e}", p.display())))?;
                    std::io::copy(&mut f, &mut h)
                        .map_err(|e| CloudError::Invalid(format!("pod VM {}: {e}", p.display())))?;
                }
                h.update(self.podvm.cmdline.as_bytes());
                let id = hex::encode(&h.finalize()[..8]);
                cached.insert(kind, (stamp, id.clone()));
                id
            }
        };
        drop(cached);
        let name = |part: &str| format!("{IMAGE_PREFIX}{id}-{part}");
        let ready = name("ready");
        if pool.lookup_storage_vol_by_name(&ready).is_err() {
            tracing::info!(image = %id, pool = %self.c.pool, "uploading the pod VM image");
            for (part, path) in &files {
                let mut f = std::fs::File::open(path).map_err(fail)?;
                let len = f.metadata().map_err(fail)?.len();
                self.upload(pool, &name(part), len, &mut f)?;
            }
            StorageVol::create_xml(pool, &volume_xml(&ready, 0, 0), 0)
                .map_err(|e| fail(format!("cannot mark the image uploaded: {e}")))?;
        }
        let path = |part: &str| -> Result<String, CloudError> {
            pool.lookup_storage_vol_by_name(&name(part))
                .and_then(|v| v.path())
                .map_err(|e| fail(format!("volume {}: {e}", name(part))))
        };
        files.iter().map(|(part, _)| path(part)).collect()
    }

    /// Removes the volumes of images nothing uses (see the module's documentation); returns how
    /// many images went.
    fn tidy_images(&self) -> Result<usize, CloudError> {
        // No create of this daemon is between its upload and its domain's definition.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let pool = self.pool()?;
        let _ = pool.refresh(0);
        let volumes = pool.list_all_volumes(0).map_err(|e| {
            fail(format!(
                "cannot list the volumes of pool {}: {e}",
                self.c.pool
            ))
        })?;
        let mut images: std::collections::BTreeMap<String, Vec<StorageVol>> = Default::default();
        let mut named = std::collections::HashSet::new();
        for v in volumes {
            let Ok(name) = v.name() else { continue };
            match image_id_of(&name) {
                Some(id) => images.entry(id.to_string()).or_default().push(v),
                // An overlay names its backing image volume.
                None => named.extend(image_ids_in(&v.xml_desc(0).unwrap_or_default())),
            }
        }
        if images.is_empty() {
            return Ok(0);
        }
        let domains = self
            .conn()?
            .list_all_domains(0)
            .map_err(|e| fail(format!("cannot list domains: {e}")))?;
        for d in domains {
            let xml = d
                .xml_desc(0)
                .map_err(|e| fail(format!("cannot read a domain's definition: {e}")))?;
            named.extend(image_ids_in(&xml));
        }
        let current: Vec<String> = self
            .image_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(_, id)| id.clone())
            .collect();
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for (id, mut vols) in images {
            if current.contains(&id) || named.contains(&id) {
                continue;
            }
            // The upload's age: its ready marker's, else its newest part's.
            let ready = format!("{IMAGE_PREFIX}{id}-ready");
            let is_ready = |v: &StorageVol| v.name().is_ok_and(|n| n == ready);
            let dated: Vec<&StorageVol> = match vols.iter().find(|v| is_ready(v)) {
                Some(r) => vec![r],
                None => vols.iter().collect(),
            };
            let old = dated.iter().all(|v| {
                mtime(&v.xml_desc(0).unwrap_or_default())
                    .is_some_and(|t| now.duration_since(t).is_ok_and(|age| age > IMAGE_GRACE))
            });
            if !old {
                continue;
            }
            // The ready marker first: a create that looks now uploads the image again.
            vols.sort_by_key(|v| !is_ready(v));
            for v in vols {
                let name = v.name().unwrap_or_default();
                v.delete(0)
                    .map_err(|e| fail(format!("cannot delete volume {name}: {e}")))?;
            }
            tracing::info!(image = %id, pool = %self.c.pool, "removed a pod VM image that no VM uses");
            removed += 1;
        }
        Ok(removed)
    }

    fn disk_boot(&self) -> bool {
        self.c.boot == "disk"
    }

    /// The tags of a domain that coffer-cloud made, of any cluster or node.
    fn any_tags(d: &Domain) -> Option<Tags> {
        let text = d
            .metadata(virt::sys::VIR_DOMAIN_METADATA_DESCRIPTION as i32, None, 0)
            .ok()?;
        let t: Tags = serde_json::from_str(&text).ok()?;
        (t.coffer_cloud == 1).then_some(t)
    }

    /// The tags of a domain of this cluster and node.
    fn tags(&self, d: &Domain) -> Option<Tags> {
        Self::any_tags(d).filter(|t| t.cluster == self.cluster && t.node == self.node)
    }

    fn all(&self) -> Result<Vec<(Domain, Tags)>, CloudError> {
        let domains = self
            .conn()?
            .list_all_domains(0)
            .map_err(|e| fail(format!("cannot list domains: {e}")))?;
        Ok(domains
            .into_iter()
            .filter_map(|d| Self::any_tags(&d).map(|t| (d, t)))
            .collect())
    }

    fn ours(&self) -> Result<Vec<(Domain, Tags)>, CloudError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|(_, t)| t.cluster == self.cluster && t.node == self.node)
            .collect())
    }

    fn vm(&self, d: &Domain, t: Tags, pool_dir: &str) -> Vm {
        let name = d.name().unwrap_or_default();
        Vm {
            id: name.clone(),
            pod: t.pod,
            sandbox_dir: t.sandbox_dir,
            address: Some(t.address),
            instance_type: t.instance_type,
            console: Some(format!("{pool_dir}/{name}.console")),
            running: d.is_active().unwrap_or(false),
        }
    }

    fn pool_dir(&self, pool: &StoragePool) -> String {
        pool.xml_desc(0)
            .ok()
            .and_then(|x| {
                let (_, rest) = x.split_once("<target>")?;
                let (_, rest) = rest.split_once("<path>")?;
                let escaped = rest.split_once("</path>")?.0;
                Some(
                    escaped
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&apos;", "'")
                        .replace("&quot;", "\"")
                        .replace("&amp;", "&"),
                )
            })
            .unwrap_or_else(|| self.c.pool_dir.display().to_string())
    }

    fn domain_xml(&self, d: &DomainParts<'_>, spec: &VmSpec, snp: Option<&SnpLaunch>) -> String {
        let description = serde_json::to_string(d.tags).unwrap_or_default();
        domain_xml(&DomainXml {
            config: &self.c,
            cmdline: &self.podvm.cmdline,
            name: d.name,
            description: &description,
            memory_mib: spec.instance.memory_mib,
            vcpus: spec.instance.vcpus,
            image: d.image,
            launch_path: d.launch_path,
            mac: d.mac,
            console: d.console,
            psp_socket: spec.psp_socket.as_deref(),
            snp,
        })
    }

    /// The SEV-SNP launch of `spec`, after every check that the libvirt host and the pod VM can
    /// make it: KVM, the kernel boot, the pod VM's SEV firmware, no emulated PSP, and the host's
    /// domain capabilities offering `sev-snp`.
    fn snp_launch(&self, spec: &VmSpec) -> Result<SnpLaunch, CloudError> {
        let no = |why: String| CloudError::Invalid(format!("tee snp: {why}"));
        if self.c.accel != "kvm" {
            return Err(no(format!(
                "SEV-SNP needs KVM; libvirt.accel is {}",
                self.c.accel
            )));
        }
        if self.disk_boot() {
            return Err(no(
                "SEV-SNP boots the measured kernel directly; libvirt.boot must be kernel".into(),
            ));
        }
        if spec.psp_socket.is_some() {
            return Err(no("an SEV-SNP launch has no emulated PSP".into()));
        }
        let firmware = self.c.podvm.join(coffer_podvm::FIRMWARE_SNP);
        if !firmware.is_file() {
            return Err(no(format!(
                "the pod VM has no {}: build it with `coffer podvm build --tee snp --firmware OVMF-AmdSev.fd`",
                firmware.display()
            )));
        }
        let caps = self
            .conn()?
            .domain_capabilities(None, Some("x86_64"), Some("q35"), Some("kvm"), 0)
            .map_err(|e| {
                no(format!(
                    "the libvirt host {} cannot launch SEV-SNP guests: it has no KVM domain capabilities ({e})",
                    self.c.uri
                ))
            })?;
        if !snp_offered(&caps) {
            return Err(no(format!(
                "the libvirt host {} cannot launch SEV-SNP guests: its domain capabilities offer no sev-snp launch security (it needs libvirt 10.5 or later, and a kernel and firmware with SEV-SNP on)",
                self.c.uri
            )));
        }
        let digest = coffer_wire::initdata::digest(&spec.launch.initdata)
            .map_err(|e| no(format!("the initdata: {e}")))?;
        let mut host_data = [0u8; 32];
        host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(&digest, 32));
        Ok(SnpLaunch {
            host_data,
            cpu: self.c.snp_cpu.clone(),
        })
    }

    /// Deletes the domain `name` and its volumes: stopped, then its volumes, then undefined
    /// last, so that a failure half-way leaves the tagged domain for the reconciler.
    fn remove(&self, name: &str) -> Result<bool, CloudError> {
        let domain = self.conn()?.lookup_domain_by_name(name).ok();
        if let Some(d) = &domain {
            if d.is_active().unwrap_or(false) {
                d.destroy()
                    .map_err(|e| fail(format!("cannot stop domain {name}: {e}")))?;
            }
        }
        let pool = self.pool()?;
        // The console file is a file of the pool's directory: a refresh shows it as a volume.
        let _ = pool.refresh(0);
        for v in volume_names(name) {
            if let Ok(vol) = pool.lookup_storage_vol_by_name(&v) {
                vol.delete(0)
                    .map_err(|e| fail(format!("cannot delete volume {v}: {e}")))?;
            }
        }
        if let Some(d) = &domain {
            d.undefine()
                .map_err(|e| fail(format!("cannot undefine domain {name}: {e}")))?;
        }
        Ok(domain.is_some())
    }
}

impl Provider for Libvirt {
    fn name(&self) -> &'static str {
        NAME
    }

    fn launch_limit(&self) -> usize {
        LAUNCH_LIMIT
    }

    fn create(&self, spec: &VmSpec) -> Result<Vm, CloudError> {
        let snp = match spec.launch.tee.as_str() {
            "emulated" => None,
            "snp" => Some(self.snp_launch(spec)?),
            other => {
                return Err(CloudError::Invalid(format!(
                    "tee {other}: the libvirt provider launches the emulated TEE or SEV-SNP (TDX is not built)"
                )))
            }
        };
        let name = self.domain_name(&spec.pod);
        let pool = self.pool()?;
        let pool_dir = self.pool_dir(&pool);
        let launch = launch_digest(spec);
        if let Ok(d) = self.conn()?.lookup_domain_by_name(&name) {
            match self.tags(&d) {
                // Idempotent: the VM this very request made (a keeper asking again).
                Some(t) if t.sandbox_dir == spec.sandbox_dir && t.launch == launch => {
                    if !d.is_active().unwrap_or(false) {
                        d.create()
                            .map_err(|e| fail(format!("cannot start domain {name}: {e}")))?;
                    }
                    return Ok(self.vm(&d, t, &pool_dir));
                }
                // A previous keeper's VM of this pod (other keys): it goes, a new one is made.
                Some(t) if t.pod == spec.pod => {
                    tracing::info!(domain = %name, "replacing a previous keeper's VM of this pod");
                    self.remove(&name)?;
                }
                _ => {
                    return Err(CloudError::Invalid(format!(
                        "domain {name} exists and is not this pod's"
                    )))
                }
            }
        }
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let image = self.image(&pool, snp.is_some())?;
        // Every coffer domain on this libvirt host, whatever its cluster or node, holds its address.
        let used: Vec<Ipv4Addr> = self.all()?.into_iter().map(|(_, t)| t.address).collect();
        let address = self
            .subnet
            .free(&used)
            .ok_or_else(|| CloudError::Capacity {
                provider: NAME,
                instance_type: spec.instance.name.clone(),
                why: format!("no free address left in subnet {}", self.c.subnet),
            })?;
        let o = address.octets();
        let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3]);
        let tags = Tags {
            coffer_cloud: 1,
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            pod: spec.pod.clone(),
            sandbox_dir: spec.sandbox_dir.clone(),
            address,
            instance_type: spec.instance.name.clone(),
            launch,
        };
        let launch_name = format!("{name}-launch.json");
        let launch_path = format!("{pool_dir}/{launch_name}");
        let console = format!("{pool_dir}/{name}.console");
        // Tagged first: from here on, whatever happens, the reconciler finds this VM.
        let xml = self.domain_xml(
            &DomainParts {
                name: &name,
                tags: &tags,
                image: &image,
                launch_path: &launch_path,
                mac: &mac,
                console: &console,
            },
            spec,
            snp.as_ref(),
        );
        let domain = self
            .conn()?
            .define_domain_xml(&xml)
            .map_err(|e| fail(format!("cannot define domain {name}: {e}")))?;
        drop(guard);
        let made = (|| {
            let mut launch = spec.launch.clone();
            if let Some(r) = launch.remote.as_mut() {
                r.interface = Some(StaticInterface {
                    mac: mac.clone(),
                    address: format!("{address}/{}", self.subnet.prefix),
                });
            }
            let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&launch).map_err(fail)?);
            self.upload(&pool, &launch_name, bytes.len() as u64, &mut &bytes[..])?;
            if self.disk_boot() {
                // The VM's own copy-on-write overlay of the image's disk.
                let overlay = format!("{name}-disk");
                let size = qcow2_size(&self.c.podvm.join(DiskFormat::Qcow2.file_name()))
                    .map_err(|e| fail(format!("the pod VM's disk: {e}")))?;
                StorageVol::create_xml(&pool, &overlay_xml(&overlay, size, &image[0]), 0)
                    .map_err(|e| fail(format!("cannot create volume {overlay}: {e}")))?;
            } else {
                let scratch = format!("{name}-scratch");
                StorageVol::create_xml(
                    &pool,
                    &volume_xml(&scratch, self.c.scratch_mib << 20, 0),
                    0,
                )
                .map_err(|e| fail(format!("cannot create volume {scratch}: {e}")))?;
            }
            domain
                .create()
                .map_err(|e| fail(format!("cannot start domain {name}: {e}")))
        })();
        if let Err(e) = made {
            // Nothing half-made stays behind.
            if let Err(r) = self.remove(&name) {
                tracing::warn!(domain = %name, error = %r, "cannot remove a failed create; the reconciler will");
            }
            return Err(e);
        }
        Ok(self.vm(&domain, tags, &pool_dir))
    }

    fn delete(&self, pod: &str) -> Result<bool, CloudError> {
        let name = self.domain_name(pod);
        // Only a domain whose tags name this cluster, node and pod (names alone could collide).
        match self.conn()?.lookup_domain_by_name(&name) {
            Ok(d) if self.tags(&d).is_some_and(|t| t.pod == pod) => self.remove(&name),
            Ok(_) => Err(CloudError::Invalid(format!(
                "domain {name} is not this node's VM of pod {pod}"
            ))),
            // None left, or only volumes of a create cut short.
            Err(_) => self.remove(&name),
        }
    }

    fn list(&self) -> Result<Vec<Vm>, CloudError> {
        let pool = self.pool()?;
        let dir = self.pool_dir(&pool);
        Ok(self
            .ours()?
            .into_iter()
            .map(|(d, t)| self.vm(&d, t, &dir))
            .collect())
    }

    fn tidy(&self) -> Result<usize, CloudError> {
        self.tidy_images()
    }
}

/// The image id in an image volume's name (`coffer-podvm-<16 hex>-<part>`).
fn image_id_of(volume: &str) -> Option<&str> {
    let rest = volume.strip_prefix(IMAGE_PREFIX)?;
    let (id, part) = rest.split_once('-')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !part.is_empty()).then_some(id)
}

/// Every image id that `text` (a domain's or a volume's XML) names through an image volume.
fn image_ids_in(text: &str) -> Vec<String> {
    text.match_indices(IMAGE_PREFIX)
        .filter_map(|(at, _)| {
            let end = text[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
                .map_or(text.len(), |n| at + n);
            image_id_of(&text[at..end]).map(str::to_string)
        })
        .collect()
}

/// A volume's modification time from its XML (`<target><timestamps><mtime>SECS.NANOS`), where
/// the pool reports one.
fn mtime(xml: &str) -> Option<std::time::SystemTime> {
    let (_, rest) = xml.split_once("<timestamps>")?;
    let (_, rest) = rest.split_once("<mtime>")?;
    let text = rest.split_once("</mtime>")?.0.trim();
    let secs: u64 = text.split('.').next()?.parse().ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// The volumes made for the domain `name` (and its console file), exactly.
fn volume_names(name: &str) -> [String; 4] {
    [
        format!("{name}-scratch"),
        format!("{name}-disk"),
        format!("{name}-launch.json"),
        format!("{name}.console"),
    ]
}

/// An SEV-SNP launch (`<launchSecurity type='sev-snp'>`, libvirt 10.5 and later).
#[derive(Clone, Debug)]
pub struct SnpLaunch {
    /// HOST_DATA: the initdata digest, fitted to 32 bytes (the KBS checks it).
    pub host_data: [u8; 32],
    /// The vCPU model (the launch digest covers each VMSA's reset state).
    pub cpu: String,
}

/// Everything a domain's XML is made of.
pub struct DomainXml<'a> {
    /// The provider's settings (accel, boot, pool, bridge, firmware).
    pub config: &'a LibvirtConfig,
    /// The measured kernel command line.
    pub cmdline: &'a str,
    /// The domain's name.
    pub name: &'a str,
    /// Its tags (JSON), in `<description>`.
    pub description: &'a str,
    /// Memory (MiB).
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// The image volumes' paths: kernel (`vmlinux`; `vmlinuz` for SEV-SNP), initrd, root and,
    /// for SEV-SNP, the firmware; or the disk alone (`boot = "disk"`).
    pub image: &'a [String],
    /// The launch configuration's file (fw_cfg).
    pub launch_path: &'a str,
    /// The NIC's MAC address.
    pub mac: &'a str,
    /// The console file.
    pub console: &'a str,
    /// The emulated PSP's socket (emulated TEE, local libvirt only).
    pub psp_socket: Option<&'a Path>,
    /// An SEV-SNP launch.
    pub snp: Option<&'a SnpLaunch>,
}

/// The domain XML of a VM (public so that tests validate it against libvirt's schema).
pub fn domain_xml(x: &DomainXml<'_>) -> String {
    let c = x.config;
    let name = esc(x.name);
    let (kind, cpu) = match (c.accel.as_str(), x.snp) {
        (_, Some(s)) => (
            "kvm",
            format!(
                "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{}</model></cpu>",
                esc(&s.cpu)
            ),
        ),
        // Under TCG without `rep movsb` (ERMS, FSRM), which TCG runs a byte per iteration: the
        // guest copies with wide moves instead (see coffer-podvm's launch).
        ("tcg", None) => (
            "qemu",
            "<cpu mode='maximum' check='none'><feature policy='disable' name='erms'/>\
             <feature policy='disable' name='fsrm'/></cpu>"
                .to_string(),
        ),
        _ => ("kvm", "<cpu mode='host-passthrough' check='none'/>".to_string()),
    };
    let psp = x
        .psp_socket
        .map(|p| {
            format!(
                "<channel type='unix'><source mode='connect' path='{}'/><target type='virtio' name='{PSP_PORT}'/></channel>",
                esc(&p.display().to_string())
            )
        })
        .unwrap_or_default();
    let pool = esc(&c.pool);
    let kernel_disks = || {
        format!(
            "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='{pool}' volume='{root_vol}'/><target dev='vda' bus='virtio'/><serial>coffer-root</serial><readonly/></disk>\
<disk type='volume' device='disk'><driver name='qemu' type='raw' cache='directsync'/><source pool='{pool}' volume='{name}-scratch'/><target dev='vdb' bus='virtio'/><serial>coffer-scratch</serial></disk>",
            root_vol = esc(x.image[2].rsplit('/').next().unwrap_or_default()),
        )
    };
    let (os, disks, security) = match x.snp {
        // Measured direct boot: the AMD SEV firmware with the kernel-hashes table, which QEMU
        // fills with the kernel's, initrd's and command line's digests; HOST_DATA binds the
        // initdata.
        Some(s) => {
            use base64::Engine;
            (
                format!(
                    "<os><type arch='x86_64' machine='q35'>hvm</type><loader type='rom'>{}</loader><kernel>{}</kernel><initrd>{}</initrd><cmdline>{}</cmdline></os>",
                    esc(&x.image[3]),
                    esc(&x.image[0]),
                    esc(&x.image[1]),
                    esc(x.cmdline)
                ),
                kernel_disks(),
                format!(
                    "<launchSecurity type='sev-snp' kernelHashes='yes'><policy>0x30000</policy><hostData>{}</hostData></launchSecurity>",
                    base64::engine::general_purpose::STANDARD.encode(s.host_data)
                ),
            )
        }
        None if c.boot == "disk" => (
            // UEFI firmware boots the disk's EFI system partition (its unified kernel image).
            format!(
                "<os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='rom'>{}</loader><boot dev='hd'/></os>",
                esc(&c.firmware.display().to_string())
            ),
            format!(
                "<disk type='volume' device='disk'><driver name='qemu' type='qcow2' cache='directsync'/><source pool='{pool}' volume='{name}-disk'/><target dev='vda' bus='virtio'/></disk>"
            ),
            String::new(),
        ),
        None => (
            format!(
                "<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{}</kernel><initrd>{}</initrd><cmdline>{}</cmdline></os>",
                esc(&x.image[0]),
                esc(&x.image[1]),
                esc(x.cmdline)
            ),
            kernel_disks(),
            String::new(),
        ),
    };
    format!(
        "<domain type='{kind}'>\
<name>{name}</name>\
<description>{description}</description>\
<memory unit='MiB'>{mem}</memory>\
<vcpu>{vcpus}</vcpu>\
{os}\
<sysinfo type='fwcfg'><entry name='{CONFIG_FW_CFG}' file='{launch}'/></sysinfo>\
<features><acpi/></features>\
{cpu}\
<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
<devices>\
{disks}\
<interface type='bridge'><source bridge='{bridge}'/><mac address='{mac}'/><model type='virtio'/><rom enabled='no'/></interface>\
<serial type='file'><source path='{console}'/><target port='0'/></serial>\
{psp}\
<memballoon model='none'/>\
</devices>\
{security}\
</domain>",
        description = esc(x.description),
        mem = x.memory_mib,
        vcpus = x.vcpus,
        launch = esc(x.launch_path),
        bridge = esc(&c.bridge),
        mac = esc(x.mac),
        console = esc(x.console),
    )
}

/// Whether domain capabilities (`virConnectGetDomainCapabilities`) offer SEV-SNP: a supported
/// `<launchSecurity>` whose `sectype` values include `sev-snp` (libvirt 10.5 and later).
fn snp_offered(caps: &str) -> bool {
    let Some((_, rest)) = caps.split_once("<launchSecurity supported='yes'>") else {
        return false;
    };
    let section = rest.split("</launchSecurity>").next().unwrap_or_default();
    section.contains("<value>sev-snp</value>")
}

/// The virtual size of a qcow2 image (its header's `size`, big-endian at byte 24).
fn qcow2_size(path: &Path) -> std::io::Result<u64> {
    let mut h = [0u8; 32];
    std::fs::File::open(path)?.read_exact(&mut h)?;
    if &h[..4] != b"QFI\xfb" {
        return Err(std::io::Error::other("not a qcow2 image"));
    }
    Ok(u64::from_be_bytes(h[24..32].try_into().unwrap_or_default()))
}

/// A qcow2 volume of `size` bytes backed by the qcow2 image at `backing`.
fn overlay_xml(name: &str, size: u64, backing: &str) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{size}</capacity><target><format type='qcow2'/></target>\
<backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
        esc(name),
        esc(backing)
    )
}

/// The digest a VM is tagged with: which launch configuration (which keeper's keys) it runs.
fn launch_digest(spec: &VmSpec) -> String {
    crate::provider::user_data(spec, NAME)
        .map(|(_, digest)| digest)
        .unwrap_or_default()
}

fn volume_xml(name: &str, capacity: u64, allocation: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity><allocation unit='bytes'>{allocation}</allocation><target><format type='raw'/></target></volume>",
        esc(name)
    )
}

/// Escapes text for XML content and single- or double-quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_owns_exactly_its_own_volumes() {
        let v = volume_names("coffer-n1-web");
        assert_eq!(
            v,
            [
                "coffer-n1-web-scratch".to_string(),
                "coffer-n1-web-disk".to_string(),
                "coffer-n1-web-launch.json".to_string(),
                "coffer-n1-web.console".to_string()
            ]
        );
        // Another pod whose name starts with this one's owns none of them.
        assert!(volume_names("coffer-n1-web-2")
            .iter()
            .all(|x| !v.contains(x)));
    }

    #[test]
    fn sev_snp_is_offered_only_where_domain_capabilities_list_it() {
        // libvirt 10.5+ on an SEV-SNP host, one on an SEV host, and libvirt 9 (no such element).
        let snp = "<domainCapabilities><features><sev supported='yes'><cbitpos>51</cbitpos></sev>\
<launchSecurity supported='yes'><enum name='sectype'><value>sev</value><value>sev-snp</value></enum></launchSecurity></features></domainCapabilities>";
        let sev = "<domainCapabilities><features><launchSecurity supported='yes'><enum name='sectype'><value>sev</value></enum></launchSecurity>\
<hyperv><value>sev-snp</value></hyperv></features></domainCapabilities>";
        let old =
            "<domainCapabilities><features><sev supported='no'/></features></domainCapabilities>";
        assert!(snp_offered(snp));
        assert!(
            !snp_offered(sev),
            "sev-snp elsewhere than launchSecurity is not an offer"
        );
        assert!(!snp_offered(old));
        assert!(!snp_offered(
            "<launchSecurity supported='no'><enum name='sectype'><value>sev-snp</value></enum></launchSecurity>"
        ));
    }

    #[test]
    fn image_volumes_are_known_by_their_names_and_by_what_names_them() {
        assert_eq!(
            image_id_of("coffer-podvm-0123456789abcdef-vmlinux"),
            Some("0123456789abcdef")
        );
        assert_eq!(image_id_of("coffer-podvm-0123456789abcdef-"), None);
        assert_eq!(image_id_of("coffer-podvm-0123456789abcdeg-root"), None);
        assert_eq!(image_id_of("coffer-podvm-0123-root"), None);
        assert_eq!(image_id_of("coffer-node-1-pod-disk"), None);
        let domain = "<disk><source file='/p/coffer-podvm-0123456789abcdef-root'/></disk>\
                      <kernel>/p/coffer-podvm-fedcba9876543210-vmlinux</kernel>\
                      <source file='/p/coffer-podvm-xyz'/>";
        assert_eq!(
            image_ids_in(domain),
            ["0123456789abcdef", "fedcba9876543210"]
        );
        let vol = "<volume><target><timestamps><atime>1.5</atime>\
                   <mtime>1700000000.123456789</mtime></timestamps></target></volume>";
        assert_eq!(
            mtime(vol),
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000))
        );
        assert_eq!(mtime("<volume><target/></volume>"), None);
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(esc("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
        let x = volume_xml("v'<", 10, 0);
        assert!(x.contains("<name>v&apos;&lt;</name>"), "{x}");
    }
}
