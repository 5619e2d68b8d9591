//! Persistent state of the KBS: resources, policies, reference values, the token signing key,
//! and (for PostgreSQL) sessions.
//!
//! Two backends: [`RedbStore`] (embedded, one process, every write an fsynced atomic commit) and
//! [`PgStore`] (PostgreSQL, shared by several replicas). The [`Store`] enum dispatches between
//! them. Every admin change bumps a generation counter so that replicas rebuild their compiled
//! policies when any replica changes them.

mod pg;
mod redb_store;

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use coffer_wire::{reference::ReferenceValues, Tee};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use pg::PgStore;
pub use redb_store::RedbStore;

/// Which policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// The resource (release) policy.
    Resource,
    /// The attestation (appraisal) policy.
    Attestation,
}

impl PolicyKind {
    /// Storage key.
    pub fn key(self) -> &'static str {
        match self {
            Self::Resource => "resource",
            Self::Attestation => "attestation",
        }
    }
}

/// A store failure. Callers report it without the stored data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error("embedded store: {0}")]
    Redb(String),
    /// PostgreSQL failed.
    #[error("PostgreSQL store: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Stored data did not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Too many live sessions.
    #[error("too many open sessions; retry later")]
    Full,
}

/// One client's attestation session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// The TEE type announced in `/auth`.
    pub tee: Tee,
    /// The challenge nonce.
    pub nonce: String,
    /// True once an `/attest` has been tried with this nonce (each nonce is single use).
    pub nonce_used: bool,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
    /// The token issued when attestation succeeded.
    pub token: Option<String>,
    /// IBM SE: the challenge's measurement key and nonce (base64), to check the answer with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub se_secret: Option<String>,
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Outcome of claiming a session's nonce for an `/attest`.
#[derive(Debug)]
pub enum NonceClaim {
    /// The session exists, was unexpired, and its nonce was unused until now.
    Claimed(Session),
    /// No such session, or it expired.
    NoSession,
    /// The nonce was already used by an earlier `/attest`.
    Replayed,
}

/// The KBS store.
pub enum Store {
    /// Embedded redb.
    Redb(RedbStore),
    /// PostgreSQL.
    Postgres(PgStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Redb($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// A resource's bytes.
    pub async fn get_resource(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self, s => s.get_resource(path).await)
    }
    /// Stores a resource (replacing any previous value).
    pub async fn put_resource(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_resource(path, value).await)
    }
    /// Deletes a resource; false when there was none.
    pub async fn delete_resource(&self, path: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete_resource(path).await)
    }
    /// The stored policy text, if one was set.
    pub async fn get_policy(&self, kind: PolicyKind) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => s.get_policy(kind).await)
    }
    /// Replaces a policy.
    pub async fn put_policy(&self, kind: PolicyKind, text: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_policy(kind, text).await)
    }
    /// All reference values.
    pub async fn reference_values(&self) -> Result<ReferenceValues, StoreError> {
        dispatch!(self, s => s.reference_values().await)
    }
    /// Sets the named lists in `values`, replacing those names' previous lists.
    pub async fn set_reference_values(&self, values: &ReferenceValues) -> Result<(), StoreError> {
        dispatch!(self, s => s.set_reference_values(values).await)
    }
    /// Deletes one named list; false when there was none.
    pub async fn delete_reference_value(&self, name: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete_reference_value(name).await)
    }
    /// The token signing key (PKCS#8), created with `generate` on first use. All replicas of a
    /// shared store end up with the same key.
    pub async fn token_key(
        &self,
        generate: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        dispatch!(self, s => s.meta_or_insert("token-key", generate).await)
    }
    /// The mesh CA (its key and certificate, [`crate::mesh`]), created with `generate` on first
    /// use. All replicas of a shared store end up with the same CA.
    pub async fn mesh_ca(&self, generate: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>, StoreError> {
        dispatch!(self, s => s.meta_or_insert("mesh-ca", generate).await)
    }
    /// Records an issued mesh certificate under its serial (hex).
    pub async fn put_mesh_issued(&self, serial: &str, record: &[u8]) -> Result<(), StoreError> {
        let key = format!("mesh-cert/{serial}");
        dispatch!(self, s => s.put_meta(&key, record).await)
    }
    /// Every recorded mesh certificate: (serial, record).
    pub async fn mesh_issued(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = dispatch!(self, s => s.list_meta("mesh-cert/").await)?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("mesh-cert/").to_string(), v))
            .collect())
    }
    /// Forgets a recorded mesh certificate (expired).
    pub async fn delete_mesh_issued(&self, serial: &str) -> Result<(), StoreError> {
        let key = format!("mesh-cert/{serial}");
        dispatch!(self, s => s.delete_meta(&key).await)
    }
    /// A counter that changes whenever a policy or reference value changes.
    pub async fn generation(&self) -> Result<u64, StoreError> {
        dispatch!(self, s => s.generation().await)
    }
    /// Saves a new session.
    pub async fn insert_session(&self, id: &str, session: &Session) -> Result<(), StoreError> {
        dispatch!(self, s => s.insert_session(id, session).await)
    }
    /// Atomically marks the session's nonce as used and returns the session as it was.
    pub async fn claim_nonce(&self, id: &str) -> Result<NonceClaim, StoreError> {
        dispatch!(self, s => s.claim_nonce(id).await)
    }
    /// Records the token issued to a session.
    pub async fn set_session_token(&self, id: &str, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.set_session_token(id, token).await)
    }
    /// Drops a session's token from memory once its client shows that it keeps the sealed
    /// cookie that carries it (the embedded store; a PostgreSQL session is a row, not memory,
    /// and stays as it is).
    pub async fn forget_session_token(&self, id: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.forget_session_token(id).await)
    }
    /// An unexpired session.
    pub async fn get_session(&self, id: &str) -> Result<Option<Session>, StoreError> {
        dispatch!(self, s => s.get_session(id).await)
    }
}

/// In-memory sessions for the embedded store. Sessions live minutes; after a restart clients
/// simply authenticate again, as with upstream.
///
/// The map is split into [`SESSION_SHARDS`] shards, each under its own lock, chosen by a keyed
/// hash of the session id. One map under one lock stalled every handler whenever it grew: a
/// hash map doubles by moving all its entries into a fresh table (at 28,000 sessions, a few
/// milliseconds in which both runtime workers waited on the lock), and the sweep walked all of
/// it. A shard holds a 64th of the sessions, so its growth and its sweep are that much shorter,
/// and they happen at different moments.
///
/// A session is held as [`Held`], keyed by the 16 bytes of its id: about 80 bytes in the table
/// and one small string beside, where a [`Session`] under its hex id took about 130 and three.
pub(crate) struct MemorySessions {
    shards: Box<[Shard]>,
    /// Picks a session's shard. Keyed per process: session ids come from this KBS's RNG, but
    /// the cookies that look them up come from clients.
    hasher: std::hash::RandomState,
    /// Sessions held, across the shards (the bound is `limit`).
    len: std::sync::atomic::AtomicUsize,
    limit: usize,
    /// The second of the last sweep of all shards (at the bound). Sessions expire by the
    /// second, so at the bound the shards are swept at most once a second: a flood of `/auth`
    /// against a full store is refused at the cost of a count, not of a scan each.
    full_sweep_at: std::sync::atomic::AtomicU64,
}

/// The session map's shards: enough that a shard stays small at the largest bound, few enough
/// that a full sweep (at the bound) stays cheap.
const SESSION_SHARDS: usize = 64;

struct Shard {
    map: Mutex<HashMap<SessionKey, Held>>,
    /// When this shard is next swept of expired sessions (seconds since the epoch).
    next_sweep: std::sync::atomic::AtomicU64,
}

/// A session id as its 16 bytes.
type SessionKey = [u8; 16];

/// The key of a session id: the id is 32 lowercase hex digits, as `/auth` makes them. Anything
/// else is no session's id (the uppercase spelling of one included).
fn session_key(id: &str) -> Option<SessionKey> {
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut key = [0u8; 16];
    hex::decode_to_slice(id, &mut key).ok()?;
    Some(key)
}

/// A [`Session`] as the embedded store holds it: its strings boxed, without spare capacity.
struct Held {
    tee: Tee,
    nonce_used: bool,
    expires_at: u64,
    nonce: Box<str>,
    token: Option<Box<str>>,
    se_secret: Option<Box<str>>,
}

impl Held {
    fn new(s: &Session) -> Self {
        Self {
            tee: s.tee,
            nonce_used: s.nonce_used,
            expires_at: s.expires_at,
            nonce: s.nonce.as_str().into(),
            token: s.token.as_deref().map(Into::into),
            se_secret: s.se_secret.as_deref().map(Into::into),
        }
    }

    fn session(&self) -> Session {
        Session {
            tee: self.tee,
            nonce: self.nonce.to_string(),
            nonce_used: self.nonce_used,
            expires_at: self.expires_at,
            token: self.token.as_deref().map(str::to_string),
            se_secret: self.se_secret.as_deref().map(str::to_string),
        }
    }
}

/// How often the in-memory sessions are swept of expired ones, so that memory follows the live
/// sessions (rate × lifetime) instead of growing to `max-sessions`. Each shard is swept by the
/// first insert into it that finds its sweep due.
const SWEEP_EVERY: u64 = 10;

impl MemorySessions {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            shards: (0..SESSION_SHARDS)
                .map(|_| Shard {
                    map: Mutex::new(HashMap::new()),
                    next_sweep: std::sync::atomic::AtomicU64::new(0),
                })
                .collect(),
            hasher: std::hash::RandomState::new(),
            len: std::sync::atomic::AtomicUsize::new(0),
            limit,
            full_sweep_at: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &SessionKey) -> &Shard {
        use std::hash::BuildHasher;
        &self.shards[(self.hasher.hash_one(key) % SESSION_SHARDS as u64) as usize]
    }

    fn lock(shard: &Shard) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Held>> {
        shard.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The locked shard that holds (or would hold) session `id`, with its key; None for an id
    /// that no session has.
    fn locked(
        &self,
        id: &str,
    ) -> Option<(
        std::sync::MutexGuard<'_, HashMap<SessionKey, Held>>,
        SessionKey,
    )> {
        let key = session_key(id)?;
        Some((Self::lock(self.shard(&key)), key))
    }

    /// Drops the expired sessions of one (locked) shard and counts them out of `len`.
    fn sweep(&self, map: &mut HashMap<SessionKey, Held>, now: u64) {
        use std::sync::atomic::Ordering;
        let before = map.len();
        map.retain(|_, s| s.expires_at > now);
        self.len.fetch_sub(before - map.len(), Ordering::Relaxed);
    }

    pub(crate) fn insert(&self, id: &str, session: &Session) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let key = session_key(id)
            .ok_or_else(|| StoreError::Corrupt("a session id is 32 lowercase hex digits".into()))?;
        let now = now_secs();
        if self.len.load(Ordering::Relaxed) >= self.limit
            && self.full_sweep_at.swap(now, Ordering::Relaxed) != now
        {
            // At the bound, and not yet swept this second: sweep every shard, one lock at a
            // time, before refusing.
            for shard in self.shards.iter() {
                self.sweep(&mut Self::lock(shard), now);
            }
        }
        let shard = self.shard(&key);
        let mut map = Self::lock(shard);
        if now >= shard.next_sweep.load(Ordering::Relaxed) {
            shard.next_sweep.store(now + SWEEP_EVERY, Ordering::Relaxed);
            self.sweep(&mut map, now);
        }
        // The place is taken with one atomic update, so concurrent inserts cannot pass the bound.
        if self
            .len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_err()
        {
            return Err(StoreError::Full);
        }
        if map.insert(key, Held::new(session)).is_some() {
            // An id already held (the RNG repeating itself) replaces its session.
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    pub(crate) fn claim_nonce(&self, id: &str) -> NonceClaim {
        let Some((mut map, key)) = self.locked(id) else {
            return NonceClaim::NoSession;
        };
        match map.get_mut(&key) {
            Some(s) if s.expires_at > now_secs() => {
                if s.nonce_used {
                    NonceClaim::Replayed
                } else {
                    let before = s.session();
                    s.nonce_used = true;
                    NonceClaim::Claimed(before)
                }
            }
            _ => NonceClaim::NoSession,
        }
    }

    pub(crate) fn set_token(&self, id: &str, token: &str) {
        self.replace_token(id, Some(token.into()));
    }

    pub(crate) fn forget_token(&self, id: &str) {
        self.replace_token(id, None);
    }

    /// Sets the token of session `id`, if it is held.
    fn replace_token(&self, id: &str, token: Option<Box<str>>) {
        if let Some((mut map, key)) = self.locked(id) {
            if let Some(s) = map.get_mut(&key) {
                s.token = token;
            }
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<Session> {
        let (map, key) = self.locked(id)?;
        map.get(&key)
            .filter(|s| s.expires_at > now_secs())
            .map(Held::session)
    }

    /// Sessions held, expired ones not yet swept included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub(crate) fn decode_refs(raw: Vec<(String, Vec<u8>)>) -> Result<ReferenceValues, StoreError> {
    raw.into_iter()
        .map(|(k, v)| {
            let list: Vec<Value> =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((k, list))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(expires_at: u64) -> Session {
        Session {
            tee: Tee::Sample,
            nonce: "n".into(),
            nonce_used: false,
            expires_at,
            token: None,
            se_secret: None,
        }
    }

    /// A session id as `/auth` makes them: 32 lowercase hex digits (`tag` tells them apart).
    fn id(tag: u32, i: u32) -> String {
        format!("{tag:08x}{i:024x}")
    }

    #[test]
    fn expired_sessions_are_swept_out() {
        let s = MemorySessions::new(1000);
        let now = now_secs();
        for i in 0..100 {
            s.insert(&id(1, i), &session(now - 1)).unwrap();
        }
        // Each shard swept at its first insert (nothing had expired then); the next sweeps are
        // due later.
        assert_eq!(s.len(), 100);
        for shard in s.shards.iter() {
            shard
                .next_sweep
                .store(now, std::sync::atomic::Ordering::Relaxed);
        }
        // An insert sweeps its own shard: the expired sessions there go, and only there.
        let live = id(2, 0);
        let (map, _) = s.locked(&live).unwrap();
        let there = map.len();
        drop(map);
        s.insert(&live, &session(now + 300)).unwrap();
        assert_eq!(
            s.locked(&live).unwrap().0.len(),
            1,
            "expired sessions stayed in the swept shard"
        );
        assert_eq!(
            s.len(),
            100 - there + 1,
            "the count did not follow the sweep"
        );
        assert!(s.get(&live).is_some());
        assert!(
            s.get(&id(1, 0)).is_none(),
            "an expired session was returned"
        );
    }

    #[test]
    fn the_bound_holds_across_shards_and_lifts_as_sessions_expire() {
        let s = MemorySessions::new(50);
        let now = now_secs();
        for i in 0..40 {
            s.insert(&id(1, i), &session(now - 1)).unwrap();
        }
        for i in 0..10 {
            s.insert(&id(2, i), &session(now + 300)).unwrap();
        }
        // Full, though 40 have expired: at the bound every shard is swept before refusing.
        assert_eq!(s.len(), 50);
        s.insert(&id(3, 0), &session(now + 300)).unwrap();
        assert_eq!(s.len(), 11);
        for i in 0..39 {
            s.insert(&id(4, i), &session(now + 300)).unwrap();
        }
        assert!(matches!(
            s.insert(&id(5, 0), &session(now + 300)),
            Err(StoreError::Full)
        ));
        assert_eq!(s.len(), 50);
        // A refused insert leaves a held session as it was.
        let mut other = session(now + 300);
        other.nonce = "m".into();
        assert!(matches!(s.insert(&id(2, 0), &other), Err(StoreError::Full)));
        assert_eq!(s.get(&id(2, 0)).unwrap().nonce, "n");
    }

    #[test]
    fn at_the_bound_the_shards_are_swept_at_most_once_a_second() {
        // Tried again, on a fresh map, whenever the clock's second turns during a try.
        loop {
            let s = MemorySessions::new(10);
            let second = now_secs();
            for i in 0..10 {
                s.insert(&id(1, i), &session(second - 1)).unwrap();
            }
            // Swept already this second: refused on the count alone, the expired sessions kept.
            s.full_sweep_at
                .store(second, std::sync::atomic::Ordering::Relaxed);
            let refused = s.insert(&id(2, 0), &session(second + 300));
            if now_secs() != second {
                continue;
            }
            assert!(matches!(refused, Err(StoreError::Full)));
            assert_eq!(s.len(), 10);
            // Not yet swept this second: the sweep makes room.
            s.full_sweep_at
                .store(0, std::sync::atomic::Ordering::Relaxed);
            s.insert(&id(2, 0), &session(second + 300)).unwrap();
            assert_eq!(s.len(), 1);
            break;
        }
    }

    #[test]
    fn concurrent_inserts_never_pass_the_bound() {
        let s = std::sync::Arc::new(MemorySessions::new(1000));
        let now = now_secs();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..500)
                        .filter(|&i| s.insert(&id(t, i), &session(now + 300)).is_ok())
                        .count()
                })
            })
            .collect();
        let inserted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(inserted, 1000);
        assert_eq!(s.len(), 1000);
        let held: usize = s
            .shards
            .iter()
            .map(|sh| MemorySessions::lock(sh).len())
            .sum();
        assert_eq!(held, 1000);
    }

    #[test]
    fn a_session_reads_back_as_it_was_written_and_changed() {
        let s = MemorySessions::new(10);
        let now = now_secs();
        let key = id(7, 7);
        let mut written = session(now + 300);
        written.tee = Tee::Snp;
        written.nonce = "bm9uY2U=".into();
        written.se_secret = Some("c2VjcmV0".into());
        s.insert(&key, &written).unwrap();
        let read = s.get(&key).unwrap();
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(&written).unwrap()
        );
        s.set_token(&key, "a.b.c");
        assert_eq!(s.get(&key).unwrap().token.as_deref(), Some("a.b.c"));
        match s.claim_nonce(&key) {
            NonceClaim::Claimed(before) => {
                assert!(!before.nonce_used);
                assert_eq!(before.token.as_deref(), Some("a.b.c"));
            }
            _ => panic!("the nonce was not claimed"),
        }
        assert!(matches!(s.claim_nonce(&key), NonceClaim::Replayed));
        assert!(s.get(&key).unwrap().nonce_used);
        s.forget_token(&key);
        assert_eq!(s.get(&key).unwrap().token, None);
    }

    #[test]
    fn only_lowercase_hex_ids_of_32_digits_name_a_session() {
        let s = MemorySessions::new(10);
        let now = now_secs();
        let key = id(0xabcd_ef01, 9);
        s.insert(&key, &session(now + 300)).unwrap();
        // The same bytes spelled in uppercase, or any other string, find nothing and change
        // nothing.
        let upper = key.to_uppercase();
        assert_ne!(upper, key);
        for other in [
            upper.as_str(),
            "",
            "not-a-session",
            &key[..31],
            &format!("{key}0"),
        ] {
            assert!(s.get(other).is_none(), "{other:?} found a session");
            assert!(matches!(s.claim_nonce(other), NonceClaim::NoSession));
            s.set_token(other, "x.y.z");
            assert!(matches!(
                s.insert(other, &session(now + 300)),
                Err(StoreError::Corrupt(_))
            ));
        }
        assert_eq!(s.get(&key).unwrap().token, None);
        assert_eq!(s.len(), 1);
    }
}
