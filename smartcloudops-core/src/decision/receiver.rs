//! Receivers: where notifications go — HTTP (generic webhook, Alertmanager, Slack,
//! PagerDuty), Redis, and guarded commands ([`super::command`]).
//!
//! A receiver only delivers; retries, timeouts, rate limits, the circuit breaker and
//! idempotency are the engine's, the same for every receiver. A receiver classifies its
//! failures ([`DeliveryError`]) so the engine knows whether to try again.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{AlertStatus, Notification, NotificationKind};
use crate::schema::format_ts;
use crate::util::url::mask_url;

/// How a delivery failed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryError {
    /// What happened.
    pub message: String,
    /// Whether trying again may succeed (timeouts, 5xx, 429, a dropped connection).
    pub retryable: bool,
    /// How long the receiver asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl DeliveryError {
    /// A failure that will fail again.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }

    /// A failure worth another try.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            retry_after: None,
        }
    }
}

/// How a receiver's executions are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionMode {
    /// Only record what would be done.
    DryRun,
    /// Record it as a suggestion a person confirms (through the API or chat, later).
    Suggest,
    /// Do it.
    #[default]
    Auto,
}

/// Delivers notifications somewhere. See the [module docs](self).
pub trait Receiver: Send + Sync + fmt::Debug {
    /// The kind, e.g. `slack`.
    fn kind(&self) -> &'static str;

    /// Where it delivers, with any secret masked, for the audit log.
    fn target(&self) -> String;

    /// Whether executions change the world (a remediation): then one runs at most once per
    /// firing episode of a group, and never for resolved alerts or notices.
    fn is_remediation(&self) -> bool {
        false
    }

    /// Dry run, suggestion or execution.
    fn mode(&self) -> ExecutionMode {
        ExecutionMode::Auto
    }

    /// What an execution of `n` would do (a command's argv, say), or why it must not run
    /// (a parameter that fails validation). Called before every execution and for dry runs.
    fn prepare(&self, n: &Notification) -> Result<Value, String> {
        let _ = n;
        Ok(Value::Null)
    }

    /// Delivers `n`; on success, a short description of what happened (e.g. `HTTP 202`).
    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>>;
}

/// Prints one line per notification on standard output (`NOTIFY …`), for trying things out
/// and for logs collected from stdout.
#[derive(Debug, Default)]
pub struct LogReceiver;

impl Receiver for LogReceiver {
    fn kind(&self) -> &'static str {
        "log"
    }

    fn target(&self) -> String {
        "stdout".into()
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        let kind = match &n.kind {
            NotificationKind::Alerts => n.status().as_str().to_uppercase(),
            NotificationKind::Flapping => "FLAPPING".into(),
            NotificationKind::Escalation {
                failed_receiver, ..
            } => format!("ESCALATION({failed_receiver})"),
        };
        let alerts: Vec<String> = n
            .alerts
            .iter()
            .map(|a| {
                format!(
                    "{} {}",
                    a.status.as_str(),
                    a.annotations.get("series").map_or("", String::as_str)
                )
            })
            .collect();
        let group: Vec<String> = n
            .group_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "NOTIFY {} {kind} {} [{}] {}",
            n.receiver,
            n.rule,
            group.join(","),
            alerts.join("; ")
        );
        Box::pin(async { Ok("printed".to_owned()) })
    }
}

/// The payload a webhook-style receiver posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpFormat {
    /// The notification as JSON, or a template of it.
    Webhook,
    /// Alertmanager's webhook payload, version 4.
    Alertmanager,
    /// A Slack incoming-webhook message.
    Slack,
    /// A PagerDuty Events API v2 event.
    PagerDuty,
}

/// Posts JSON to a URL. See the [module docs](self).
pub struct HttpReceiver {
    client: reqwest::Client,
    url: String,
    format: HttpFormat,
    headers: BTreeMap<String, String>,
    template: Option<minijinja::Environment<'static>>,
    routing_key: Option<String>,
    external_url: String,
    slack_channel: Option<String>,
}

impl fmt::Debug for HttpReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpReceiver")
            .field("url", &mask_url(&self.url))
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// The options of an HTTP receiver.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpOptions {
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) template: Option<String>,
    pub(crate) routing_key: Option<String>,
    pub(crate) external_url: String,
    pub(crate) slack_channel: Option<String>,
}

impl HttpReceiver {
    pub(crate) fn new(
        url: String,
        format: HttpFormat,
        timeout: Duration,
        options: HttpOptions,
    ) -> Result<Self, String> {
        for (k, v) in &options.headers {
            reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("`{k}` is not a valid header name"))?;
            reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| format!("the value of header `{k}` is not valid"))?;
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("smartcloudops/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("creating the HTTP client: {e}"))?;
        let template = match options.template {
            Some(t) => {
                let mut env = minijinja::Environment::new();
                env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
                env.add_template_owned("body", t)
                    .map_err(|e| format!("invalid body template: {e}"))?;
                Some(env)
            }
            None => None,
        };
        Ok(Self {
            client,
            url,
            format,
            headers: options.headers,
            template,
            routing_key: options.routing_key,
            external_url: options.external_url,
            slack_channel: options.slack_channel,
        })
    }

    /// The body posted for `n`.
    pub(crate) fn body(&self, n: &Notification) -> Result<Vec<u8>, String> {
        let value = match self.format {
            HttpFormat::Webhook => {
                let data = serde_json::to_value(n).map_err(|e| e.to_string())?;
                if let Some(env) = &self.template {
                    let t = env.get_template("body").map_err(|e| e.to_string())?;
                    return t
                        .render(minijinja::Value::from_serialize(&data))
                        .map(String::into_bytes)
                        .map_err(|e| format!("rendering the body template: {e}"));
                }
                data
            }
            HttpFormat::Alertmanager => alertmanager_payload(n, &self.external_url),
            HttpFormat::Slack => slack_payload(n, self.slack_channel.as_deref()),
            HttpFormat::PagerDuty => pagerduty_payload(
                n,
                self.routing_key.as_deref().unwrap_or_default(),
                &self.external_url,
            ),
        };
        serde_json::to_vec(&value).map_err(|e| e.to_string())
    }
}

impl Receiver for HttpReceiver {
    fn kind(&self) -> &'static str {
        match self.format {
            HttpFormat::Webhook => "webhook",
            HttpFormat::Alertmanager => "alertmanager",
            HttpFormat::Slack => "slack",
            HttpFormat::PagerDuty => "pagerduty",
        }
    }

    fn target(&self) -> String {
        mask_url(&self.url)
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let body = self.body(n).map_err(DeliveryError::permanent)?;
            let mut request = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", &n.id);
            for (k, v) in &self.headers {
                request = request.header(k, v);
            }
            let response = request.body(body).send().await.map_err(|e| {
                // Timeouts and connection failures: the receiver may be back soon.
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                };
                DeliveryError::transient(format!("{what}: {}", without_url(&e)))
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(format!("HTTP {}", status.as_u16()));
            }
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let text = response.text().await.unwrap_or_default();
            let message = format!(
                "HTTP {}: {}",
                status.as_u16(),
                text.chars().take(200).collect::<String>()
            );
            // 4xx means the request is wrong and will be wrong again, except 429 (slow down).
            let retryable =
                status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408;
            Err(DeliveryError {
                message,
                retryable,
                retry_after,
            })
        })
    }
}

/// The error without the URL, which may carry a secret.
fn without_url(e: &reqwest::Error) -> String {
    let mut e = e.to_string();
    if let Some(i) = e.find(" for url (") {
        e.truncate(i);
    }
    e
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value.trim()).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn rfc3339(ms: i64) -> String {
    // Alertmanager writes seconds precision with a `Z`; keep the milliseconds we have.
    format_ts(ms)
}

/// Alertmanager's webhook payload, version 4.
pub(crate) fn alertmanager_payload(n: &Notification, external_url: &str) -> Value {
    let alerts: Vec<Value> = n
        .alerts
        .iter()
        .map(|a| {
            json!({
                "status": a.status.as_str(),
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": rfc3339(a.starts_at_ms),
                "endsAt": a.ends_at_ms.map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339),
                "generatorURL": external_url,
                "fingerprint": a.fingerprint,
            })
        })
        .collect();
    json!({
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status().as_str(),
        "receiver": n.receiver,
        "groupLabels": n.group_labels,
        "commonLabels": n.common_labels(),
        "commonAnnotations": n.common_annotations(),
        "externalURL": external_url,
        "alerts": alerts,
    })
}

/// A Slack incoming-webhook message: `text` (the title, shown in notifications) and
/// `blocks` (the title, then one line per alert).
pub(crate) fn slack_payload(n: &Notification, channel: Option<&str>) -> Value {
    let firing = n
        .alerts
        .iter()
        .filter(|a| a.status == AlertStatus::Firing)
        .count();
    let group: Vec<String> = n
        .group_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let title = match &n.kind {
        NotificationKind::Alerts => format!(
            "[{}{}] {} ({})",
            n.status().as_str().to_uppercase(),
            if firing > 0 {
                format!(":{firing}")
            } else {
                String::new()
            },
            n.rule,
            group.join(" ")
        ),
        NotificationKind::Flapping => format!(
            "[FLAPPING] {} ({}): notifications paused",
            n.rule,
            group.join(" ")
        ),
        NotificationKind::Escalation {
            failed_receiver,
            reason,
        } => format!(
            "[ESCALATION] {} ({}): receiver `{failed_receiver}` is failing: {reason}",
            n.rule,
            group.join(" ")
        ),
    };
    let lines: Vec<String> = n
        .alerts
        .iter()
        .map(|a| {
            format!(
                "• *{}* `{}` {}",
                a.status.as_str(),
                a.annotations.get("series").map_or("", String::as_str),
                a.annotations.get("description").map_or("", String::as_str)
            )
        })
        .collect();
    let mut blocks = vec![json!({
        "type": "section",
        "text": { "type": "mrkdwn", "text": format!("*{title}*") },
    })];
    // A section holds at most 3 000 characters; Slack refuses longer ones.
    let body: String = lines.join("\n").chars().take(2900).collect();
    if !body.is_empty() {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": body } }));
    }
    let mut message = json!({ "text": title, "blocks": blocks });
    if let Some(channel) = channel {
        message["channel"] = channel.into();
    }
    message
}

/// A PagerDuty Events API v2 event: `trigger` while the group fires, `resolve` after, with
/// one `dedup_key` per group so the resolve closes the incident the trigger opened.
pub(crate) fn pagerduty_payload(n: &Notification, routing_key: &str, external_url: &str) -> Value {
    let dedup_key = n.group_id();
    if n.status() == AlertStatus::Resolved && n.kind == NotificationKind::Alerts {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key,
        });
    }
    let worst = n
        .alerts
        .iter()
        .map(|a| a.severity)
        .max()
        .unwrap_or_default();
    let first = n.alerts.first();
    let summary: String = match &n.kind {
        NotificationKind::Alerts => format!(
            "{}: {}",
            n.rule,
            first
                .and_then(|a| a.annotations.get("description"))
                .map_or("", String::as_str)
        ),
        NotificationKind::Flapping => format!("{} is flapping; notifications paused", n.rule),
        NotificationKind::Escalation {
            failed_receiver,
            reason,
        } => {
            format!(
                "{}: receiver `{failed_receiver}` is failing: {reason}",
                n.rule
            )
        }
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "client": "SmartCloudOps",
        "client_url": external_url,
        "payload": {
            "summary": summary.chars().take(1024).collect::<String>(),
            "source": first.and_then(|a| a.labels.get("host").or(a.labels.get("instance"))).cloned().unwrap_or_else(|| "smartcloudops".into()),
            "severity": worst.as_str(),
            "timestamp": first.map(|a| rfc3339(a.starts_at_ms)),
            "component": first.and_then(|a| a.labels.get("metric")).cloned(),
            "group": n.rule,
            "class": first.and_then(|a| a.annotations.get("detector")).cloned(),
            "custom_details": {
                "group_key": n.group_key,
                "alerts": n.alerts.iter().map(|a| json!({
                    "status": a.status.as_str(),
                    "labels": a.labels,
                    "description": a.annotations.get("description"),
                })).collect::<Vec<_>>(),
            },
        },
    })
}

/// Publishes notifications to Redis (a channel or a stream), as JSON.
#[cfg(feature = "redis")]
#[derive(Debug)]
pub struct RedisReceiver {
    connection: crate::redis::LazyConnection,
    channel: Option<String>,
    stream: Option<String>,
    target: String,
}

#[cfg(feature = "redis")]
impl RedisReceiver {
    pub(crate) fn new(
        connection: crate::redis::RedisConnection,
        channel: Option<String>,
        stream: Option<String>,
    ) -> Self {
        let target = format!(
            "{} {}",
            connection.redacted_url(),
            channel.as_deref().or(stream.as_deref()).unwrap_or_default()
        );
        Self {
            connection: crate::redis::LazyConnection::new(connection),
            channel,
            stream,
            target,
        }
    }
}

#[cfg(feature = "redis")]
impl Receiver for RedisReceiver {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let body =
                serde_json::to_string(n).map_err(|e| DeliveryError::permanent(e.to_string()))?;
            let mut con = self
                .connection
                .get()
                .await
                .map_err(|e| DeliveryError::transient(e.to_string()))?;
            let transient = |e: redis::RedisError| DeliveryError {
                retryable: e.is_io_error() || e.is_timeout() || e.is_connection_dropped(),
                message: e.to_string(),
                retry_after: None,
            };
            if let Some(channel) = &self.channel {
                let n: i64 = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(&body)
                    .query_async(&mut con)
                    .await
                    .map_err(transient)?;
                return Ok(format!("published to {n} subscribers"));
            }
            let stream = self.stream.as_deref().unwrap_or_default();
            let id: String = redis::cmd("XADD")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("data")
                .arg(&body)
                .query_async(&mut con)
                .await
                .map_err(transient)?;
            Ok(format!("appended {id}"))
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
