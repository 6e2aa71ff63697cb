//! The gateway's durable state: a SQLite database (WAL) with embedded
//! migrations. Everything a later call depends on lives here, never only in
//! memory.

pub mod agents;
pub mod audit;
pub mod disks;
pub mod git;
pub mod keys;
pub mod networks;
pub mod vms;
pub mod workspaces;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed; the database may be from a newer moat")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("database query failed")]
    Direct(#[from] rusqlite::Error),
    #[error("no node named `{0}`; `moat node list` shows the known nodes")]
    UnknownNode(String),
    #[error("a node named `{0}` already exists; remove it first or pick another name")]
    DuplicateNode(String),
}

/// Contacts missed in a row (heartbeats or live calls) after which a node counts as unreachable.
pub const MISSED_HEARTBEATS_UNREACHABLE: i64 = 3;

/// A node as the registry stores it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NodeRow {
    pub name: String,
    pub address: String,
    pub added_at: String,
    pub last_seen: Option<String>,
    pub last_info: Option<String>,
    pub last_error: Option<String>,
    /// Heartbeats missed in a row; three or more mean unreachable.
    pub missed_heartbeats: i64,
}

impl NodeRow {
    /// Unreachable by the heartbeat's measure: several beats missed in a row.
    pub fn is_unreachable(&self) -> bool {
        self.missed_heartbeats >= MISSED_HEARTBEATS_UNREACHABLE
    }
}

pub use crate::config::Durability;

#[derive(Debug, Clone)]
pub struct State {
    pool: SqlitePool,
    path: PathBuf,
    /// A direct connection for the reads every call on a VM makes (see [`State::read`]).
    reader: std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>,
}

impl State {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub async fn open(path: &Path) -> Result<State, StateError> {
        State::open_with(path, Durability::Process).await
    }

    /// Opens with a chosen durability for commits.
    pub async fn open_with(path: &Path, durability: Durability) -> Result<State, StateError> {
        let synchronous = match durability {
            // WAL + NORMAL: a commit survives the process crashing (SIGKILL), not power loss.
            Durability::Process => SqliteSynchronous::Normal,
            // WAL + FULL: every commit is fsynced and survives power loss too.
            Durability::Power => SqliteSynchronous::Full,
        };
        if let Some(dir) = path.parent() {
            private_dir(dir).map_err(|source| StateError::StateDir { path: dir.into(), source })?;
        }
        // The database holds the audit log, key hashes and VM records: this user's only. SQLite
        // gives its -wal and -shm files the database file's mode.
        for file in [path.to_path_buf(), wal_file(path, "-wal"), wal_file(path, "-shm")] {
            private_file(&file).map_err(|source| StateError::StateDir { path: file.clone(), source })?;
        }
        let open_err = |source| StateError::Open { path: path.into(), source };
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(open_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // Two moat processes starting at once on a new database would both migrate it and one
        // would fail: the first to take this lock connects and migrates, the other then finds
        // nothing to do. (Connecting is inside the lock too: it switches the file to WAL, which
        // SQLite refuses, busy, while the other's migration writes.)
        // (A lock file of its own: closing another descriptor of the database would drop
        // SQLite's own locks on it.)
        let lock_path = wal_file(path, "-lock");
        let locking = lock_path.clone();
        let lock = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            // Made 0600 (an older one is tightened below), like the database beside it.
            let file =
                std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&locking)?;
            private_file(&locking)?;
            file.lock()?;
            Ok(file)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| StateError::StateDir { path: lock_path.clone(), source })?;
        // No ping before each acquire: it doubles every query's round trips to SQLite's worker
        // thread, and a local file connection has nothing to go stale.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        MIGRATOR.run(&pool).await.map_err(StateError::Migrate)?;
        drop(lock);
        let reader = std::sync::Arc::new(std::sync::Mutex::new(open_direct(path, durability)?));
        Ok(State { pool, path: path.into(), reader })
    }

    /// Runs a read on the direct connection, on the caller's thread. For the per-call hot path
    /// only: an indexed read takes a few µs there, where sqlx hands each query to its
    /// connection's worker thread and back (35-60 µs per query measured on an idle 2-core
    /// machine, more when it is busy). Writes stay on the pool.
    pub(crate) fn read<T>(
        &self,
        query: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StateError> {
        // A read cannot leave the connection half-way: a panic in another caller's closure
        // leaves nothing to repair.
        let conn = self.reader.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(query(&conn)?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The newest applied migration, e.g. 1.
    pub async fn schema_version(&self) -> Result<i64, StateError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Adds a node; the name must be new.
    pub async fn add_node(&self, name: &str, address: &str) -> Result<(), StateError> {
        let result = sqlx::query("INSERT INTO nodes (name, address, added_at) VALUES (?, ?, ?)")
            .bind(name)
            .bind(address)
            .bind(now())
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StateError::DuplicateNode(name.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers or re-points a node (the embedded node does this at every start).
    pub async fn upsert_node(&self, name: &str, address: &str) -> Result<(), StateError> {
        sqlx::query(
            "INSERT INTO nodes (name, address, added_at) VALUES (?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET address = excluded.address",
        )
        .bind(name)
        .bind(address)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn remove_node(&self, name: &str) -> Result<(), StateError> {
        let done = sqlx::query("DELETE FROM nodes WHERE name = ?").bind(name).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(StateError::UnknownNode(name.into()));
        }
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>, StateError> {
        Ok(sqlx::query_as("SELECT * FROM nodes ORDER BY name").fetch_all(&self.pool).await?)
    }

    pub async fn node(&self, name: &str) -> Result<NodeRow, StateError> {
        sqlx::query_as("SELECT * FROM nodes WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StateError::UnknownNode(name.into()))
    }

    /// Records a successful contact: when, and what the node said.
    pub async fn node_seen(&self, name: &str, info_json: &str) -> Result<String, StateError> {
        let at = now();
        sqlx::query(
            "UPDATE nodes SET last_seen = ?, last_info = ?, last_error = NULL, missed_heartbeats = 0 WHERE name = ?",
        )
        .bind(&at)
        .bind(info_json)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(at)
    }

    /// Records a failed contact (a live call or a heartbeat): the error, and one more miss in a row.
    /// Records a failed contact with node `name`; returns how many in a row have failed now.
    pub async fn node_failed(&self, name: &str, error: &str) -> Result<i64, StateError> {
        let missed: Option<i64> = sqlx::query_scalar(
            "UPDATE nodes SET last_error = ?, missed_heartbeats = missed_heartbeats + 1 WHERE name = ? \
             RETURNING missed_heartbeats",
        )
        .bind(error)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(missed.unwrap_or(0))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn wal_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// What moat keeps in its state directory; a directory holding anything else is not moat's own.
const STATE_ENTRIES: &[&str] = &[
    "moat.db",
    "moat.db-wal",
    "moat.db-shm",
    "moat.db-lock",
    "pki",
    "run",
    "node",
    "images",
    "audit.key",
    "audit-checkpoints.jsonl",
];

/// Creates `dir` (and its parents) if missing, `dir` itself 0700; tightens an existing `dir`
/// that others could read, saying so, when it holds only moat's files (a directory the operator
/// shares with other things, named with --state-dir, keeps its mode and gets a warning).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        return std::fs::DirBuilder::new().mode(0o700).create(dir).or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        });
    }
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let foreign = std::fs::read_dir(dir)?.flatten().find(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        !STATE_ENTRIES.contains(&name.as_str()) && !name.starts_with("audit.key.")
    });
    match foreign {
        None => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            tracing::warn!(dir = %dir.display(), "the state directory was {mode:o}, readable by other users; it is 0700 now");
        }
        Some(entry) => tracing::warn!(
            dir = %dir.display(),
            "the state directory is {mode:o}, readable by other users, and holds {} which is not moat's, so its \
             mode is left alone: give moat a directory of its own, or chmod 0700 it (the database itself is 0600)",
            entry.file_name().to_string_lossy()
        ),
    }
    Ok(())
}

/// Creates `file` empty with mode 0600 if missing; tightens an existing one others could read.
fn private_file(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::metadata(file) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
                tracing::warn!(file = %file.display(), "was {mode:o}, readable by other users; it is 0600 now");
            }
            Ok(())
        }
        // Only the database itself is made ahead of SQLite; its -wal and -shm follow its mode.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if file.extension().is_some_and(|x| x == "db") {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(file)
                    .map(drop)
                    .or_else(|e| if e.kind() == std::io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A direct (rusqlite) connection to an already-migrated database, for the per-call hot
/// paths (audit appends, key checks) where sqlx-sqlite's worker-thread hand-offs cost more
/// than the query. Same SQLite library, same settings as the pool.
pub fn open_direct(path: &Path, durability: Durability) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let synchronous = match durability {
        Durability::Process => "NORMAL",
        Durability::Power => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

/// RFC 3339 UTC with milliseconds, computed without a date crate.
pub fn now() -> String {
    moat_proto::time::rfc3339_after(Duration::ZERO)
}

pub use moat_proto::time::rfc3339_after;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nodes_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/moat.db");
        let state = State::open(&path).await.unwrap();
        assert_eq!(state.schema_version().await.unwrap(), 10);
        state.add_node("n1", "http://127.0.0.1:7443").await.unwrap();
        assert!(matches!(state.add_node("n1", "x").await, Err(StateError::DuplicateNode(_))));
        state.upsert_node("local", "unix:/tmp/a.sock").await.unwrap();
        state.upsert_node("local", "unix:/tmp/b.sock").await.unwrap();
        state.node_seen("n1", "{}").await.unwrap();
        state.close().await;

        let state = State::open(&path).await.unwrap();
        let nodes = state.nodes().await.unwrap();
        assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["local", "n1"]);
        assert_eq!(nodes[0].address, "unix:/tmp/b.sock");
        assert!(nodes[1].last_seen.is_some());
        assert!(matches!(state.remove_node("zz").await, Err(StateError::UnknownNode(_))));
        state.remove_node("n1").await.unwrap();
        assert!(matches!(state.node("n1").await, Err(StateError::UnknownNode(_))));
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&state.pool).await.unwrap();
        assert_eq!(mode, "wal");
    }

    /// Two processes opening one new database at once: the second waits for the first's
    /// migrations instead of failing on them.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_first_opens_both_succeed() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("moat.db");
            let (a, b) = tokio::join!(State::open(&db), State::open(&db));
            a.unwrap();
            b.unwrap();
        }
    }

    /// The state directory and the database files are this user's only, new or found open.
    #[tokio::test]
    async fn state_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("moat");
        let db = state_dir.join("moat.db");
        let state = State::open(&db).await.unwrap();
        state.add_node("n1", "https://127.0.0.1:1").await.unwrap();
        assert_eq!(mode(&state_dir), 0o700);
        for file in [db.clone(), wal_file(&db, "-wal"), wal_file(&db, "-shm")] {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        state.close().await;
        // An existing state directory and database left open to others are tightened at start.
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let state = State::open(&db).await.unwrap();
        assert_eq!((mode(&state_dir), mode(&db)), (0o700, 0o600));
        assert_eq!(state.nodes().await.unwrap().len(), 1, "nothing was lost");
        state.close().await;
        // A directory shared with other things (say --state-dir /srv) keeps its mode; the
        // database is still made private.
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(state_dir.join("somebody-elses.txt"), "x").unwrap();
        State::open(&db).await.unwrap().close().await;
        assert_eq!((mode(&state_dir), mode(&db)), (0o755, 0o600));
    }

    /// Failed contacts count up (whoever made them) until one succeeds; the count decides
    /// when a node is shown unreachable.
    #[tokio::test]
    async fn failed_contacts_count_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        state.add_node("n1", "https://127.0.0.1:7443").await.unwrap();
        for want in 1..=3 {
            assert_eq!(state.node_failed("n1", "connection refused").await.unwrap(), want);
        }
        let row = state.node("n1").await.unwrap();
        assert!(row.is_unreachable());
        assert_eq!(row.last_error.as_deref(), Some("connection refused"));
        state.node_seen("n1", "{}").await.unwrap();
        assert!(!state.node("n1").await.unwrap().is_unreachable());
        assert_eq!(state.node_failed("n1", "again").await.unwrap(), 1);
        assert_eq!(state.node_failed("gone", "x").await.unwrap(), 0, "an unregistered node counts nothing");
    }
}
