//! Configuration of the Kafka source.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decode::{CsvOptions, Format};
use crate::kafka::KafkaClientConfig;

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoOffsetReset {
    /// From the oldest retained message.
    Earliest,
    /// Only messages produced from now on (Kafka's default).
    #[default]
    Latest,
}

/// Configuration of a [`KafkaSource`](super::KafkaSource) (`[source] type = "kafka"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group; every replica of the pipeline uses the same one.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Payload format of the messages.
    #[serde(default)]
    pub format: Format,
    /// CSV options (`format = "csv"`); set `csv.metric` for headerless feeds.
    #[serde(default)]
    pub csv: CsvOptions,
    /// Where a new group starts.
    #[serde(default)]
    pub auto_offset_reset: AutoOffsetReset,
    /// Messages per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait to fill a batch.
    #[serde(default = "default_batch_timeout", with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// Messages in flight (sent to the pipeline, not yet acknowledged) before the source
    /// pauses its partitions.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
    /// Topic for undecodable messages; without it they go to the pipeline's dead-letter output.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// How long a revoke waits for in-flight batches of the revoked partitions.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How often acknowledged offsets are committed.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// First delay before redelivering a nacked batch (doubles per failure, up to 30 s).
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Append `kafka_topic`, `kafka_partition`, `kafka_offset`, `kafka_key`,
    /// `kafka_timestamp` and `kafka_headers` columns for prep stages.
    #[serde(default)]
    pub metadata: bool,
    /// Any librdkafka consumer property, e.g. `"session.timeout.ms" = "10000"`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_batch_size() -> usize {
    1024
}
fn default_batch_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_max_unacked() -> usize {
    100_000
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(500)
}

impl KafkaSourceConfig {
    /// A config with defaults for everything but the connection.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            format: Format::Json,
            csv: CsvOptions::default(),
            auto_offset_reset: AutoOffsetReset::Latest,
            batch_size: default_batch_size(),
            batch_timeout: default_batch_timeout(),
            max_unacked: default_max_unacked(),
            dead_letter_topic: None,
            drain_timeout: default_drain_timeout(),
            commit_interval: default_commit_interval(),
            retry_backoff: default_retry_backoff(),
            metadata: false,
            options: BTreeMap::new(),
        }
    }

    /// The client settings (brokers and librdkafka options) of the consumer and of the
    /// dead-letter producer.
    pub(super) fn client(&self) -> KafkaClientConfig {
        KafkaClientConfig {
            brokers: self.brokers.clone(),
            options: self.options.clone(),
        }
    }
}
