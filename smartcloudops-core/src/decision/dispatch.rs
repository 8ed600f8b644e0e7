//! Grouping, silences and inhibition: from alert changes to notifications, on the wall clock
//! (a [`Clock`](super::Clock), so tests control it).
//!
//! As in Alertmanager:
//!
//! - Alerts of one rule with equal `group_by` label values form a **group**. A new group is
//!   notified `group_wait` after its first alert, so alerts arriving together go out together.
//! - A group whose alerts changed (new, resolved) is notified again `group_interval` after its
//!   last notification; an unchanged group still firing, every `repeat_interval`.
//! - A **silenced** alert (matching an active silence) is not notified; neither is an
//!   **inhibited** one (a firing alert matching an inhibition rule's `source` mutes alerts
//!   matching its `target` that agree on the `equal` labels).
//! - Resolved alerts are notified once, then leave the group; an empty group is removed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::matcher::Matchers;
use super::rule::RuleConfig;
use super::{AlertRecord, AlertStatus, Notification, NotificationKind};

/// `[[decision.silence]]`: mutes matching alerts for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceConfig {
    /// Label matchers (as in rules); an alert matching all of them is silenced.
    pub matchers: BTreeMap<String, String>,
    /// Who created it.
    pub created_by: String,
    /// Why.
    #[serde(default)]
    pub comment: String,
    /// Start, RFC 3339; now when absent.
    #[serde(default)]
    pub starts_at: Option<String>,
    /// End, RFC 3339; or give `duration`. Capped at `max_silence` after the start.
    #[serde(default)]
    pub ends_at: Option<String>,
    /// Length, from the start; or give `ends_at`.
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
}

/// An active or future silence.
#[derive(Debug, Clone)]
pub struct Silence {
    /// Its id (for the API and the audit log).
    pub id: String,
    /// What it was created from.
    pub config: SilenceConfig,
    matchers: Matchers,
    /// Start, ms since the epoch.
    pub starts_ms: i64,
    /// End, ms since the epoch (capped).
    pub ends_ms: i64,
}

impl Silence {
    /// A silence from `config` at `now_ms`; its end is capped at `max` after its start.
    pub fn new(
        id: String,
        config: SilenceConfig,
        now_ms: i64,
        max: Duration,
    ) -> Result<Self, String> {
        if config.matchers.is_empty() {
            return Err("a silence needs at least one matcher".into());
        }
        if config.created_by.trim().is_empty() {
            return Err("a silence needs `created_by`".into());
        }
        let matchers = Matchers::parse(&config.matchers)?;
        let parse = |s: &str| {
            crate::schema::parse_ts(s).ok_or_else(|| format!("`{s}` is not an RFC 3339 time"))
        };
        let starts_ms = config
            .starts_at
            .as_deref()
            .map(parse)
            .transpose()?
            .unwrap_or(now_ms);
        let max_ms = i64::try_from(max.as_millis()).unwrap_or(i64::MAX);
        let ends_ms = match (&config.ends_at, config.duration) {
            (Some(end), None) => parse(end)?,
            (None, Some(d)) => {
                starts_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            }
            _ => return Err("give exactly one of `ends_at` and `duration`".into()),
        };
        if ends_ms <= starts_ms {
            return Err("a silence must end after it starts".into());
        }
        Ok(Self {
            id,
            config,
            matchers,
            starts_ms,
            ends_ms: ends_ms.min(starts_ms.saturating_add(max_ms)),
        })
    }

    fn mutes(&self, labels: &BTreeMap<String, String>, now_ms: i64) -> bool {
        (self.starts_ms..self.ends_ms).contains(&now_ms) && self.matchers.matches(labels)
    }
}

/// `[[decision.inhibit]]`: while a `source` alert fires, mute `target` alerts that agree
/// with it on the `equal` labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InhibitConfig {
    /// Matchers a firing alert must meet to inhibit.
    pub source: BTreeMap<String, String>,
    /// Matchers an alert must meet to be inhibited.
    pub target: BTreeMap<String, String>,
    /// Labels whose values source and target must share.
    #[serde(default)]
    pub equal: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Inhibit {
    source: Matchers,
    target: Matchers,
    equal: Vec<String>,
}

impl Inhibit {
    pub(crate) fn new(c: &InhibitConfig) -> Result<Self, String> {
        if c.source.is_empty() || c.target.is_empty() {
            return Err("an inhibition rule needs `source` and `target` matchers".into());
        }
        Ok(Self {
            source: Matchers::parse(&c.source)?,
            target: Matchers::parse(&c.target)?,
            equal: c.equal.clone(),
        })
    }
}

/// Why an alert change was not notified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Muted {
    Silenced(String),
    Inhibited(String),
}

#[derive(Debug)]
struct Group {
    rule: usize,
    labels: BTreeMap<String, String>,
    /// The group's alerts by fingerprint: firing ones, and resolved ones not notified yet.
    alerts: BTreeMap<String, AlertRecord>,
    created_ms: i64,
    last_notified_ms: Option<i64>,
    /// Changed since the last notification.
    dirty: bool,
    /// Start of the current firing episode (the first alert that fired in it).
    epoch_ms: i64,
    /// Notifications sent in this episode.
    sequence: u32,
}

impl Group {
    /// When the group's next notification falls due (`i64::MAX`: none pending).
    fn due_at(&self, rule: &RuleConfig) -> i64 {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let firing = self
            .alerts
            .values()
            .any(|a| a.status == AlertStatus::Firing);
        match self.last_notified_ms {
            None => self.created_ms.saturating_add(ms(rule.group_wait)),
            Some(last) if self.dirty => last.saturating_add(ms(rule.group_interval)),
            Some(last) if firing => last.saturating_add(ms(rule.repeat_interval)),
            Some(_) => i64::MAX,
        }
    }
}

/// All groups and the muting rules. See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Dispatcher {
    groups: HashMap<String, Group>,
    /// Groups whose alerts all resolved before the group's first notification: nothing was
    /// announced, so nothing is notified; the engine records them in the audit log.
    pub(crate) unannounced: Vec<(String, String, Vec<String>)>,
    pub(crate) silences: Vec<Silence>,
    pub(crate) inhibits: Vec<Inhibit>,
}

/// `{alertname="cpu",service="api"}`, the form Alertmanager's `groupKey` uses.
fn label_set(labels: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", parts.join(","))
}

impl Dispatcher {
    /// Whether `alert` is muted now: silenced, or inhibited by a firing alert.
    pub(crate) fn muted(&self, alert: &AlertRecord, now_ms: i64) -> Option<Muted> {
        if let Some(s) = self
            .silences
            .iter()
            .find(|s| s.mutes(&alert.labels, now_ms))
        {
            return Some(Muted::Silenced(s.id.clone()));
        }
        for inhibit in &self.inhibits {
            if !inhibit.target.matches(&alert.labels) {
                continue;
            }
            let source = self
                .groups
                .values()
                .flat_map(|g| g.alerts.values())
                .find(|s| {
                    s.status == AlertStatus::Firing
                        && s.fingerprint != alert.fingerprint
                        && inhibit.source.matches(&s.labels)
                        && inhibit
                            .equal
                            .iter()
                            .all(|l| s.labels.get(l) == alert.labels.get(l))
                });
            if let Some(source) = source {
                return Some(Muted::Inhibited(source.fingerprint.clone()));
            }
        }
        None
    }

    /// Takes a fired or resolved alert into its group.
    pub(crate) fn update(
        &mut self,
        rule_index: usize,
        rule: &RuleConfig,
        alert: AlertRecord,
        now_ms: i64,
    ) {
        let labels: BTreeMap<String, String> = rule
            .group_by
            .iter()
            .filter_map(|l| alert.labels.get(l).map(|v| (l.clone(), v.clone())))
            .collect();
        let key = format!("{}:{}", rule.name, label_set(&labels));
        let group = self.groups.entry(key).or_insert_with(|| Group {
            rule: rule_index,
            labels,
            alerts: BTreeMap::new(),
            created_ms: now_ms,
            last_notified_ms: None,
            dirty: false,
            epoch_ms: alert.starts_at_ms,
            sequence: 0,
        });
        let had_firing = group
            .alerts
            .values()
            .any(|a| a.status == AlertStatus::Firing);
        if alert.status == AlertStatus::Firing && !had_firing {
            // A new episode for this group: new idempotency keys for its notifications.
            group.epoch_ms = alert.starts_at_ms;
            group.sequence = 0;
        }
        if alert.status == AlertStatus::Resolved && !group.alerts.contains_key(&alert.fingerprint) {
            return; // it was never notified as firing here (muted): nothing to resolve
        }
        group.alerts.insert(alert.fingerprint.clone(), alert);
        group.dirty = true;
    }

    /// The notifications due at `now_ms` (all pending ones with `flush`, at shutdown).
    pub(crate) fn due(
        &mut self,
        rules: &[RuleConfig],
        now_ms: i64,
        flush: bool,
    ) -> Vec<Notification> {
        let mut out = Vec::new();
        for (key, group) in &mut self.groups {
            let rule = &rules[group.rule];
            let due_at = group.due_at(rule);
            let due = if flush { group.dirty } else { now_ms >= due_at };
            if !due || group.alerts.is_empty() {
                continue;
            }
            let firing = group
                .alerts
                .values()
                .any(|a| a.status == AlertStatus::Firing);
            if group.last_notified_ms.is_none() && !firing {
                self.unannounced.push((
                    rule.name.clone(),
                    key.clone(),
                    group.alerts.keys().cloned().collect(),
                ));
                group.alerts.clear();
                continue;
            }
            let alerts: Vec<AlertRecord> = group.alerts.values().cloned().collect();
            for receiver in &rule.receivers {
                out.push(Notification::new(
                    receiver,
                    &rule.name,
                    key,
                    group.labels.clone(),
                    alerts.clone(),
                    group.epoch_ms,
                    group.sequence,
                    NotificationKind::Alerts,
                ));
            }
            group.sequence += 1;
            group.last_notified_ms = Some(now_ms);
            group.dirty = false;
            group.alerts.retain(|_, a| a.status == AlertStatus::Firing);
        }
        self.groups.retain(|_, g| !g.alerts.is_empty());
        out
    }

    /// Alerts currently firing, for the API.
    pub(crate) fn firing(&self) -> Vec<AlertRecord> {
        self.groups
            .values()
            .flat_map(|g| g.alerts.values())
            .filter(|a| a.status == AlertStatus::Firing)
            .cloned()
            .collect()
    }
}
