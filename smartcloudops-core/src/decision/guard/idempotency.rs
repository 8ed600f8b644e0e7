//! Idempotency keys: which executions already happened, so a redelivered batch, a replay
//! or a restart never runs the same one twice. In memory, in a local file, or in Redis.
//!
//! A key has two states: **claimed** (an execution started) and **delivered** (it ended:
//! the receiver accepted the notification, or the remediation ran). The two kinds of
//! execution use them differently, on purpose:
//!
//! - **Notifications are at least once, with idempotency keys.** A notification whose key
//!   is claimed but not delivered (the process died mid-delivery, or the delivery failed and
//!   waits in the outbox) is sent again, under the same key (the HTTP receivers' header
//!   `Idempotency-Key`), so the receiver can tell the copies apart. One whose key is
//!   delivered is a duplicate and is not sent again.
//! - **Remediations are at most once per firing episode of a group.** The key is claimed
//!   before the command runs, and a claimed key never runs again, whether or not the run
//!   finished: running a command twice can do twice what was asked once. A key found claimed
//!   but not delivered (the process died while the command ran) is reported as
//!   `outcome_unknown` and escalated to the receiver's `escalate_to`: a person checks.
//!
//! A key is claimed by `IdempotencyLayer`, inside the circuit breaker, the cooldown and the
//! rate limits: a notification one of them holds back has not happened, so it keeps its key
//! and may run later in the same episode. A key's state is looked up
//! ([`IdempotencyStore::state`]) before those guards, so a duplicate spends nothing.

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

/// The state of a key that is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// An execution started and has not been seen to end.
    #[default]
    Claimed,
    /// The execution ended: the notification was accepted, or the remediation ran.
    Delivered,
}

/// Remembers which executions already happened, so a redelivered batch or a replay never
/// runs the same one twice. `claim` is atomic: of two claims of one key, one wins.
pub trait IdempotencyStore: Send + Sync + std::fmt::Debug {
    /// Claims `key` for `ttl`; false if it was claimed (or delivered) before and has not
    /// expired.
    fn claim<'a>(&'a self, key: &'a str, ttl: Duration, now_ms: i64)
    -> BoxFuture<'a, Result<bool>>;

    /// The state of `key` at `now_ms`: `None` when it is not remembered (never claimed, or
    /// expired).
    fn state<'a>(&'a self, key: &'a str, now_ms: i64) -> BoxFuture<'a, Result<Option<KeyState>>>;

    /// Records that the execution of `key` ended (delivered, or ran), for `ttl` from
    /// `now_ms`.
    fn mark_delivered<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<()>>;

    /// Whether `key` is claimed or delivered and not expired at `now_ms`.
    fn is_claimed<'a>(&'a self, key: &'a str, now_ms: i64) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move { Ok(self.state(key, now_ms).await?.is_some()) })
    }
}

/// What an execution's key promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guarantee {
    /// A notification: a key claimed by a delivery that did not end is sent again.
    AtLeastOnce,
    /// A remediation: a claimed key never runs again.
    AtMostOnce,
}

/// Claims the execution's idempotency key just before it runs, and marks it delivered once
/// it ended; a key claimed before holds it back (`duplicate`, recorded only), except a
/// notification's key whose delivery never ended, which is sent again under the same key.
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
    /// At least once (a notification) or at most once (a remediation).
    pub(crate) guarantee: Guarantee,
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
                guarantee,
            } = self.guard;
            if !store.claim(key, ttl, now_ms).await? {
                let resend = guarantee == Guarantee::AtLeastOnce
                    && store.state(key, now_ms).await? == Some(KeyState::Claimed);
                if !resend {
                    return Ok(Outcome::Held(Hold::pause(
                        "duplicate",
                        "this execution already happened",
                    )));
                }
            }
            let outcome = self.inner.deliver(request).await?;
            let ended = match &outcome {
                Outcome::Delivered(_) => true,
                // A remediation that ran and failed has run all the same.
                Outcome::Failed { .. } => guarantee == Guarantee::AtMostOnce,
                Outcome::Held(_) => false,
            };
            if ended {
                store.mark_delivered(key, ttl, now_ms).await?;
            }
            Ok(outcome)
        })
    }
}

/// A remembered key: when it expires, and its state.
type Remembered = (i64, KeyState);

fn live(keys: &HashMap<String, Remembered>, key: &str, now_ms: i64) -> Option<KeyState> {
    keys.get(key)
        .filter(|(expires, _)| *expires > now_ms)
        .map(|&(_, state)| state)
}

fn expiry(ttl: Duration, now_ms: i64) -> i64 {
    now_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

/// Keys in memory: deduplicates within one process only.
#[derive(Debug, Default)]
pub struct MemoryIdempotency(Mutex<HashMap<String, Remembered>>);

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

    fn state<'a>(&'a self, key: &'a str, now_ms: i64) -> BoxFuture<'a, Result<Option<KeyState>>> {
        let keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let state = live(&keys, key, now_ms);
        Box::pin(async move { Ok(state) })
    }

    fn mark_delivered<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<()>> {
        let mut keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        keys.insert(key.to_owned(), (expiry(ttl, now_ms), KeyState::Delivered));
        Box::pin(async { Ok(()) })
    }
}

fn claim_in(keys: &mut HashMap<String, Remembered>, key: &str, ttl: Duration, now_ms: i64) -> bool {
    if live(keys, key, now_ms).is_some() {
        return false;
    }
    keys.insert(key.to_owned(), (expiry(ttl, now_ms), KeyState::Claimed));
    if keys.len() > 100_000 {
        keys.retain(|_, (expires, _)| *expires > now_ms);
    }
    true
}

/// Keys in a local file (JSON lines, synced before a claim is granted or a delivery
/// recorded): survives restarts of a single replica. The last line of a key is its state;
/// expired keys are dropped when the file is loaded.
#[derive(Debug)]
pub struct FileIdempotency {
    file: JsonlAppender,
    keys: Mutex<HashMap<String, Remembered>>,
}

#[derive(Serialize, Deserialize)]
struct ClaimLine {
    key: String,
    expires_ms: i64,
    /// Absent in files written before keys had states: claimed.
    #[serde(default)]
    state: KeyState,
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
                if let Ok(c) = serde_json::from_str::<ClaimLine>(&line) {
                    keys.insert(c.key, (c.expires_ms, c.state));
                }
            }
        }
        keys.retain(|_, (expires, _)| *expires > now_ms);
        // Rewritten without expired keys (atomically: a crash leaves the old file or the
        // new one, never an empty one), then appended to.
        let live: Vec<ClaimLine> = keys
            .iter()
            .map(|(key, &(expires_ms, state))| ClaimLine {
                key: key.clone(),
                expires_ms,
                state,
            })
            .collect();
        file.replace(&ClaimLine::encode(&live, &path)?)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(Self {
            file,
            keys: Mutex::new(keys),
        })
    }

    /// Appends `line` and syncs it: only then is the change made in memory.
    fn record(&self, line: ClaimLine) -> Result<()> {
        let path = self.file.path();
        self.file
            .append(&ClaimLine::encode(&[line], path)?, true)
            .map_err(|e| Error::io(format!("recording a key in {}", path.display()), e))
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
            if live(&keys, key, now_ms).is_some() {
                return Ok(false);
            }
            // Granted only once it is on disk: a failed write leaves the key free.
            self.record(ClaimLine {
                key: key.to_owned(),
                expires_ms: expiry(ttl, now_ms),
                state: KeyState::Claimed,
            })?;
            claim_in(&mut keys, key, ttl, now_ms);
            Ok(true)
        })();
        Box::pin(async move { result })
    }

    fn state<'a>(&'a self, key: &'a str, now_ms: i64) -> BoxFuture<'a, Result<Option<KeyState>>> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let state = live(&keys, key, now_ms);
        Box::pin(async move { Ok(state) })
    }

    fn mark_delivered<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<()>> {
        let result = (|| {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let expires_ms = expiry(ttl, now_ms);
            self.record(ClaimLine {
                key: key.to_owned(),
                expires_ms,
                state: KeyState::Delivered,
            })?;
            keys.insert(key.to_owned(), (expires_ms, KeyState::Delivered));
            Ok(())
        })();
        Box::pin(async move { result })
    }
}

/// Keys in Redis (`SET key claimed NX PX ttl`, then `SET key delivered PX ttl`): shared by
/// every replica.
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

    fn redis_key(&self, key: &str) -> String {
        format!("{}:idempotency:{key}", self.prefix)
    }
}

/// The value of a delivered key in Redis; any other value (`claimed`, or `1` from before
/// keys had states) is a claim.
#[cfg(feature = "redis")]
const REDIS_DELIVERED: &str = "delivered";

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
                .arg(self.redis_key(key))
                .arg("claimed")
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut con)
                .await
                .map_err(|e| crate::redis::error("claiming an idempotency key", e))?;
            Ok(set.is_some())
        })
    }

    fn state<'a>(&'a self, key: &'a str, _now_ms: i64) -> BoxFuture<'a, Result<Option<KeyState>>> {
        Box::pin(async move {
            let mut con = self.connection.get().await?;
            let value: Option<String> = redis::cmd("GET")
                .arg(self.redis_key(key))
                .query_async(&mut con)
                .await
                .map_err(|e| crate::redis::error("looking up an idempotency key", e))?;
            Ok(value.map(|v| {
                if v == REDIS_DELIVERED {
                    KeyState::Delivered
                } else {
                    KeyState::Claimed
                }
            }))
        })
    }

    fn mark_delivered<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        _now_ms: i64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut con = self.connection.get().await?;
            let _: Option<String> = redis::cmd("SET")
                .arg(self.redis_key(key))
                .arg(REDIS_DELIVERED)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut con)
                .await
                .map_err(|e| crate::redis::error("recording a delivered idempotency key", e))?;
            Ok(())
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
            guarantee: Guarantee::AtLeastOnce,
        };
        assert!(!store.is_claimed("k", 0).await.unwrap());
        let first = layer.layer(&script).deliver(Request::new(&n)).await;
        assert_eq!(first.unwrap(), Outcome::Delivered("ok".into()));
        assert!(store.is_claimed("k", 0).await.unwrap());
        assert_eq!(
            store.state("k", 0).await.unwrap(),
            Some(KeyState::Delivered)
        );
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

    #[tokio::test]
    async fn a_claimed_notification_is_sent_again_and_a_claimed_remediation_never() {
        use super::super::Layer;
        use super::super::testing::*;
        use crate::decision::AlertStatus;
        let n = notification(AlertStatus::Firing);
        let ttl = Duration::from_secs(60);
        for (guarantee, runs) in [(Guarantee::AtLeastOnce, 1), (Guarantee::AtMostOnce, 0)] {
            let store = MemoryIdempotency::default();
            // A delivery that started and never ended (the process died).
            assert!(store.claim("k", ttl, 0).await.unwrap());
            let script = Script::default();
            let layer = IdempotencyLayer {
                store: &store,
                key: "k",
                ttl,
                now_ms: 1,
                guarantee,
            };
            layer
                .layer(&script)
                .deliver(Request::new(&n))
                .await
                .unwrap();
            assert_eq!(script.calls().len(), runs, "{guarantee:?}");
        }
    }

    #[tokio::test]
    async fn a_failed_notification_stays_claimed_and_a_failed_remediation_has_run() {
        use super::super::Layer;
        use super::super::testing::*;
        use crate::decision::AlertStatus;
        let n = notification(AlertStatus::Firing);
        let ttl = Duration::from_secs(60);
        for (guarantee, after) in [
            (Guarantee::AtLeastOnce, KeyState::Claimed),
            (Guarantee::AtMostOnce, KeyState::Delivered),
        ] {
            let store = MemoryIdempotency::default();
            let script = Script::new([transient("HTTP 503")]);
            let layer = IdempotencyLayer {
                store: &store,
                key: "k",
                ttl,
                now_ms: 0,
                guarantee,
            };
            let outcome = layer.layer(&script).deliver(Request::new(&n)).await;
            assert_eq!(outcome.unwrap(), transient("HTTP 503"));
            assert_eq!(
                store.state("k", 0).await.unwrap(),
                Some(after),
                "{guarantee:?}"
            );
        }
    }

    #[tokio::test]
    async fn file_states_survive_a_reopen_and_old_lines_are_claims() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl");
        std::fs::write(&path, "{\"key\":\"old\",\"expires_ms\":100000}\n").unwrap();
        let ttl = Duration::from_secs(60);
        let store = FileIdempotency::open(&path, 0).unwrap();
        assert_eq!(
            store.state("old", 0).await.unwrap(),
            Some(KeyState::Claimed)
        );
        assert!(store.claim("a", ttl, 0).await.unwrap());
        assert!(store.claim("b", ttl, 0).await.unwrap());
        store.mark_delivered("b", ttl, 1).await.unwrap();
        drop(store);
        let reopened = FileIdempotency::open(&path, 10).unwrap();
        assert_eq!(
            reopened.state("a", 10).await.unwrap(),
            Some(KeyState::Claimed)
        );
        assert_eq!(
            reopened.state("b", 10).await.unwrap(),
            Some(KeyState::Delivered)
        );
        assert_eq!(reopened.state("c", 10).await.unwrap(), None);
        assert!(!reopened.claim("b", ttl, 10).await.unwrap());
        drop(reopened);
        let compacted = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            compacted.lines().count(),
            3,
            "one line per key: {compacted}"
        );
    }
}
