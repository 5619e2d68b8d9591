//! The `coffer` remote snapshotter: a containerd proxy snapshotter plugin through which the
//! node never holds an image layer.
//!
//! When containerd's unpacker (the CRI plugin's image pull) asks to prepare the extraction of a
//! layer (`Prepare` with the label `containerd.io/snapshot.ref` = the layer's chain id), the
//! snapshotter records that chain id as a committed snapshot and answers "already exists": the
//! unpacker then skips the layer, and containerd never downloads it. Containers get an active
//! snapshot whose mount is an empty read-only directory; the shim hands the image reference to
//! the sandbox's agent, which pulls, verifies, decrypts and unpacks the image inside the TEE.
//!
//! A client-side extraction (`ctr images pull`, which downloads every layer first) is refused
//! with an error that says so. The metadata lives in a redb database: every change is one
//! committed transaction, so the store survives `kill -9`.

#![deny(unsafe_code)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use containerd_snapshots::{api::types::Mount, tonic, Info, Kind, Snapshotter, Usage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// The label containerd's unpacker puts on a layer's extraction: the chain id it commits to.
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

/// The snapshotter's errors, as containerd's error classes.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No such snapshot.
    #[error("snapshot {0} not found")]
    NotFound(String),
    /// The snapshot exists (for a layer: it is pulled inside the sandbox, not here).
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    /// The request cannot be served in the snapshot's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The metadata store failed.
    #[error("snapshot store: {0}")]
    Store(String),
}

impl From<SnapshotError> for tonic::Status {
    fn from(e: SnapshotError) -> Self {
        let msg = e.to_string();
        match e {
            SnapshotError::NotFound(_) => tonic::Status::not_found(msg),
            SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapshotError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapshotError::Store(_) => tonic::Status::internal(msg),
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Store(e.to_string())
}

/// The snapshot `key` in `table`, decoded.
fn read_info(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Info>, SnapshotError> {
    match table.get(key).map_err(store_err)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(store_err),
    }
}

/// The snapshotter.
pub struct CofferSnapshotter {
    db: Database,
    empty: PathBuf,
}

impl CofferSnapshotter {
    /// Opens (creating if needed) the snapshotter's state in `root`: `metadata.redb` and the
    /// empty directory containers' mounts show.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let empty = root.join("empty");
        std::fs::create_dir_all(&empty)
            .map_err(|e| store_err(format!("cannot create {}: {e}", empty.display())))?;
        let path = root.join("metadata.redb");
        let db = Database::create(&path)
            .map_err(|e| store_err(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(store_err)?;
        txn.open_table(SNAPSHOTS).map_err(store_err)?;
        txn.commit().map_err(store_err)?;
        Ok(Self { db, empty })
    }

    fn get(&self, key: &str) -> Result<Option<Info>, SnapshotError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
        let Some(v) = table.get(key).map_err(store_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(store_err)
    }

    fn all(&self) -> Result<Vec<Info>, SnapshotError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(store_err)? {
            let (_, v) = row.map_err(store_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(store_err)?);
        }
        Ok(out)
    }

    /// Runs `f` over the table in one committed transaction.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let txn = self.db.begin_write().map_err(store_err)?;
        let out = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
            f(&mut table)?
        };
        txn.commit().map_err(store_err)?;
        Ok(out)
    }

    /// The mounts of every snapshot: the empty directory, read-only. Whatever on the node
    /// mounts a container's root (containerd reading /etc/group for supplementary groups) sees
    /// nothing of the image.
    fn empty_mounts(&self) -> Vec<Mount> {
        vec![Mount {
            r#type: "bind".into(),
            source: self.empty.display().to_string(),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        }]
    }

    /// Creates `info` unless its name exists; its parent, if any, must be committed.
    fn insert_new(&self, info: Info) -> Result<(), SnapshotError> {
        self.write(|table| {
            if table.get(info.name.as_str()).map_err(store_err)?.is_some() {
                return Err(SnapshotError::AlreadyExists(info.name.clone()));
            }
            if !info.parent.is_empty() {
                let parent = read_info(table, &info.parent)?
                    .ok_or_else(|| SnapshotError::NotFound(info.parent.clone()))?;
                if parent.kind != Kind::Committed {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "parent {} is not committed",
                        info.parent
                    )));
                }
            }
            let bytes = serde_json::to_vec(&info).map_err(store_err)?;
            table
                .insert(info.name.as_str(), bytes.as_slice())
                .map_err(store_err)?;
            Ok(())
        })
    }

    fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if kind == Kind::Active {
            if let Some(target) = labels.get(TARGET_REF_LABEL).cloned() {
                // A layer's extraction by containerd's unpacker: record the layer as present
                // (it is pulled inside the sandbox) and say so, so that it is never fetched.
                let layer = Info {
                    kind: Kind::Committed,
                    name: target.clone(),
                    parent,
                    labels,
                    ..Default::default()
                };
                match self.insert_new(layer) {
                    Ok(()) | Err(SnapshotError::AlreadyExists(_)) => {}
                    Err(e) => return Err(e),
                }
                tracing::debug!(layer = %target, "layer left to the sandbox");
                return Err(SnapshotError::AlreadyExists(target));
            }
            if key.starts_with("extract-") {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "{key}: the coffer snapshotter unpacks no layer on the node; pull images \
                     through the CRI (crictl pull, or the kubelet), which leaves layers to the \
                     sandbox, not with `ctr images pull`, which downloads them here"
                )));
            }
        }
        self.insert_new(Info {
            kind,
            name: key,
            parent,
            labels,
            ..Default::default()
        })?;
        Ok(self.empty_mounts())
    }
}

#[tonic::async_trait]
impl Snapshotter for CofferSnapshotter {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        self.get(&key)?.ok_or(SnapshotError::NotFound(key))
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        self.write(|table| {
            let mut stored = read_info(table, &info.name)?
                .ok_or_else(|| SnapshotError::NotFound(info.name.clone()))?;
            match fieldpaths.filter(|p| !p.is_empty()) {
                None => stored.labels = info.labels,
                Some(paths) => {
                    for p in paths {
                        if p == "labels" {
                            stored.labels = info.labels.clone();
                        } else if let Some(k) = p.strip_prefix("labels.") {
                            match info.labels.get(k) {
                                Some(v) => stored.labels.insert(k.to_string(), v.clone()),
                                None => stored.labels.remove(k),
                            };
                        } else {
                            return Err(SnapshotError::FailedPrecondition(format!(
                                "cannot update {p}: only labels change"
                            )));
                        }
                    }
                }
            }
            stored.updated_at = SystemTime::now();
            let bytes = serde_json::to_vec(&stored).map_err(store_err)?;
            table
                .insert(stored.name.as_str(), bytes.as_slice())
                .map_err(store_err)?;
            Ok(stored)
        })
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        // Nothing of a snapshot is stored on the node.
        self.stat(key).await.map(|_| Usage::default())
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        self.stat(key).await.map(|_| self.empty_mounts())
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::Active, key, parent, labels)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::View, key, parent, labels)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        self.write(|table| {
            let active =
                read_info(table, &key)?.ok_or_else(|| SnapshotError::NotFound(key.clone()))?;
            if active.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "{key} is not active"
                )));
            }
            if table.get(name.as_str()).map_err(store_err)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.clone()));
            }
            let committed = Info {
                kind: Kind::Committed,
                name: name.clone(),
                parent: active.parent,
                labels,
                ..Default::default()
            };
            let bytes = serde_json::to_vec(&committed).map_err(store_err)?;
            table.remove(key.as_str()).map_err(store_err)?;
            table
                .insert(name.as_str(), bytes.as_slice())
                .map_err(store_err)?;
            Ok(())
        })
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        self.write(|table| {
            if table.get(key.as_str()).map_err(store_err)?.is_none() {
                return Err(SnapshotError::NotFound(key.clone()));
            }
            for row in table.iter().map_err(store_err)? {
                let (_, v) = row.map_err(store_err)?;
                let child: Info = serde_json::from_slice(v.value()).map_err(store_err)?;
                if child.parent == key {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "cannot remove {key}: snapshot {} is its child",
                        child.name
                    )));
                }
            }
            table.remove(key.as_str()).map_err(store_err)?;
            Ok(())
        })
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info, SnapshotError>>>;

    async fn list(
        &self,
        _snapshotter: String,
        _filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        // containerd filters the list itself.
        let all = self.all()?.into_iter().map(Ok).collect::<Vec<_>>();
        Ok(futures::stream::iter(all))
    }
}

/// Serves `snapshotter` on the unix socket `socket` (replacing a stale socket file) until the
/// process ends.
pub async fn serve(snapshotter: CofferSnapshotter, socket: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot replace {}", socket.display()))
        }
        _ => {}
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(std::sync::Arc::new(
            snapshotter,
        )))
        .serve_with_incoming(incoming)
        .await
        .context("the snapshotter's server failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn layers_are_reported_present_and_containers_see_an_empty_root() {
        let d = tempfile::tempdir().unwrap();
        let s = CofferSnapshotter::open(d.path()).unwrap();
        // The unpacker's extraction of two layers.
        let e = s
            .prepare(
                "extract-1 sha256:l1".into(),
                String::new(),
                labels(&[(TARGET_REF_LABEL, "sha256:l1")]),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::AlreadyExists(_)));
        assert_eq!(
            s.stat("sha256:l1".into()).await.unwrap().kind,
            Kind::Committed
        );
        let e = s
            .prepare(
                "extract-2 sha256:l2".into(),
                "sha256:l1".into(),
                labels(&[(TARGET_REF_LABEL, "sha256:l2")]),
            )
            .await
            .unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::AlreadyExists);
        assert!(s.stat("extract-2 sha256:l2".into()).await.is_err());
        // A container on top.
        let m = s
            .prepare("c1".into(), "sha256:l2".into(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert!(m[0].options.contains(&"ro".to_string()));
        let empty = std::path::Path::new(&m[0].source);
        assert_eq!(std::fs::read_dir(empty).unwrap().count(), 0);
        // A layer with a child cannot go; the container can, then the layers.
        let e = s.remove("sha256:l2".into()).await.unwrap_err();
        assert!(e.to_string().contains("c1"), "{e}");
        s.remove("c1".into()).await.unwrap();
        s.remove("sha256:l2".into()).await.unwrap();
        assert_eq!(s.all().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn client_side_extraction_is_refused_and_the_store_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = CofferSnapshotter::open(d.path()).unwrap();
            let e = s
                .prepare("extract-9 sha256:x".into(), String::new(), HashMap::new())
                .await
                .unwrap_err();
            assert!(e.to_string().contains("crictl pull"), "{e}");
            s.prepare(
                "extract-1 sha256:l1".into(),
                String::new(),
                labels(&[(TARGET_REF_LABEL, "sha256:l1")]),
            )
            .await
            .unwrap_err();
            let e = s
                .prepare("c".into(), "sha256:nope".into(), HashMap::new())
                .await
                .unwrap_err();
            assert!(matches!(e, SnapshotError::NotFound(_)));
            let info = Info {
                name: "sha256:l1".into(),
                labels: labels(&[("containerd.io/gc.root", "x")]),
                ..Default::default()
            };
            s.update(info, Some(vec!["labels.containerd.io/gc.root".into()]))
                .await
                .unwrap();
        }
        let s = CofferSnapshotter::open(d.path()).unwrap();
        let info = s.stat("sha256:l1".into()).await.unwrap();
        assert_eq!(info.labels["containerd.io/gc.root"], "x");
        assert_eq!(info.labels[TARGET_REF_LABEL], "sha256:l1");
    }
}
