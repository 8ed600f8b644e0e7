//! Kafka sink: publishes alerts (or every scored row) as JSON with CloudEvents 1.0 attributes
//! in `ce_*` headers (`[[action]] type = "kafka"`).
//!
//! Messages are keyed by series id, so all events of a series land on one partition in order.
//! The producer is idempotent (`enable.idempotence = true`) and a batch completes only when
//! the broker acknowledged every message of it: a failed delivery fails the action, which
//! nacks the batch — it is never counted as delivered.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use super::{Action, ActionConfig, ActionInput, Event, SinkPayload};
use crate::component::{BuildContext, ComponentConfig};
use crate::error::{Error, Problems, Result};
use crate::kafka::KafkaClientConfig;

/// What the sink publishes (kept under its old name).
pub type KafkaSinkPayload = SinkPayload;

/// Configuration of a [`KafkaSink`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic to publish to.
    pub topic: String,
    /// Alerts only, or every scored row.
    #[serde(default)]
    pub payload: SinkPayload,
    /// The CloudEvents `source` attribute.
    #[serde(default = "default_ce_source")]
    pub event_source: String,
    /// How long a message may wait for delivery before the batch fails.
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Any librdkafka producer property, e.g. `"compression.type" = "lz4"`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_ce_source() -> String {
    "smartcloudops".to_owned()
}

fn default_delivery_timeout() -> Duration {
    Duration::from_secs(30)
}

impl KafkaSinkConfig {
    /// A sink of alerts to `topic` with defaults.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            payload: SinkPayload::Alerts,
            event_source: default_ce_source(),
            delivery_timeout: default_delivery_timeout(),
            options: BTreeMap::new(),
        }
    }
}

/// Publishes to Kafka. See the [module docs](self).
pub struct KafkaSink {
    producer: FutureProducer,
    config: KafkaSinkConfig,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.config.topic)
            .field("payload", &self.config.payload)
            .finish()
    }
}

impl KafkaSink {
    /// Creates the producer (it connects lazily).
    pub fn new(config: KafkaSinkConfig) -> Result<Self> {
        let timeout = config.delivery_timeout.as_millis().to_string();
        let client = KafkaClientConfig {
            brokers: config.brokers.clone(),
            options: config.options.clone(),
        };
        let producer: FutureProducer = client
            .client_config(&[
                ("enable.idempotence", "true"),
                ("message.timeout.ms", timeout.as_str()),
                ("linger.ms", "5"),
            ])
            .create()
            .map_err(|e| Error::Connector {
                connector: "kafka".into(),
                message: format!("creating the producer: {e}"),
            })?;
        Ok(Self { producer, config })
    }
}

impl Action for KafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    fn wants_every_batch(&self) -> bool {
        self.config.payload == SinkPayload::Scored
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let events = Event::from_input(input, self.config.payload, "kafka")?;
            let ce_type = self.config.payload.ce_type();
            let mut deliveries = Vec::with_capacity(events.len());
            for event in &events {
                let headers = OwnedHeaders::new_with_capacity(6)
                    .insert(Header {
                        key: "ce_specversion",
                        value: Some("1.0"),
                    })
                    .insert(Header {
                        key: "ce_id",
                        value: Some(event.id.as_str()),
                    })
                    .insert(Header {
                        key: "ce_source",
                        value: Some(self.config.event_source.as_str()),
                    })
                    .insert(Header {
                        key: "ce_type",
                        value: Some(ce_type),
                    })
                    .insert(Header {
                        key: "ce_time",
                        value: Some(event.time.as_str()),
                    })
                    .insert(Header {
                        key: "content-type",
                        value: Some("application/json"),
                    });
                let mut record = FutureRecord::to(&self.config.topic)
                    .key(event.key.as_str())
                    .payload(event.body.as_slice())
                    .headers(headers);
                // Enqueue without waiting for delivery; only a full local queue makes us wait.
                loop {
                    match self.producer.send_result(record) {
                        Ok(delivery) => {
                            deliveries.push(delivery);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err((e, _)) => return Err(delivery_error(&self.config.topic, e)),
                    }
                }
            }
            for delivery in futures::future::join_all(deliveries).await {
                match delivery {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(delivery_error(&self.config.topic, e)),
                    Err(_) => {
                        return Err(Error::Action {
                            action: "kafka".into(),
                            message: "the producer went away before delivery".into(),
                            retryable: true,
                        });
                    }
                }
            }
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // Everything was awaited per batch; flush covers anything the broker still owes.
            rdkafka::producer::Producer::flush(&self.producer, Duration::from_secs(10))
                .map_err(|e| delivery_error(&self.config.topic, e))
        })
    }
}

fn delivery_error(topic: &str, e: KafkaError) -> Error {
    let retryable = !matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    Error::Action {
        action: "kafka".into(),
        message: format!("delivering to {topic}: {e}"),
        retryable,
    }
}

impl ComponentConfig for KafkaSinkConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.check(
            !self.brokers.trim().is_empty(),
            "brokers",
            "must not be empty",
            "",
        );
        p.check(
            !self.topic.trim().is_empty(),
            "topic",
            "must not be empty",
            "",
        );
        p
    }
}

impl ActionConfig for KafkaSinkConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<std::sync::Arc<dyn Action>> {
        Ok(std::sync::Arc::new(KafkaSink::new(self.clone())?))
    }
}
