//! PostgreSQL store, shared by several KBS replicas: resources, policies, reference values,
//! sessions and the token key all live in the database, so a session begun on one replica
//! completes on another.
//!
//! A handshake costs the database one statement per step it needs: `/auth` inserts the
//! session; `/attest` claims the nonce and records the token (its own column, one `UPDATE`).
//! Expired sessions are deleted, and the live ones counted against `max-sessions`, at most
//! once a second per replica rather than at every `/auth` (a count is a scan of the table):
//! between two counts a replica adds its own inserts to the last count, so the bound holds to
//! within what the other replicas inserted in that second.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use coffer_wire::reference::ReferenceValues;
use sqlx::{postgres::PgPoolOptions, PgPool, Row};

use super::{decode_refs, now_secs, NonceClaim, PolicyKind, Session, StoreError};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS coffer_resources (path TEXT PRIMARY KEY, value BYTEA NOT NULL)",
    "CREATE TABLE IF NOT EXISTS coffer_policies (kind TEXT PRIMARY KEY, text TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS coffer_reference_values (name TEXT PRIMARY KEY, value BYTEA NOT NULL)",
    "CREATE TABLE IF NOT EXISTS coffer_meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL)",
    "CREATE TABLE IF NOT EXISTS coffer_generation (id INT PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO coffer_generation (id, value) VALUES (1, 0) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS coffer_sessions (id TEXT PRIMARY KEY, session BYTEA NOT NULL, \
     nonce_used BOOLEAN NOT NULL, expires_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS coffer_sessions_expiry ON coffer_sessions (expires_at)",
    // The token of an attested session: its own column, so that recording it is one UPDATE
    // (sessions written before it keep theirs in the session JSON).
    "ALTER TABLE coffer_sessions ADD COLUMN IF NOT EXISTS token TEXT",
];

/// Arbitrary key of the advisory lock that serializes schema creation among replicas.
const SCHEMA_LOCK: i64 = 0x636f_6666_6572;

/// The PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    session_limit: i64,
    /// When (seconds since the epoch) expired sessions are next deleted and the live ones
    /// counted.
    next_sweep: AtomicU64,
    /// The live sessions at the last count, plus this replica's inserts since.
    live: AtomicI64,
    /// Held by the one request that sweeps, so that others do not sweep at the same time.
    sweeping: tokio::sync::Mutex<()>,
}

fn corrupt(err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

impl PgStore {
    /// Connects and creates the schema if needed.
    pub async fn connect(url: &str, session_limit: usize) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await?;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await?;
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Self {
            pool,
            session_limit: i64::try_from(session_limit).unwrap_or(i64::MAX),
            next_sweep: AtomicU64::new(0),
            live: AtomicI64::new(0),
            sweeping: tokio::sync::Mutex::new(()),
        })
    }

    async fn bump(tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        sqlx::query("UPDATE coffer_generation SET value = value + 1 WHERE id = 1")
            .execute(tx)
            .await?;
        Ok(())
    }

    pub(super) async fn get_resource(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT value FROM coffer_resources WHERE path = $1")
            .bind(path)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<Vec<u8>, _>(0)))
    }

    /// Runs one change and bumps the store generation in one transaction; returns the rows
    /// affected.
    async fn change(
        &self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let n = q.execute(&mut *tx).await?.rows_affected();
        Self::bump(&mut tx).await?;
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn put_resource(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        self.change(
            sqlx::query(
                "INSERT INTO coffer_resources (path, value) VALUES ($1, $2) \
                 ON CONFLICT (path) DO UPDATE SET value = EXCLUDED.value",
            )
            .bind(path)
            .bind(value),
        )
        .await
        .map(|_| ())
    }

    pub(super) async fn delete_resource(&self, path: &str) -> Result<bool, StoreError> {
        self.change(sqlx::query("DELETE FROM coffer_resources WHERE path = $1").bind(path))
            .await
            .map(|n| n > 0)
    }

    pub(super) async fn get_policy(&self, kind: PolicyKind) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT text FROM coffer_policies WHERE kind = $1")
            .bind(kind.key())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    pub(super) async fn put_policy(&self, kind: PolicyKind, text: &str) -> Result<(), StoreError> {
        self.change(
            sqlx::query(
                "INSERT INTO coffer_policies (kind, text) VALUES ($1, $2) \
                 ON CONFLICT (kind) DO UPDATE SET text = EXCLUDED.text",
            )
            .bind(kind.key())
            .bind(text),
        )
        .await
        .map(|_| ())
    }

    pub(super) async fn reference_values(&self) -> Result<ReferenceValues, StoreError> {
        let rows = sqlx::query("SELECT name, value FROM coffer_reference_values")
            .fetch_all(&self.pool)
            .await?;
        decode_refs(
            rows.into_iter()
                .map(|r| (r.get::<String, _>(0), r.get::<Vec<u8>, _>(1)))
                .collect(),
        )
    }

    pub(super) async fn set_reference_values(
        &self,
        values: &ReferenceValues,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for (name, list) in values {
            let bytes = serde_json::to_vec(list).map_err(corrupt)?;
            sqlx::query(
                "INSERT INTO coffer_reference_values (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            )
            .bind(name)
            .bind(bytes)
            .execute(&mut *tx)
            .await?;
        }
        Self::bump(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn delete_reference_value(&self, name: &str) -> Result<bool, StoreError> {
        self.change(sqlx::query("DELETE FROM coffer_reference_values WHERE name = $1").bind(name))
            .await
            .map(|n| n > 0)
    }

    pub(super) async fn meta_or_insert(
        &self,
        name: &str,
        generate: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        // Insert-if-absent, then read back: whichever replica wins, all use its value.
        if let Some(row) = sqlx::query("SELECT value FROM coffer_meta WHERE key = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
        {
            return Ok(row.get::<Vec<u8>, _>(0));
        }
        sqlx::query("INSERT INTO coffer_meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(generate())
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM coffer_meta WHERE key = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<Vec<u8>, _>(0))
    }

    pub(super) async fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO coffer_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn list_meta(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // A prefix match on the key without LIKE's wildcards.
        let rows = sqlx::query(
            "SELECT key, value FROM coffer_meta WHERE left(key, length($1)) = $1 ORDER BY key",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<Vec<u8>, _>(1)))
            .collect())
    }

    pub(super) async fn delete_meta(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM coffer_meta WHERE key = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn generation(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT value FROM coffer_generation WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Deletes expired sessions and counts the live ones, when the last count is a second old
    /// (or older) and no other request of this replica is doing it.
    async fn sweep_if_due(&self) -> Result<(), StoreError> {
        let now = now_secs();
        if now < self.next_sweep.load(Ordering::Acquire) {
            return Ok(());
        }
        let Ok(_turn) = self.sweeping.try_lock() else {
            return Ok(());
        };
        sqlx::query("DELETE FROM coffer_sessions WHERE expires_at <= $1")
            .bind(now as i64)
            .execute(&self.pool)
            .await?;
        let live: i64 = sqlx::query("SELECT count(*) FROM coffer_sessions")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        self.live.store(live, Ordering::Release);
        self.next_sweep.store(now + 1, Ordering::Release);
        Ok(())
    }

    pub(super) async fn insert_session(&self, id: &str, s: &Session) -> Result<(), StoreError> {
        self.sweep_if_due().await?;
        if self.live.load(Ordering::Acquire) >= self.session_limit {
            // Counted again at the next sweep: the bound lifts as sessions expire.
            return Err(StoreError::Full);
        }
        sqlx::query(
            "INSERT INTO coffer_sessions (id, session, nonce_used, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(serde_json::to_vec(s).map_err(corrupt)?)
        .bind(s.nonce_used)
        .bind(s.expires_at as i64)
        .execute(&self.pool)
        .await?;
        self.live.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn decode(bytes: Vec<u8>) -> Result<Session, StoreError> {
        serde_json::from_slice(&bytes).map_err(corrupt)
    }

    pub(super) async fn claim_nonce(&self, id: &str) -> Result<NonceClaim, StoreError> {
        let now = now_secs() as i64;
        // One statement: only the first claimant flips nonce_used and gets the row back.
        let claimed = sqlx::query(
            "UPDATE coffer_sessions SET nonce_used = TRUE \
             WHERE id = $1 AND expires_at > $2 AND NOT nonce_used RETURNING session",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = claimed {
            return Ok(NonceClaim::Claimed(Self::decode(row.get(0))?));
        }
        let exists = sqlx::query("SELECT 1 FROM coffer_sessions WHERE id = $1 AND expires_at > $2")
            .bind(id)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        Ok(if exists.is_some() {
            NonceClaim::Replayed
        } else {
            NonceClaim::NoSession
        })
    }

    /// A session here is a row, not memory of this process: it keeps its token (one write per
    /// resource request would cost more than the row).
    pub(super) async fn forget_session_token(&self, _id: &str) -> Result<(), StoreError> {
        Ok(())
    }

    pub(super) async fn set_session_token(&self, id: &str, token: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE coffer_sessions SET token = $2, nonce_used = TRUE WHERE id = $1")
            .bind(id)
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn get_session(&self, id: &str) -> Result<Option<Session>, StoreError> {
        let row = sqlx::query(
            "SELECT session, nonce_used, token FROM coffer_sessions WHERE id = $1 AND expires_at > $2",
        )
        .bind(id)
        .bind(now_secs() as i64)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut s = Self::decode(row.get(0))?;
        // The columns are the truth: the JSON is the session as `/auth` made it.
        s.nonce_used = row.get(1);
        if let Some(token) = row.get::<Option<String>, _>(2) {
            s.token = Some(token);
        }
        Ok(Some(s))
    }
}
