//! The ingestion check of event timestamps against the wall clock (`[source] timestamps`).
//!
//! A row dated far ahead of the clock would move event time on for everything after it
//! (windows, `for` durations, intervals), and one dated decades back is no live data either.
//! The pipeline checks every batch right after its source, whatever the source is: rows dated
//! more than `max_age` before the wall clock or more than `max_ahead` after it go to the
//! dead-letter output with the reason, and the rest of the batch goes on.
//!
//! ```toml
//! [source]
//! type = "kafka"
//! timestamps = { max_age = "7d", max_ahead = "10m" }   # the default for live sources
//! ```
//!
//! Sources that replay history (the `file` source and the `generator`) are not checked unless
//! their table says so (`timestamps = { check = true }`): their rows are dated years back on
//! purpose. A source kind says which it is through
//! [`SourceConfig::default_timestamps`](super::SourceConfig::default_timestamps).

use std::time::Duration;

use arrow::array::{Array, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Problems, Result};
use crate::schema::format_ts;

/// Longest `max_age` or `max_ahead` accepted: beyond, the check would check nothing.
const MAX_WINDOW: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Which event timestamps a source's rows may carry (`[source] timestamps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampPolicy {
    /// Whether rows are checked at all. Giving the table turns the check on unless this says
    /// `false`.
    #[serde(default = "checked")]
    pub check: bool,
    /// Rows dated more than this before the wall clock are dead-lettered.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Rows dated more than this after the wall clock are dead-lettered.
    #[serde(default = "default_max_ahead", with = "humantime_serde")]
    pub max_ahead: Duration,
}

fn checked() -> bool {
    true
}
fn default_max_age() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_max_ahead() -> Duration {
    Duration::from_secs(600)
}

impl Default for TimestampPolicy {
    /// Checked: 7 days back, 10 minutes ahead.
    fn default() -> Self {
        Self {
            check: true,
            max_age: default_max_age(),
            max_ahead: default_max_ahead(),
        }
    }
}

impl TimestampPolicy {
    /// Not checked: the policy of sources that replay history.
    pub fn unchecked() -> Self {
        Self {
            check: false,
            ..Self::default()
        }
    }

    /// Configuration problems, with paths relative to the `timestamps` table.
    pub fn problems(&self) -> Problems {
        let mut out = Problems::new();
        out.check(
            self.max_age >= Duration::from_secs(1) && self.max_age <= MAX_WINDOW,
            "max_age",
            format!(
                "must be between 1s and 10 years, got {}",
                humantime::format_duration(self.max_age)
            ),
            "to accept rows of any age, set check = false",
        );
        out.check(
            self.max_ahead <= MAX_WINDOW,
            "max_ahead",
            format!(
                "must be at most 10 years, got {}",
                humantime::format_duration(self.max_ahead)
            ),
            "to accept rows from any time ahead, set check = false",
        );
        out
    }

    /// Splits `batch` into the rows within the window around `now_ms` and the reasons for
    /// the rows outside it: at most one [`Rejected`] for the rows too old and one for those
    /// too far ahead, each with the rows it stands for. An unchecked policy keeps everything.
    pub fn split(&self, batch: &RecordBatch, now_ms: i64) -> Result<(RecordBatch, Vec<Rejected>)> {
        if !self.check || batch.num_rows() == 0 {
            return Ok((batch.clone(), Vec::new()));
        }
        let ts = batch
            .column_by_name("ts")
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<arrow::array::TimestampMillisecondArray>()
            })
            .ok_or_else(|| Error::schema("timestamps", "no `ts` column of milliseconds"))?;
        let oldest = now_ms.saturating_sub(millis(self.max_age));
        let newest = now_ms.saturating_add(millis(self.max_ahead));
        let mut old = Vec::new();
        let mut ahead = Vec::new();
        // A null time cannot be placed: it counts as too old (it is the epoch to most readers).
        for row in 0..ts.len() {
            let t = if ts.is_null(row) {
                i64::MIN
            } else {
                ts.value(row)
            };
            if t < oldest {
                old.push(row);
            } else if t > newest {
                ahead.push(row);
            }
        }
        if old.is_empty() && ahead.is_empty() {
            return Ok((batch.clone(), Vec::new()));
        }
        let mut keep = vec![true; batch.num_rows()];
        let mut rejected = Vec::new();
        let value = |row: usize| {
            if ts.is_null(row) {
                None
            } else {
                Some(ts.value(row))
            }
        };
        if let Some(&worst) = old.iter().min_by_key(|&&r| value(r).unwrap_or(i64::MIN)) {
            let reason = match value(worst) {
                Some(t) => format!(
                    "timestamp {} is {} behind the clock (at most {} accepted)",
                    format_ts(t),
                    short(now_ms.saturating_sub(t)),
                    short(millis(self.max_age))
                ),
                None => "no timestamp".to_owned(),
            };
            rejected.push(Rejected::of(batch, &old, reason, &mut keep)?);
        }
        if let Some(&worst) = ahead.iter().max_by_key(|&&r| value(r).unwrap_or(i64::MIN)) {
            let t = value(worst).unwrap_or(i64::MAX);
            let reason = format!(
                "timestamp {} is {} ahead of the clock (at most {} accepted)",
                format_ts(t),
                short(t.saturating_sub(now_ms)),
                short(millis(self.max_ahead))
            );
            rejected.push(Rejected::of(batch, &ahead, reason, &mut keep)?);
        }
        let kept = filter_record_batch(batch, &BooleanArray::from(keep))?;
        Ok((kept, rejected))
    }
}

/// Rows a [`TimestampPolicy`] refused, and why (the reason names the furthest out of them).
#[derive(Debug)]
pub struct Rejected {
    /// The refused rows, in the source's schema.
    pub rows: RecordBatch,
    /// E.g. `timestamp 2027-12-07T10:00:00.000Z is 365d ahead of the clock (at most 10m
    /// accepted)`; with `(and N more rows)` when it stands for several.
    pub reason: String,
}

impl Rejected {
    fn of(batch: &RecordBatch, rows: &[usize], reason: String, keep: &mut [bool]) -> Result<Self> {
        let mut mask = vec![false; batch.num_rows()];
        for &row in rows {
            mask[row] = true;
            keep[row] = false;
        }
        let reason = match rows.len() {
            1 => reason,
            n => format!("{reason} (and {} more rows)", n - 1),
        };
        Ok(Self {
            rows: filter_record_batch(batch, &BooleanArray::from(mask))?,
            reason,
        })
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `365d`, `3h`, `12m`, `40s`, `250ms`: the largest whole unit, for reasons.
fn short(ms: i64) -> String {
    const UNITS: [(i64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    for (size, unit) in UNITS {
        if ms >= size {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{MetricsBatchBuilder, MetricsColumns};

    const NOW: i64 = 1_796_637_600_000; // 2026-12-07T10:00:00Z
    const DAY: i64 = 86_400_000;

    fn batch(times: &[i64]) -> RecordBatch {
        let mut b = MetricsBatchBuilder::default();
        for (i, &t) in times.iter().enumerate() {
            b.push(t, "cpu", &[("host", &format!("h{i}"))], i as f64);
        }
        b.finish()
    }

    fn times(b: &RecordBatch) -> Vec<i64> {
        let cols = MetricsColumns::try_new(b, "t").unwrap();
        (0..b.num_rows()).map(|r| cols.ts.value(r)).collect()
    }

    #[test]
    fn rows_outside_the_window_are_refused_with_the_reason_and_the_rest_kept() {
        let policy = TimestampPolicy::default();
        let input = batch(&[NOW, NOW + 365 * DAY, NOW - 8 * DAY, NOW - DAY, i64::MAX]);
        let (kept, rejected) = policy.split(&input, NOW).unwrap();
        assert_eq!(times(&kept), vec![NOW, NOW - DAY]);
        assert_eq!(rejected.len(), 2);
        assert_eq!(
            rejected[0].reason,
            "timestamp 2026-11-29T10:00:00.000Z is 8d behind the clock (at most 7d accepted)"
        );
        assert_eq!(times(&rejected[0].rows), vec![NOW - 8 * DAY]);
        assert!(
            rejected[1]
                .reason
                .ends_with("ahead of the clock (at most 10m accepted) (and 1 more rows)"),
            "{}",
            rejected[1].reason
        );
        assert_eq!(times(&rejected[1].rows), vec![NOW + 365 * DAY, i64::MAX]);
        let (_, one) = policy.split(&batch(&[NOW + 365 * DAY]), NOW).unwrap();
        assert_eq!(
            one[0].reason,
            "timestamp 2027-12-07T10:00:00.000Z is 365d ahead of the clock (at most 10m accepted)"
        );
    }

    #[test]
    fn the_edges_are_inside_and_an_unchecked_policy_keeps_everything() {
        let policy = TimestampPolicy::default();
        let edges = batch(&[NOW - 7 * DAY, NOW + 600_000]);
        let (kept, rejected) = policy.split(&edges, NOW).unwrap();
        assert_eq!(kept.num_rows(), 2);
        assert!(rejected.is_empty());
        let wild = batch(&[i64::MIN, 0, i64::MAX]);
        let (kept, rejected) = TimestampPolicy::unchecked().split(&wild, NOW).unwrap();
        assert_eq!(kept.num_rows(), 3);
        assert!(rejected.is_empty());
        // The window saturates at the ends of time instead of overflowing.
        let (kept, _) = policy.split(&wild, i64::MAX).unwrap();
        assert_eq!(times(&kept), vec![i64::MAX]);
    }

    #[test]
    fn the_table_turns_the_check_on_and_bad_windows_are_reported() {
        let p: TimestampPolicy = toml::from_str("max_ahead = \"1m\"").unwrap();
        assert!(p.check);
        assert_eq!(p.max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(p.max_ahead, Duration::from_secs(60));
        let off: TimestampPolicy = toml::from_str("check = false").unwrap();
        assert!(!off.check);
        let bad: TimestampPolicy = toml::from_str("max_age = \"0s\"").unwrap();
        let problems = bad.problems();
        assert_eq!(problems.0.len(), 1);
        assert_eq!(problems.0[0].path, "max_age");
        assert!(toml::from_str::<TimestampPolicy>("max_agee = \"1d\"").is_err());
    }
}
