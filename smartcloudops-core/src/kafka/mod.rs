//! The Kafka client settings shared by the Kafka source (`source::kafka`), the Kafka sink
//! (`action::kafka`) and the decision receivers. Stage-specific bookkeeping lives with its
//! stage (the source's offset tracking is `source::kafka::offsets`).

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// Connection settings every Kafka client takes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaClientConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Any librdkafka property, passed through as is (`security.protocol`,
    /// `sasl.mechanisms`, `sasl.password`, `session.timeout.ms` …). Use `${VAR}` for secrets.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl KafkaClientConfig {
    /// Settings for `brokers` and no extra options.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            options: BTreeMap::new(),
        }
    }

    /// A librdkafka config: `defaults` first, then `bootstrap.servers`, then the user's options
    /// (which win).
    pub(crate) fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.options {
            config.set(k, v);
        }
        config
    }
}

/// Whether a librdkafka property holds a secret that must never be printed.
pub(crate) fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "sasl.jaas", "ssl.key.pem", "token"]
        .iter()
        .any(|s| key.contains(s))
}

impl fmt::Debug for KafkaClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaClientConfig")
            .field("brokers", &self.brokers)
            .field("options", &options)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_debug_output() {
        let mut c = KafkaClientConfig::new("127.0.0.1:9092");
        c.options.insert("sasl.password".into(), "hunter2".into());
        c.options.insert("session.timeout.ms".into(), "6000".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("6000"));
    }

    #[test]
    fn user_options_override_defaults() {
        let mut c = KafkaClientConfig::new("b:1");
        c.options.insert("session.timeout.ms".into(), "6000".into());
        let config = c.client_config(&[("session.timeout.ms", "45000"), ("client.id", "x")]);
        assert_eq!(config.get("session.timeout.ms"), Some("6000"));
        assert_eq!(config.get("client.id"), Some("x"));
        assert_eq!(config.get("bootstrap.servers"), Some("b:1"));
    }
}
