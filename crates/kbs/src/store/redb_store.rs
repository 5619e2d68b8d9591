//! Embedded store on redb. Each write is one transaction committed with fsync, so a change
//! acknowledged to the admin survives `kill -9`; a crash mid-write leaves the previous state.

use std::{
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use coffer_wire::reference::ReferenceValues;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{decode_refs, MemorySessions, NonceClaim, PolicyKind, Session, StoreError};

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const POLICIES: TableDefinition<&str, &str> = TableDefinition::new("policies");
const REFERENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("reference_values");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const GENERATION: &str = "generation";

fn e(err: impl std::fmt::Display) -> StoreError {
    StoreError::Redb(err.to_string())
}

/// The embedded store.
pub struct RedbStore {
    db: Database,
    generation: AtomicU64,
    sessions: MemorySessions,
}

impl RedbStore {
    /// Opens (creating if needed) `dir/kbs.redb`. Fails if another process holds it.
    pub fn open(dir: &Path, session_limit: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| e(format!("cannot create {}: {err}", dir.display())))?;
        let path = dir.join("kbs.redb");
        let db = Database::create(&path)
            .map_err(|err| e(format!("cannot open {}: {err}", path.display())))?;
        let txn = db.begin_write().map_err(e)?;
        {
            txn.open_table(RESOURCES).map_err(e)?;
            txn.open_table(POLICIES).map_err(e)?;
            txn.open_table(REFERENCES).map_err(e)?;
            txn.open_table(META).map_err(e)?;
        }
        txn.commit().map_err(e)?;
        let store = Self {
            db,
            generation: AtomicU64::new(0),
            sessions: MemorySessions::new(session_limit),
        };
        let generation = store
            .read_meta(GENERATION)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        store.generation.store(generation, Ordering::SeqCst);
        Ok(store)
    }

    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let table = txn.open_table(META).map_err(e)?;
        Ok(table.get(key).map_err(e)?.map(|v| v.value().to_vec()))
    }

    /// Runs `f` in a write transaction that also bumps the generation, and commits.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(e)?;
        let out = f(&txn)?;
        let next = self.generation.load(Ordering::SeqCst) + 1;
        {
            let mut meta = txn.open_table(META).map_err(e)?;
            meta.insert(GENERATION, next.to_be_bytes().as_slice())
                .map_err(e)?;
        }
        txn.commit().map_err(e)?;
        self.generation.store(next, Ordering::SeqCst);
        Ok(out)
    }

    pub(super) async fn get_resource(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let table = txn.open_table(RESOURCES).map_err(e)?;
        Ok(table.get(path).map_err(e)?.map(|v| v.value().to_vec()))
    }

    pub(super) async fn put_resource(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(RESOURCES)
                .map_err(e)?
                .insert(path, value)
                .map_err(e)?;
            Ok(())
        })
    }

    pub(super) async fn delete_resource(&self, path: &str) -> Result<bool, StoreError> {
        self.write(|txn| {
            Ok(txn
                .open_table(RESOURCES)
                .map_err(e)?
                .remove(path)
                .map_err(e)?
                .is_some())
        })
    }

    pub(super) async fn get_policy(&self, kind: PolicyKind) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let table = txn.open_table(POLICIES).map_err(e)?;
        Ok(table
            .get(kind.key())
            .map_err(e)?
            .map(|v| v.value().to_string()))
    }

    pub(super) async fn put_policy(&self, kind: PolicyKind, text: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(POLICIES)
                .map_err(e)?
                .insert(kind.key(), text)
                .map_err(e)?;
            Ok(())
        })
    }

    pub(super) async fn reference_values(&self) -> Result<ReferenceValues, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let table = txn.open_table(REFERENCES).map_err(e)?;
        let mut raw = Vec::new();
        for item in table.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            raw.push((k.value().to_string(), v.value().to_vec()));
        }
        decode_refs(raw)
    }

    pub(super) async fn set_reference_values(
        &self,
        values: &ReferenceValues,
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(REFERENCES).map_err(e)?;
            for (name, list) in values {
                let bytes = serde_json::to_vec(list).map_err(e)?;
                table.insert(name.as_str(), bytes.as_slice()).map_err(e)?;
            }
            Ok(())
        })
    }

    pub(super) async fn delete_reference_value(&self, name: &str) -> Result<bool, StoreError> {
        self.write(|txn| {
            Ok(txn
                .open_table(REFERENCES)
                .map_err(e)?
                .remove(name)
                .map_err(e)?
                .is_some())
        })
    }

    pub(super) async fn meta_or_insert(
        &self,
        name: &str,
        generate: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        if let Some(k) = self.read_meta(name)? {
            return Ok(k);
        }
        let txn = self.db.begin_write().map_err(e)?;
        let key = {
            let mut meta = txn.open_table(META).map_err(e)?;
            let existing = meta.get(name).map_err(e)?.map(|v| v.value().to_vec());
            match existing {
                Some(k) => k,
                None => {
                    let k = generate();
                    meta.insert(name, k.as_slice()).map_err(e)?;
                    k
                }
            }
        };
        txn.commit().map_err(e)?;
        Ok(key)
    }

    pub(super) async fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(e)?;
        txn.open_table(META)
            .map_err(e)?
            .insert(name, value)
            .map_err(e)?;
        txn.commit().map_err(e)
    }

    pub(super) async fn list_meta(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(e)?;
        let table = txn.open_table(META).map_err(e)?;
        let mut out = Vec::new();
        for row in table.range(prefix..).map_err(e)? {
            let (k, v) = row.map_err(e)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    pub(super) async fn delete_meta(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(e)?;
        txn.open_table(META).map_err(e)?.remove(name).map_err(e)?;
        txn.commit().map_err(e)
    }

    pub(super) async fn generation(&self) -> Result<u64, StoreError> {
        Ok(self.generation.load(Ordering::SeqCst))
    }

    pub(super) async fn insert_session(&self, id: &str, s: &Session) -> Result<(), StoreError> {
        self.sessions.insert(id, s)
    }

    pub(super) async fn claim_nonce(&self, id: &str) -> Result<NonceClaim, StoreError> {
        Ok(self.sessions.claim_nonce(id))
    }

    pub(super) async fn set_session_token(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.sessions.set_token(id, token);
        Ok(())
    }

    pub(super) async fn forget_session_token(&self, id: &str) -> Result<(), StoreError> {
        self.sessions.forget_token(id);
        Ok(())
    }

    pub(super) async fn get_session(&self, id: &str) -> Result<Option<Session>, StoreError> {
        Ok(self.sessions.get(id))
    }
}
