//! Guards around every execution: idempotency keys, cooldowns, rate limits, a circuit breaker
//! and retries with error classification.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a receiver retries a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Wait before the second try; doubles per try, with full jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest wait between tries (also caps a `Retry-After`).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

fn default_attempts() -> u32 {
    3
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed try number `attempt` (1-based): a `Retry-After` the receiver
    /// asked for (capped), else a random wait up to the exponential backoff (full jitter:
    /// retries of many failures spread out instead of arriving together).
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.max_backoff);
        }
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_backoff);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// `rate_limit = { per_minute = N }`: a token bucket refilled continuously.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Executions per minute, with a burst of the same size.
    pub per_minute: u32,
}

#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_ms: f64,
    capacity: f64,
    tokens: f64,
    at_ms: i64,
}

impl TokenBucket {
    pub(crate) fn new(limit: RateLimit, now_ms: i64) -> Self {
        let capacity = f64::from(limit.per_minute.max(1));
        Self {
            per_ms: capacity / 60_000.0,
            capacity,
            tokens: capacity,
            at_ms: now_ms,
        }
    }

    /// Whether a token is available at `now_ms`, without taking it.
    pub(crate) fn has_token(&self, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        (self.tokens + elapsed * self.per_ms).min(self.capacity) >= 1.0
    }

    pub(crate) fn try_take(&mut self, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.at_ms = now_ms;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// `circuit_breaker = { failures = K, open_for = "5m" }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failed deliveries (after their retries) that open the circuit.
    pub failures: u32,
    /// How long an open circuit stops the receiver; then one trial delivery is let through.
    #[serde(default = "default_open_for", with = "humantime_serde")]
    pub open_for: Duration,
}

fn default_open_for() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until_ms: i64,
    },
    /// `open_for` passed: one trial delivery is out.
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    config: CircuitBreakerConfig,
    circuit: Circuit,
}

impl CircuitBreaker {
    pub(crate) fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            circuit: Circuit::Closed { failures: 0 },
        }
    }

    /// Whether a delivery may go now: always while closed; once `open_for` has passed, one
    /// trial (the circuit is half-open until its outcome is recorded); never while open.
    pub(crate) fn try_pass(&mut self, now_ms: i64) -> bool {
        match self.circuit {
            Circuit::Closed { .. } => true,
            Circuit::Open { until_ms } if now_ms >= until_ms => {
                self.circuit = Circuit::HalfOpen;
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen => false,
        }
    }

    /// Records a delivery's outcome; true when this failure opened the circuit (a failed
    /// trial opens it again). Failures that were in flight while it opened change nothing.
    pub(crate) fn record(&mut self, ok: bool, now_ms: i64) -> bool {
        let open_ms = i64::try_from(self.config.open_for.as_millis()).unwrap_or(i64::MAX);
        let open = Circuit::Open {
            until_ms: now_ms.saturating_add(open_ms),
        };
        match (self.circuit, ok) {
            (_, true) => {
                self.circuit = Circuit::Closed { failures: 0 };
                false
            }
            (Circuit::Closed { failures }, false)
                if failures + 1 >= self.config.failures.max(1) =>
            {
                self.circuit = open;
                true
            }
            (Circuit::Closed { failures }, false) => {
                self.circuit = Circuit::Closed {
                    failures: failures + 1,
                };
                false
            }
            (Circuit::HalfOpen, false) => {
                self.circuit = open;
                true
            }
            (Circuit::Open { .. }, false) => false,
        }
    }
}

/// Remembers which executions already happened, so a redelivered batch or a replay never
/// runs the same one twice. `claim` is atomic: of two claims of one key, one wins.
pub trait IdempotencyStore: Send + Sync + std::fmt::Debug {
    /// Claims `key` for `ttl`; false if it was claimed before and has not expired.
    fn claim<'a>(&'a self, key: &'a str, ttl: Duration, now_ms: i64)
    -> BoxFuture<'a, Result<bool>>;
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
    path: PathBuf,
    state: Mutex<(HashMap<String, i64>, std::fs::File)>,
}

#[derive(Serialize, Deserialize)]
struct ClaimLine {
    key: String,
    expires_ms: i64,
}

impl FileIdempotency {
    /// Opens (or creates) the store at `path`, loading the keys not expired at `now_ms`.
    pub fn open(path: impl Into<PathBuf>, now_ms: i64) -> Result<Self> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let mut keys = HashMap::new();
        if let Ok(file) = std::fs::File::open(&path) {
            for line in std::io::BufReader::new(file).lines().map_while(|l| l.ok()) {
                // A torn last line (a crash mid-write) is skipped: its claim was never granted.
                if let Ok(c) = serde_json::from_str::<ClaimLine>(&line)
                    && c.expires_ms > now_ms
                {
                    keys.insert(c.key, c.expires_ms);
                }
            }
        }
        // Rewrite without expired keys, then append.
        let tmp = path.with_extension("tmp");
        let mut text = String::new();
        for (key, expires_ms) in &keys {
            text.push_str(
                &serde_json::to_string(&ClaimLine {
                    key: key.clone(),
                    expires_ms: *expires_ms,
                })
                .unwrap_or_default(),
            );
            text.push('\n');
        }
        // Written, synced, renamed, and the directory synced: a crash leaves the old file
        // or the new one, never an empty one.
        (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            std::fs::File::open(dir)?.sync_all()
        })()
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Ok(Self {
            path,
            state: Mutex::new((keys, file)),
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
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (keys, file) = &mut *state;
            if keys.get(key).is_some_and(|&expires| expires > now_ms) {
                return Ok(false);
            }
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            let line = ClaimLine {
                key: key.to_owned(),
                expires_ms: now_ms.saturating_add(ttl_ms),
            };
            let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
            bytes.push(b'\n');
            // Granted only once it is on disk: a failed write leaves the key free.
            file.write_all(&bytes)
                .and_then(|()| file.sync_data())
                .map_err(|e| {
                    Error::io(format!("recording a claim in {}", self.path.display()), e)
                })?;
            claim_in(keys, key, ttl, now_ms);
            Ok(true)
        })();
        Box::pin(async move { result })
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(RateLimit { per_minute: 2 }, 0);
        assert!(b.try_take(0) && b.try_take(0));
        assert!(!b.try_take(1000));
        assert!(b.try_take(30_000), "one token per 30 s");
        assert!(!b.try_take(30_001));
    }

    #[test]
    fn breaker_opens_after_k_failures_and_lets_one_trial_through_after_open_for() {
        let mut c = CircuitBreaker::new(CircuitBreakerConfig {
            failures: 3,
            open_for: Duration::from_secs(60),
        });
        assert!(c.try_pass(0));
        assert!(!c.record(false, 0) && !c.record(false, 1));
        assert!(c.record(false, 2), "the third failure opens it");
        assert!(
            !c.record(false, 3),
            "a failure in flight does not open it again"
        );
        assert!(!c.try_pass(30_000));
        assert!(c.try_pass(60_002), "half-open: one trial");
        assert!(!c.try_pass(60_003), "and only one");
        assert!(c.record(false, 60_004), "a failed trial opens it again");
        assert!(!c.try_pass(60_005));
        assert!(c.try_pass(120_010));
        assert!(!c.record(true, 120_011), "a good trial closes it");
        assert!(c.try_pass(120_012) && c.try_pass(120_013));
    }

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        let p = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for attempt in 1..10 {
            assert!(p.backoff(attempt, None) <= Duration::from_secs(1));
        }
        assert_eq!(
            p.backoff(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
    }

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
}
