//! The result cache: the latest score and explanation of every series, in Redis, for an API,
//! a dashboard or a chat bot to read without touching the pipeline
//! (`[[action]] type = "redis_cache"`).
//!
//! Layout:
//!
//! ```text
//! {key_prefix}:result:{series_id}   hash   latest        → CachedResult JSON, the latest row
//!                                          last_anomaly  → CachedResult JSON, the latest anomaly
//! {key_prefix}:results              zset   series_id scored by the latest row's event time
//! ```
//!
//! Each hash expires `ttl` after its series' last row; the sorted set drops members older than
//! `ttl` (by event time) as new rows arrive. Only the last row of each series in a batch is
//! written, so the cost is one pipelined round trip per batch and a few commands per series.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::{Action, ActionInput, Alert};
use crate::error::{Error, Result};
use crate::redis::{
    LazyConnection, RedisConnection, default_key_prefix, error, expiring_keys_problems,
};
use crate::schema::{MetricsColumns, ScoreColumns};

/// `[[action]] type = "redis_cache"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultCacheConfig {
    /// The connection; without it, the pipeline's `[redis]` section (or the default).
    #[serde(default)]
    pub redis: Option<RedisConnection>,
    /// First part of every key.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a series' results outlive its last row.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for ResultCacheConfig {
    fn default() -> Self {
        Self {
            redis: None,
            key_prefix: default_key_prefix(),
            ttl: default_ttl(),
        }
    }
}

impl ResultCacheConfig {
    /// Configuration problems, as `(field, message)`.
    pub fn problems(&self) -> crate::error::Problems {
        expiring_keys_problems(self.redis.as_ref(), self.ttl)
    }
}

/// One cached row: the series, its value, score, band and explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedResult {
    /// The series as Prometheus writes it, e.g. `cpu{host="web-1"}`.
    pub series: String,
    /// The series' stable id (a string in JSON: numbers lose precision past 2^53).
    #[serde(with = "u64_string")]
    pub series_id: u64,
    /// Metric name.
    pub metric: String,
    /// Labels, sorted by key.
    pub labels: BTreeMap<String, String>,
    /// Event time, RFC 3339.
    pub time: String,
    /// Event time, milliseconds since the epoch.
    pub ts_ms: i64,
    /// Observed value (`null` when not finite).
    pub value: Option<f64>,
    /// Anomaly score in `[0, 1]`.
    pub score: f64,
    /// Whether the row was anomalous.
    pub is_anomaly: bool,
    /// Expected value, when the detector had one.
    pub expected: Option<f64>,
    /// Lower edge of the normal band.
    pub lower: Option<f64>,
    /// Upper edge of the normal band.
    pub upper: Option<f64>,
    /// The detector, and for an anomaly the parts that fired.
    pub detector: String,
    /// Start of the anomalous episode, RFC 3339.
    pub since: Option<String>,
    /// One line a person can read.
    pub explanation: String,
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl CachedResult {
    fn from_alert(alert: Alert, is_anomaly: bool) -> Self {
        Self {
            series: alert.series(),
            series_id: alert.series_id,
            metric: alert.metric,
            labels: alert.labels,
            time: alert.time,
            ts_ms: alert.ts_ms,
            value: alert.value.is_finite().then_some(alert.value),
            score: alert.score,
            is_anomaly,
            expected: alert.expected,
            lower: alert.lower,
            upper: alert.upper,
            detector: alert.detector,
            since: alert.since,
            explanation: alert.reason,
        }
    }
}

/// Writes (as an [`Action`]) and reads the result cache. See the [module docs](self).
#[derive(Debug)]
pub struct ResultCache {
    connection: LazyConnection,
    key_prefix: String,
    ttl: Duration,
}

/// Series per pipelined round trip.
const CHUNK: usize = 500;

/// Sets `latest` (and `last_anomaly`) only if newer than what the hash holds, then the TTL.
/// KEYS[1] the hash; ARGV: latest ts, latest JSON, anomaly ts, anomaly JSON ("" if none),
/// TTL in seconds.
const NEWER_ONLY: &str = r#"
local ts = tonumber(redis.call('HGET', KEYS[1], 'latest_ts') or '-1e300')
if tonumber(ARGV[1]) >= ts then
  redis.call('HSET', KEYS[1], 'latest_ts', ARGV[1], 'latest', ARGV[2])
end
if ARGV[4] ~= '' then
  local ats = tonumber(redis.call('HGET', KEYS[1], 'anomaly_ts') or '-1e300')
  if tonumber(ARGV[3]) >= ats then
    redis.call('HSET', KEYS[1], 'anomaly_ts', ARGV[3], 'last_anomaly', ARGV[4])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"#;

impl ResultCache {
    /// A cache for `config`, connecting through `connection` unless the config has its own.
    pub fn new(config: &ResultCacheConfig, connection: RedisConnection) -> Self {
        Self {
            connection: LazyConnection::new(config.redis.clone().unwrap_or(connection)),
            key_prefix: config.key_prefix.clone(),
            ttl: config.ttl,
        }
    }

    fn result_key(&self, series_id: u64) -> String {
        format!("{}:result:{series_id}", self.key_prefix)
    }

    fn index_key(&self) -> String {
        format!("{}:results", self.key_prefix)
    }

    /// The latest cached row of a series and its latest anomaly, if cached.
    pub async fn get(
        &self,
        series_id: u64,
    ) -> Result<(Option<CachedResult>, Option<CachedResult>)> {
        let mut con = self.connection.get().await?;
        let (latest, anomaly): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.result_key(series_id))
            .arg("latest")
            .arg("last_anomaly")
            .query_async(&mut con)
            .await
            .map_err(|e| error("reading the result cache", e))?;
        Ok((parse(latest), parse(anomaly)))
    }

    /// The `limit` series that reported most recently, newest first, with their latest row.
    pub async fn recent(&self, limit: usize) -> Result<Vec<CachedResult>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut con = self.connection.get().await?;
        let ids: Vec<u64> = redis::cmd("ZRANGE")
            .arg(self.index_key())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("REV")
            .query_async(&mut con)
            .await
            .map_err(|e| error("reading the result cache", e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGET").arg(self.result_key(*id)).arg("latest");
        }
        let latest: Vec<Option<String>> = pipe
            .query_async(&mut con)
            .await
            .map_err(|e| error("reading the result cache", e))?;
        Ok(latest.into_iter().filter_map(parse).collect())
    }

    /// The last row of each series in `input` (and its last anomaly), ready to write.
    fn latest_rows(input: &ActionInput) -> Result<Vec<(u64, CachedResult, Option<CachedResult>)>> {
        let batch = &input.batch;
        let Ok(scores) = ScoreColumns::try_new(batch, "action:redis_cache") else {
            return Ok(Vec::new()); // no detector ran: nothing to cache
        };
        let cols = MetricsColumns::try_new(batch, "action:redis_cache")?;
        // Row of the latest sample and of the latest anomaly per series.
        let mut last: FxHashMap<u64, (usize, Option<usize>)> = FxHashMap::default();
        for row in 0..batch.num_rows() {
            let id = cols.series_id.value(row);
            let entry = last.entry(id).or_insert((row, None));
            if cols.ts.value(row) >= cols.ts.value(entry.0) {
                entry.0 = row;
            }
            if scores.is_anomaly.value(row)
                && entry
                    .1
                    .is_none_or(|a| cols.ts.value(row) >= cols.ts.value(a))
            {
                entry.1 = Some(row);
            }
        }
        let cached = |row: usize| {
            CachedResult::from_alert(Alert::at(&cols, &scores, row), scores.is_anomaly.value(row))
        };
        Ok(last
            .into_iter()
            .map(|(id, (row, anomaly))| (id, cached(row), anomaly.map(cached)))
            .collect())
    }
}

fn parse(json: Option<String>) -> Option<CachedResult> {
    json.and_then(|j| serde_json::from_str(&j).ok())
}

impl Action for ResultCache {
    fn name(&self) -> &str {
        "redis_cache"
    }

    fn wants_every_batch(&self) -> bool {
        true
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rows = Self::latest_rows(input)?;
            if rows.is_empty() {
                return Ok(());
            }
            let ttl_secs = self.ttl.as_secs().max(1);
            let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
            // The index forgets series quiet for `ttl` of event time, counted from the newest
            // row but never from the future: one row stamped ahead must not empty it.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let newest = rows
                .iter()
                .map(|(_, r, _)| r.ts_ms)
                .max()
                .unwrap_or(0)
                .min(now);
            let mut con = self.connection.get().await?;
            for chunk in rows.chunks(CHUNK) {
                let mut pipe = redis::pipe();
                for (id, latest, anomaly) in chunk {
                    // Only newer rows replace what is cached: a redelivered or late batch
                    // never moves a series back in time.
                    pipe.cmd("EVAL")
                        .arg(NEWER_ONLY)
                        .arg(1)
                        .arg(self.result_key(*id))
                        .arg(latest.ts_ms)
                        .arg(serde_json::to_string(latest).unwrap_or_default())
                        .arg(anomaly.as_ref().map_or(0, |a| a.ts_ms))
                        .arg(
                            anomaly
                                .as_ref()
                                .map(|a| serde_json::to_string(a).unwrap_or_default())
                                .unwrap_or_default(),
                        )
                        .arg(ttl_secs)
                        .ignore();
                }
                let index = pipe.cmd("ZADD").arg(self.index_key()).arg("GT");
                for (id, latest, _) in chunk {
                    index.arg(latest.ts_ms).arg(*id);
                }
                index.ignore();
                pipe.cmd("EXPIRE")
                    .arg(self.index_key())
                    .arg(ttl_secs)
                    .ignore();
                pipe.query_async::<()>(&mut con)
                    .await
                    .map_err(cache_error)?;
            }
            redis::cmd("ZREMRANGEBYSCORE")
                .arg(self.index_key())
                .arg("-inf")
                .arg(format!("({}", newest.saturating_sub(ttl_ms)))
                .query_async::<()>(&mut con)
                .await
                .map_err(cache_error)?;
            Ok(())
        })
    }
}

fn cache_error(e: redis::RedisError) -> Error {
    Error::Action {
        action: "redis_cache".into(),
        message: format!("writing the result cache: {e}"),
        retryable: true,
    }
}

impl crate::component::ComponentConfig for ResultCacheConfig {
    fn problems(&self) -> crate::error::Problems {
        ResultCacheConfig::problems(self)
    }
}

impl crate::action::ActionConfig for ResultCacheConfig {
    fn build(
        &self,
        ctx: &crate::component::BuildContext,
    ) -> crate::error::Result<std::sync::Arc<dyn Action>> {
        Ok(std::sync::Arc::new(ResultCache::new(
            self,
            ctx.redis_connection(),
        )))
    }
}
