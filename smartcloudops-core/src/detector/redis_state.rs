//! Per-series detector state in Redis: one key per series, with a TTL.
//!
//! Key layout (versioned through the namespace, see
//! [`Detector::series_state_namespace`](super::Detector::series_state_namespace)):
//!
//! ```text
//! {key_prefix}:state:{namespace}:{series_id}      e.g. smartcloudops:state:v1:ewma:9f2c…:1234
//! ```
//!
//! The value is the series' state in the detector's snapshot encoding (postcard). A detector
//! of another kind, configuration or snapshot format reads another namespace, so it never
//! mixes incompatible state; old namespaces simply expire. Every save refreshes the TTL of
//! the series saved, so the state of a series that stopped reporting disappears `ttl` later.
//!
//! **Versioned writes.** Next to each state, `{key_prefix}:state-version:{namespace}:{series_id}`
//! holds its version, a counter bumped by every write. The store remembers the version of
//! each state it loaded or wrote, and a write (a Lua script, one per chunk) only replaces a
//! state still at that version; a series it never saw a state for is only written if none is
//! stored. So a replica whose in-memory state went stale (its partition moved to another
//! replica and came back, or the state could not be loaded during an outage) never
//! overwrites the newer state another replica saved meanwhile: the write is refused,
//! counted, and the series is reported by
//! [`take_rejected`](SeriesStateStore::take_rejected) so that the pipeline drops the stale
//! state and loads the stored one. A state written before versions existed (without a
//! version key) loads as version 0 and is replaced like any other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rustc_hash::FxHashMap;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{SeriesStateStore, SeriesStates};
use crate::error::Result;
use crate::redis::{
    LazyConnection, RedisConnection, default_key_prefix, error, expiring_keys_problems,
};

/// `[detector.redis_state]`: where and how long per-series states are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStateStoreConfig {
    /// The connection; without it, the pipeline's `[redis]` section (or the default).
    #[serde(default)]
    pub redis: Option<RedisConnection>,
    /// First part of every key.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a series' state outlives its last save.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// How often the states that changed are saved while running (and once at shutdown).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}

impl Default for RedisStateStoreConfig {
    fn default() -> Self {
        Self {
            redis: None,
            key_prefix: default_key_prefix(),
            ttl: default_ttl(),
            interval: default_interval(),
        }
    }
}

impl RedisStateStoreConfig {
    /// Configuration problems.
    pub fn problems(&self) -> crate::error::Problems {
        let mut problems = expiring_keys_problems(self.redis.as_ref(), self.ttl);
        if self.interval.is_zero() {
            problems.push("interval", "must be longer than 0");
        }
        if self.key_prefix.is_empty() {
            problems.push("key_prefix", "must not be empty");
        }
        problems
    }
}

/// Keys and commands per round trip: large enough to amortise the round trip, small enough
/// not to stall Redis's event loop.
const CHUNK: usize = 1000;

/// Versions of series states remembered before the table is cleared (a cleared table only
/// costs refused writes and reloads, never a lost state): about 40 MB at most.
const MAX_KNOWN_VERSIONS: usize = 2_000_000;

/// Writes `state` (`KEYS[2i-1]`) and its version (`KEYS[2i]`) for each series `i` whose
/// stored version still is the expected one (`ARGV[2i]`; `-1`: no state stored, `0`: a state
/// without a version). `ARGV[1]` is the TTL in seconds, `ARGV[2i+1]` the state. Replies with
/// one integer per series: the new version, or `0` when the write was refused.
const SAVE_SCRIPT: &str = r#"
local ttl = ARGV[1]
local out = {}
for i = 1, #KEYS / 2 do
  local key, vkey = KEYS[2 * i - 1], KEYS[2 * i]
  local stored = redis.call('GET', vkey)
  local current
  if stored then
    current = tonumber(stored)
  elseif redis.call('EXISTS', key) == 1 then
    current = 0
  else
    current = -1
  end
  if current == tonumber(ARGV[2 * i]) then
    local version = math.max(current, 0) + 1
    redis.call('SET', key, ARGV[2 * i + 1], 'EX', ttl)
    redis.call('SET', vkey, version, 'EX', ttl)
    out[i] = version
  else
    out[i] = 0
  end
end
return out
"#;

/// The expected version of a series no state is known of: only written if none is stored.
const ABSENT: i64 = -1;

/// A [`SeriesStateStore`] in Redis. See the [module docs](self).
///
/// It connects on first use and reconnects by itself after Redis went away.
#[derive(Debug)]
pub struct RedisStateStore {
    connection: LazyConnection,
    key_prefix: String,
    ttl_secs: u64,
    versions: Mutex<Versions>,
}

/// What the store knows of the stored versions, per namespace, and the series whose writes
/// were refused since the pipeline last asked.
#[derive(Debug, Default)]
struct Versions {
    known: HashMap<String, FxHashMap<u64, i64>>,
    rejected: HashMap<String, Vec<u64>>,
    rejected_total: u64,
}

impl Versions {
    fn known_count(&self) -> usize {
        self.known.values().map(|m| m.len()).sum()
    }
}

impl RedisStateStore {
    /// A store for `config`, connecting through `connection` unless the config has its own.
    pub fn new(config: &RedisStateStoreConfig, connection: RedisConnection) -> Self {
        Self {
            connection: LazyConnection::new(config.redis.clone().unwrap_or(connection)),
            key_prefix: config.key_prefix.clone(),
            ttl_secs: config.ttl.as_secs().max(1),
            versions: Mutex::new(Versions::default()),
        }
    }

    /// The key of one series' state.
    pub fn key(&self, namespace: &str, series_id: u64) -> String {
        format!("{}:state:{namespace}:{series_id}", self.key_prefix)
    }

    /// The key of the version of one series' state.
    pub fn version_key(&self, namespace: &str, series_id: u64) -> String {
        format!("{}:state-version:{namespace}:{series_id}", self.key_prefix)
    }

    /// Writes refused since this store was created because a newer state was stored.
    pub fn rejected_writes(&self) -> u64 {
        self.versions().rejected_total
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, Versions> {
        // Plain bookkeeping: a panic elsewhere while holding it leaves nothing half-done
        // that matters more than a refused write.
        self.versions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SeriesStateStore for RedisStateStore {
    fn name(&self) -> &str {
        "redis"
    }

    fn load<'a>(
        &'a self,
        namespace: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<SeriesStates>> {
        Box::pin(async move {
            let mut con = self.connection.get().await?;
            let mut found = Vec::new();
            for chunk in ids.chunks(CHUNK) {
                let keys: Vec<String> = chunk.iter().map(|id| self.key(namespace, *id)).collect();
                let version_keys: Vec<String> = chunk
                    .iter()
                    .map(|id| self.version_key(namespace, *id))
                    .collect();
                let (values, versions): (Vec<Option<Vec<u8>>>, Vec<Option<i64>>) = redis::pipe()
                    .cmd("MGET")
                    .arg(&keys)
                    .cmd("MGET")
                    .arg(&version_keys)
                    .query_async(&mut con)
                    .await
                    .map_err(|e| error("loading detector states", e))?;
                let mut v = self.versions();
                if v.known_count() > MAX_KNOWN_VERSIONS {
                    v.known.clear();
                }
                let known = v.known.entry(namespace.to_owned()).or_default();
                for ((id, value), version) in chunk.iter().zip(values).zip(versions) {
                    match value {
                        // Without a version: written before versions existed.
                        Some(value) => {
                            known.insert(*id, version.unwrap_or(0));
                            found.push((*id, value));
                        }
                        None => {
                            known.remove(id);
                        }
                    }
                }
            }
            Ok(found)
        })
    }

    fn save<'a>(
        &'a self,
        namespace: &'a str,
        states: &'a [(u64, Vec<u8>)],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut con = self.connection.get().await?;
            for chunk in states.chunks(CHUNK) {
                let expected: Vec<i64> = {
                    let v = self.versions();
                    let known = v.known.get(namespace);
                    chunk
                        .iter()
                        .map(|(id, _)| known.and_then(|k| k.get(id)).copied().unwrap_or(ABSENT))
                        .collect()
                };
                let mut eval = redis::cmd("EVAL");
                eval.arg(SAVE_SCRIPT).arg(chunk.len() * 2);
                for (id, _) in chunk {
                    eval.arg(self.key(namespace, *id))
                        .arg(self.version_key(namespace, *id));
                }
                eval.arg(self.ttl_secs);
                for ((_, bytes), expected) in chunk.iter().zip(&expected) {
                    eval.arg(*expected).arg(bytes.as_slice());
                }
                let written: Vec<i64> = eval
                    .query_async(&mut con)
                    .await
                    .map_err(|e| error("saving detector states", e))?;
                let mut v = self.versions();
                if v.known_count() > MAX_KNOWN_VERSIONS {
                    v.known.clear();
                }
                let mut refused = Vec::new();
                {
                    let known = v.known.entry(namespace.to_owned()).or_default();
                    for ((id, _), version) in chunk.iter().zip(written) {
                        if version > 0 {
                            known.insert(*id, version);
                        } else {
                            // Unknown from now on: only a reload tells the stored version.
                            known.remove(id);
                            refused.push(*id);
                        }
                    }
                }
                if !refused.is_empty() {
                    tracing::info!(
                        series = refused.len(),
                        namespace,
                        "detector states not saved: another replica stored newer ones"
                    );
                    v.rejected_total += refused.len() as u64;
                    let pending = v.rejected.entry(namespace.to_owned()).or_default();
                    // Bounded by the series the detector holds: each is reported once.
                    pending.extend(refused);
                    pending.sort_unstable();
                    pending.dedup();
                }
            }
            Ok(())
        })
    }

    fn take_rejected(&self, namespace: &str) -> Vec<u64> {
        self.versions()
            .rejected
            .remove(namespace)
            .unwrap_or_default()
    }

    fn rejected_writes(&self) -> u64 {
        RedisStateStore::rejected_writes(self)
    }
}
