//! Rules and the alert state machine: which scored rows become alerts, and when an alert
//! fires, resolves or is held back as flapping.
//!
//! One alert state per (rule, series). Time is the rows' event time, so a replay of the
//! same rows takes the same decisions:
//!
//! ```text
//!  inactive ──active──▶ pending ──active for `for`──▶ firing ──inactive for `keep_firing_for`──▶ resolved
//!     ▲                    │                            │ ▲                                         │
//!     └──────inactive──────┘                            └─┘ active (refreshes)                      ▼
//!                                                                                                inactive
//! ```
//!
//! **Hysteresis**: a row is *active* when its score reaches `min_score` (or, without one,
//! when the detector flagged it); a firing alert stays active down to `resolve_score`.
//! **Flapping**: more than `flap.max_changes` fire/resolve changes within `flap.window` turn
//! the alert *flapping*: one notice is sent, and its changes are not notified (nor acted on)
//! until it has been stable for a whole window.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::matcher::{Matcher, Matchers};
use crate::error::Problems;

/// How urgent an alert is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// For the record.
    Info,
    /// Someone should look.
    #[default]
    Warning,
    /// Something is broken.
    Error,
    /// Wake someone up.
    Critical,
}

impl Severity {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

/// Flap detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlapConfig {
    /// Fire/resolve changes tolerated within `window`; one more makes the alert flapping.
    #[serde(default = "default_max_changes")]
    pub max_changes: usize,
    /// The window changes are counted in, and how long a flapping alert must stay stable.
    #[serde(default = "default_flap_window", with = "humantime_serde")]
    pub window: Duration,
}

fn default_max_changes() -> usize {
    4
}
fn default_flap_window() -> Duration {
    Duration::from_secs(600)
}

impl Default for FlapConfig {
    fn default() -> Self {
        Self {
            max_changes: default_max_changes(),
            window: default_flap_window(),
        }
    }
}

/// `[[rule]]`: which scored rows become alerts, and where their notifications go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's name; alerts carry it as the `alertname` label.
    pub name: String,
    /// Metric name to match; `*` matches any run of characters (`cpu_*`). All when absent.
    #[serde(default)]
    pub metric: Option<String>,
    /// Label matchers: `value` (equal), `"!value"` (not equal), `"~regex"`, `"!~regex"`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Only rows scored by this detector or ensemble part (e.g. `seasonal`).
    #[serde(default)]
    pub detector: Option<String>,
    /// Score at which a row is active; without it, rows the detector flagged are.
    #[serde(default)]
    pub min_score: Option<f64>,
    /// Score below which a firing alert stops being active (hysteresis); defaults to
    /// `min_score`.
    #[serde(default)]
    pub resolve_score: Option<f64>,
    /// Severity of the alerts.
    #[serde(default)]
    pub severity: Severity,
    /// How long rows must stay active before the alert fires.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_duration: Duration,
    /// How long a firing alert keeps firing after its rows stopped being active.
    #[serde(default, with = "humantime_serde")]
    pub keep_firing_for: Duration,
    /// This rule's cap on new alert groups per minute, instead of `[decision]`'s
    /// `max_new_groups_per_minute`.
    #[serde(default)]
    pub max_new_groups_per_minute: Option<u32>,
    /// Flap detection.
    #[serde(default)]
    pub flap: FlapConfig,
    /// Labels whose values form a notification group (`alertname` is the rule name).
    #[serde(default = "default_group_by")]
    pub group_by: Vec<String>,
    /// Wait before a new group's first notification, to collect its alerts.
    #[serde(default = "default_group_wait", with = "humantime_serde")]
    pub group_wait: Duration,
    /// Wait before notifying a group's changes after its previous notification.
    #[serde(default = "default_group_interval", with = "humantime_serde")]
    pub group_interval: Duration,
    /// Wait before notifying an unchanged, still firing group again.
    #[serde(default = "default_repeat_interval", with = "humantime_serde")]
    pub repeat_interval: Duration,
    /// Resolve a firing alert whose series sent no row for this long (wall clock), e.g. a
    /// host that went away; `0s` never does.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// Receivers (by name) to notify, in order.
    pub receivers: Vec<String>,
}

fn default_stale_after() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_group_by() -> Vec<String> {
    vec!["alertname".to_owned()]
}
fn default_group_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_group_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_repeat_interval() -> Duration {
    Duration::from_secs(4 * 3600)
}

impl RuleConfig {
    /// A rule named `name` notifying `receivers`, with defaults.
    pub fn new(name: impl Into<String>, receivers: Vec<String>) -> Self {
        Self {
            max_new_groups_per_minute: None,
            name: name.into(),
            metric: None,
            labels: BTreeMap::new(),
            detector: None,
            min_score: None,
            resolve_score: None,
            severity: Severity::Warning,
            for_duration: Duration::ZERO,
            keep_firing_for: Duration::ZERO,
            flap: FlapConfig::default(),
            group_by: default_group_by(),
            group_wait: default_group_wait(),
            group_interval: default_group_interval(),
            repeat_interval: default_repeat_interval(),
            stale_after: default_stale_after(),
            receivers,
        }
    }

    /// Configuration problems, as `(field, message)`.
    pub fn problems(&self) -> Problems {
        let mut problems = Problems::new();
        problems.check(
            self.max_new_groups_per_minute != Some(0),
            "max_new_groups_per_minute",
            "must be at least 1",
            "leave it out for [decision]'s cap (100 by default)",
        );
        if self.name.trim().is_empty() {
            problems.push("name", "must not be empty".to_owned());
        }
        for (field, v) in [
            ("min_score", self.min_score),
            ("resolve_score", self.resolve_score),
        ] {
            if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                problems.push(field, "must be within [0, 1]".to_owned());
            }
        }
        if let (Some(fire), Some(resolve)) = (self.min_score, self.resolve_score)
            && resolve > fire
        {
            problems.push("resolve_score", "must not be above min_score".to_owned());
        }
        if self.resolve_score.is_some() && self.min_score.is_none() {
            problems.push("resolve_score", "needs min_score".to_owned());
        }
        if let Err(e) = Matchers::parse(&self.labels) {
            problems.push("labels", e);
        }
        if self.receivers.is_empty() {
            problems.push("receivers", "name at least one receiver".to_owned());
        }
        if self.flap.max_changes == 0 || self.flap.window.is_zero() {
            problems.push("flap", "max_changes and window must be above 0".to_owned());
        }
        if self.group_interval.is_zero() || self.repeat_interval.is_zero() {
            problems.push(
                "group_interval",
                "group_interval and repeat_interval must be above 0".to_owned(),
            );
        }
        problems
    }
}

/// A rule ready to match rows.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) config: RuleConfig,
    metric: Option<Matcher>,
    labels: Matchers,
}

impl Rule {
    pub(crate) fn new(config: RuleConfig) -> Result<Self, String> {
        let metric = config.metric.as_deref().map(Matcher::glob).transpose()?;
        let labels = Matchers::parse(&config.labels)?;
        Ok(Self {
            config,
            metric,
            labels,
        })
    }

    /// Whether a row of `metric` with `labels`, scored by `detector`, falls under this rule.
    pub(crate) fn matches(
        &self,
        metric: &str,
        labels: &BTreeMap<String, String>,
        detector: &str,
    ) -> bool {
        self.metric.as_ref().is_none_or(|m| m.is_match(metric))
            && self
                .config
                .detector
                .as_deref()
                .is_none_or(|d| detector == d || detector.split('+').any(|part| part == d))
            && self.labels.matches(labels)
    }

    /// Whether a row is active, given whether its alert is firing (hysteresis).
    pub(crate) fn is_active(&self, score: f64, flagged: bool, firing: bool) -> bool {
        match self.config.min_score {
            None => flagged,
            Some(fire) if firing => score >= self.config.resolve_score.unwrap_or(fire),
            Some(fire) => score >= fire,
        }
    }
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Phase {
    Inactive,
    /// Active since event time `since`, first seen when the wall clock read `since_wall`;
    /// not for long enough yet.
    Pending {
        since: i64,
        since_wall: i64,
    },
    /// Firing since `since`; last active at `active_at`.
    Firing {
        since: i64,
        active_at: i64,
    },
}

/// What a row did to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    /// Started firing at `since` (the start of the episode).
    Fired {
        since: i64,
    },
    /// Resolved at `at`; it had fired since `since`.
    Resolved {
        since: i64,
        at: i64,
    },
    /// Started flapping at `at`; its changes are held back.
    StartedFlapping {
        at: i64,
    },
    /// Stable again at `at`, and firing or not.
    StoppedFlapping {
        at: i64,
        firing_since: Option<i64>,
    },
}

/// One alert's state: phase and recent changes. The decision journal keeps it (all but
/// `seen_ms`, which changes with every row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct AlertState {
    pub(crate) phase: Phase,
    changes: VecDeque<i64>,
    pub(crate) flapping: bool,
    /// Wall-clock time of the series' last row, for the staleness sweep. Not journaled: a
    /// restored alert counts its series' silence from the restart, since rows could not
    /// arrive while the process was down.
    #[serde(skip)]
    pub(crate) seen_ms: i64,
    /// The firing alert as notified, to resolve it if its series goes quiet.
    pub(crate) record: Option<super::AlertRecord>,
}

impl Default for AlertState {
    fn default() -> Self {
        Self {
            phase: Phase::Inactive,
            changes: VecDeque::new(),
            flapping: false,
            seen_ms: 0,
            record: None,
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How much less than `for` a live alert's pending time may measure on the wall clock: rows
/// reach the engine with jitter (scrape intervals, batching, windows), so half of `for`, at
/// most 5 minutes.
fn tolerance(for_ms: i64) -> i64 {
    (for_ms / 2).min(300_000)
}

impl AlertState {
    pub(crate) fn is_firing(&self) -> bool {
        matches!(self.phase, Phase::Firing { .. })
    }

    /// Inactive with no recent change to remember: the state can be dropped.
    pub(crate) fn is_idle(&self) -> bool {
        self.phase == Phase::Inactive && !self.flapping && self.changes.is_empty()
    }

    /// Advances on one row at event time `ts`, seen now on the system clock (the engine
    /// passes its own clock to [`step_at`](Self::step_at)).
    #[cfg(test)]
    pub(crate) fn step(&mut self, rule: &RuleConfig, ts: i64, active: bool) -> Transition {
        use super::Clock;
        self.step_at(rule, ts, super::SystemClock.now_ms(), active)
    }

    /// Advances on one row at event time `ts`, seen when the wall clock read `now_ms`.
    ///
    /// A pending alert fires once its rows have been active for `for` in event time and,
    /// unless they are replayed history ([`is_history`](super::clock::is_history)), for
    /// `for` less a tolerance on the wall clock too: two rows with forged timestamps an hour
    /// apart, arriving a second apart, do not satisfy a `for` of 30 minutes.
    pub(crate) fn step_at(
        &mut self,
        rule: &RuleConfig,
        ts: i64,
        now_ms: i64,
        active: bool,
    ) -> Transition {
        let change = match (self.phase, active) {
            (Phase::Inactive, true) => {
                if rule.for_duration.is_zero() {
                    self.phase = Phase::Firing {
                        since: ts,
                        active_at: ts,
                    };
                    Transition::Fired { since: ts }
                } else {
                    self.phase = Phase::Pending {
                        since: ts,
                        since_wall: now_ms,
                    };
                    Transition::None
                }
            }
            (Phase::Pending { since, since_wall }, true) => {
                let for_ms = ms(rule.for_duration);
                let wall_ok = super::clock::is_history(since, since_wall)
                    || now_ms.saturating_sub(since_wall)
                        >= for_ms.saturating_sub(tolerance(for_ms));
                if ts.saturating_sub(since) >= for_ms && wall_ok {
                    self.phase = Phase::Firing {
                        since,
                        active_at: ts,
                    };
                    Transition::Fired { since }
                } else {
                    Transition::None
                }
            }
            (Phase::Pending { .. }, false) => {
                self.phase = Phase::Inactive;
                Transition::None
            }
            (Phase::Firing { since, active_at }, true) => {
                // A late row must not pull the last active time back.
                self.phase = Phase::Firing {
                    since,
                    active_at: active_at.max(ts),
                };
                Transition::None
            }
            (Phase::Firing { since, active_at }, false) => {
                if ts.saturating_sub(active_at) >= ms(rule.keep_firing_for) {
                    self.phase = Phase::Inactive;
                    Transition::Resolved { since, at: ts }
                } else {
                    Transition::None
                }
            }
            (Phase::Inactive, false) => Transition::None,
        };
        self.flap_filter(rule, ts, change)
    }

    /// Counts fire/resolve changes; turns a flapping alert's changes into one notice.
    fn flap_filter(&mut self, rule: &RuleConfig, ts: i64, change: Transition) -> Transition {
        let window = ms(rule.flap.window);
        while self
            .changes
            .front()
            .is_some_and(|&t| ts.saturating_sub(t) > window)
        {
            self.changes.pop_front();
        }
        match change {
            Transition::Fired { .. } | Transition::Resolved { .. } => {
                self.changes.push_back(ts);
                if self.flapping {
                    return Transition::None;
                }
                if self.changes.len() > rule.flap.max_changes {
                    self.flapping = true;
                    return Transition::StartedFlapping { at: ts };
                }
                change
            }
            _ if self.flapping && self.changes.is_empty() => {
                self.flapping = false;
                let firing_since = match self.phase {
                    Phase::Firing { since, .. } => Some(since),
                    _ => None,
                };
                Transition::StoppedFlapping {
                    at: ts,
                    firing_since,
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Clock;

    fn rule() -> RuleConfig {
        RuleConfig::new("cpu", vec!["pager".into()])
    }

    #[test]
    fn for_and_keep_firing_for_delay_firing_and_resolving() {
        let mut r = rule();
        r.for_duration = Duration::from_secs(120);
        r.keep_firing_for = Duration::from_secs(60);
        let mut s = AlertState::default();
        assert_eq!(s.step(&r, 0, true), Transition::None);
        assert_eq!(s.step(&r, 60_000, true), Transition::None);
        assert_eq!(s.step(&r, 120_000, true), Transition::Fired { since: 0 });
        assert_eq!(s.step(&r, 150_000, false), Transition::None, "kept firing");
        assert_eq!(s.step(&r, 170_000, true), Transition::None);
        assert_eq!(s.step(&r, 200_000, false), Transition::None);
        assert_eq!(
            s.step(&r, 230_000, false),
            Transition::Resolved {
                since: 0,
                at: 230_000
            }
        );
        // A short blip while pending never fires.
        assert_eq!(s.step(&r, 300_000, true), Transition::None);
        assert_eq!(s.step(&r, 310_000, false), Transition::None);
        assert_eq!(s.phase, Phase::Inactive);
    }

    #[test]
    fn forged_timestamps_an_hour_apart_arriving_a_second_apart_do_not_satisfy_for() {
        const MIN: i64 = 60_000;
        let mut r = rule();
        r.for_duration = Duration::from_secs(30 * 60);
        let wall = crate::decision::SystemClock.now_ms();
        let mut s = AlertState::default();
        assert_eq!(s.step_at(&r, wall, wall, true), Transition::None);
        assert_eq!(
            s.step_at(&r, wall + 60 * MIN, wall + 1_000, true),
            Transition::None,
            "an hour of event time in a second of wall time"
        );
        // Rows that keep coming: it fires once 30 minutes less the tolerance went by.
        assert_eq!(
            s.step_at(&r, wall + 70 * MIN, wall + 20 * MIN, true),
            Transition::None
        );
        assert_eq!(
            s.step_at(&r, wall + 80 * MIN, wall + 25 * MIN, true),
            Transition::Fired { since: wall }
        );
    }

    #[test]
    fn replayed_history_fires_on_event_time_alone() {
        let mut r = rule();
        r.for_duration = Duration::from_secs(30 * 60);
        let wall = crate::decision::SystemClock.now_ms();
        let day_in_2014 = 1_388_534_400_000; // 2014-01-01T00:00:00Z
        let mut s = AlertState::default();
        assert_eq!(s.step_at(&r, day_in_2014, wall, true), Transition::None);
        assert_eq!(
            s.step_at(&r, day_in_2014 + 30 * 60_000, wall + 5, true),
            Transition::Fired { since: day_in_2014 }
        );
        // The ends of time neither overflow nor fire early.
        let mut s = AlertState::default();
        assert_eq!(s.step_at(&r, i64::MAX, i64::MIN, true), Transition::None);
        assert_eq!(s.step_at(&r, i64::MIN, i64::MAX, true), Transition::None);
    }

    #[test]
    fn hysteresis_keeps_a_firing_alert_active_down_to_the_resolve_score() {
        let mut c = rule();
        c.min_score = Some(0.9);
        c.resolve_score = Some(0.5);
        let r = Rule::new(c).unwrap();
        assert!(!r.is_active(0.7, true, false), "0.7 does not fire");
        assert!(r.is_active(0.95, false, false));
        assert!(r.is_active(0.7, false, true), "0.7 keeps it firing");
        assert!(!r.is_active(0.4, false, true));
    }

    #[test]
    fn flapping_sends_one_notice_then_holds_changes_until_stable() {
        let mut r = rule();
        r.flap = FlapConfig {
            max_changes: 3,
            window: Duration::from_secs(600),
        };
        let mut s = AlertState::default();
        let mut out = Vec::new();
        for i in 0..20 {
            out.push(s.step(&r, i * 10_000, i % 2 == 0));
        }
        let notices = out
            .iter()
            .filter(|t| matches!(t, Transition::StartedFlapping { .. }))
            .count();
        assert_eq!(notices, 1);
        let notified = out
            .iter()
            .filter(|t| matches!(t, Transition::Fired { .. } | Transition::Resolved { .. }))
            .count();
        assert_eq!(
            notified, 3,
            "changes before the flapping are notified, none after"
        );
        // Stable (firing) for a whole window: flapping ends, with the current phase.
        let mut last = Transition::None;
        for i in 0..80 {
            let t = s.step(&r, 200_000 + i * 10_000, true);
            if t != Transition::None {
                last = t;
            }
        }
        assert!(
            matches!(
                last,
                Transition::StoppedFlapping {
                    firing_since: Some(_),
                    ..
                }
            ),
            "{last:?}"
        );
        assert!(!s.flapping);
    }

    #[test]
    fn rules_match_metric_globs_labels_and_detector_parts() {
        let mut c = rule();
        c.metric = Some("cpu_*".into());
        c.labels.insert("service".into(), "~api|web".into());
        c.labels.insert("env".into(), "!dev".into());
        c.detector = Some("seasonal".into());
        let r = Rule::new(c).unwrap();
        let labels = |s: &str, e: &str| {
            BTreeMap::from([
                ("service".to_owned(), s.to_owned()),
                ("env".to_owned(), e.to_owned()),
            ])
        };
        assert!(r.matches("cpu_user", &labels("api", "prod"), "seasonal+context"));
        assert!(!r.matches("mem_used", &labels("api", "prod"), "seasonal"));
        assert!(!r.matches("cpu_user", &labels("db", "prod"), "seasonal"));
        assert!(!r.matches("cpu_user", &labels("api", "dev"), "seasonal"));
        assert!(!r.matches("cpu_user", &labels("api", "prod"), "ewma"));
    }
}
