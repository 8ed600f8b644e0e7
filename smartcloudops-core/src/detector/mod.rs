//! Detectors: synchronous, stateful scorers keyed by series.
//!
//! A [`Detector`] receives canonical metrics batches and returns them with the score columns
//! appended (see [`crate::schema::scored_schema`]). It keeps one small state per `series_id`
//! and is strictly online: the score of a row depends only on that series' earlier rows.
//! Detectors are plain `&mut self` state machines — no I/O, no async — so they are trivial to
//! test and to benchmark.
//!
//! Most detectors are a [`SeriesModel`] (the per-series state machine) inside a
//! [`KeyedDetector`], which owns the keyed state store: one state per series, a cap on the
//! number of series with least-recently-used eviction, memory accounting, and versioned
//! snapshots. The building blocks:
//!
//! | module | what it models | state per series |
//! |---|---|---|
//! | [`ewma`] | exponentially weighted mean and variance, z-score | 24 B |
//! | [`mad`] | streaming median and median absolute deviation | 24 B |
//! | [`seasonal`] | a baseline per time-of-day slot | 8 B × slots |
//! | [`cusum`] | two-sided CUSUM change-point on a slow baseline | 48 B |
//! | [`hst`] | half-space trees over a shingle of recent values | 2 B × trees × nodes |
//! | [`threshold`] | static rules (`above` / `below`) | none |
//! | [`postprocess`] | anomaly likelihood, range novelty, alert rest | 40 B – 16 KiB |
//! | [`ensemble`] | all of the above combined; the `fast` and `precise` presets | sum |

pub mod context;
pub mod cusum;
pub mod ensemble;
pub mod ewma;
pub mod hst;
pub mod keyed;
pub mod mad;
pub mod postprocess;
pub mod preset;
#[cfg(feature = "redis")]
pub mod redis_state;
pub mod seasonal;
pub mod threshold;

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, DictionaryArray, Float64Array, Int32Array, StringArray,
    TimestampMillisecondArray,
};
use arrow::datatypes::Int32Type;
use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;
use rustc_hash::FxHashMap;

use crate::component::{BuildContext, ComponentConfig};
use crate::error::{Error, Result};
use crate::schema::{TIME_ZONE, scored_schema_for};

pub use self::ensemble::{EnsembleConfig, EnsembleDetector, Preset};
pub use self::ewma::{EwmaConfig, EwmaDetector};
pub use self::keyed::{KeyedDetector, SeriesModel};
#[cfg(feature = "redis")]
pub use self::redis_state::{RedisStateStore, RedisStateStoreConfig};
pub use self::threshold::{ThresholdConfig, ThresholdDetector};
/// Detector configurations report their problems in the crate's one problem list.
pub use crate::error::Problems;

/// A `[detector]` kind's configuration: a serde struct that checks itself
/// ([`ComponentConfig`]) and builds its detector. Listed in the
/// registry (`config::Registry`) under its `type` name.
pub trait DetectorConfig: ComponentConfig {
    /// Builds the detector, holding state for at most `max_series` series.
    fn build(&self, ctx: &BuildContext, max_series: usize) -> Result<Box<dyn Detector>>;

    /// The ensemble this detector is, for tools that adjust its threshold (`eval`); `None`
    /// (the default) for a detector that is not an ensemble.
    fn ensemble_config(&self) -> Option<EnsembleConfig> {
        None
    }
}

/// Scores batches of canonical metrics. See the [module docs](self).
pub trait Detector: Send + fmt::Debug {
    /// A short name for metrics, logs and the `detector` column, e.g. `ewma`.
    fn name(&self) -> &str;

    /// Scores every row of `batch`, returning it with the score columns appended.
    fn score(&mut self, batch: &RecordBatch) -> Result<RecordBatch>;

    /// Number of series with state.
    fn series_count(&self) -> usize;

    /// Approximate bytes of state held, for memory accounting.
    fn state_bytes(&self) -> usize;

    /// Series whose state was evicted to respect the series cap, since start.
    fn evicted_series(&self) -> u64 {
        0
    }

    /// All state as versioned bytes, for [`restore`](Detector::restore) after a restart.
    fn snapshot(&self) -> Result<Vec<u8>> {
        Err(Error::Snapshot(format!(
            "detector `{}` keeps no state to snapshot",
            self.name()
        )))
    }

    /// Replaces all state with a [`snapshot`](Detector::snapshot) taken by a detector of the
    /// same kind and configuration.
    fn restore(&mut self, snapshot: &[u8]) -> Result<()> {
        let _ = snapshot;
        Err(Error::Snapshot(format!(
            "detector `{}` keeps no state to restore",
            self.name()
        )))
    }

    /// Where this detector's per-series states may be shared with other processes: the
    /// snapshot format version, the detector's name and a hash of its configuration, e.g.
    /// `v1:ewma:9f2c…`. States are only exchanged within one namespace. `None` (the default)
    /// means the detector keeps no per-series state to hand off. See [`SeriesStateStore`].
    fn series_state_namespace(&self) -> Option<String> {
        None
    }

    /// The series of `ids` this detector holds no state for, each once, in first-seen order.
    fn unknown_series(&self, ids: &[u64]) -> Vec<u64> {
        let _ = ids;
        Vec::new()
    }

    /// Installs per-series states exported by a detector of the same namespace, for series
    /// it does not hold yet; returns how many were installed. A state that does not decode is
    /// skipped and reported in the error after the others were installed.
    fn import_series_states(&mut self, states: SeriesStates) -> Result<usize> {
        let _ = states;
        Ok(0)
    }

    /// The encoded states of the series that learned something since the last call, which
    /// marks them saved.
    fn export_changed_series(&mut self) -> Result<SeriesStates> {
        Ok(Vec::new())
    }

    /// Drops the states of `ids` (stale: the store holds newer ones), so that the next batch
    /// of those series loads them again; returns how many were held.
    fn forget_series(&mut self, ids: &[u64]) -> usize {
        let _ = ids;
        0
    }
}

/// Encoded per-series states: `(series_id, state)` pairs.
pub type SeriesStates = Vec<(u64, Vec<u8>)>;

/// Keeps per-series detector states outside the process (Redis, say), so a replica that
/// restarts or takes over another replica's series resumes where it left off instead of
/// learning again.
///
/// The pipeline asks the store for the series a batch brings that the detector does not
/// hold, before scoring it, and saves the states that changed periodically and at shutdown.
pub trait SeriesStateStore: Send + Sync + fmt::Debug {
    /// A short name for logs, e.g. `redis`.
    fn name(&self) -> &str;

    /// The stored states of `ids` within `namespace`; series without one are left out.
    fn load<'a>(
        &'a self,
        namespace: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<SeriesStates>>;

    /// Stores `states` within `namespace`, replacing older ones. A versioned store refuses
    /// to replace a state another writer stored since this store loaded or wrote it (or, for
    /// a series it never loaded a state of, any stored state); refused series are reported
    /// by [`take_rejected`](SeriesStateStore::take_rejected), the others are stored.
    fn save<'a>(
        &'a self,
        namespace: &'a str,
        states: &'a [(u64, Vec<u8>)],
    ) -> BoxFuture<'a, Result<()>>;

    /// The series of `namespace` whose saves were refused since the last call: their
    /// in-memory state is stale and should be dropped
    /// ([`Detector::forget_series`]) and loaded again. Unversioned stores refuse nothing.
    fn take_rejected(&self, namespace: &str) -> Vec<u64> {
        let _ = namespace;
        Vec::new()
    }

    /// Saves refused since the store was created (a counter, for metrics).
    fn rejected_writes(&self) -> u64 {
        0
    }
}

/// One row's verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Anomaly score in `[0, 1]`.
    pub score: f64,
    /// Whether the row is anomalous.
    pub is_anomaly: bool,
    /// The value expected, if the detector has an opinion yet.
    pub expected: f64,
    /// Lower edge of the normal band.
    pub lower: f64,
    /// Upper edge of the normal band.
    pub upper: f64,
    /// Which parts of the detector fired, one bit per name of
    /// [`ScoreColumnsBuilder::finish_with_parts`]; 0 names the detector itself.
    pub fired: u32,
    /// Start of the anomalous episode this row belongs to (ms since the epoch).
    pub since_ms: Option<i64>,
}

impl Verdict {
    /// The verdict of a z-score detector: score `erf(z / √2)` (the normal probability mass
    /// within `z` sds), anomalous at `z ≥ threshold`, band `expected ± threshold · sd`.
    pub fn from_z(z: f64, expected: f64, sd: f64, threshold: f64) -> Verdict {
        Verdict {
            score: statrs::function::erf::erf(z / std::f64::consts::SQRT_2),
            is_anomaly: z >= threshold,
            expected,
            lower: expected - threshold * sd,
            upper: expected + threshold * sd,
            ..Verdict::NONE
        }
    }

    /// No opinion (warm-up, a non-finite value): score 0, no band.
    pub const NONE: Verdict = Verdict {
        score: 0.0,
        is_anomaly: false,
        expected: f64::NAN,
        lower: f64::NAN,
        upper: f64::NAN,
        fired: 0,
        since_ms: None,
    };
}

/// Collects per-row verdicts and appends them to a batch as the score columns.
#[derive(Debug, Default)]
pub struct ScoreColumnsBuilder {
    score: Vec<f64>,
    is_anomaly: BooleanBuilder,
    expected: Vec<Option<f64>>,
    lower: Vec<Option<f64>>,
    upper: Vec<Option<f64>>,
    fired: Vec<u32>,
    since: Vec<Option<i64>>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

impl ScoreColumnsBuilder {
    /// A builder for `rows` rows.
    pub fn with_capacity(rows: usize) -> Self {
        Self {
            score: Vec::with_capacity(rows),
            is_anomaly: BooleanBuilder::with_capacity(rows),
            expected: Vec::with_capacity(rows),
            lower: Vec::with_capacity(rows),
            upper: Vec::with_capacity(rows),
            fired: Vec::with_capacity(rows),
            since: Vec::with_capacity(rows),
        }
    }

    /// Appends one row's verdict. Scores are clamped to `[0, 1]` and NaN becomes 0, so the
    /// output contract holds whatever the detector math did.
    pub fn push(&mut self, v: Verdict) {
        let score = if v.score.is_nan() {
            0.0
        } else {
            v.score.clamp(0.0, 1.0)
        };
        self.score.push(score);
        self.is_anomaly.append_value(v.is_anomaly);
        self.expected.push(finite(v.expected));
        self.lower.push(finite(v.lower));
        self.upper.push(finite(v.upper));
        self.fired.push(if v.is_anomaly { v.fired } else { 0 });
        self.since
            .push(if v.is_anomaly { v.since_ms } else { None });
    }

    /// `batch` with the collected columns appended; `detector` fills the `detector` column.
    pub fn finish(self, batch: &RecordBatch, detector: &str) -> Result<RecordBatch> {
        self.finish_with_parts(batch, detector, &[])
    }

    /// Like [`finish`](Self::finish), but an anomalous row whose verdict has `fired` bits set
    /// is attributed to those `parts`, joined with `+` (e.g. `seasonal+likelihood`).
    pub fn finish_with_parts(
        mut self,
        batch: &RecordBatch,
        detector: &str,
        parts: &[&str],
    ) -> Result<RecordBatch> {
        let rows = self.score.len();
        let mut names = vec![detector.to_owned()];
        let mut key_of: FxHashMap<u32, i32> = FxHashMap::default();
        key_of.insert(0, 0);
        let keys: Vec<i32> = self
            .fired
            .iter()
            .map(|&mask| {
                *key_of.entry(mask).or_insert_with(|| {
                    names.push(part_names(mask, parts, detector));
                    (names.len() - 1) as i32
                })
            })
            .collect();
        let names: ArrayRef = Arc::new(StringArray::from(names));
        let detector_col: ArrayRef = Arc::new(DictionaryArray::<Int32Type>::try_new(
            Int32Array::from(keys),
            names,
        )?);
        debug_assert_eq!(rows, batch.num_rows());
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(Float64Array::from(std::mem::take(
            &mut self.score,
        ))));
        columns.push(Arc::new(self.is_anomaly.finish()));
        for v in [&mut self.expected, &mut self.lower, &mut self.upper] {
            columns.push(Arc::new(Float64Array::from(std::mem::take(v))));
        }
        columns.push(detector_col);
        columns.push(Arc::new(
            TimestampMillisecondArray::from(std::mem::take(&mut self.since))
                .with_timezone(TIME_ZONE),
        ));
        Ok(RecordBatch::try_new(
            scored_schema_for(&batch.schema()),
            columns,
        )?)
    }
}

fn part_names(mask: u32, parts: &[&str], detector: &str) -> String {
    let fired: Vec<&str> = (0..parts.len().min(32))
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| parts[bit])
        .collect();
    if fired.is_empty() {
        detector.to_owned()
    } else {
        fired.join("+")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{MetricsBatchBuilder, ScoreColumns};

    #[test]
    fn anomalous_rows_name_the_parts_that_fired_and_normal_rows_the_detector() {
        let mut b = MetricsBatchBuilder::default();
        for i in 0..3 {
            b.push(i, "cpu", &[("host", "a")], 1.0);
        }
        let mut s = ScoreColumnsBuilder::with_capacity(3);
        s.push(Verdict {
            score: 0.9,
            is_anomaly: true,
            fired: 0b101,
            since_ms: Some(0),
            ..Verdict::NONE
        });
        s.push(Verdict {
            fired: 0b1, // not anomalous: attributed to the detector
            ..Verdict::NONE
        });
        s.push(Verdict {
            score: f64::NAN,
            is_anomaly: true,
            fired: 0b10,
            ..Verdict::NONE
        });
        let out = s
            .finish_with_parts(&b.finish(), "precise", &["ewma", "mad", "likelihood"])
            .unwrap();
        let c = ScoreColumns::try_new(&out, "t").unwrap();
        assert_eq!(c.detector(0), "ewma+likelihood");
        assert_eq!(c.detector(1), "precise");
        assert_eq!(c.detector(2), "mad");
        assert_eq!(c.score.value(2), 0.0, "NaN scores become 0");
        assert!(arrow::array::Array::is_valid(c.anomaly_since, 0));
        assert!(arrow::array::Array::is_null(c.anomaly_since, 1));
    }
}
