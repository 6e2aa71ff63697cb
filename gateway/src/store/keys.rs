//! API keys: `moat_<id>_<secret>`. The key is shown once at creation; the
//! database keeps the public id, the principal name and role, and a SHA-256
//! of the key. Every authentication reads the database, so a revoked or
//! expired key is refused on its next call.

use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

use super::{now, rfc3339_after};
use crate::principal::{Principal, Role};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// Why a presented key is not accepted. The messages never echo the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no API key: send `Authorization: Bearer <key>` (create one with `moat keys create`)")]
    Missing,
    #[error("malformed API key: expected moat_<id>_<secret>")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("API key {0} was revoked")]
    Revoked(String),
    #[error("API key {0} expired at {1}")]
    Expired(String, String),
    #[error("cannot check the API key right now; retry")]
    Store(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key name must be 1-128 characters of letters, digits, '.', '_', '-' or '@'")]
    BadName,
    #[error("no key with id `{0}`; `moat keys list` shows them")]
    Unknown(String),
    #[error("key {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("cannot read the system random source")]
    Random(#[source] getrandom::Error),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
}

/// SHA-256 of `data`, hex: how moat keeps secrets it checks (API keys, git tokens).
pub fn sha256_hex(data: &str) -> String {
    Sha256::digest(data.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(bytes: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(KeyError::Random)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// Creates a key; returns its row and the secret key string (shown once).
pub async fn create(
    pool: &SqlitePool,
    name: &str,
    role: Role,
    expires_in: Option<Duration>,
) -> Result<(KeyRow, String), KeyError> {
    if !valid_name(name) {
        return Err(KeyError::BadName);
    }
    let id = random_hex(4)?;
    let key = format!("moat_{id}_{}", random_hex(32)?);
    let row = KeyRow {
        id: id.clone(),
        name: name.into(),
        role: role.as_str().into(),
        created_at: now(),
        expires_at: expires_in.map(rfc3339_after),
        revoked_at: None,
    };
    sqlx::query("INSERT INTO api_keys (id, name, role, key_sha256, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.role)
        .bind(sha256_hex(&key))
        .bind(&row.created_at)
        .bind(&row.expires_at)
        .execute(pool)
        .await?;
    Ok((row, key))
}

pub async fn list(pool: &SqlitePool) -> Result<Vec<KeyRow>, KeyError> {
    Ok(sqlx::query_as("SELECT id, name, role, created_at, expires_at, revoked_at FROM api_keys ORDER BY created_at")
        .fetch_all(pool)
        .await?)
}

pub async fn revoke(pool: &SqlitePool, id: &str) -> Result<(), KeyError> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT revoked_at FROM api_keys WHERE id = ?").bind(id).fetch_optional(pool).await?;
    match row {
        None => Err(KeyError::Unknown(id.into())),
        Some((Some(_),)) => Err(KeyError::AlreadyRevoked(id.into())),
        Some((None,)) => {
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ?").bind(now()).bind(id).execute(pool).await?;
            Ok(())
        }
    }
}

/// Checks presented keys on every call. A direct connection behind a mutex: one indexed read
/// of a few microseconds, cheaper than any cache that would still have to see revocations.
pub struct KeyChecker {
    conn: Mutex<rusqlite::Connection>,
}

impl KeyChecker {
    pub fn open(path: &std::path::Path) -> Result<KeyChecker, rusqlite::Error> {
        Ok(KeyChecker { conn: Mutex::new(super::open_direct(path, super::Durability::Process)?) })
    }

    pub fn check(&self, key: &str) -> Result<Principal, AuthError> {
        authenticate(&self.conn.lock().expect("the key checker lock is never poisoned"), key)
    }
}

/// Resolves a presented key to its principal, or says why not.
pub fn authenticate(conn: &rusqlite::Connection, key: &str) -> Result<Principal, AuthError> {
    let id = key
        .strip_prefix("moat_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
        .filter(|id| id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(AuthError::Malformed)?;
    use rusqlite::OptionalExtension;
    type Stored = (String, String, String, Option<String>, Option<String>);
    let row: Option<Stored> = conn
        .prepare_cached("SELECT name, role, key_sha256, expires_at, revoked_at FROM api_keys WHERE id = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))).optional()
        })
        .map_err(|e| AuthError::Store(e.to_string()))?;
    let (name, role, stored, expires_at, revoked_at) = row.ok_or(AuthError::Unknown)?;
    if !constant_time_eq(sha256_hex(key).as_bytes(), stored.as_bytes()) {
        return Err(AuthError::Unknown);
    }
    if revoked_at.is_some() {
        return Err(AuthError::Revoked(id.into()));
    }
    if let Some(at) = expires_at
        && at <= now()
    {
        return Err(AuthError::Expired(id.into(), at));
    }
    let role = role.parse().map_err(AuthError::Store)?;
    Ok(Principal::new(name, role))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses `90s`, `15m`, `12h`, `30d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 90s, 15m, 12h or 30d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}` is not a duration like 90s, 15m, 12h or 30d")),
    };
    if secs == 0 {
        return Err("the duration must be more than zero".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::State;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        for bad in ["", "d", "10", "5w", "0s", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn create_authenticate_revoke_expire() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("moat.db")).await.unwrap();
        let pool = state.pool();
        let checker = KeyChecker::open(state.path()).unwrap();
        let (row, key) = create(pool, "agent-1", Role::Agent, None).await.unwrap();
        assert!(key.starts_with(&format!("moat_{}_", row.id)) && key.len() == 5 + 8 + 1 + 64);
        assert_eq!(checker.check(&key), Ok(Principal::new("agent-1", Role::Agent)));

        let stored: String = sqlx::query_scalar("SELECT key_sha256 FROM api_keys").fetch_one(pool).await.unwrap();
        assert!(!stored.contains(&key[14..]), "only a hash is stored");

        let mut forged = key.clone();
        forged.pop();
        forged.push(if key.ends_with('0') { '1' } else { '0' });
        assert_eq!(checker.check(&forged), Err(AuthError::Unknown));
        assert_eq!(checker.check("Bearer nonsense"), Err(AuthError::Malformed));
        assert_eq!(checker.check("moat_00000000_x"), Err(AuthError::Unknown));

        revoke(pool, &row.id).await.unwrap();
        assert_eq!(checker.check(&key), Err(AuthError::Revoked(row.id.clone())));
        assert!(matches!(revoke(pool, &row.id).await, Err(KeyError::AlreadyRevoked(_))));
        assert!(matches!(revoke(pool, "ffffffff").await, Err(KeyError::Unknown(_))));

        let (short, key) = create(pool, "brief", Role::Reader, Some(Duration::from_secs(1))).await.unwrap();
        assert!(checker.check(&key).is_ok());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(matches!(checker.check(&key), Err(AuthError::Expired(id, _)) if id == short.id));
        assert!(matches!(create(pool, "bad name", Role::Reader, None).await, Err(KeyError::BadName)));
    }
}
