//! `type = "kafka"`: produce to a topic, as JSON keyed by group.

#[cfg(feature = "kafka")]
use std::fmt;
#[cfg(feature = "kafka")]
use std::time::Duration;

#[cfg(feature = "kafka")]
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{BuildContext, Built};
#[cfg(feature = "kafka")]
use super::{DeliveryError, Receiver};
#[cfg(feature = "kafka")]
use crate::decision::Notification;

/// `type = "kafka"` settings: both are required.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: Option<String>,
    /// The topic.
    pub topic: Option<String>,
}

impl KafkaConfig {
    #[cfg_attr(not(feature = "kafka"), allow(unused_variables))]
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        #[cfg(feature = "kafka")]
        {
            let (Some(brokers), Some(topic)) = (&self.brokers, &self.topic) else {
                return Err("`brokers` and `topic` are required".into());
            };
            KafkaReceiver::new(brokers, topic, ctx.timeout)
                .map(|k| Box::new(k) as Box<dyn Receiver>)
        }
        #[cfg(not(feature = "kafka"))]
        Err("this build has no Kafka support".into())
    }
}

/// Publishes notifications to a Kafka topic, as JSON keyed by group (so one group's
/// notifications stay in order on one partition).
#[cfg(feature = "kafka")]
pub struct KafkaReceiver {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    target: String,
    timeout: Duration,
}

#[cfg(feature = "kafka")]
impl fmt::Debug for KafkaReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaReceiver")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "kafka")]
impl KafkaReceiver {
    pub(crate) fn new(brokers: &str, topic: &str, timeout: Duration) -> Result<Self, String> {
        let ms = timeout.as_millis().to_string();
        let producer = crate::kafka::KafkaClientConfig::new(brokers)
            .client_config(&[
                ("enable.idempotence", "true"),
                ("message.timeout.ms", ms.as_str()),
            ])
            .create()
            .map_err(|e| format!("creating the Kafka producer: {e}"))?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            target: format!("kafka {brokers} {topic}"),
            timeout,
        })
    }
}

#[cfg(feature = "kafka")]
impl Receiver for KafkaReceiver {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let body =
                serde_json::to_vec(n).map_err(|e| DeliveryError::permanent(e.to_string()))?;
            let key = n.group_id();
            let record = rdkafka::producer::FutureRecord::to(&self.topic)
                .key(key.as_str())
                .payload(body.as_slice());
            match self.producer.send(record, self.timeout).await {
                Ok(delivery) => Ok(format!(
                    "partition {} offset {}",
                    delivery.partition, delivery.offset
                )),
                Err((e, _)) => Err(DeliveryError::transient(format!(
                    "producing to {}: {e}",
                    self.topic
                ))),
            }
        })
    }
}
