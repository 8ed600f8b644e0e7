//! `[[decision.receiver]]`: a name, the guards every kind has ([`GuardConfig`]) and the
//! settings of its kind ([`ReceiverSettings`], tagged by `type`).
//!
//! serde cannot derive this shape and still refuse unknown fields (`deny_unknown_fields`
//! does not work with `flatten`), so [`ReceiverConfig`] is deserialized by hand: the guard
//! fields straight from the table (errors keep their full path), the kind's fields set aside
//! and deserialized once `type` is known, each part refusing fields it does not know. An
//! unknown field is reported with every field this kind takes, for a did-you-mean hint.

use std::fmt;
use std::time::Duration;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::alertmanager::AlertmanagerConfig;
use super::command::CommandReceiverConfig;
use super::http::WebhookConfig;
use super::kafka::KafkaConfig;
use super::log::LogConfig;
use super::pagerduty::PagerDutyConfig;
use super::redis::RedisConfig;
use super::slack::SlackConfig;
use super::{BuildContext, Built};
use crate::decision::guard::{CircuitBreakerConfig, RateLimit, RetryPolicy};
use crate::error::Problems;

/// The kinds of receiver (`type`).
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

/// The settings of one kind of receiver.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReceiverSettings {
    /// `type = "webhook"`.
    Webhook(WebhookConfig),
    /// `type = "alertmanager"`.
    Alertmanager(AlertmanagerConfig),
    /// `type = "slack"`.
    Slack(SlackConfig),
    /// `type = "pagerduty"`.
    Pagerduty(PagerDutyConfig),
    /// `type = "command"`.
    Command(CommandReceiverConfig),
    /// `type = "redis"`.
    Redis(RedisConfig),
    /// `type = "kafka"`.
    Kafka(KafkaConfig),
    /// `type = "log"`.
    Log(LogConfig),
}

impl ReceiverSettings {
    /// The kind.
    pub fn kind(&self) -> ReceiverKind {
        match self {
            Self::Webhook(_) => ReceiverKind::Webhook,
            Self::Alertmanager(_) => ReceiverKind::Alertmanager,
            Self::Slack(_) => ReceiverKind::Slack,
            Self::Pagerduty(_) => ReceiverKind::Pagerduty,
            Self::Command(_) => ReceiverKind::Command,
            Self::Redis(_) => ReceiverKind::Redis,
            Self::Kafka(_) => ReceiverKind::Kafka,
            Self::Log(_) => ReceiverKind::Log,
        }
    }

    /// The receiver, or why these settings cannot work.
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        match self {
            Self::Webhook(c) => c.build(ctx),
            Self::Alertmanager(c) => c.build(ctx),
            Self::Slack(c) => c.build(ctx),
            Self::Pagerduty(c) => c.build(ctx),
            Self::Command(c) => c.build(ctx),
            Self::Redis(c) => c.build(ctx),
            Self::Kafka(c) => c.build(ctx),
            Self::Log(c) => c.build(ctx),
        }
    }

    /// The settings of `kind` from `fields` (the receiver's table less its name, type and
    /// guards).
    fn from_fields<E: de::Error>(kind: ReceiverKind, fields: toml::Table) -> Result<Self, E> {
        Ok(match kind {
            ReceiverKind::Webhook => Self::Webhook(part(fields)?),
            ReceiverKind::Alertmanager => Self::Alertmanager(part(fields)?),
            ReceiverKind::Slack => Self::Slack(part(fields)?),
            ReceiverKind::Pagerduty => Self::Pagerduty(part(fields)?),
            ReceiverKind::Command => Self::Command(part(fields)?),
            ReceiverKind::Redis => Self::Redis(part(fields)?),
            ReceiverKind::Kafka => Self::Kafka(part(fields)?),
            ReceiverKind::Log => Self::Log(part(fields)?),
        })
    }
}

/// The guards of a receiver, the same for every kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
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
    /// How long a failed notification is retried from the outbox before it is escalated
    /// and dead-lettered; `[decision] max_delivery_age` when absent.
    #[serde(default, with = "humantime_serde")]
    pub max_delivery_age: Option<Duration>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            retry: RetryPolicy::default(),
            cooldown: Duration::ZERO,
            rate_limit: None,
            circuit_breaker: None,
            escalate_to: None,
            fallback: None,
            max_delivery_age: None,
        }
    }
}

impl GuardConfig {
    /// Problems of these settings.
    pub fn problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.timeout.is_zero() {
            out.push("timeout", "must be longer than 0");
        }
        if self.retry.attempts == 0 {
            out.push("retry.attempts", "must be at least 1");
        }
        if self.max_delivery_age.is_some_and(|age| age.is_zero()) {
            out.push("max_delivery_age", "must be longer than 0");
        }
        out
    }
}

/// `[[decision.receiver]]`. The `Debug` output masks URLs and header values (they carry
/// secrets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceiverConfig {
    /// The name rules refer to.
    pub name: String,
    /// Retries, timeout, rate limit, cooldown, circuit breaker, escalation and fallback.
    #[serde(flatten)]
    pub guards: GuardConfig,
    /// What it is (`type`) and its kind's settings.
    #[serde(flatten)]
    pub settings: ReceiverSettings,
}

impl ReceiverConfig {
    /// The kind.
    pub fn kind(&self) -> ReceiverKind {
        self.settings.kind()
    }
}

impl<'de> Deserialize<'de> for ReceiverConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ReceiverVisitor)
    }
}

struct ReceiverVisitor;

impl<'de> Visitor<'de> for ReceiverVisitor {
    type Value = ReceiverConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a receiver table")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReceiverConfig, A::Error> {
        let mut rest = Rest::default();
        let guards = GuardConfig::deserialize(MapAccessDeserializer::new(GuardFields {
            map: &mut map,
            guard_fields: field_names::<GuardConfig>(),
            rest: &mut rest,
        }))?;
        let name = rest.name.ok_or_else(|| de::Error::missing_field("name"))?;
        let kind = rest.kind.ok_or_else(|| de::Error::missing_field("type"))?;
        let settings = ReceiverSettings::from_fields(kind, rest.fields)?;
        Ok(ReceiverConfig {
            name,
            guards,
            settings,
        })
    }
}

/// What a receiver's table holds besides its guards.
#[derive(Default)]
struct Rest {
    name: Option<String>,
    kind: Option<ReceiverKind>,
    /// The kind's fields, for when `type` is known.
    fields: toml::Table,
}

/// The guard fields of a receiver's table, as a map of their own; `name` and `type` are
/// read, and the other fields set aside, on the way.
struct GuardFields<'m, A> {
    map: &'m mut A,
    guard_fields: &'static [&'static str],
    rest: &'m mut Rest,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for GuardFields<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.map.next_key::<String>()? {
            match key.as_str() {
                "name" => self.rest.name = Some(self.map.next_value()?),
                "type" => self.rest.kind = Some(self.map.next_value()?),
                k if self.guard_fields.contains(&k) => {
                    return seed.deserialize(key.into_deserializer()).map(Some);
                }
                _ => {
                    let value = self.map.next_value::<toml::Value>()?;
                    self.rest.fields.insert(key, value);
                }
            }
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// Deserializes one kind's settings from `fields`. Its errors name the field inside the
/// receiver (`command.argv`), and an unknown field lists every field the receiver may have.
fn part<T: DeserializeOwned, E: de::Error>(fields: toml::Table) -> Result<T, E> {
    serde_path_to_error::deserialize(toml::Value::Table(fields)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().message().to_owned();
        let within = if path == "." || path.is_empty() {
            String::new()
        } else {
            format!("{path}.")
        };
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field)
        {
            // The path ends with the unknown field itself.
            let full = if path == field || path.ends_with(&format!(".{field}")) {
                path.clone()
            } else {
                format!("{within}{field}")
            };
            let mut known: Vec<&str> = Vec::new();
            if full == field {
                known.extend(["name", "type"]);
                known.extend(field_names::<GuardConfig>());
            }
            known.extend(expected_fields(&message));
            return E::custom(format_args!("unknown field `{full}`, {}", OneOf(&known)));
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            return E::custom(format_args!("missing field `{within}{rest}"));
        }
        if within.is_empty() {
            E::custom(message)
        } else {
            // `parse_table` moves a leading "at `path`: " into the problem's path.
            E::custom(format_args!("at `{path}`: {message}"))
        }
    })
}

/// The field list of serde's unknown-field message (`expected one of `a`, `b``).
fn expected_fields(message: &str) -> impl Iterator<Item = &str> {
    let list = message.split_once(", ").map_or("", |(_, list)| list);
    list.split('`').skip(1).step_by(2)
}

/// serde's wording of a list of expected fields.
struct OneOf<'a>(&'a [&'a str]);

impl fmt::Display for OneOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [] => f.write_str("there are no fields"),
            [one] => write!(f, "expected `{one}`"),
            many => {
                f.write_str("expected one of ")?;
                for (i, field) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "`{field}`")?;
                }
                Ok(())
            }
        }
    }
}

/// The field names of a struct that derives `Deserialize` (serde hands them to the
/// deserializer; this one only keeps them).
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Names(Option<&'static [&'static str]>);

    impl<'de> Deserializer<'de> for &mut Names {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            Err(de::Error::custom("only the field names"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut names = Names(None);
    let _ = T::deserialize(&mut names);
    names.0.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ReceiverConfig, String> {
        let value: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize::<_, ReceiverConfig>(value)
            .map_err(|e| format!("{} | {}", e.path(), e.inner().message()))
    }

    #[test]
    fn each_kind_takes_its_own_fields_and_the_guards() {
        let r = parse(
            r##"
            name = "ops"
            type = "slack"
            url = "https://hooks.slack.com/services/T/B/secret"
            channel = "#ops"
            cooldown = "1m"
            retry = { attempts = 5 }
            "##,
        )
        .unwrap();
        assert_eq!(r.kind(), ReceiverKind::Slack);
        assert_eq!(r.guards.cooldown, Duration::from_secs(60));
        assert_eq!(r.guards.retry.attempts, 5);
        assert_eq!(r.guards.timeout, Duration::from_secs(10), "the default");
        let ReceiverSettings::Slack(slack) = &r.settings else {
            panic!("{r:?}")
        };
        assert_eq!(slack.channel.as_deref(), Some("#ops"));
        let debug = format!("{r:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn a_field_of_another_kind_is_unknown_with_the_known_ones_listed() {
        let e = parse("name = \"x\"\ntype = \"webhook\"\nurl = \"http://a\"\nchanel = \"#ops\"")
            .unwrap_err();
        assert!(
            e.starts_with(". | unknown field `chanel`, expected one of"),
            "{e}"
        );
        for known in ["`name`", "`type`", "`cooldown`", "`url`", "`body`"] {
            assert!(e.contains(known), "{e}");
        }
        assert!(!e.contains("`channel`"), "not a webhook's: {e}");
    }

    #[test]
    fn errors_keep_their_path() {
        let e = parse("name = \"x\"\ntype = \"log\"\nretry = { attempts = \"3\" }").unwrap_err();
        assert!(e.starts_with("retry.attempts | invalid type"), "{e}");
        let e = parse("name = \"x\"\ntype = \"slak\"").unwrap_err();
        assert!(e.starts_with("type | unknown variant `slak`"), "{e}");
        let e = parse(
            "name = \"x\"\ntype = \"command\"\ncommand = { argv = [], mode = \"sometimes\" }",
        )
        .unwrap_err();
        assert!(
            e.starts_with(". | at `command.mode`: unknown variant"),
            "{e}"
        );
        let e = parse("name = \"x\"\ntype = \"command\"\ncommand = { argvv = [] }").unwrap_err();
        assert!(
            e.starts_with(". | unknown field `command.argvv`, expected one of `argv`"),
            "{e}"
        );
        let e = parse("type = \"log\"").unwrap_err();
        assert_eq!(e, ". | missing field `name`");
    }

    #[test]
    fn the_table_serializes_back_to_the_same_fields() {
        let text = "name = \"k\"\ntype = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\ncooldown = \"5s\"";
        let r = parse(text).unwrap();
        let back = toml::Value::try_from(&r).unwrap();
        assert_eq!(back["type"].as_str(), Some("kafka"));
        assert_eq!(back["topic"].as_str(), Some("t"));
        assert_eq!(parse(&toml::to_string(&r).unwrap()).unwrap(), r);
    }

    #[test]
    fn guard_problems_name_their_field() {
        let guards = GuardConfig {
            timeout: Duration::ZERO,
            retry: RetryPolicy {
                attempts: 0,
                ..RetryPolicy::default()
            },
            max_delivery_age: Some(Duration::ZERO),
            ..GuardConfig::default()
        };
        let fields: Vec<String> = guards.problems().into_iter().map(|e| e.path).collect();
        assert_eq!(fields, ["timeout", "retry.attempts", "max_delivery_age"]);
        let r = parse("name = \"k\"\ntype = \"log\"\nmax_delivery_age = \"2h\"").unwrap();
        assert_eq!(r.guards.max_delivery_age, Some(Duration::from_secs(7200)));
        assert!(GuardConfig::default().problems().is_empty());
    }
}
