//! Anchoring the audit chain outside the database, in the manner of CloudTrail's
//! digest files and Certificate Transparency's signed tree heads: checkpoints
//! (sequence number, head hash, time) MACed with a key kept outside the
//! database, appended to a file (and optionally a second place). Someone who can
//! write the database can cut its tail or rebuild the whole chain with fresh
//! hashes, and the chain alone still verifies; without the key they cannot make a
//! checkpoint that vouches for their version, so `verify` names truncation after a
//! checkpoint and re-chained history, and says what it could not check (records
//! after the last checkpoint).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

use super::chain::hex;

/// What a checkpoint's MAC covers, versioned so the format can change.
const DOMAIN: &str = "moat-audit-checkpoint-v1";

#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("cannot read or create the audit key {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit key {path} is not 64 hex digits; restore it from your backup")]
    BadKey { path: PathBuf },
    #[error("cannot write the audit checkpoint to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the audit log's head")]
    Query(#[from] sqlx::Error),
}

/// The secret that MACs checkpoints: 32 random bytes in a 0600 file outside the database.
#[derive(Clone)]
pub struct AnchorKey([u8; 32]);

impl std::fmt::Debug for AnchorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnchorKey(..)")
    }
}

impl AnchorKey {
    /// The key at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<AnchorKey>, AnchorError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(AnchorError::Key { path: path.into(), source }),
        };
        let text = text.trim();
        let bad = || AnchorError::BadKey { path: path.into() };
        if text.len() != 64 {
            return Err(bad());
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Some(AnchorKey(key)))
    }

    /// The key at `path`, made (0600) if there is none yet. Several gateways may start on one
    /// state directory at once: the key is written to a file of its own and linked into place,
    /// which fails if another got there first, whose key is then the one.
    pub fn load_or_create(path: &Path) -> Result<AnchorKey, AnchorError> {
        if let Some(key) = AnchorKey::load(path)? {
            return Ok(key);
        }
        use std::os::unix::fs::OpenOptionsExt;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random source works");
        let io = |source| AnchorError::Key { path: path.into(), source };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        file.write_all(format!("{}\n", hex(&key)).as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(AnchorKey(key)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                AnchorKey::load(path)?.ok_or_else(|| AnchorError::BadKey { path: path.into() })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// HMAC-SHA256 (RFC 2104) of `message`, hex.
    fn mac(&self, message: &str) -> String {
        let (mut inner, mut outer) = ([0x36u8; 64], [0x5cu8; 64]);
        for (i, byte) in self.0.iter().enumerate() {
            inner[i] ^= byte;
            outer[i] ^= byte;
        }
        let inner_hash = Sha256::new().chain_update(inner).chain_update(message.as_bytes()).finalize();
        hex(&Sha256::new().chain_update(outer).chain_update(inner_hash).finalize())
    }
}

/// One line of the checkpoint file: the chain's head at a moment, vouched for by the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub at: String,
    pub mac: String,
}

impl Checkpoint {
    fn message(seq: i64, hash: &str, at: &str) -> String {
        format!("{DOMAIN}\n{seq}\n{hash}\n{at}")
    }

    fn sealed(key: &AnchorKey, seq: i64, hash: String, at: String) -> Checkpoint {
        let mac = key.mac(&Checkpoint::message(seq, &hash, &at));
        Checkpoint { seq, hash, at, mac }
    }

    fn is_sealed_by(&self, key: &AnchorKey) -> bool {
        // Both sides are hex of the same length; a MAC comparison leaks nothing worth a
        // constant-time compare here (the verifier is the key holder).
        key.mac(&Checkpoint::message(self.seq, &self.hash, &self.at)) == self.mac
    }
}

/// The chain's newest record: (seq, hash), or (0, genesis) for an empty log.
async fn head(pool: &SqlitePool) -> Result<(i64, String), sqlx::Error> {
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetch_optional(pool).await?;
    Ok(last.unwrap_or((0, super::GENESIS.to_string())))
}

/// Writes checkpoints for one gateway process.
#[derive(Debug)]
pub struct Anchor {
    key: AnchorKey,
    file: PathBuf,
    copy: Option<PathBuf>,
    last: std::sync::Mutex<i64>,
}

impl Anchor {
    /// Checkpoints go to `file` (and `copy`, when the operator names a second place), sealed
    /// with the key at `key_path` (made if missing).
    pub fn open(key_path: &Path, file: PathBuf, copy: Option<PathBuf>) -> Result<Anchor, AnchorError> {
        Ok(Anchor { key: AnchorKey::load_or_create(key_path)?, file, copy, last: std::sync::Mutex::new(-1) })
    }

    /// Appends a checkpoint of the chain's head if it moved since this process's last one.
    pub async fn checkpoint(&self, pool: &SqlitePool) -> Result<Option<Checkpoint>, AnchorError> {
        let (seq, hash) = head(pool).await?;
        if *self.last.lock().expect("the checkpoint lock is never poisoned") == seq {
            return Ok(None);
        }
        let checkpoint = Checkpoint::sealed(&self.key, seq, hash, crate::store::now());
        let line = serde_json::to_string(&checkpoint).expect("a checkpoint serializes") + "\n";
        for path in std::iter::once(&self.file).chain(self.copy.as_ref()) {
            append(path, &line).map_err(|source| AnchorError::Write { path: path.clone(), source })?;
        }
        *self.last.lock().expect("the checkpoint lock is never poisoned") = seq;
        Ok(Some(checkpoint))
    }
}

/// Appends `line` and syncs it: a checkpoint is worth having only if it survives.
fn append(path: &Path, line: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)?;
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

/// What checking the checkpoints found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorProblem {
    /// A checkpoint vouches for record `seq`, but the log now ends before it.
    Truncated { seq: i64, at: String, last: i64 },
    /// Record `seq` exists but is not the one a checkpoint vouched for: history was rebuilt.
    Rechained { seq: i64, at: String },
    /// A checkpoint line whose MAC does not match: edited, or made without the key.
    Forged { line: usize },
    /// The key exists, so checkpoints were written, but their file is gone or empty.
    NoCheckpoints { file: PathBuf },
    /// Checkpoints exist but the key to check them does not.
    NoKey { key: PathBuf },
    /// A line that is not a checkpoint.
    Unreadable { line: usize },
}

impl std::fmt::Display for AnchorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnchorProblem::Truncated { seq, at, last } => write!(
                f,
                "TRUNCATED: the checkpoint of {at} vouches for record {seq}, but the log ends at record {last}"
            ),
            AnchorProblem::Rechained { seq, at } => write!(
                f,
                "RE-CHAINED: record {seq} is not the one the checkpoint of {at} vouches for; the history before \
                 it was rebuilt"
            ),
            AnchorProblem::Forged { line } => {
                write!(f, "checkpoint line {line} does not carry the audit key's MAC: it was edited or forged")
            }
            AnchorProblem::NoCheckpoints { file } => write!(
                f,
                "the checkpoint file {} is missing or empty although checkpoints were written (the audit key \
                 exists): it was deleted",
                file.display()
            ),
            AnchorProblem::NoKey { key } => {
                write!(f, "checkpoints exist but the audit key {} does not: restore it to check them", key.display())
            }
            AnchorProblem::Unreadable { line } => write!(f, "checkpoint line {line} is not a checkpoint"),
        }
    }
}

/// The outcome of checking the checkpoints against the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorReport {
    /// Checkpoints whose MAC and record matched.
    pub checked: usize,
    /// The newest record a checkpoint vouches for, and when.
    pub anchored: Option<(i64, String)>,
    /// The log's newest record: records after `anchored` are not vouched for yet.
    pub last: i64,
    pub problem: Option<AnchorProblem>,
}

/// Checks every checkpoint in `file` with the key at `key_path` against the log in `pool`.
pub async fn verify_anchors(pool: &SqlitePool, key_path: &Path, file: &Path) -> Result<AnchorReport, AnchorError> {
    let (last, _) = head(pool).await?;
    let key = AnchorKey::load(key_path)?;
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(AnchorError::Write { path: file.into(), source }),
    };
    let report = |checked, anchored, problem| AnchorReport { checked, anchored, last, problem };
    let Some(key) = key else {
        let problem = (!text.trim().is_empty()).then(|| AnchorProblem::NoKey { key: key_path.into() });
        return Ok(report(0, None, problem));
    };
    if text.trim().is_empty() {
        return Ok(report(0, None, Some(AnchorProblem::NoCheckpoints { file: file.into() })));
    }
    let (mut checked, mut anchored) = (0, None::<(i64, String)>);
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let Ok(checkpoint) = serde_json::from_str::<Checkpoint>(line) else {
            return Ok(report(checked, anchored, Some(AnchorProblem::Unreadable { line: n + 1 })));
        };
        if !checkpoint.is_sealed_by(&key) {
            return Ok(report(checked, anchored, Some(AnchorProblem::Forged { line: n + 1 })));
        }
        let Checkpoint { seq, hash, at, .. } = checkpoint;
        if seq > last {
            return Ok(report(checked, anchored, Some(AnchorProblem::Truncated { seq, at, last })));
        }
        let stored: Option<String> = if seq == 0 {
            Some(super::GENESIS.to_string())
        } else {
            sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = ?").bind(seq).fetch_optional(pool).await?
        };
        if stored.as_deref() != Some(hash.as_str()) {
            return Ok(report(checked, anchored, Some(AnchorProblem::Rechained { seq, at })));
        }
        checked += 1;
        if anchored.as_ref().is_none_or(|(s, _)| seq >= *s) {
            anchored = Some((seq, at));
        }
    }
    Ok(report(checked, anchored, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 case 1's message with a 32-byte key (ours are 32 bytes); the expected value is
        // Python's hmac.new(b"\x0b" * 32, b"Hi There", hashlib.sha256).
        let key = AnchorKey([0x0b; 32]);
        assert_eq!(key.mac("Hi There"), "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7");
    }

    #[test]
    fn a_checkpoint_is_bound_to_its_key_and_fields() {
        let key = AnchorKey([7; 32]);
        let cp = Checkpoint::sealed(&key, 5, "ab".into(), "2026-12-02T00:00:00.000Z".into());
        assert!(cp.is_sealed_by(&key));
        assert!(!cp.is_sealed_by(&AnchorKey([8; 32])));
        assert!(!Checkpoint { seq: 6, ..cp.clone() }.is_sealed_by(&key));
        assert!(!Checkpoint { hash: "ac".into(), ..cp }.is_sealed_by(&key));
    }
}
