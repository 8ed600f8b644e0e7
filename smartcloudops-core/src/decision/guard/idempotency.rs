//! Idempotency keys: which executions already happened, so a redelivered batch or a replay
//! never runs the same one twice. In memory, in a local file, or in Redis.
//!
//! A key is claimed by `IdempotencyLayer`, inside the circuit breaker, the cooldown and the
//! rate limits: a notification one of them holds back has not happened, so it keeps its key
//! and may run later in the same episode. A key already claimed is looked up
//! ([`IdempotencyStore::is_claimed`]) before those guards, so a duplicate spends nothing.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Deliver, Guard, Guarded, Hold, Outcome, Request};
use crate::error::{Error, Result};
use crate::util::jsonl::{JsonlAppender, encode_lines};

/// Remembers which executions already happened, so a redelivered batch or a replay never
/// runs the same one twice. `claim` is atomic: of two claims of one key, one wins.
pub trait IdempotencyStore: Send + Sync + std::fmt::Debug {
    /// Claims `key` for `ttl`; false if it was claimed before and has not expired.
    fn claim<'a>(&'a self, key: &'a str, ttl: Duration, now_ms: i64)
    -> BoxFuture<'a, Result<bool>>;

    /// Whether `key` is claimed and not expired at `now_ms`, without claiming it. Only a
    /// shortcut (so a duplicate spends no rate-limit token): `claim` decides. The default
    /// says no.
    fn is_claimed<'a>(&'a self, key: &'a str, now_ms: i64) -> BoxFuture<'a, Result<bool>> {
        let _ = (key, now_ms);
        Box::pin(async { Ok(false) })
    }
}

/// Claims the execution's idempotency key just before it runs; a key claimed before holds
/// it back (`duplicate`, recorded only).
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdempotencyLayer<'s> {
    /// Where keys are kept.
    pub(crate) store: &'s dyn IdempotencyStore,
    /// The execution's key.
    pub(crate) key: &'s str,
    /// How long it is remembered.
    pub(crate) ttl: Duration,
    /// When the notification is decided.
    pub(crate) now_ms: i64,
}

impl Guard for IdempotencyLayer<'_> {}

impl<S: Deliver> Deliver for Guarded<IdempotencyLayer<'_>, S> {
    fn deliver<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            let IdempotencyLayer {
                store,
                key,
                ttl,
                now_ms,
            } = self.guard;
            if !store.claim(key, ttl, now_ms).await? {
                return Ok(Outcome::Held(Hold::pause(
                    "duplicate",
                    "this execution already happened",
                )));
            }
            self.inner.deliver(request).await
        })
    }
}

/// Keys in memory: deduplicates within one process only.
#[derive(Debug, Default)]
pub struct MemoryIdempotency(Mutex<HashMap<String, i64>>);

impl IdempotencyStore for MemoryIdempotency {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool>> {
        let mut keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let won = claim_in(&mut keys, key, ttl, now_ms);
        Box::pin(async move { Ok(won) })
    }

    fn is_claimed<'a>(&'a self, key: &'a str, now_ms: i64) -> BoxFuture<'a, Result<bool>> {
        let keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let claimed = keys.get(key).is_some_and(|&expires| expires > now_ms);
        Box::pin(async move { Ok(claimed) })
    }
}

fn claim_in(keys: &mut HashMap<String, i64>, key: &str, ttl: Duration, now_ms: i64) -> bool {
    if keys.get(key).is_some_and(|&expires| expires > now_ms) {
        return false;
    }
    let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    keys.insert(key.to_owned(), now_ms.saturating_add(ttl));
    if keys.len() > 100_000 {
        keys.retain(|_, &mut expires| expires > now_ms);
    }
    true
}

/// Keys in a local file (JSON lines, synced before a claim is granted): survives restarts of
/// a single replica. Expired keys are dropped when the file is loaded.
#[derive(Debug)]
pub struct FileIdempotency {
    file: JsonlAppender,
    keys: Mutex<HashMap<String, i64>>,
}

#[derive(Serialize, Deserialize)]
struct ClaimLine {
    key: String,
    expires_ms: i64,
}

impl ClaimLine {
    fn encode(lines: &[ClaimLine], path: &Path) -> Result<Vec<u8>> {
        encode_lines(lines).map_err(|e| {
            Error::io(
                format!("encoding a claim for {}", path.display()),
                std::io::Error::other(e),
            )
        })
    }
}

impl FileIdempotency {
    /// Opens (or creates) the store at `path`, loading the keys not expired at `now_ms`.
    pub fn open(path: impl Into<PathBuf>, now_ms: i64) -> Result<Self> {
        let path = path.into();
        let file = JsonlAppender::open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut keys = HashMap::new();
        if let Ok(text) = std::fs::File::open(&path) {
            for line in std::io::BufReader::new(text).lines().map_while(|l| l.ok()) {
                // A torn last line (a crash mid-write) is skipped: its claim was never granted.
                if let Ok(c) = serde_json::from_str::<ClaimLine>(&line)
                    && c.expires_ms > now_ms
                {
                    keys.insert(c.key, c.expires_ms);
                }
            }
        }
        // Rewritten without expired keys (atomically: a crash leaves the old file or the
        // new one, never an empty one), then appended to.
        let live: Vec<ClaimLine> = keys
            .iter()
            .map(|(key, &expires_ms)| ClaimLine {
                key: key.clone(),
                expires_ms,
            })
            .collect();
        file.replace(&ClaimLine::encode(&live, &path)?)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(Self {
            file,
            keys: Mutex::new(keys),
        })
    }
}

impl IdempotencyStore for FileIdempotency {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool>> {
        let result = (|| {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if keys.get(key).is_some_and(|&expires| expires > now_ms) {
                return Ok(false);
            }
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            let line = ClaimLine {
                key: key.to_owned(),
                expires_ms: now_ms.saturating_add(ttl_ms),
            };
            let path = self.file.path();
            // Granted only once it is on disk: a failed write leaves the key free.
            self.file
                .append(&ClaimLine::encode(&[line], path)?, true)
                .map_err(|e| Error::io(format!("recording a claim in {}", path.display()), e))?;
            claim_in(&mut keys, key, ttl, now_ms);
            Ok(true)
        })();
        Box::pin(async move { result })
    }

    fn is_claimed<'a>(&'a self, key: &'a str, now_ms: i64) -> BoxFuture<'a, Result<bool>> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let claimed = keys.get(key).is_some_and(|&expires| expires > now_ms);
        Box::pin(async move { Ok(claimed) })
    }
}

/// Keys in Redis (`SET key 1 NX PX ttl`): shared by every replica.
#[cfg(feature = "redis")]
#[derive(Debug)]
pub struct RedisIdempotency {
    connection: crate::redis::LazyConnection,
    prefix: String,
}

#[cfg(feature = "redis")]
impl RedisIdempotency {
    /// Keys `{prefix}:idempotency:{key}` through `connection`.
    pub fn new(connection: crate::redis::RedisConnection, prefix: impl Into<String>) -> Self {
        Self {
            connection: crate::redis::LazyConnection::new(connection),
            prefix: prefix.into(),
        }
    }
}

#[cfg(feature = "redis")]
impl IdempotencyStore for RedisIdempotency {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        _now_ms: i64,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut con = self.connection.get().await?;
            let set: Option<String> = redis::cmd("SET")
                .arg(format!("{}:idempotency:{key}", self.prefix))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut con)
                .await
                .map_err(|e| crate::redis::error("claiming an idempotency key", e))?;
            Ok(set.is_some())
        })
    }

    fn is_claimed<'a>(&'a self, key: &'a str, _now_ms: i64) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut con = self.connection.get().await?;
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{}:idempotency:{key}", self.prefix))
                .query_async(&mut con)
                .await
                .map_err(|e| crate::redis::error("looking up an idempotency key", e))?;
            Ok(exists)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_claims_survive_a_reopen_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl");
        let ttl = Duration::from_secs(60);
        let store = FileIdempotency::open(&path, 0).unwrap();
        assert!(store.claim("a", ttl, 0).await.unwrap());
        assert!(!store.claim("a", ttl, 1).await.unwrap());
        drop(store);
        let reopened = FileIdempotency::open(&path, 10).unwrap();
        assert!(
            !reopened.claim("a", ttl, 10).await.unwrap(),
            "claimed before the restart"
        );
        assert!(reopened.claim("b", ttl, 10).await.unwrap());
        drop(reopened);
        let later = FileIdempotency::open(&path, 120_000).unwrap();
        assert!(later.claim("a", ttl, 120_000).await.unwrap(), "expired");
    }

    #[tokio::test]
    async fn the_layer_claims_once_and_holds_duplicates_back() {
        use super::super::Layer;
        use super::super::testing::*;
        use crate::decision::AlertStatus;
        let store = MemoryIdempotency::default();
        let script = Script::default();
        let n = notification(AlertStatus::Firing);
        let layer = IdempotencyLayer {
            store: &store,
            key: "k",
            ttl: Duration::from_secs(60),
            now_ms: 0,
        };
        assert!(!store.is_claimed("k", 0).await.unwrap());
        let first = layer.layer(&script).deliver(Request::new(&n)).await;
        assert_eq!(first.unwrap(), Outcome::Delivered("ok".into()));
        assert!(store.is_claimed("k", 0).await.unwrap());
        let again = layer.layer(&script).deliver(Request::new(&n)).await;
        assert_eq!(
            again.unwrap(),
            Outcome::Held(Hold::pause("duplicate", "this execution already happened"))
        );
        assert_eq!(script.calls().len(), 1);
        assert!(!store.is_claimed("k", 60_000).await.unwrap(), "expired");
    }

    #[tokio::test]
    async fn memory_claims_are_won_once_until_they_expire() {
        let store = MemoryIdempotency::default();
        let ttl = Duration::from_secs(1);
        assert!(store.claim("k", ttl, 0).await.unwrap());
        assert!(!store.claim("k", ttl, 999).await.unwrap());
        assert!(store.claim("k", ttl, 1_000).await.unwrap());
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/keys.jsonl");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            "{\"key\":\"a\",\"expires_ms\":100}\n{\"key\":\"b\",\"exp",
        )
        .unwrap();
        let store = FileIdempotency::open(&path, 0).unwrap();
        assert!(!store.claim("a", Duration::from_secs(1), 1).await.unwrap());
        assert!(store.claim("b", Duration::from_secs(1), 1).await.unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "compacted, then appended: {text}");
    }
}
