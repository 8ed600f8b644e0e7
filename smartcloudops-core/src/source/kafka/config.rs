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
    /// What one record may hold (line length, labels, label sizes): over-limit records are
    /// dead-lettered with the limit's name. See [`DecodeLimits`](crate::decode::DecodeLimits).
    #[serde(default)]
    pub limits: crate::decode::DecodeLimits,
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
    /// Topic for undecodable messages and for the messages of batches that failed
    /// permanently `max_attempts` times; without it they go to the pipeline's dead-letter
    /// output.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Longest wait for `dead_letter_topic` to accept a batch's dead letters (it also sets the
    /// dead-letter producer's `message.timeout.ms`). Past it the batch is nacked and
    /// redelivered, never committed without its dead letters.
    #[serde(default = "default_dead_letter_timeout", with = "humantime_serde")]
    pub dead_letter_timeout: Duration,
    /// Deliveries of a batch that keep failing with a *permanent* error (an action's
    /// non-retryable error, say a 4xx) before its messages are dead-lettered (with the
    /// failure and the attempts in headers) and their offsets committed. Retryable failures
    /// (a downstream outage, a timeout) and batches abandoned at shutdown never count: they
    /// are redelivered with the backoff for as long as it takes, so an outage never
    /// dead-letters good messages. `0` never dead-letters (a poison message stops its
    /// partition until it is removed).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
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
fn default_dead_letter_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    5
}

impl KafkaSourceConfig {
    /// A config with defaults for everything but the connection.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        Self {
            limits: crate::decode::DecodeLimits::default(),
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
            dead_letter_timeout: default_dead_letter_timeout(),
            max_attempts: default_max_attempts(),
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

impl crate::component::ComponentConfig for KafkaSourceConfig {
    fn problems(&self) -> crate::error::Problems {
        let mut p = crate::error::Problems::new();
        p.extend_at("limits", self.limits.problems());
        p.check(
            !self.brokers.trim().is_empty(),
            "brokers",
            "must not be empty",
            "e.g. \"127.0.0.1:9092\"",
        );
        p.check(
            !self.group_id.trim().is_empty(),
            "group_id",
            "must not be empty",
            "every replica of the pipeline uses the same group id",
        );
        p.check(
            !self.topics.is_empty(),
            "topics",
            "must list at least one topic",
            "",
        );
        crate::source::check_batch_size(&mut p, self.batch_size, "");
        p.check(
            !self.commit_interval.is_zero()
                && self.commit_interval <= crate::component::MAX_DURATION,
            "commit_interval",
            "must be longer than 0 and at most a day",
            "e.g. \"1s\"",
        );
        for key in ["enable.auto.commit", "enable.auto.offset.store"] {
            p.check(
                !self.options.contains_key(key),
                format!("options.\"{key}\""),
                "is managed by the source (offsets are committed only after the pipeline acknowledged them)",
                "remove it",
            );
        }
        p.check(
            self.dead_letter_timeout >= Duration::from_millis(100)
                && self.dead_letter_timeout <= crate::component::MAX_DURATION,
            "dead_letter_timeout",
            "must be at least 100ms and at most a day",
            "e.g. \"10s\"; a revoke or a shutdown waits for it",
        );
        p.check(
            self.max_unacked > 0,
            "max_unacked",
            "must be at least 1",
            "",
        );
        if let Some(session) = self
            .options
            .get("session.timeout.ms")
            .and_then(|s| s.parse::<u128>().ok())
        {
            p.check(
                self.drain_timeout.as_millis() < session,
                "drain_timeout",
                format!("must be shorter than session.timeout.ms ({session} ms)"),
                "a revoke that drains longer than the session gets this member kicked out",
            );
        }
        p
    }

    fn summary(&self, _ctx: &crate::component::BuildContext) -> String {
        format!(
            "kafka {} (group {}, topics {})",
            self.brokers,
            self.group_id,
            self.topics.join(",")
        )
    }
}

impl crate::source::SourceConfig for KafkaSourceConfig {
    fn build(
        &self,
        _ctx: &crate::component::BuildContext,
    ) -> crate::error::Result<Box<dyn crate::source::Source>> {
        Ok(Box::new(super::KafkaSource::new(self.clone())))
    }

    fn output_schema(&self) -> arrow::datatypes::SchemaRef {
        super::metadata::output_schema(self.metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::ComponentConfig;

    fn parse(extra: &str) -> KafkaSourceConfig {
        toml::from_str(&format!(
            "brokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_poison_limit_and_the_dead_letter_timeout_have_defaults_and_are_checked() {
        let config = parse("");
        assert_eq!(config.max_attempts, 5);
        assert_eq!(config.dead_letter_timeout, Duration::from_secs(10));
        assert!(config.problems().is_empty());
        assert_eq!(
            config,
            KafkaSourceConfig::new("127.0.0.1:9092", "g", vec!["t".into()])
        );

        let forever = parse("max_attempts = 0\ndead_letter_timeout = \"2s\"");
        assert_eq!(forever.max_attempts, 0);
        assert_eq!(forever.dead_letter_timeout, Duration::from_secs(2));
        assert!(forever.problems().is_empty());

        let problems = parse("dead_letter_timeout = \"10ms\"").problems();
        assert_eq!(problems.len(), 1);
        let problem = problems.iter().next().unwrap();
        assert_eq!(problem.path, "dead_letter_timeout");
    }
}
