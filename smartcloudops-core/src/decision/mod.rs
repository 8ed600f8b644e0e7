//! The decision layer: from scored rows to notifications and guarded remediation, with an
//! audit trail (`[decision]`).
//!
//! [`DecisionEngine`] is an [`Action`]: it sees every scored batch and
//!
//! 1. runs the **rules** ([`rule`]): which rows are active, `for`, `keep_firing_for`,
//!    hysteresis and flap detection give each (rule, series) alert its life — firing,
//!    resolved, or held back as flapping (one notice, no action);
//! 2. hands fired and resolved alerts to the **dispatcher** ([`dispatch`]): silences,
//!    inhibition, grouping by labels with `group_wait` / `group_interval` /
//!    `repeat_interval`, as Alertmanager does;
//! 3. **executes** each due notification on each of the rule's receivers ([`receiver`],
//!    [`command`]) behind the same **guards** ([`guard`]): an idempotency key claimed
//!    atomically (so a redelivered batch or a replay never runs a remediation twice), a
//!    cooldown per (receiver, group), rate limits per receiver and overall, a circuit breaker
//!    that stops a failing receiver and escalates to a person, and retries with error
//!    classification (4xx never, except 408 and 429 with its `Retry-After`; 5xx and timeouts with
//!    exponential backoff and jitter). After the last try a notification goes to the
//!    receiver's fallback or is dead-lettered (in the audit log, with its payload): never
//!    silently dropped;
//! 4. writes an **audit log** ([`audit`]) linking trigger → decision → execution → result.
//!
//! A batch is acknowledged once its alert changes are in the (synced) audit log and the
//! notifications that fell due were delivered, sent to a fallback or dead-lettered. If the
//! audit log cannot be written, the batch is nacked. Notifications that fall due later
//! (`group_wait`) are sent by a background ticker, and every pending one is sent at shutdown.
//!
//! ```
//! use smartcloudops_core::decision::{DecisionConfig, DecisionEngine};
//!
//! let config: DecisionConfig = toml::from_str(r#"
//!     idempotency = { store = "memory" }   # the default is a file, for restarts
//!
//!     [[rule]]
//!     name = "cpu-high"
//!     metric = "cpu_*"
//!     min_score = 0.9
//!     resolve_score = 0.6
//!     for = "2m"
//!     group_by = ["alertname", "service"]
//!     receivers = ["oncall"]
//!
//!     [[receiver]]
//!     name = "oncall"
//!     type = "slack"
//!     url = "https://hooks.slack.com/services/T0ACME/B0ONCALL/s3cr3tt0ken"
//! "#).unwrap();
//! let engine = DecisionEngine::new(config).unwrap();
//! assert!(engine.firing().is_empty());
//! ```

pub mod audit;
pub mod command;
pub mod dispatch;
pub mod guard;
mod matcher;
pub mod receiver;
pub mod rule;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::audit::{AuditLog, AuditRecord};
use self::dispatch::{Dispatcher, Inhibit, InhibitConfig, Silence, SilenceConfig};
use self::guard::{
    CircuitBreaker, CircuitBreakerConfig, FileIdempotency, IdempotencyStore, MemoryIdempotency,
    RateLimit, RetryPolicy, TokenBucket,
};
use self::receiver::{
    DeliveryError, ExecutionMode, HttpFormat, HttpOptions, HttpReceiver, Receiver,
};
use self::rule::{AlertState, Rule, RuleConfig, Severity, Transition};
use crate::action::{Action, ActionInput, Alert};
use crate::error::{Error, Result};
use crate::schema::{MetricsColumns, ScoreColumns};

/// The wall clock the dispatcher and the guards use; tests substitute a [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: i64) -> Self {
        Self(AtomicI64::new(ms))
    }
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(
            i64::try_from(by.as_millis()).unwrap_or(i64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Whether an alert fires or is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    /// Firing.
    Firing,
    /// Resolved.
    Resolved,
}

impl AlertStatus {
    /// `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// An alert of a rule for one series, as notified.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertRecord {
    /// Stable id: a hash of the labels (which include `alertname`).
    pub fingerprint: String,
    /// The rule.
    pub rule: String,
    /// Firing or resolved.
    pub status: AlertStatus,
    /// The rule's severity.
    pub severity: Severity,
    /// The series' labels plus `alertname`, `metric` and `severity`.
    pub labels: BTreeMap<String, String>,
    /// `summary`, `description` (the explanation), `value`, `score`, `detector`, `series`.
    pub annotations: BTreeMap<String, String>,
    /// Start of the firing episode, ms since the epoch (event time).
    pub starts_at_ms: i64,
    /// When it resolved (event time).
    pub ends_at_ms: Option<i64>,
    /// The series id.
    #[serde(serialize_with = "as_string")]
    pub series_id: u64,
}

fn as_string<S: serde::Serializer>(v: &u64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn hash_hex(text: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

impl AlertRecord {
    fn new(
        rule: &RuleConfig,
        alert: &Alert,
        status: AlertStatus,
        starts: i64,
        ends: Option<i64>,
    ) -> Self {
        let mut labels = alert.labels.clone();
        labels.insert("alertname".into(), rule.name.clone());
        labels.insert("metric".into(), alert.metric.clone());
        labels.insert("severity".into(), rule.severity.as_str().into());
        let fingerprint = hash_hex(&format!("{labels:?}"));
        let annotations = BTreeMap::from([
            (
                "summary".to_owned(),
                format!("{} on {}", rule.name, alert.series()),
            ),
            ("description".to_owned(), alert.reason.clone()),
            ("value".to_owned(), alert.value.to_string()),
            ("score".to_owned(), format!("{:.3}", alert.score)),
            ("detector".to_owned(), alert.detector.clone()),
            ("series".to_owned(), alert.series()),
        ]);
        Self {
            fingerprint,
            rule: rule.name.clone(),
            status,
            severity: rule.severity,
            labels,
            annotations,
            starts_at_ms: starts,
            ends_at_ms: ends,
            series_id: alert.series_id,
        }
    }
}

/// What a notification is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NotificationKind {
    /// The group's alerts changed, or are still firing (a repeat).
    Alerts,
    /// An alert started flapping: its changes are held back until it is stable.
    Flapping,
    /// Another receiver keeps failing (its circuit opened); a person should know.
    Escalation {
        /// The failing receiver.
        failed_receiver: String,
        /// Its last error.
        reason: String,
    },
}

/// One notification of one group to one receiver.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    /// Unique per receiver, group, episode and notification number.
    pub id: String,
    /// The receiver.
    pub receiver: String,
    /// The rule.
    pub rule: String,
    /// The group, as Alertmanager writes it: `rule:{label="value",…}`.
    pub group_key: String,
    /// The labels the group is formed by.
    pub group_labels: BTreeMap<String, String>,
    /// What it is about.
    pub kind: NotificationKind,
    /// The group's alerts: firing ones, and those resolved since the last notification.
    pub alerts: Vec<AlertRecord>,
    /// Start of the group's firing episode (ms).
    pub epoch_ms: i64,
    /// Notification number within the episode.
    pub sequence: u32,
}

impl Notification {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        receiver: &str,
        rule: &str,
        group_key: &str,
        group_labels: BTreeMap<String, String>,
        alerts: Vec<AlertRecord>,
        epoch_ms: i64,
        sequence: u32,
        kind: NotificationKind,
    ) -> Self {
        // The content is part of the id: a replay that numbers notifications differently
        // never mistakes one notification for another.
        let content: Vec<(&str, &str)> = alerts
            .iter()
            .map(|a| (a.fingerprint.as_str(), a.status.as_str()))
            .collect();
        let id = hash_hex(&format!(
            "{receiver}|{group_key}|{epoch_ms}|{sequence}|{kind:?}|{content:?}"
        ));
        Self {
            id,
            receiver: receiver.to_owned(),
            rule: rule.to_owned(),
            group_key: group_key.to_owned(),
            group_labels,
            kind,
            alerts,
            epoch_ms,
            sequence,
        }
    }

    /// Firing if any alert fires.
    pub fn status(&self) -> AlertStatus {
        if self.alerts.iter().any(|a| a.status == AlertStatus::Firing) {
            AlertStatus::Firing
        } else {
            AlertStatus::Resolved
        }
    }

    /// Labels every alert shares.
    pub fn common_labels(&self) -> BTreeMap<String, String> {
        common(self.alerts.iter().map(|a| &a.labels))
    }

    /// Annotations every alert shares.
    pub fn common_annotations(&self) -> BTreeMap<String, String> {
        common(self.alerts.iter().map(|a| &a.annotations))
    }

    /// A stable id of the group (PagerDuty's `dedup_key`).
    pub fn group_id(&self) -> String {
        hash_hex(&self.group_key)
    }

    /// The key that makes an execution happen once: per notification, or for a remediation
    /// per firing episode of the group.
    pub fn idempotency_key(&self, remediation: bool) -> String {
        if remediation {
            hash_hex(&format!(
                "remediate|{}|{}|{}",
                self.receiver, self.group_key, self.epoch_ms
            ))
        } else {
            self.id.clone()
        }
    }
}

fn common<'a>(
    mut maps: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let Some(first) = maps.next() else {
        return BTreeMap::new();
    };
    let mut out = first.clone();
    for m in maps {
        out.retain(|k, v| m.get(k) == Some(v));
    }
    out
}

/// The kinds of receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiverKind {
    /// POST the notification as JSON (or a template of it) to `url`.
    Webhook,
    /// POST Alertmanager's webhook payload (version 4) to `url`.
    Alertmanager,
    /// POST a Slack message to an incoming-webhook `url`.
    Slack,
    /// Send a PagerDuty Events API v2 event (trigger / resolve with `dedup_key`).
    Pagerduty,
    /// Run an allowlisted command (`command` table).
    Command,
    /// Publish to a Redis `channel` or append to a `stream`.
    Redis,
    /// Publish to a Kafka `topic` on `brokers`.
    Kafka,
    /// Print one line per notification on standard output.
    Log,
}

/// `[[decision.receiver]]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// The name rules refer to.
    pub name: String,
    /// What it is.
    #[serde(rename = "type")]
    pub kind: ReceiverKind,
    /// HTTP receivers: where to POST. PagerDuty defaults to its Events API v2 endpoint.
    #[serde(default)]
    pub url: Option<String>,
    /// HTTP receivers: extra headers (e.g. `Authorization = "Bearer ${TOKEN}"`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Webhook: a minijinja template of the body, over the notification's fields.
    #[serde(default)]
    pub body: Option<String>,
    /// Slack: the channel to post in; Redis: the channel to publish to.
    #[serde(default)]
    pub channel: Option<String>,
    /// Redis: the stream to append to (instead of a channel).
    #[serde(default)]
    pub stream: Option<String>,
    /// Kafka: `bootstrap.servers`.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Kafka: the topic.
    #[serde(default)]
    pub topic: Option<String>,
    /// PagerDuty: environment variable holding the integration's routing key.
    #[serde(default)]
    pub routing_key_env: Option<String>,
    /// PagerDuty: file holding the routing key.
    #[serde(default)]
    pub routing_key_file: Option<PathBuf>,
    /// Command: what to run and how.
    #[serde(default)]
    pub command: Option<command::CommandConfig>,
    /// Redis: a connection of its own (else the pipeline's `[redis]`).
    #[cfg(feature = "redis")]
    #[serde(default)]
    pub redis: Option<crate::redis::RedisConnection>,
    /// Longest time one attempt may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries of failed deliveries (never for commands).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Least time between two executions for one group.
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Duration,
    /// Most executions per minute.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Stop after this many consecutive failures, for a while.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Receiver told when this one's circuit opens (a person's channel).
    #[serde(default)]
    pub escalate_to: Option<String>,
    /// Receiver a notification goes to when this one failed it for good.
    #[serde(default)]
    pub fallback: Option<String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl fmt::Debug for ReceiverConfig {
    // URLs carry secrets (Slack's path), header values carry tokens: neither is printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url.as_deref().map(crate::util::url::mask_url))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("channel", &self.channel)
            .field("stream", &self.stream)
            .field("topic", &self.topic)
            .field("command", &self.command)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("cooldown", &self.cooldown)
            .field("rate_limit", &self.rate_limit)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("escalate_to", &self.escalate_to)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// Where idempotency keys are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdempotencyBackend {
    /// In memory: this process only.
    Memory,
    /// A local file (`path`): survives restarts of one replica.
    #[default]
    File,
    /// Redis (`SET NX PX`): shared by all replicas.
    Redis,
}

/// `[decision.idempotency]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// The backend.
    #[serde(default)]
    pub store: IdempotencyBackend,
    /// The file of the `file` backend.
    #[serde(default = "default_idempotency_path")]
    pub path: PathBuf,
    /// How long a key is remembered.
    #[serde(default = "default_idempotency_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Key prefix of the `redis` backend.
    #[serde(default = "default_idempotency_prefix")]
    pub key_prefix: String,
}

fn default_idempotency_path() -> PathBuf {
    PathBuf::from("smartcloudops-state/idempotency.jsonl")
}
fn default_idempotency_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_idempotency_prefix() -> String {
    "smartcloudops".into()
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            store: IdempotencyBackend::File,
            path: default_idempotency_path(),
            ttl: default_idempotency_ttl(),
            key_prefix: default_idempotency_prefix(),
        }
    }
}

/// `[decision]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionConfig {
    /// `[[decision.rule]]`.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// `[[decision.receiver]]`.
    #[serde(default, rename = "receiver")]
    pub receivers: Vec<ReceiverConfig>,
    /// `[[decision.silence]]`: silences from the start.
    #[serde(default, rename = "silence")]
    pub silences: Vec<SilenceConfig>,
    /// `[[decision.inhibit]]`.
    #[serde(default, rename = "inhibit")]
    pub inhibits: Vec<InhibitConfig>,
    /// The audit log (JSON lines, synced); in memory only when absent.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Where idempotency keys are kept.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// Most executions per minute over all receivers.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Longest silence allowed; longer ones are cut.
    #[serde(default = "default_max_silence", with = "humantime_serde")]
    pub max_silence: Duration,
    /// Link back to this deployment in notifications (Alertmanager's `externalURL`).
    #[serde(default)]
    pub external_url: String,
    /// Programs commands may run (absolute paths).
    #[serde(default)]
    pub allowed_commands: Vec<PathBuf>,
    /// How often pending notifications are looked at.
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick: Duration,
}

fn default_max_silence() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_tick() -> Duration {
    Duration::from_secs(1)
}

impl DecisionConfig {
    /// Configuration problems, as `(path, message)` (paths relative to `[decision]`).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let names: Vec<&str> = self.receivers.iter().map(|r| r.name.as_str()).collect();
        for (i, rule) in self.rules.iter().enumerate() {
            if self.rules[..i].iter().any(|r| r.name == rule.name) {
                out.push((
                    format!("rule[{i}].name"),
                    format!("`{}` is used twice", rule.name),
                ));
            }
            for (field, message) in rule.problems() {
                out.push((format!("rule[{i}].{field}"), message));
            }
            for r in &rule.receivers {
                if !names.contains(&r.as_str()) {
                    out.push((
                        format!("rule[{i}].receivers"),
                        format!("no receiver named `{r}`"),
                    ));
                }
            }
        }
        for (i, r) in self.receivers.iter().enumerate() {
            if names.iter().filter(|n| **n == r.name).count() > 1 {
                out.push((
                    format!("receiver[{i}].name"),
                    format!("`{}` is used twice", r.name),
                ));
            }
            for (field, target) in [("escalate_to", &r.escalate_to), ("fallback", &r.fallback)] {
                if let Some(t) = target {
                    let other = self
                        .receivers
                        .iter()
                        .find(|o| &o.name == t && o.name != r.name);
                    match other {
                        None => out.push((format!("receiver[{i}].{field}"), format!("no other receiver named `{t}`"))),
                        Some(o) if o.kind == ReceiverKind::Command => out.push((
                            format!("receiver[{i}].{field}"),
                            format!("`{t}` is a command; escalations and fallbacks go to people and channels"),
                        )),
                        Some(_) => {}
                    }
                }
            }
            if r.timeout.is_zero() {
                out.push((
                    format!("receiver[{i}].timeout"),
                    "must be longer than 0".into(),
                ));
            }
            if let Err(e) = build_receiver(r, self, None) {
                out.push((format!("receiver[{i}]"), e));
            }
            if r.retry.attempts == 0 {
                out.push((
                    format!("receiver[{i}].retry.attempts"),
                    "must be at least 1".into(),
                ));
            }
        }
        for (i, s) in self.silences.iter().enumerate() {
            if let Ok(m) = matcher::Matchers::parse(&s.matchers)
                && m.matches(&BTreeMap::new())
            {
                out.push((
                        format!("silence[{i}].matchers"),
                        "these matchers match an alert with no labels, so every alert: name a label value".into(),
                    ));
            }
            if let Err(e) = Silence::new(String::new(), s.clone(), 0, self.max_silence) {
                out.push((format!("silence[{i}]"), e));
            }
        }
        for (i, c) in self.inhibits.iter().enumerate() {
            if let Err(e) = Inhibit::new(c) {
                out.push((format!("inhibit[{i}]"), e));
            }
        }
        out
    }
}

fn read_secret(
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> std::result::Result<Option<String>, String> {
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("the variable `{var}` is not set"));
    }
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_owned()))
            .map_err(|e| format!("reading {}: {e}", path.display()));
    }
    Ok(None)
}

/// The pipeline's Redis connection, where the build has Redis.
#[cfg(feature = "redis")]
type PipelineRedis = crate::redis::RedisConnection;
#[cfg(not(feature = "redis"))]
type PipelineRedis = ();

/// Builds the receiver of `r`. `redis` is the pipeline's Redis connection, if any.
#[cfg_attr(not(feature = "redis"), allow(unused_variables))]
fn build_receiver(
    r: &ReceiverConfig,
    config: &DecisionConfig,
    redis: Option<&PipelineRedis>,
) -> std::result::Result<Box<dyn Receiver>, String> {
    let http = |format: HttpFormat, url: Option<&str>, options: HttpOptions| {
        let url = url.ok_or("`url` is required")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "`{}` is not an http(s) URL",
                crate::util::url::mask_url(url)
            ));
        }
        HttpReceiver::new(url.to_owned(), format, r.timeout, options)
            .map(|h| Box::new(h) as Box<dyn Receiver>)
    };
    let options = HttpOptions {
        headers: r.headers.clone(),
        template: r.body.clone(),
        routing_key: None,
        external_url: config.external_url.clone(),
        slack_channel: r.channel.clone(),
    };
    match r.kind {
        ReceiverKind::Webhook => http(HttpFormat::Webhook, r.url.as_deref(), options),
        ReceiverKind::Alertmanager => http(HttpFormat::Alertmanager, r.url.as_deref(), options),
        ReceiverKind::Slack => http(HttpFormat::Slack, r.url.as_deref(), options),
        ReceiverKind::Pagerduty => {
            let key = read_secret(&r.routing_key_env, &r.routing_key_file)?
                .ok_or("set `routing_key_env` or `routing_key_file`")?;
            let url = r.url.as_deref().unwrap_or(PAGERDUTY_URL);
            http(
                HttpFormat::PagerDuty,
                Some(url),
                HttpOptions {
                    routing_key: Some(key),
                    ..options
                },
            )
        }
        ReceiverKind::Command => {
            let c = r.command.clone().ok_or("a `command` table is required")?;
            command::CommandReceiver::new(c, &config.allowed_commands, r.timeout)
                .map(|c| Box::new(c) as Box<dyn Receiver>)
        }
        ReceiverKind::Redis => {
            #[cfg(feature = "redis")]
            {
                if r.channel.is_some() == r.stream.is_some() {
                    return Err("set exactly one of `channel` and `stream`".into());
                }
                let connection = r
                    .redis
                    .clone()
                    .or_else(|| redis.cloned())
                    .unwrap_or_default();
                Ok(Box::new(receiver::RedisReceiver::new(
                    connection,
                    r.channel.clone(),
                    r.stream.clone(),
                )))
            }
            #[cfg(not(feature = "redis"))]
            Err("this build has no Redis support".into())
        }
        ReceiverKind::Log => Ok(Box::new(receiver::LogReceiver)),
        ReceiverKind::Kafka => {
            #[cfg(feature = "kafka")]
            {
                let (Some(brokers), Some(topic)) = (&r.brokers, &r.topic) else {
                    return Err("`brokers` and `topic` are required".into());
                };
                receiver::KafkaReceiver::new(brokers, topic, r.timeout)
                    .map(|k| Box::new(k) as Box<dyn Receiver>)
            }
            #[cfg(not(feature = "kafka"))]
            Err("this build has no Kafka support".into())
        }
    }
}

/// One receiver with its guards.
#[derive(Debug)]
struct Slot {
    config: ReceiverConfig,
    receiver: Box<dyn Receiver>,
    guards: Mutex<Guards>,
}

#[derive(Debug)]
struct Guards {
    bucket: Option<TokenBucket>,
    breaker: Option<CircuitBreaker>,
}

/// A suggested remediation waiting for a person.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    /// The notification it came from.
    pub notification: String,
    /// The receiver (command) that would run.
    pub receiver: String,
    /// What would run.
    pub plan: Value,
    /// When it was suggested, ms.
    pub at_ms: i64,
}

/// Counters of the engine's outcomes.
#[derive(Debug, Default)]
pub struct DecisionStats {
    /// Notifications delivered (including to fallbacks).
    pub delivered: AtomicU64,
    /// Notifications held back by a guard, a silence or inhibition.
    pub held_back: AtomicU64,
    /// Notifications dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Delivery attempts that failed.
    pub failed_attempts: AtomicU64,
}

#[derive(Debug, Default)]
struct EngineState {
    alerts: rustc_hash::FxHashMap<(usize, u64), AlertState>,
    dispatcher: Dispatcher,
    global_bucket: Option<TokenBucket>,
    suggestions: Vec<Suggestion>,
    silence_seq: u64,
    /// Notifications whose execution failed before it was recorded (the audit log or the key
    /// store failed); the ticker tries them again.
    pending: Vec<Notification>,
}

/// The decision layer as a pipeline action. See the [module docs](self).
#[derive(Debug)]
pub struct DecisionEngine {
    inner: Arc<Inner>,
    ticker: Mutex<
        Option<(
            tokio::task::JoinHandle<()>,
            tokio_util::sync::CancellationToken,
        )>,
    >,
}

#[derive(Debug)]
struct Inner {
    rules: Vec<Rule>,
    rule_configs: Vec<RuleConfig>,
    slots: HashMap<String, Slot>,
    state: Mutex<EngineState>,
    audit: AuditLog,
    idempotency: Box<dyn IdempotencyStore>,
    idempotency_ttl: Duration,
    clock: Arc<dyn Clock>,
    max_silence: Duration,
    tick: Option<Duration>,
    stats: DecisionStats,
    /// One lock per (receiver, group): a group's notifications reach a receiver in order.
    delivery_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Options of [`DecisionEngine::with_options`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// Run the background ticker that sends notifications falling due later.
    pub ticker: bool,
    /// Use this idempotency store instead of the configured one.
    pub idempotency: Option<Arc<dyn IdempotencyStore>>,
    /// The pipeline's `[redis]` connection, for Redis receivers and the Redis key store.
    #[cfg(feature = "redis")]
    pub redis: Option<crate::redis::RedisConnection>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            ticker: true,
            idempotency: None,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }
}

#[derive(Debug)]
struct SharedStore(Arc<dyn IdempotencyStore>);

impl IdempotencyStore for SharedStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool>> {
        self.0.claim(key, ttl, now_ms)
    }
}

fn config_error(message: String) -> Error {
    Error::Action {
        action: "decision".into(),
        message,
        retryable: false,
    }
}

impl DecisionEngine {
    /// An engine for `config` on the system clock.
    pub fn new(config: DecisionConfig) -> Result<Self> {
        Self::with_options(config, EngineOptions::default())
    }

    /// An engine for `config` with `options`.
    pub fn with_options(config: DecisionConfig, options: EngineOptions) -> Result<Self> {
        let problems = config.problems();
        if let Some((path, message)) = problems.first() {
            return Err(config_error(format!("decision.{path}: {message}")));
        }
        let now = options.clock.now_ms();
        #[cfg(feature = "redis")]
        let redis_ref = options.redis.as_ref();
        #[cfg(not(feature = "redis"))]
        let redis_ref: Option<&PipelineRedis> = None;
        let mut slots = HashMap::new();
        for r in &config.receivers {
            let receiver = build_receiver(r, &config, redis_ref).map_err(config_error)?;
            slots.insert(
                r.name.clone(),
                Slot {
                    config: r.clone(),
                    receiver,
                    guards: Mutex::new(Guards {
                        bucket: r.rate_limit.map(|l| TokenBucket::new(l, now)),
                        breaker: r.circuit_breaker.map(CircuitBreaker::new),
                    }),
                },
            );
        }
        let rules = config
            .rules
            .iter()
            .cloned()
            .map(Rule::new)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(config_error)?;
        let idempotency: Box<dyn IdempotencyStore> = match options.idempotency {
            Some(store) => Box::new(SharedStore(store)),
            None => match config.idempotency.store {
                IdempotencyBackend::Memory => Box::new(MemoryIdempotency::default()),
                IdempotencyBackend::File => {
                    Box::new(FileIdempotency::open(&config.idempotency.path, now)?)
                }
                IdempotencyBackend::Redis => {
                    #[cfg(feature = "redis")]
                    {
                        Box::new(guard::RedisIdempotency::new(
                            options.redis.clone().unwrap_or_default(),
                            config.idempotency.key_prefix.clone(),
                        ))
                    }
                    #[cfg(not(feature = "redis"))]
                    return Err(config_error("this build has no Redis support".into()));
                }
            },
        };
        let audit = match &config.audit_log {
            Some(path) => AuditLog::open(path)?,
            None => AuditLog::in_memory(),
        };
        let mut state = EngineState {
            global_bucket: config.rate_limit.map(|l| TokenBucket::new(l, now)),
            ..EngineState::default()
        };
        for c in &config.inhibits {
            state
                .dispatcher
                .inhibits
                .push(Inhibit::new(c).map_err(config_error)?);
        }
        for s in &config.silences {
            state.silence_seq += 1;
            let id = format!("static-{}", state.silence_seq);
            state
                .dispatcher
                .silences
                .push(Silence::new(id, s.clone(), now, config.max_silence).map_err(config_error)?);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                rule_configs: config.rules.clone(),
                rules,
                slots,
                state: Mutex::new(state),
                audit,
                idempotency,
                idempotency_ttl: config.idempotency.ttl,
                clock: options.clock,
                max_silence: config.max_silence,
                tick: options.ticker.then_some(config.tick),
                stats: DecisionStats::default(),
                delivery_locks: Mutex::default(),
            }),
            ticker: Mutex::new(None),
        })
    }

    /// Sends the notifications due now; returns how many went out (or were held back).
    pub async fn tick(&self) -> Result<usize> {
        self.inner.tick(false).await
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Outcome counters.
    pub fn stats(&self) -> &DecisionStats {
        &self.inner.stats
    }

    /// Alerts firing now (notified or waiting for their group).
    pub fn firing(&self) -> Vec<AlertRecord> {
        self.inner.lock().dispatcher.firing()
    }

    /// Remediations suggested and waiting for a person.
    pub fn suggestions(&self) -> Vec<Suggestion> {
        self.inner.lock().suggestions.clone()
    }

    /// Adds a silence; returns its id. Its end is capped at `max_silence`.
    pub fn add_silence(&self, config: SilenceConfig) -> Result<String> {
        let now = self.inner.clock.now_ms();
        let mut state = self.inner.lock();
        state.silence_seq += 1;
        let id = format!("silence-{}", state.silence_seq);
        let silence =
            Silence::new(id.clone(), config, now, self.inner.max_silence).map_err(config_error)?;
        let mut record = AuditRecord::new("decision", "silence_added");
        record.reason = format!(
            "by {}: {}",
            silence.config.created_by, silence.config.comment
        );
        record.details =
            json!({ "id": id, "matchers": silence.config.matchers, "ends_ms": silence.ends_ms });
        state.dispatcher.silences.push(silence);
        drop(state);
        self.inner.audit.write(&[record])?;
        Ok(id)
    }

    /// Active and future silences.
    pub fn silences(&self) -> Vec<Silence> {
        let now = self.inner.clock.now_ms();
        let mut state = self.inner.lock();
        state.dispatcher.silences.retain(|s| s.ends_ms > now);
        state.dispatcher.silences.clone()
    }

    fn ensure_ticker(&self) {
        let Some(every) = self.inner.tick else { return };
        let mut ticker = self.ticker.lock().unwrap_or_else(|p| p.into_inner());
        if ticker.is_some() {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let Some(inner) = inner.upgrade() else { return };
                // Not cancelled while it works: a claimed execution runs to its end.
                if let Err(e) = inner.tick(false).await {
                    tracing::error!("decision: sending due notifications failed: {e}");
                }
            }
        });
        *ticker = Some((handle, stop));
    }
}

impl Drop for DecisionEngine {
    fn drop(&mut self) {
        if let Some((handle, _)) = self.ticker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, EngineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the rules over one scored batch; returns the audit records and the
    /// notifications due now.
    fn evaluate(&self, input: &ActionInput) -> Result<(Vec<AuditRecord>, Vec<Notification>)> {
        let batch = &input.batch;
        let Ok(scores) = ScoreColumns::try_new(batch, "decision") else {
            return Ok((Vec::new(), Vec::new())); // not scored: nothing to decide
        };
        let cols = MetricsColumns::try_new(batch, "decision")?;
        let now = self.clock.now_ms();
        let mut records = Vec::new();
        let mut notices = Vec::new();
        let mut due = Vec::new();
        let mut state = self.lock();
        let state = &mut *state;
        for row in 0..batch.num_rows() {
            let metric = cols.metric(row);
            let detector = scores.detector(row);
            let series_id = cols.series_id.value(row);
            let mut labels: Option<BTreeMap<String, String>> = None;
            for (ri, rule) in self.rules.iter().enumerate() {
                let key = (ri, series_id);
                let firing = state.alerts.get(&key).is_some_and(AlertState::is_firing);
                let active = rule.is_active(
                    scores.score.value(row),
                    scores.is_anomaly.value(row),
                    firing,
                );
                if !active && !state.alerts.contains_key(&key) {
                    continue; // the common case: a normal row of a series with no alert
                }
                let labels = labels.get_or_insert_with(|| cols.labels(row).into_iter().collect());
                if !rule.matches(metric, labels, detector) {
                    continue;
                }
                let alert_state = state.alerts.entry(key).or_default();
                let transition = alert_state.step(&rule.config, cols.ts.value(row), active);
                alert_state.seen_ms = now;
                if alert_state.is_idle() {
                    state.alerts.remove(&key);
                }
                if transition == Transition::None {
                    continue;
                }
                let alert = Alert::at(&cols, &scores, row);
                let (status, starts, ends, outcome) = match transition {
                    Transition::Fired { since } => (AlertStatus::Firing, since, None, "fired"),
                    Transition::StoppedFlapping {
                        firing_since: Some(since),
                        ..
                    } => (AlertStatus::Firing, since, None, "stable"),
                    Transition::Resolved { since, at } => {
                        (AlertStatus::Resolved, since, Some(at), "resolved")
                    }
                    Transition::StoppedFlapping {
                        at,
                        firing_since: None,
                    } => (AlertStatus::Resolved, at, Some(at), "stable"),
                    Transition::StartedFlapping { at } => {
                        (AlertStatus::Firing, at, None, "flapping")
                    }
                    Transition::None => unreachable!("handled above"),
                };
                let record = AlertRecord::new(&rule.config, &alert, status, starts, ends);
                let mut trigger = AuditRecord::new("trigger", outcome);
                trigger.rule = Some(rule.config.name.clone());
                trigger.reason = alert.reason.clone();
                trigger.details = json!({
                    "fingerprint": record.fingerprint,
                    "status": status.as_str(),
                    "labels": record.labels,
                    "value": alert.value,
                    "score": alert.score,
                    "time": alert.time,
                });
                records.push(trigger);
                if let Transition::StartedFlapping { at } = transition {
                    // One notice to the receivers that only notify; no remediation. A muted
                    // alert's notice is muted too.
                    if let Some(m) = state.dispatcher.muted(&record, now) {
                        let (outcome, by) = m.outcome();
                        let mut d = AuditRecord::new("decision", outcome);
                        d.rule = Some(rule.config.name.clone());
                        d.reason = format!("flapping notice {outcome} by {by}");
                        d.details = json!({ "fingerprint": record.fingerprint });
                        records.push(d);
                        continue;
                    }
                    for receiver in &rule.config.receivers {
                        if self
                            .slots
                            .get(receiver)
                            .is_some_and(|s| !s.receiver.is_remediation())
                        {
                            notices.push(Notification::new(
                                receiver,
                                &rule.config.name,
                                &format!("{}:flapping:{}", rule.config.name, record.fingerprint),
                                BTreeMap::from([(
                                    "alertname".to_owned(),
                                    rule.config.name.clone(),
                                )]),
                                vec![record.clone()],
                                at,
                                0,
                                NotificationKind::Flapping,
                            ));
                        }
                    }
                    continue;
                }
                if let Some(alert_state) = state.alerts.get_mut(&key) {
                    // Kept for the staleness sweep: a series that stops reporting resolves.
                    alert_state.record = (status == AlertStatus::Firing).then(|| record.clone());
                }
                let group = state.dispatcher.update(ri, &rule.config, record, now);
                if rule.config.group_wait.is_zero() {
                    // Announce now, before a later row of this batch resolves it again.
                    due.extend(state.dispatcher.due_one(&self.rule_configs, &group, now));
                }
            }
        }
        due.extend(state.dispatcher.due(&self.rule_configs, now, false));
        records.extend(dispatch_records(&mut state.dispatcher, &self.stats));
        due.extend(notices);
        Ok((records, due))
    }

    /// Resolves firing alerts whose series went quiet for `stale_after`, and forgets quiet
    /// alerts that have nothing left to remember.
    fn sweep(&self, state: &mut EngineState, now: i64) -> Vec<AuditRecord> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let mut stale = Vec::new();
        state.alerts.retain(|(ri, _), st| {
            let rule = &self.rule_configs[*ri];
            let quiet = now.saturating_sub(st.seen_ms);
            if let rule::Phase::Firing { active_at, .. } = st.phase {
                if !rule.stale_after.is_zero() && quiet >= ms(rule.stale_after) {
                    if let Some(mut record) = st.record.take() {
                        record.status = AlertStatus::Resolved;
                        record.ends_at_ms = Some(active_at);
                        stale.push((*ri, record));
                    }
                    return false;
                }
                return true;
            }
            quiet < ms(rule.flap.window).max(ms(rule.stale_after))
        });
        let mut records = Vec::new();
        for (ri, record) in stale {
            let rule = &self.rule_configs[ri];
            let mut trigger = AuditRecord::new("trigger", "stale");
            trigger.rule = Some(rule.name.clone());
            trigger.reason = format!("no row for {:?}: resolved", rule.stale_after);
            trigger.details = json!({ "fingerprint": record.fingerprint, "status": "resolved", "labels": record.labels });
            records.push(trigger);
            state.dispatcher.update(ri, rule, record, now);
        }
        records
    }

    async fn tick(&self, flush: bool) -> Result<usize> {
        let now = self.clock.now_ms();
        let (due, records) = {
            let mut state = self.lock();
            let mut records = self.sweep(&mut state, now);
            let due = state.dispatcher.due(&self.rule_configs, now, flush);
            records.extend(dispatch_records(&mut state.dispatcher, &self.stats));
            (due, records)
        };
        self.audit.write(&records)?;
        let mut all = std::mem::take(&mut self.lock().pending);
        all.extend(due);
        let n = all.len();
        self.run_all(all).await?;
        Ok(n)
    }

    /// Executes `notifications`; one whose execution failed before it was recorded is kept
    /// for the ticker, and the first such error is returned after the others ran.
    async fn run_all(&self, notifications: Vec<Notification>) -> Result<()> {
        let mut first_error = None;
        for n in notifications {
            if let Err(e) = self.execute(n.clone(), true).await {
                self.lock().pending.push(n);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn delivery_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .delivery_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key).or_default().clone()
    }

    fn record(&self, kind: &'static str, n: &Notification, outcome: &str) -> AuditRecord {
        let mut r = AuditRecord::new(kind, outcome);
        r.rule = Some(n.rule.clone());
        r.notification = Some(n.id.clone());
        r.receiver = Some(n.receiver.clone());
        r
    }

    /// Runs one notification through the guards and its receiver. An error means it could
    /// not even be dead-lettered (the audit log failed).
    fn execute<'a>(&'a self, n: Notification, may_escalate: bool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(slot) = self.slots.get(&n.receiver) else {
                return Ok(()); // checked at start-up
            };
            let order = self.delivery_lock(format!("{}|{}", n.receiver, n.group_key));
            let _in_order = order.lock().await;
            let remediation = slot.receiver.is_remediation();
            let now = self.clock.now_ms();
            let key = n.idempotency_key(remediation);
            let fingerprints: Vec<&str> = n.alerts.iter().map(|a| a.fingerprint.as_str()).collect();
            let decision = |outcome: &str, reason: String, details: Value| {
                let mut r = self.record("decision", &n, outcome);
                r.key = Some(key.clone());
                r.reason = reason;
                r.details = json!({
                    "group_key": n.group_key,
                    "fingerprints": fingerprints,
                    "target": slot.receiver.target(),
                    "receiver_type": slot.receiver.kind(),
                    "plan": details,
                });
                r
            };
            if remediation
                && (n.kind != NotificationKind::Alerts || n.status() != AlertStatus::Firing)
            {
                return self.held(decision(
                    "skipped",
                    "remediation runs only for firing alerts".into(),
                    Value::Null,
                ));
            }
            // 1. Parameters: a plan that must not run stops here.
            let plan = match slot.receiver.prepare(&n) {
                Ok(plan) => plan,
                Err(reason) => return self.held(decision("blocked", reason, Value::Null)),
            };
            // 2. Idempotency, before any guard spends anything: a duplicate is not news, and
            //    never goes to a fallback.
            if !self
                .idempotency
                .claim(&key, self.idempotency_ttl, now)
                .await?
            {
                return self.held(decision(
                    "duplicate",
                    "this execution already happened".into(),
                    plan,
                ));
            }
            // 3. Mode.
            match slot.receiver.mode() {
                ExecutionMode::DryRun => {
                    return self.held(decision(
                        "dry_run",
                        "mode = dry_run: not executed".into(),
                        plan,
                    ));
                }
                ExecutionMode::Suggest => {
                    self.lock().suggestions.push(Suggestion {
                        notification: n.id.clone(),
                        receiver: n.receiver.clone(),
                        plan: plan.clone(),
                        at_ms: now,
                    });
                    return self.held(decision(
                        "suggested",
                        "mode = suggest: waits for a person".into(),
                        plan,
                    ));
                }
                ExecutionMode::Auto => {}
            }
            // 4. Circuit breaker, cooldown and rate limits. A cooldown is a deliberate pause:
            //    recorded only. An open circuit or a rate limit is an overflow: the
            //    notification goes to the fallback or the dead letters (a remediation is just
            //    not run).
            let cooldown_applies = !slot.config.cooldown.is_zero()
                && n.kind == NotificationKind::Alerts
                && n.status() == AlertStatus::Firing;
            let cooled = cooldown_applies
                && !self
                    .idempotency
                    .claim(
                        &format!("cooldown|{}|{}", n.receiver, n.group_key),
                        slot.config.cooldown,
                        now,
                    )
                    .await?;
            let blocked: Option<(&str, String)> = {
                let mut g = slot.guards.lock().unwrap_or_else(|p| p.into_inner());
                if g.breaker.as_mut().is_some_and(|b| !b.try_pass(now)) {
                    Some((
                        "circuit_open",
                        "the receiver's circuit is open after repeated failures".into(),
                    ))
                } else if cooled {
                    Some((
                        "cooldown",
                        format!(
                            "ran for this group less than {:?} ago",
                            slot.config.cooldown
                        ),
                    ))
                } else {
                    let mut state = self.lock();
                    let own = g.bucket.as_ref().is_none_or(|b| b.has_token(now));
                    let global = state
                        .global_bucket
                        .as_ref()
                        .is_none_or(|b| b.has_token(now));
                    if own && global {
                        if let Some(b) = g.bucket.as_mut() {
                            b.try_take(now);
                        }
                        if let Some(b) = state.global_bucket.as_mut() {
                            b.try_take(now);
                        }
                        None
                    } else if !own {
                        Some((
                            "rate_limited",
                            "the receiver's rate limit is reached".into(),
                        ))
                    } else {
                        Some(("rate_limited", "the global rate limit is reached".into()))
                    }
                }
            };
            if let Some((outcome, reason)) = blocked {
                self.held(decision(outcome, reason.clone(), Value::Null))?;
                if outcome == "cooldown" || remediation {
                    return Ok(());
                }
                return self.give_up(&n, slot, &reason, may_escalate).await;
            }
            self.audit
                .write(&[decision("execute", String::new(), plan)])?;
            let attempts = if remediation {
                1
            } else {
                slot.config.retry.attempts.max(1)
            };
            let mut last_error = String::new();
            for attempt in 1..=attempts {
                let mut exec = self.record("execution", &n, "started");
                exec.key = Some(key.clone());
                exec.attempt = Some(attempt);
                self.audit.write(&[exec])?;
                let result = match tokio::time::timeout(
                    slot.config.timeout,
                    slot.receiver.deliver(&n),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(DeliveryError::transient(format!(
                        "timed out after {:?}",
                        slot.config.timeout
                    ))),
                };
                let mut res = self.record("result", &n, "");
                res.key = Some(key.clone());
                res.attempt = Some(attempt);
                match result {
                    Ok(detail) => {
                        res.outcome = "delivered".into();
                        res.details = json!({ "detail": detail });
                        self.audit.write(&[res])?;
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                        let mut g = slot.guards.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(b) = g.breaker.as_mut() {
                            b.record(true, self.clock.now_ms());
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        res.outcome = "failed".into();
                        res.reason = e.message.clone();
                        res.details = json!({ "retryable": e.retryable });
                        self.audit.write(&[res])?;
                        last_error = e.message.clone();
                        if !e.retryable || attempt == attempts {
                            break;
                        }
                        tokio::time::sleep(slot.config.retry.backoff(attempt, e.retry_after)).await;
                    }
                }
            }
            let opened = {
                let mut g = slot.guards.lock().unwrap_or_else(|p| p.into_inner());
                g.breaker
                    .as_mut()
                    .is_some_and(|b| b.record(false, self.clock.now_ms()))
            };
            if opened {
                let mut r = self.record("result", &n, "circuit_opened");
                r.reason = last_error.clone();
                self.audit.write(&[r])?;
                if let (Some(person), true) = (&slot.config.escalate_to, may_escalate) {
                    let escalation = Notification::new(
                        person,
                        &n.rule,
                        &n.group_key,
                        n.group_labels.clone(),
                        n.alerts.clone(),
                        n.epoch_ms,
                        n.sequence,
                        NotificationKind::Escalation {
                            failed_receiver: n.receiver.clone(),
                            reason: last_error.clone(),
                        },
                    );
                    self.execute(escalation, false).await?;
                }
            }
            self.give_up(&n, slot, &last_error, may_escalate).await
        })
    }

    /// Records a decision not to execute.
    fn held(&self, record: AuditRecord) -> Result<()> {
        self.stats.held_back.fetch_add(1, Ordering::Relaxed);
        self.audit.write(&[record])
    }

    /// A notification its receiver could not take: to the fallback, else a dead letter.
    async fn give_up(
        &self,
        n: &Notification,
        slot: &Slot,
        reason: &str,
        may_escalate: bool,
    ) -> Result<()> {
        if let (Some(fallback), true) = (&slot.config.fallback, may_escalate) {
            let mut r = self.record("result", n, "fallback");
            r.reason = format!("to `{fallback}`: {reason}");
            self.audit.write(&[r])?;
            let mut other = n.clone();
            other.receiver = fallback.clone();
            other.id = hash_hex(&format!("{}|fallback|{fallback}", n.id));
            return self.execute(other, false).await;
        }
        let mut r = self.record("result", n, "dead_lettered");
        r.reason = reason.to_owned();
        r.details = serde_json::to_value(n).unwrap_or(Value::Null);
        self.audit.write(&[r])?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::error!(receiver = %n.receiver, notification = %n.id, "notification dead-lettered: {reason}");
        Ok(())
    }
}

/// Audit records of what the dispatcher decided without notifying: muting that started or
/// ended, and alerts that resolved before anything about them was notified.
fn dispatch_records(dispatcher: &mut Dispatcher, stats: &DecisionStats) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = dispatcher
        .mute_changes
        .drain(..)
        .map(|change| {
            let (outcome, reason) = match &change.muted {
                Some(m) => {
                    stats.held_back.fetch_add(1, Ordering::Relaxed);
                    let (outcome, by) = m.outcome();
                    (outcome, format!("{outcome} by {by}"))
                }
                None => (
                    "unmuted",
                    "no silence or inhibition applies any more".to_owned(),
                ),
            };
            let mut r = AuditRecord::new("decision", outcome);
            r.rule = Some(change.rule);
            r.reason = reason;
            r.details = json!({ "fingerprint": change.fingerprint });
            r
        })
        .collect();
    out.extend(
        dispatcher
            .unannounced
            .drain(..)
            .map(|(rule, group_key, fingerprints)| {
                let mut r = AuditRecord::new("decision", "resolved_before_notified");
                r.rule = Some(rule);
                r.reason =
                    "resolved before a notification announced it (group_wait, or muted)".into();
                r.details = json!({ "group_key": group_key, "fingerprints": fingerprints });
                r
            }),
    );
    out
}

impl Action for DecisionEngine {
    fn name(&self) -> &str {
        "decision"
    }

    fn wants_every_batch(&self) -> bool {
        true // resolving needs the normal rows too
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.ensure_ticker();
            let (records, due) = self.inner.evaluate(input)?;
            // Durable before anything is acted on, and before the batch is acknowledged.
            if let Err(e) = self.inner.audit.write(&records) {
                self.inner.lock().pending.extend(due);
                return Err(e);
            }
            self.inner.run_all(due).await
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let ticker = self.ticker.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((handle, stop)) = ticker {
                stop.cancel();
                let _ = handle.await; // let a running tick finish its executions
            }
            // What was decided must not be lost with the process: send every pending group.
            self.inner.tick(true).await.map(|_| ())
        })
    }
}
