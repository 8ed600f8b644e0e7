//! Actions: what the pipeline does with scored rows and anomalies.
//!
//! An [`Action`] is async and shared (`&self`): the pipeline may run it for several batches at
//! once. It gets an [`ActionInput`]: the scored batch and the [`Alert`]s extracted from its
//! anomalous rows. By default an action is only called for batches with at least one alert;
//! sinks that want every scored row say so with [`Action::wants_every_batch`]. An `Err`
//! nacks the batch.

pub mod event;
mod fn_action;
pub mod jsonl;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod log;
mod memory;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod redis_cache;

use std::collections::BTreeMap;
use std::fmt;

use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::component::{BuildContext, ComponentConfig};
use crate::error::Result;
use crate::schema::{MetricsColumns, ScoreColumns, format_ts};
use crate::source::Origin;

pub use self::event::{Event, SinkPayload};
pub use self::fn_action::FnAction;
pub use self::jsonl::{JsonlAction, JsonlActionConfig};
#[cfg(feature = "kafka")]
pub use self::kafka::{KafkaSink, KafkaSinkConfig, KafkaSinkPayload};
pub use self::log::{LogAction, LogActionConfig, LogFormat};
pub use self::memory::MemoryAction;
#[cfg(feature = "redis")]
pub use self::redis::{RedisPublish, RedisPublishConfig, RedisStreamSink, RedisStreamSinkConfig};
#[cfg(feature = "redis")]
pub use self::redis_cache::{CachedResult, ResultCache, ResultCacheConfig};

/// An `[[action]]` kind's configuration: a serde struct that checks itself
/// ([`ComponentConfig`]) and builds its action. Listed in the
/// registry (`config::Registry`) under its `type` name.
pub trait ActionConfig: ComponentConfig {
    /// Builds the action (connections are opened lazily, on first use).
    fn build(&self, ctx: &BuildContext) -> Result<std::sync::Arc<dyn Action>>;
}

/// Consumes scored batches. See the [module docs](self).
pub trait Action: Send + Sync + fmt::Debug {
    /// A short name for metrics and logs, e.g. `jsonl`.
    fn name(&self) -> &str;

    /// Whether to call [`execute`](Action::execute) for batches without alerts too.
    fn wants_every_batch(&self) -> bool {
        false
    }

    /// Acts on one scored batch. Completing with `Ok` means the effect is done (written,
    /// delivered); the batch is acknowledged only after every action completed.
    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>>;

    /// Called once after the last batch, while shutting down: flush buffers.
    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// What an action receives for one batch.
#[derive(Debug, Clone)]
pub struct ActionInput {
    /// The scored batch (the canonical schema plus the score columns, if a detector ran).
    pub batch: RecordBatch,
    /// One alert per anomalous row.
    pub alerts: Vec<Alert>,
    /// Where the rows came from (source, client, partitions).
    pub origin: Origin,
}

impl ActionInput {
    /// A batch and its alerts, of no particular origin.
    pub fn new(batch: RecordBatch, alerts: Vec<Alert>) -> Self {
        Self {
            batch,
            alerts,
            origin: Origin::default(),
        }
    }
}

/// An anomalous row, in the words a person (or a receiver) needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Event time, RFC 3339.
    pub time: String,
    /// Event time, milliseconds since the epoch.
    pub ts_ms: i64,
    /// The series' stable id, as a decimal string (JSON numbers lose precision past 2^53).
    #[serde(serialize_with = "as_string")]
    pub series_id: u64,
    /// Metric name.
    pub metric: String,
    /// Labels, sorted by key.
    pub labels: BTreeMap<String, String>,
    /// Observed value.
    pub value: f64,
    /// Anomaly score in `[0, 1]`.
    pub score: f64,
    /// Expected value, when the detector had one.
    pub expected: Option<f64>,
    /// Lower edge of the normal band.
    pub lower: Option<f64>,
    /// Upper edge of the normal band.
    pub upper: Option<f64>,
    /// The detector that flagged the row, and for an ensemble the parts that fired.
    pub detector: String,
    /// Start of the anomalous episode, RFC 3339, when the detector tracks episodes.
    pub since: Option<String>,
    /// A one-line explanation.
    pub reason: String,
}

fn as_string<S: serde::Serializer>(v: &u64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Alert {
    /// One alert per row of `batch` with `is_anomaly` set. A batch without score columns has
    /// no alerts.
    pub fn from_scored(batch: &RecordBatch) -> Result<Vec<Alert>> {
        if batch
            .column_by_name(crate::schema::col::IS_ANOMALY)
            .is_none()
        {
            return Ok(Vec::new()); // not scored
        }
        let scores = ScoreColumns::try_new(batch, "alerts")?;
        if scores.is_anomaly.true_count() == 0 {
            return Ok(Vec::new());
        }
        let cols = MetricsColumns::try_new(batch, "alerts")?;
        Ok((0..batch.num_rows())
            .filter(|&row| scores.is_anomaly.value(row))
            .map(|row| Alert::at(&cols, &scores, row))
            .collect())
    }

    /// The alert for `row` of a scored batch, anomalous or not (for a normal row the
    /// explanation tells how far within the band it was).
    pub fn at(cols: &MetricsColumns<'_>, scores: &ScoreColumns<'_>, row: usize) -> Alert {
        let opt = |a: &arrow::array::Float64Array| {
            arrow::array::Array::is_valid(a, row).then(|| a.value(row))
        };
        let mut alert = Alert {
            time: format_ts(cols.ts.value(row)),
            ts_ms: cols.ts.value(row),
            series_id: cols.series_id.value(row),
            metric: cols.metric(row).to_owned(),
            labels: cols.labels(row).into_iter().collect(),
            value: cols.value.value(row),
            score: scores.score.value(row),
            expected: opt(scores.expected),
            lower: opt(scores.lower),
            upper: opt(scores.upper),
            detector: scores.detector(row).to_owned(),
            since: arrow::array::Array::is_valid(scores.anomaly_since, row)
                .then(|| format_ts(scores.anomaly_since.value(row))),
            reason: String::new(),
        };
        alert.reason = alert.explain();
        alert
    }

    /// `metric{k="v",…}`, the series as Prometheus writes it.
    pub fn series(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        format!("{}{{{}}}", self.metric, labels.join(","))
    }

    /// A one-line explanation, e.g. `97.2 above expected 41 (band 29..53) since
    /// 2026-11-25T10:05:00.000Z, score 1.000 by seasonal+likelihood`.
    pub fn explain(&self) -> String {
        let since = self
            .since
            .as_deref()
            .map(|s| format!(" since {s}"))
            .unwrap_or_default();
        match (self.expected, self.lower, self.upper) {
            (Some(expected), Some(lower), Some(upper)) => {
                let side = if self.value >= expected {
                    "above"
                } else {
                    "below"
                };
                format!(
                    "{} {side} expected {} (band {}..{}){since}, score {:.3} by {}",
                    short(self.value),
                    short(expected),
                    short(lower),
                    short(upper),
                    self.score,
                    self.detector
                )
            }
            _ => format!(
                "{} flagged{since} with score {:.3} by {}",
                short(self.value),
                self.score,
                self.detector
            ),
        }
    }
}

/// A number with at most 4 significant decimals, without trailing zeros.
fn short(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let digits = if v.abs() >= 100.0 {
        1
    } else if v.abs() >= 1.0 {
        2
    } else {
        4
    };
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::{ScoreColumnsBuilder, Verdict};
    use crate::schema::MetricsBatchBuilder;

    #[test]
    fn alerts_come_from_anomalous_rows_with_an_explanation() {
        let mut b = MetricsBatchBuilder::default();
        b.push(1_764_065_100_000, "cpu", &[("host", "web-2")], 97.2);
        b.push(1_764_065_100_000, "cpu", &[("host", "web-1")], 41.0);
        let batch = b.finish();
        let mut s = ScoreColumnsBuilder::with_capacity(2);
        s.push(Verdict {
            score: 0.9999,
            is_anomaly: true,
            expected: 41.04,
            lower: 29.0,
            upper: 53.0,
            since_ms: Some(1_764_064_800_000),
            ..Verdict::NONE
        });
        s.push(Verdict::NONE);
        let scored = s.finish(&batch, "ewma").unwrap();
        let alerts = Alert::from_scored(&scored).unwrap();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(a.series(), "cpu{host=\"web-2\"}");
        assert_eq!(a.time, "2025-11-25T10:05:00.000Z");
        assert_eq!(
            a.reason,
            "97.2 above expected 41.04 (band 29..53) since 2025-11-25T10:00:00.000Z, \
             score 1.000 by ewma"
        );
        let json = serde_json::to_value(a).unwrap();
        assert_eq!(
            json["series_id"],
            serde_json::Value::String(a.series_id.to_string())
        );
        assert_eq!(json["labels"]["host"], "web-2");
    }

    #[test]
    fn malformed_score_columns_are_an_error_not_silence() {
        let mut b = MetricsBatchBuilder::default();
        b.push(0, "cpu", &[] as &[(&str, &str)], 1.0);
        let batch = b.finish();
        let mut columns = batch.columns().to_vec();
        columns.push(std::sync::Arc::new(arrow::array::BooleanArray::from(vec![
            true,
        ])));
        let mut fields: Vec<arrow::datatypes::Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(arrow::datatypes::Field::new(
            "is_anomaly",
            arrow::datatypes::DataType::Boolean,
            false,
        ));
        let bad = RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
            columns,
        )
        .unwrap();
        let err = Alert::from_scored(&bad).unwrap_err();
        assert!(
            err.to_string().contains("missing column `detector`"),
            "{err}"
        );
    }

    #[test]
    fn unscored_batches_have_no_alerts() {
        let mut b = MetricsBatchBuilder::default();
        b.push(0, "cpu", &[] as &[(&str, &str)], 1.0);
        assert!(Alert::from_scored(&b.finish()).unwrap().is_empty());
    }
}
