//! `[decision]`: rules, receivers, silences, inhibitions, the audit log and the idempotency
//! store, and the checks of references between them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::audit::Rotation as AuditRotation;
use super::dispatch::{Inhibit, InhibitConfig, Silence, SilenceConfig};
use super::guard::RateLimit;
use super::matcher;
use super::outbox::OutboxConfig;
use super::receiver::{
    BuildContext, ExecutionMode, PipelineRedis, ReceiverConfig, ReceiverKind, ReceiverSettings,
};
use super::rule::RuleConfig;
use crate::error::Problems;

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
    /// The audit log (JSON lines, synced, hash-chained, mode 0600); in memory only when
    /// absent, which is allowed only while no command runs in `auto` mode.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Rotate the audit log before it grows past this many bytes (0: never).
    #[serde(default = "default_audit_max_bytes")]
    pub audit_max_bytes: u64,
    /// Rotated audit files kept (`audit.jsonl.1` … `audit.jsonl.N`).
    #[serde(default = "default_audit_keep")]
    pub audit_keep: u32,
    /// Most new alert groups one rule may open per minute; alerts beyond it are counted, not
    /// notified one by one, and the rule's receivers get one escalation. A flood of new series
    /// (forged, or a fleet-wide fault) cannot use up the shared rate limit.
    #[serde(default = "default_max_new_groups_per_minute")]
    pub max_new_groups_per_minute: u32,
    /// Most suggestions (`mode = "suggest"`) waiting for a person; a new one beyond it drops
    /// the oldest, with an audit record.
    #[serde(default = "default_max_pending_suggestions")]
    pub max_pending_suggestions: usize,
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
    /// The directory of the decision layer's durable state (journal, outbox): the pipeline's
    /// `[runtime] state_dir`, set by the config layer. When absent the state lives in memory
    /// only and does not survive a restart (embedded engines, tests).
    #[serde(skip)]
    pub state_dir: Option<PathBuf>,
    /// How long a notification whose deliveries fail is retried from the outbox before it is
    /// escalated and dead-lettered (a receiver's `max_delivery_age` overrides it).
    #[serde(default = "default_max_delivery_age", with = "humantime_serde")]
    pub max_delivery_age: Duration,
    /// `[decision.outbox]`: how many notifications may wait for delivery, and the backoff.
    #[serde(default)]
    pub outbox: OutboxConfig,
}

fn default_max_delivery_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_audit_max_bytes() -> u64 {
    AuditRotation::default().max_bytes
}
fn default_audit_keep() -> u32 {
    AuditRotation::default().keep
}
fn default_max_new_groups_per_minute() -> u32 {
    100
}
fn default_max_pending_suggestions() -> usize {
    100
}
fn default_max_silence() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_tick() -> Duration {
    Duration::from_secs(1)
}

impl DecisionConfig {
    /// Configuration problems (paths relative to `[decision]`).
    pub fn problems(&self) -> Problems {
        let mut out = Problems::new();
        let names: Vec<&str> = self.receivers.iter().map(|r| r.name.as_str()).collect();
        for (i, rule) in self.rules.iter().enumerate() {
            if self.rules[..i].iter().any(|r| r.name == rule.name) {
                out.push(
                    format!("rule[{i}].name"),
                    format!("`{}` is used twice", rule.name),
                );
            }
            out.extend_at(&format!("rule[{i}]"), rule.problems());
            for r in &rule.receivers {
                if !names.contains(&r.as_str()) {
                    out.push(
                        format!("rule[{i}].receivers"),
                        format!("no receiver named `{r}`"),
                    );
                }
            }
        }
        for (i, r) in self.receivers.iter().enumerate() {
            if names.iter().filter(|n| **n == r.name).count() > 1 {
                out.push(
                    format!("receiver[{i}].name"),
                    format!("`{}` is used twice", r.name),
                );
            }
            for (field, target) in [
                ("escalate_to", &r.guards.escalate_to),
                ("fallback", &r.guards.fallback),
            ] {
                if let Some(t) = target {
                    let other = self
                        .receivers
                        .iter()
                        .find(|o| &o.name == t && o.name != r.name);
                    match other {
                        None => out.push(format!("receiver[{i}].{field}"), format!("no other receiver named `{t}`")),
                        Some(o) if o.kind() == ReceiverKind::Command => out.push(
                            format!("receiver[{i}].{field}"),
                            format!("`{t}` is a command; escalations and fallbacks go to people and channels"),
                        ),
                        Some(_) => {}
                    }
                }
            }
            if let ReceiverSettings::Command(c) = &r.settings
                && c.command
                    .as_ref()
                    .is_some_and(|c| c.mode == ExecutionMode::Auto)
                && self.audit_log.is_none()
            {
                out.push_hint(
                    format!("receiver[{i}].command.mode"),
                    format!(
                        "receiver `{}` runs commands (`mode = \"auto\"`), so an audit log is \
                         required",
                        r.name
                    ),
                    "set `[decision] audit_log = \"/var/lib/smartcloudops/audit.jsonl\"`: every \
                     execution must leave a durable record",
                );
            }
            out.extend_at(&format!("receiver[{i}]"), r.guards.problems());
            if let Err(e) = r.settings.build(&self.build_context(r, None)) {
                out.push(format!("receiver[{i}]"), e);
            }
        }
        if self.audit_max_bytes > 0 && self.audit_keep == 0 {
            out.push_hint(
                "audit_keep",
                "must be at least 1 while the audit log rotates",
                "keep at least one rotated file, or set `audit_max_bytes = 0` to never rotate",
            );
        }
        if self.max_new_groups_per_minute == 0 {
            out.push_hint(
                "max_new_groups_per_minute",
                "must be at least 1",
                "the default, 100, leaves room for a real incident across a fleet",
            );
        }
        if self.max_pending_suggestions == 0 {
            out.push_hint(
                "max_pending_suggestions",
                "must be at least 1",
                "use `mode = \"dry_run\"` to record plans without keeping suggestions",
            );
        }
        if self.max_delivery_age.is_zero() {
            out.push("max_delivery_age", "must be longer than 0");
        }
        out.extend_at("outbox", self.outbox.problems());
        for (i, s) in self.silences.iter().enumerate() {
            if let Ok(m) = matcher::Matchers::parse(&s.matchers)
                && m.matches(&BTreeMap::new())
            {
                out.push(
                        format!("silence[{i}].matchers"),
                        "these matchers match an alert with no labels, so every alert: name a label value",
                    );
            }
            if let Err(e) = Silence::new(String::new(), s.clone(), 0, self.max_silence) {
                out.push(format!("silence[{i}]"), e);
            }
        }
        for (i, c) in self.inhibits.iter().enumerate() {
            if let Err(e) = Inhibit::new(c) {
                out.push(format!("inhibit[{i}]"), e);
            }
        }
        out
    }

    /// What building receiver `r` needs; `redis` is the pipeline's connection, if any.
    pub(crate) fn build_context<'a>(
        &'a self,
        r: &ReceiverConfig,
        redis: Option<&'a PipelineRedis>,
    ) -> BuildContext<'a> {
        BuildContext {
            timeout: r.guards.timeout,
            external_url: &self.external_url,
            allowed_commands: &self.allowed_commands,
            redis,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> BTreeMap<String, String> {
        let config: DecisionConfig = toml::from_str(text).unwrap();
        config
            .problems()
            .into_iter()
            .map(|e| (e.path, e.message))
            .collect()
    }

    #[test]
    fn the_example_parses_unchanged_and_has_no_problem() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/decision.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let example: toml::Table = toml::from_str(&text).unwrap();
        let config: DecisionConfig = example["decision"].clone().try_into().unwrap();
        assert_eq!(config.receivers.len(), 2);
        assert_eq!(config.receivers[1].kind(), ReceiverKind::Command);
        assert_eq!(
            config.receivers[1].guards.cooldown,
            Duration::from_secs(30 * 60)
        );
        assert!(config.problems().is_empty(), "{:?}", config.problems());
    }

    #[test]
    fn the_defaults_have_no_problem() {
        let config: DecisionConfig = toml::from_str("").unwrap();
        assert!(config.problems().is_empty());
        assert_eq!(config.idempotency, IdempotencyConfig::default());
        assert_eq!(config.tick, Duration::from_secs(1));
    }

    #[test]
    fn names_are_unique_and_references_resolve() {
        let p = problems(
            r#"
            [[rule]]
            name = "cpu"
            receivers = ["log", "nobody"]
            [[rule]]
            name = "cpu"
            receivers = ["log"]

            [[receiver]]
            name = "log"
            type = "log"
            fallback = "log"
            escalate_to = "fix"
            [[receiver]]
            name = "log"
            type = "log"
            [[receiver]]
            name = "fix"
            type = "command"
            "#,
        );
        assert!(p["rule[1].name"].contains("used twice"), "{p:?}");
        assert!(p["rule[0].receivers"].contains("`nobody`"), "{p:?}");
        assert!(p["receiver[0].name"].contains("used twice"), "{p:?}");
        assert!(
            p["receiver[0].fallback"].contains("no other receiver"),
            "{p:?}"
        );
        assert!(
            p["receiver[0].escalate_to"].contains("is a command"),
            "{p:?}"
        );
        assert!(p["receiver[2]"].contains("`command` table"), "{p:?}");
    }

    #[test]
    fn each_kind_checks_its_settings() {
        let p = problems(
            r#"
            [[receiver]]
            name = "a"
            type = "webhook"
            timeout = "0s"
            retry = { attempts = 0 }
            [[receiver]]
            name = "b"
            type = "slack"
            url = "ftp://example.com"
            [[receiver]]
            name = "c"
            type = "pagerduty"
            [[receiver]]
            name = "d"
            type = "webhook"
            url = "http://example.com"
            body = "{{ unclosed"
            "#,
        );
        assert_eq!(p["receiver[0].timeout"], "must be longer than 0");
        assert_eq!(p["receiver[0].retry.attempts"], "must be at least 1");
        assert_eq!(p["receiver[0]"], "`url` is required");
        assert!(p["receiver[1]"].contains("not an http(s) URL"), "{p:?}");
        assert!(p["receiver[2]"].contains("routing_key"), "{p:?}");
        assert!(p["receiver[3]"].contains("invalid body template"), "{p:?}");
    }

    #[test]
    fn a_command_in_auto_mode_needs_an_audit_log() {
        let receivers = r#"
            allowed_commands = ["/usr/bin/systemctl"]
            [[receiver]]
            name = "restart"
            type = "command"
            [receiver.command]
            argv = ["/usr/bin/systemctl", "restart", "api"]
            mode = "auto"
            [[receiver]]
            name = "plan"
            type = "command"
            [receiver.command]
            argv = ["/usr/bin/systemctl", "restart", "api"]
            "#;
        let p = problems(receivers);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p["receiver[0].command.mode"].contains("`restart`")
                && p["receiver[0].command.mode"].contains("audit log is required"),
            "{p:?}"
        );
        let config: DecisionConfig = toml::from_str(receivers).unwrap();
        let hint = config.problems().into_iter().next().unwrap().hint.unwrap();
        assert!(hint.contains("audit_log"), "{hint}");
        let p = problems(&format!("audit_log = \"/tmp/audit.jsonl\"\n{receivers}"));
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn caps_and_rotation_must_leave_room() {
        let p =
            problems("audit_keep = 0\nmax_new_groups_per_minute = 0\nmax_pending_suggestions = 0");
        for field in [
            "audit_keep",
            "max_new_groups_per_minute",
            "max_pending_suggestions",
        ] {
            assert!(p.contains_key(field), "{field}: {p:?}");
        }
        assert!(problems("audit_keep = 0\naudit_max_bytes = 0").is_empty());
    }

    #[test]
    fn the_outbox_settings_parse_and_are_checked() {
        let config: DecisionConfig = toml::from_str(
            "max_delivery_age = \"6h\"\n[outbox]\nmax_entries = 50\nmax_backoff = \"2m\"",
        )
        .unwrap();
        assert_eq!(config.max_delivery_age, Duration::from_secs(6 * 3600));
        assert_eq!(config.outbox.max_entries, 50);
        assert_eq!(config.outbox.max_backoff, Duration::from_secs(120));
        let default: DecisionConfig = toml::from_str("").unwrap();
        assert_eq!(default.max_delivery_age, Duration::from_secs(24 * 3600));
        let p = problems("max_delivery_age = \"0s\"\n[outbox]\nmax_entries = 0");
        assert!(p.contains_key("max_delivery_age"), "{p:?}");
        assert!(p.contains_key("outbox.max_entries"), "{p:?}");
    }

    #[test]
    fn a_silence_must_name_a_label_value() {
        let p = problems(
            r#"
            [[silence]]
            matchers = {}
            created_by = "me"
            comment = "all"
            duration = "1h"
            "#,
        );
        assert!(p["silence[0].matchers"].contains("every alert"), "{p:?}");
    }
}
