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

use std::time::Duration;

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

/// A [`SeriesStateStore`] in Redis. See the [module docs](self).
///
/// It connects on first use and reconnects by itself after Redis went away.
#[derive(Debug)]
pub struct RedisStateStore {
    connection: LazyConnection,
    key_prefix: String,
    ttl_secs: u64,
}

impl RedisStateStore {
    /// A store for `config`, connecting through `connection` unless the config has its own.
    pub fn new(config: &RedisStateStoreConfig, connection: RedisConnection) -> Self {
        Self {
            connection: LazyConnection::new(config.redis.clone().unwrap_or(connection)),
            key_prefix: config.key_prefix.clone(),
            ttl_secs: config.ttl.as_secs().max(1),
        }
    }

    /// The key of one series' state.
    pub fn key(&self, namespace: &str, series_id: u64) -> String {
        format!("{}:state:{namespace}:{series_id}", self.key_prefix)
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
                let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query_async(&mut con)
                    .await
                    .map_err(|e| error("loading detector states", e))?;
                found.extend(
                    chunk
                        .iter()
                        .zip(values)
                        .filter_map(|(id, v)| v.map(|v| (*id, v))),
                );
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
                let mut pipe = redis::pipe();
                for (id, bytes) in chunk {
                    pipe.cmd("SET")
                        .arg(self.key(namespace, *id))
                        .arg(bytes.as_slice())
                        .arg("EX")
                        .arg(self.ttl_secs)
                        .ignore();
                }
                pipe.query_async::<()>(&mut con)
                    .await
                    .map_err(|e| error("saving detector states", e))?;
            }
            Ok(())
        })
    }
}
