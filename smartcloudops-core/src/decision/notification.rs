//! The notification model: alerts as notified ([`AlertRecord`]) and one notification of a
//! group to a receiver ([`Notification`]), with the ids that make executions idempotent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::rule::{RuleConfig, Severity};
use crate::action::Alert;

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

/// An alert of a rule for one series, as notified (and as the decision journal keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(serialize_with = "as_string", deserialize_with = "from_string")]
    pub series_id: u64,
}

fn as_string<S: serde::Serializer>(v: &u64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn from_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

pub(crate) fn hash_hex(text: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

impl AlertRecord {
    /// The record of `alert` under `rule`.
    pub(crate) fn new(
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// One notification of one group to one receiver (and as the delivery outbox keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fingerprint: &str, status: AlertStatus, host: &str) -> AlertRecord {
        AlertRecord {
            fingerprint: fingerprint.into(),
            rule: "cpu".into(),
            status,
            severity: Severity::default(),
            labels: BTreeMap::from([
                ("alertname".to_owned(), "cpu".to_owned()),
                ("host".to_owned(), host.to_owned()),
            ]),
            annotations: BTreeMap::from([("summary".to_owned(), "cpu".to_owned())]),
            starts_at_ms: 0,
            ends_at_ms: None,
            series_id: u64::MAX,
        }
    }

    fn notification(alerts: Vec<AlertRecord>, sequence: u32) -> Notification {
        Notification::new(
            "hook",
            "cpu",
            "cpu:{}",
            BTreeMap::new(),
            alerts,
            7,
            sequence,
            NotificationKind::Alerts,
        )
    }

    #[test]
    fn status_is_firing_while_any_alert_fires() {
        let n = notification(
            vec![
                record("a", AlertStatus::Resolved, "x"),
                record("b", AlertStatus::Firing, "y"),
            ],
            1,
        );
        assert_eq!(n.status(), AlertStatus::Firing);
        let n = notification(vec![record("a", AlertStatus::Resolved, "x")], 1);
        assert_eq!(n.status(), AlertStatus::Resolved);
        assert_eq!(n.status().as_str(), "resolved");
    }

    #[test]
    fn common_labels_are_those_every_alert_shares() {
        let n = notification(
            vec![
                record("a", AlertStatus::Firing, "x"),
                record("b", AlertStatus::Firing, "y"),
            ],
            1,
        );
        assert_eq!(
            n.common_labels(),
            BTreeMap::from([("alertname".to_owned(), "cpu".to_owned())])
        );
        assert_eq!(n.common_annotations().len(), 1);
        assert!(notification(Vec::new(), 1).common_labels().is_empty());
    }

    #[test]
    fn ids_depend_on_content_and_number_and_remediation_keys_on_the_episode() {
        let a = notification(vec![record("a", AlertStatus::Firing, "x")], 1);
        let b = notification(vec![record("a", AlertStatus::Firing, "x")], 2);
        let c = notification(vec![record("a", AlertStatus::Resolved, "x")], 1);
        assert_eq!(a.id, notification(a.alerts.clone(), 1).id, "stable");
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.idempotency_key(false), a.id);
        assert_eq!(
            a.idempotency_key(true),
            b.idempotency_key(true),
            "one remediation per episode of the group"
        );
        assert_ne!(a.idempotency_key(true), a.id);
        assert_eq!(a.group_id(), b.group_id());
        assert_eq!(a.group_id().len(), 16);
    }

    #[test]
    fn series_ids_serialize_as_strings() {
        let json = serde_json::to_value(record("a", AlertStatus::Firing, "x")).unwrap();
        assert_eq!(json["series_id"], "18446744073709551615");
        assert_eq!(json["status"], "firing");
        let back: AlertRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record("a", AlertStatus::Firing, "x"), "and read back");
        let bytes = postcard::to_allocvec(&back).unwrap();
        assert_eq!(postcard::from_bytes::<AlertRecord>(&bytes).unwrap(), back);
    }
}
