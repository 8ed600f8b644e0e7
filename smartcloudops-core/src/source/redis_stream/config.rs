//! Configuration of the Redis Streams source.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decode::{CsvOptions, Format};
use crate::redis::RedisConnection;

/// Where a group this source creates starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStart {
    /// From the stream's first entry (`0`).
    Earliest,
    /// Only entries added from now on (`$`).
    #[default]
    Latest,
}

/// The Redis keys holding what one stream's consumption must keep across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StateKeys {
    /// Hash: entry id → failed attempts, and `<id>:error` → the last failure's reason.
    pub(super) attempts: String,
    /// String: an id through which every entry of the stream is acknowledged by the group.
    pub(super) acked: String,
}

/// Configuration of a [`RedisStreamSource`](super::RedisStreamSource).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamSourceConfig {
    /// The connection; without it, the pipeline's `[redis]` section (or the default).
    #[serde(default)]
    pub redis: Option<RedisConnection>,
    /// Streams to read.
    pub streams: Vec<String>,
    /// The consumer group; every replica uses the same one.
    pub group: String,
    /// This replica's name within the group; unique per replica, and stable across restarts
    /// if it can be (a pod name), so a restart finds its own pending entries at once.
    /// Default: `{hostname}-{pid}`.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Where a group created by this source starts.
    #[serde(default)]
    pub start: StreamStart,
    /// The entry field holding the payload.
    #[serde(default = "default_field")]
    pub field: String,
    /// Payload format.
    #[serde(default)]
    pub format: Format,
    /// CSV options (`format = "csv"`).
    #[serde(default)]
    pub csv: CsvOptions,
    /// What one record may hold (line length, labels, label sizes): over-limit records are
    /// dead-lettered with the limit's name. See [`DecodeLimits`](crate::decode::DecodeLimits).
    #[serde(default)]
    pub limits: crate::decode::DecodeLimits,
    /// Entries per read (`COUNT`), and so per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait of a read for new entries (`BLOCK`).
    #[serde(default = "default_block", with = "humantime_serde")]
    pub block: Duration,
    /// How long an entry must have been pending with another consumer before it is claimed.
    /// Keep it well above the pipeline's usual batch latency.
    #[serde(default = "default_claim_idle", with = "humantime_serde")]
    pub claim_idle: Duration,
    /// How often stale pending entries are looked for.
    #[serde(default = "default_claim_interval", with = "humantime_serde")]
    pub claim_interval: Duration,
    /// Failed processing attempts after which an entry is dead-lettered (with its record and
    /// the last failure's reason), then acknowledged. Only failures count, not deliveries: a
    /// nack of a batch holding the entry counts when other batches were acknowledged since the
    /// entry's previous attempt (so an outage of the whole pipeline counts nothing). Restarts,
    /// takeovers of a stopped consumer's entries and reconnections count nothing either. The
    /// counts are kept in Redis (`<key_prefix>:<stream>:<group>:attempts`), so they survive
    /// restarts and move with the entry to whichever consumer takes it over.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// First wait before a nacked batch is delivered again.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Stream for dead letters; without it they go to the pipeline's dead-letter output.
    #[serde(default)]
    pub dead_letter_stream: Option<String>,
    /// Entries in flight (read, not yet acknowledged) before reading pauses.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
    /// First part of the keys the source keeps per stream and group:
    /// `<key_prefix>:<stream>:<group>:attempts` (failed attempts of pending entries) and
    /// `<key_prefix>:<stream>:<group>:acked` (an id through which every entry is
    /// acknowledged; a lost group is created again there).
    #[serde(default = "crate::redis::default_key_prefix")]
    pub key_prefix: String,
    /// How long the failure counts outlive the last failure recorded for the stream and
    /// group. Counts are deleted when their entry is acknowledged; this bounds what entries
    /// lost with their group would leave behind.
    #[serde(default = "default_attempts_ttl", with = "humantime_serde")]
    pub attempts_ttl: Duration,
}

fn default_field() -> String {
    "data".to_owned()
}
fn default_batch_size() -> usize {
    1024
}
fn default_block() -> Duration {
    Duration::from_millis(500)
}
fn default_claim_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_claim_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_max_deliveries() -> u32 {
    5
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_unacked() -> usize {
    100_000
}
fn default_attempts_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl RedisStreamSourceConfig {
    /// A source of `streams` for `group` with defaults.
    pub fn new(streams: Vec<String>, group: impl Into<String>) -> Self {
        Self {
            limits: crate::decode::DecodeLimits::default(),
            redis: None,
            streams,
            group: group.into(),
            consumer: None,
            start: StreamStart::Latest,
            field: default_field(),
            format: Format::Json,
            csv: CsvOptions::default(),
            batch_size: default_batch_size(),
            block: default_block(),
            claim_idle: default_claim_idle(),
            claim_interval: default_claim_interval(),
            max_deliveries: default_max_deliveries(),
            retry_backoff: default_retry_backoff(),
            dead_letter_stream: None,
            max_unacked: default_max_unacked(),
            key_prefix: crate::redis::default_key_prefix(),
            attempts_ttl: default_attempts_ttl(),
        }
    }

    /// The keys of the state kept for `stream` and this source's group.
    pub(super) fn state_keys(&self, stream: &str) -> StateKeys {
        let base = format!("{}:{stream}:{}", self.key_prefix, self.group);
        StateKeys {
            attempts: format!("{base}:attempts"),
            acked: format!("{base}:acked"),
        }
    }

    /// The consumer name: configured, or `{hostname}-{pid}`.
    pub fn consumer_name(&self) -> String {
        self.consumer.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "smartcloudops".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

impl crate::component::ComponentConfig for RedisStreamSourceConfig {
    fn problems(&self) -> crate::error::Problems {
        let mut p = crate::error::Problems::new();
        p.extend_at("limits", self.limits.problems());
        if let Some(redis) = &self.redis {
            p.extend_at("redis", redis.problems());
        }
        p.check(
            !self.streams.is_empty(),
            "streams",
            "must list at least one stream",
            "",
        );
        p.check(
            !self.group.trim().is_empty(),
            "group",
            "must not be empty",
            "every replica of the pipeline uses the same group",
        );
        p.check(
            self.consumer.as_ref().is_none_or(|c| !c.trim().is_empty()),
            "consumer",
            "must not be empty",
            "leave it out for {hostname}-{pid}",
        );
        crate::source::check_batch_size(&mut p, self.batch_size, "");
        p.check(
            self.max_deliveries >= 1,
            "max_deliveries",
            "must be at least 1",
            "",
        );
        p.check(
            self.max_unacked >= 1,
            "max_unacked",
            "must be at least 1",
            "",
        );
        p.check(
            !self.block.is_zero() && self.block <= crate::component::MAX_DURATION,
            "block",
            "must be longer than 0 and at most a day",
            "e.g. \"500ms\"",
        );
        p.check(
            !self.key_prefix.is_empty(),
            "key_prefix",
            "must not be empty",
            "e.g. \"smartcloudops\"",
        );
        p.check(
            self.attempts_ttl >= Duration::from_secs(1),
            "attempts_ttl",
            "must be at least 1s",
            "e.g. \"7d\"; longer than the longest outage an entry may wait through",
        );
        p.check(
            !self.claim_interval.is_zero(),
            "claim_interval",
            "must be longer than 0",
            "e.g. \"5s\"",
        );
        p.check(
            self.claim_idle >= self.block,
            "claim_idle",
            "must be at least `block`",
            "an entry is claimed from a consumer that kept it this long without acknowledging it",
        );
        p
    }

    fn summary(&self, ctx: &crate::component::BuildContext) -> String {
        let url = self.redis.clone().unwrap_or_else(|| ctx.redis_connection());
        format!(
            "redis streams {} (group {}, streams {})",
            url.redacted_url(),
            self.group,
            self.streams.join(",")
        )
    }
}

impl crate::source::SourceConfig for RedisStreamSourceConfig {
    fn build(
        &self,
        ctx: &crate::component::BuildContext,
    ) -> crate::error::Result<Box<dyn crate::source::Source>> {
        Ok(Box::new(super::RedisStreamSource::new(
            self.clone(),
            ctx.redis_connection(),
        )))
    }
}
