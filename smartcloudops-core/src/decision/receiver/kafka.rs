//! `type = "kafka"`: produce to a topic, as JSON keyed by group.

use std::collections::BTreeMap;
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

/// `type = "kafka"` settings: `brokers` and `topic` are required. The `Debug` output masks
/// secret options (`sasl.password` …).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: Option<String>,
    /// The topic.
    pub topic: Option<String>,
    /// Any librdkafka producer property, passed through as is, as the Kafka source takes
    /// them: `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
    /// `ssl.ca.location` … Use `${VAR}` for secrets.
    pub options: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("options", &options)
            .finish()
    }
}

/// Whether option `key` holds a secret, the Kafka clients' own test where the build has them.
#[cfg(feature = "kafka")]
fn is_secret(key: &str) -> bool {
    crate::kafka::is_secret(key)
}

/// Whether option `key` holds a secret: without Kafka support, every value is hidden.
#[cfg(not(feature = "kafka"))]
fn is_secret(_: &str) -> bool {
    true
}

impl KafkaConfig {
    #[cfg_attr(not(feature = "kafka"), allow(unused_variables))]
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        #[cfg(feature = "kafka")]
        {
            let (Some(brokers), Some(topic)) = (&self.brokers, &self.topic) else {
                return Err("`brokers` and `topic` are required".into());
            };
            let client = crate::kafka::KafkaClientConfig {
                brokers: brokers.clone(),
                options: self.options.clone(),
            };
            KafkaReceiver::new(&client, topic, ctx.timeout)
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
    pub(crate) fn new(
        client: &crate::kafka::KafkaClientConfig,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        // librdkafka checks every option here (an unknown name, a bad value, TLS in a build
        // without it), so `validate` reports them.
        let producer = Self::client_config(client, timeout)
            .create()
            .map_err(|e| format!("creating the Kafka producer: {e}"))?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            target: format!("kafka {} {topic}", client.brokers),
            timeout,
        })
    }

    /// The producer's librdkafka settings: ours, then the user's `options` (which win).
    fn client_config(
        client: &crate::kafka::KafkaClientConfig,
        timeout: Duration,
    ) -> rdkafka::ClientConfig {
        let ms = timeout.as_millis().to_string();
        client.client_config(&[
            ("enable.idempotence", "true"),
            ("message.timeout.ms", ms.as_str()),
        ])
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

#[cfg(all(test, feature = "kafka"))]
mod tests {
    use super::*;
    use crate::kafka::KafkaClientConfig;

    fn config(options: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: Some("127.0.0.1:9".into()),
            topic: Some("alerts".into()),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn build(c: &KafkaConfig) -> Built {
        c.build(&BuildContext {
            timeout: Duration::from_secs(5),
            external_url: "",
            allowed_commands: &[],
            redis: None,
        })
    }

    #[test]
    fn sasl_options_reach_the_producer_and_stay_out_of_debug() {
        let c = config(&[
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "notifier"),
            ("sasl.password", "hunter2"),
        ]);
        let client = KafkaClientConfig {
            brokers: "127.0.0.1:9".into(),
            options: c.options.clone(),
        };
        let settings = KafkaReceiver::client_config(&client, Duration::from_secs(5));
        assert_eq!(settings.get("security.protocol"), Some("SASL_PLAINTEXT"));
        assert_eq!(settings.get("sasl.password"), Some("hunter2"));
        assert_eq!(settings.get("enable.idempotence"), Some("true"));
        build(&c).expect("librdkafka accepts the SASL settings");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("SASL_PLAINTEXT"), "{shown}");
    }

    #[test]
    fn a_bad_option_fails_validation_with_its_name() {
        let e = build(&config(&[("sasl.pasword", "x")])).unwrap_err();
        assert!(e.contains("sasl.pasword"), "{e}");
    }

    #[test]
    fn the_options_table_parses_from_toml() {
        let c: KafkaConfig = toml::from_str(
            "brokers = \"b:9092\"\ntopic = \"t\"\n[options]\n\"security.protocol\" = \"SASL_SSL\"",
        )
        .unwrap();
        assert_eq!(c.options["security.protocol"], "SASL_SSL");
    }
}
