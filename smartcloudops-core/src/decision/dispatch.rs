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
//!
//! Unlike Alertmanager, a rule opens at most `max_new_groups_per_minute` new groups per
//! minute: a flood of new series (forged data, say) would otherwise be one notification per
//! series, and use up the rate limits that the real alerts of every rule share. Alerts beyond
//! the cap are counted and not grouped; the first of them in a minute is reported
//! (a `CapTrip`) so that the engine escalates once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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

    /// A silence as it was: from the decision journal, with its start and (capped) end.
    pub(crate) fn restore(
        id: String,
        config: SilenceConfig,
        starts_ms: i64,
        ends_ms: i64,
    ) -> Result<Self, String> {
        let matchers = Matchers::parse(&config.matchers)?;
        Ok(Self {
            id,
            config,
            matchers,
            starts_ms,
            ends_ms,
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

/// Why an alert is not notified now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Muted {
    /// By the silence with this id.
    Silenced(String),
    /// By the firing alert with this fingerprint.
    Inhibited(String),
}

impl Muted {
    pub(crate) fn outcome(&self) -> (&'static str, &str) {
        match self {
            Muted::Silenced(id) => ("silenced", id),
            Muted::Inhibited(fp) => ("inhibited", fp),
        }
    }
}

/// An alert that a silence or an inhibition started or stopped muting.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MuteChange {
    pub(crate) rule: String,
    pub(crate) fingerprint: String,
    /// The new muting, or `None` when it ended.
    pub(crate) muted: Option<Muted>,
}

/// A group of alerts and what was notified of it. The decision journal keeps it whole, with
/// its rule by name (`rule` is an index into this run's rules).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Group {
    #[serde(skip)]
    rule: usize,
    labels: BTreeMap<String, String>,
    /// The group's alerts by fingerprint: firing ones, and resolved ones not notified yet.
    alerts: BTreeMap<String, AlertRecord>,
    /// What the last notification said: (fingerprint, firing?).
    sent: BTreeSet<(String, bool)>,
    /// Alerts muted at the last look, and by what (each change is recorded once).
    muted: BTreeMap<String, Muted>,
    created_ms: i64,
    last_notified_ms: Option<i64>,
    /// Start of the current firing episode (the first alert that fired in it).
    epoch_ms: i64,
    /// Notifications sent in this episode.
    sequence: u32,
}

impl Group {
    /// The index of the group's rule.
    pub(crate) fn rule(&self) -> usize {
        self.rule
    }

    /// The alerts a notification would carry now: firing ones not muted, and resolved ones
    /// that were announced as firing.
    fn visible(&self, muted: &HashMap<String, Muted>) -> Vec<&AlertRecord> {
        self.alerts
            .values()
            .filter(|a| match a.status {
                AlertStatus::Firing => !muted.contains_key(&a.fingerprint),
                AlertStatus::Resolved => self.sent.contains(&(a.fingerprint.clone(), true)),
            })
            .collect()
    }

    /// When the group's next notification falls due, given what it would say now, and
    /// whether that differs from what was said last.
    fn due_at(&self, rule: &RuleConfig, visible: &[&AlertRecord]) -> (i64, bool) {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let now: BTreeSet<(String, bool)> = visible
            .iter()
            .map(|a| (a.fingerprint.clone(), a.status == AlertStatus::Firing))
            .collect();
        let changed = now != self.sent;
        let firing = visible.iter().any(|a| a.status == AlertStatus::Firing);
        let at = match self.last_notified_ms {
            None if firing => self.created_ms.saturating_add(ms(rule.group_wait)),
            None => i64::MAX,
            Some(last) if changed => last.saturating_add(ms(rule.group_interval)),
            Some(last) if firing => last.saturating_add(ms(rule.repeat_interval)),
            Some(_) => i64::MAX,
        };
        (at, changed && (firing || self.last_notified_ms.is_some()))
    }
}

/// A rule that reached its cap of new groups in the current minute.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CapTrip {
    /// The rule's index.
    pub(crate) rule: usize,
    /// Start of the minute (ms).
    pub(crate) window_start_ms: i64,
    /// The first alert over the cap.
    pub(crate) alert: AlertRecord,
}

/// New groups a rule opened in the current minute.
#[derive(Debug, Clone, Copy)]
struct NewGroups {
    window_start_ms: i64,
    opened: u32,
    tripped: bool,
}

/// The length of the window of `max_new_groups_per_minute`.
const MINUTE_MS: i64 = 60_000;

/// All groups and the muting rules. See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Dispatcher {
    groups: HashMap<String, Group>,
    /// New groups a rule may open per minute (0: no cap).
    pub(crate) max_new_groups_per_minute: u32,
    /// Per rule: the new groups opened in the current minute.
    new_groups: HashMap<usize, NewGroups>,
    /// Rules that reached their cap, for the engine to escalate (once per rule and minute).
    pub(crate) cap_trips: Vec<CapTrip>,
    /// Groups whose alerts all resolved before anything about them was notified; the engine
    /// records them in the audit log.
    pub(crate) unannounced: Vec<(String, String, Vec<String>)>,
    /// Muting that started or ended, for the audit log.
    pub(crate) mute_changes: Vec<MuteChange>,
    pub(crate) silences: Vec<Silence>,
    pub(crate) inhibits: Vec<Inhibit>,
    /// Keep [`changed_groups`](Self::changed_groups) (when the decision state is journaled).
    pub(crate) track_changes: bool,
    /// Groups created, changed or removed since the journal last saved them.
    pub(crate) changed_groups: HashSet<String>,
}

/// `{alertname="cpu",service="api"}`, the form Alertmanager's `groupKey` uses.
fn label_set(labels: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", parts.join(","))
}

impl Dispatcher {
    /// Whether `alert` is muted now: silenced, or inhibited by another firing alert.
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

    /// Whether `rule_index` may open one more group at `now_ms` (counting it if so); the
    /// first refusal of a minute is recorded as a [`CapTrip`].
    fn may_open_group(
        &mut self,
        rule_index: usize,
        rule: &RuleConfig,
        alert: &AlertRecord,
        now_ms: i64,
    ) -> bool {
        let cap = rule
            .max_new_groups_per_minute
            .unwrap_or(self.max_new_groups_per_minute);
        if cap == 0 {
            return true;
        }
        let fresh = NewGroups {
            window_start_ms: now_ms,
            opened: 0,
            tripped: false,
        };
        let window = self.new_groups.entry(rule_index).or_insert(fresh);
        let elapsed = now_ms.saturating_sub(window.window_start_ms);
        if !(0..MINUTE_MS).contains(&elapsed) {
            *window = fresh;
        }
        if window.opened < cap {
            window.opened += 1;
            return true;
        }
        if !window.tripped {
            window.tripped = true;
            self.cap_trips.push(CapTrip {
                rule: rule_index,
                window_start_ms: window.window_start_ms,
                alert: alert.clone(),
            });
        }
        false
    }

    /// Takes a fired or resolved alert into its group; returns the group's key, or `None`
    /// when the alert would open a group beyond the rule's cap of new groups per minute (it
    /// is then not grouped, so never notified on its own).
    pub(crate) fn update(
        &mut self,
        rule_index: usize,
        rule: &RuleConfig,
        alert: AlertRecord,
        now_ms: i64,
    ) -> Option<String> {
        let labels: BTreeMap<String, String> = rule
            .group_by
            .iter()
            .filter_map(|l| alert.labels.get(l).map(|v| (l.clone(), v.clone())))
            .collect();
        let key = format!("{}:{}", rule.name, label_set(&labels));
        if alert.status == AlertStatus::Resolved
            && !self
                .groups
                .get(&key)
                .is_some_and(|g| g.alerts.contains_key(&alert.fingerprint))
        {
            return Some(key); // not in a group (already notified as resolved, or never fired here)
        }
        if !self.groups.contains_key(&key) && !self.may_open_group(rule_index, rule, &alert, now_ms)
        {
            return None;
        }
        let group = self.groups.entry(key.clone()).or_insert_with(|| Group {
            rule: rule_index,
            labels,
            alerts: BTreeMap::new(),
            sent: BTreeSet::new(),
            muted: BTreeMap::new(),
            created_ms: now_ms,
            last_notified_ms: None,
            epoch_ms: alert.starts_at_ms,
            sequence: 0,
        });
        let had_firing = group
            .alerts
            .values()
            .any(|a| a.status == AlertStatus::Firing);
        if alert.status == AlertStatus::Firing && !had_firing {
            // A new episode for this group.
            group.epoch_ms = alert.starts_at_ms;
            group.sequence = 0;
        }
        group.alerts.insert(alert.fingerprint.clone(), alert);
        if self.track_changes {
            self.changed_groups.insert(key.clone());
        }
        Some(key)
    }

    /// Whether any group is open (waiting, firing, or with a resolution to notify).
    pub(crate) fn has_groups(&self) -> bool {
        !self.groups.is_empty()
    }

    /// The group `key`, if there is one.
    pub(crate) fn group(&self, key: &str) -> Option<&Group> {
        self.groups.get(key)
    }

    /// Puts back a group from the decision journal, under rule `rule_index`.
    pub(crate) fn restore_group(&mut self, key: String, mut group: Group, rule_index: usize) {
        group.rule = rule_index;
        self.groups.insert(key, group);
    }

    /// Removes the empty groups, noting them for the journal.
    fn remove_empty_groups(&mut self) {
        let changed = &mut self.changed_groups;
        let track = self.track_changes;
        self.groups.retain(|key, g| {
            let keep = !g.alerts.is_empty();
            if !keep && track {
                changed.insert(key.clone());
            }
            keep
        });
    }

    /// The notifications due at `now_ms` (every pending one with `flush`, at shutdown).
    /// Silences and inhibition are applied here, at notification time, so a silence added
    /// during an incident mutes it from then on, and an alert still firing when its silence
    /// ends is notified.
    pub(crate) fn due(
        &mut self,
        rules: &[RuleConfig],
        now_ms: i64,
        flush: bool,
    ) -> Vec<Notification> {
        // Expired silences go; muting needs every group (inhibition looks across them), so
        // it is decided first.
        self.silences.retain(|s| s.ends_ms > now_ms);
        let muted = self.muted_alerts(
            self.groups.keys().cloned().collect::<Vec<_>>().iter(),
            now_ms,
        );
        let mut out = Vec::new();
        let keys: Vec<String> = self.groups.keys().cloned().collect();
        for key in &keys {
            self.settle(rules, key, &muted, now_ms, flush, &mut out);
        }
        self.remove_empty_groups();
        out
    }

    /// Like [`due`](Self::due) for one group only: what a change to that group makes due now
    /// (with `group_wait = 0`, without walking every group per change).
    pub(crate) fn due_one(
        &mut self,
        rules: &[RuleConfig],
        key: &str,
        now_ms: i64,
    ) -> Vec<Notification> {
        let keys = [key.to_owned()];
        let muted = self.muted_alerts(keys.iter(), now_ms);
        let mut out = Vec::new();
        self.settle(rules, key, &muted, now_ms, false, &mut out);
        if self.groups.get(key).is_some_and(|g| g.alerts.is_empty()) {
            self.groups.remove(key);
            if self.track_changes {
                self.changed_groups.insert(key.to_owned());
            }
        }
        out
    }

    /// The firing alerts of the groups `keys` that are muted now, and by what.
    fn muted_alerts<'a>(
        &self,
        keys: impl Iterator<Item = &'a String>,
        now_ms: i64,
    ) -> HashMap<String, Muted> {
        let mut muted = HashMap::new();
        if self.silences.is_empty() && self.inhibits.is_empty() {
            return muted;
        }
        for key in keys {
            let Some(g) = self.groups.get(key) else {
                continue;
            };
            for a in g
                .alerts
                .values()
                .filter(|a| a.status == AlertStatus::Firing)
            {
                if let Some(m) = self.muted(a, now_ms) {
                    muted.insert(a.fingerprint.clone(), m);
                }
            }
        }
        muted
    }

    /// Notifies the group `key` if it is due, records muting changes, and lets resolved
    /// alerts go.
    fn settle(
        &mut self,
        rules: &[RuleConfig],
        key: &str,
        muted: &HashMap<String, Muted>,
        now_ms: i64,
        flush: bool,
        out: &mut Vec<Notification>,
    ) {
        let Some(group) = self.groups.get_mut(key) else {
            return;
        };
        let rule = &rules[group.rule];
        // Record each change of muting once.
        let now_muted: BTreeMap<String, Muted> = group
            .alerts
            .keys()
            .filter_map(|fp| muted.get(fp).map(|m| (fp.clone(), m.clone())))
            .collect();
        for (fp, m) in &now_muted {
            if group.muted.get(fp) != Some(m) {
                self.mute_changes.push(MuteChange {
                    rule: rule.name.clone(),
                    fingerprint: fp.clone(),
                    muted: Some(m.clone()),
                });
            }
        }
        for fp in group.muted.keys() {
            if !now_muted.contains_key(fp) && group.alerts.contains_key(fp) {
                self.mute_changes.push(MuteChange {
                    rule: rule.name.clone(),
                    fingerprint: fp.clone(),
                    muted: None,
                });
            }
        }
        // What the journal must save: anything but the alerts' unchanged presence.
        let mut journal_changed = group.muted != now_muted;
        group.muted = now_muted;

        let visible: Vec<AlertRecord> = group.visible(muted).into_iter().cloned().collect();
        let visible: Vec<&AlertRecord> = visible.iter().collect();
        let (due_at, changed) = group.due_at(rule, &visible);
        // At shutdown, what changed goes out at once; repeats wait for the next run.
        let due = if flush { changed } else { now_ms >= due_at };
        if due && visible.is_empty() {
            // Everything is muted: nothing to say, but remember that nothing was said, so
            // the alerts are notified when the muting ends.
            journal_changed |= !group.sent.is_empty();
            group.sent.clear();
        }
        let due = due && !visible.is_empty();
        journal_changed |= due;
        if due {
            let alerts: Vec<AlertRecord> = visible.into_iter().cloned().collect();
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
            group.sent = alerts
                .iter()
                .filter(|a| a.status == AlertStatus::Firing)
                .map(|a| (a.fingerprint.clone(), true))
                .collect();
        }
        // Resolved alerts leave the group once notified, or at once if they never were.
        let unannounced: Vec<String> = group
            .alerts
            .values()
            .filter(|a| {
                a.status == AlertStatus::Resolved
                    && !group.sent.contains(&(a.fingerprint.clone(), true))
            })
            .map(|a| a.fingerprint.clone())
            .collect();
        if !unannounced.is_empty() {
            self.unannounced
                .push((rule.name.clone(), key.to_owned(), unannounced));
        }
        let sent = &group.sent;
        let before = group.alerts.len();
        group.alerts.retain(|fp, a| {
            a.status == AlertStatus::Firing || (!due && sent.contains(&(fp.clone(), true)))
        });
        journal_changed |= group.alerts.len() != before;
        if due {
            group.sent.retain(|(fp, _)| group.alerts.contains_key(fp));
        }
        if journal_changed && self.track_changes {
            self.changed_groups.insert(key.to_owned());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn firing(host: &str) -> AlertRecord {
        AlertRecord {
            fingerprint: host.into(),
            rule: "cpu".into(),
            status: AlertStatus::Firing,
            severity: Default::default(),
            labels: BTreeMap::from([("host".to_owned(), host.to_owned())]),
            annotations: BTreeMap::new(),
            starts_at_ms: 0,
            ends_at_ms: None,
            series_id: 1,
        }
    }

    #[test]
    fn a_rule_opens_at_most_its_cap_of_new_groups_per_minute() {
        let rule: RuleConfig =
            toml::from_str("name = \"cpu\"\nreceivers = [\"hook\"]\ngroup_by = [\"host\"]")
                .unwrap();
        let mut d = Dispatcher {
            max_new_groups_per_minute: 2,
            ..Dispatcher::default()
        };
        assert!(d.update(0, &rule, firing("a"), 0).is_some());
        assert!(d.update(0, &rule, firing("b"), 1).is_some());
        assert!(
            d.update(0, &rule, firing("a"), 2).is_some(),
            "an open group takes its alerts"
        );
        assert!(d.update(0, &rule, firing("c"), 3).is_none());
        assert!(d.update(0, &rule, firing("d"), 4).is_none());
        assert_eq!(d.cap_trips.len(), 1, "one trip per rule and minute");
        assert_eq!(d.cap_trips[0].alert.fingerprint, "c");
        assert!(
            d.update(1, &rule, firing("x"), 5).is_some(),
            "each rule has its own cap"
        );
        assert!(
            d.update(0, &rule, firing("e"), 60_000).is_some(),
            "a new minute"
        );
        let own: RuleConfig = toml::from_str(
            "name = \"disk\"\nreceivers = [\"hook\"]\ngroup_by = [\"host\"]\n\
             max_new_groups_per_minute = 1",
        )
        .unwrap();
        assert!(d.update(2, &own, firing("p"), 5).is_some());
        assert!(
            d.update(2, &own, firing("q"), 6).is_none(),
            "a rule's own cap overrides [decision]'s"
        );
        let unlimited = &mut Dispatcher::default();
        assert!((0..500).all(|i| {
            unlimited
                .update(0, &rule, firing(&i.to_string()), 0)
                .is_some()
        }));
    }
}
