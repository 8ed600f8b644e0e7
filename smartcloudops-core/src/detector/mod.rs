//! Detectors: synchronous, stateful scorers keyed by series.
//!
//! A [`Detector`] receives canonical metrics batches and returns them with the score columns
//! appended (see [`crate::schema::scored_schema`]). It keeps one small state per `series_id`
//! and must be strictly online: the score of a row depends only on that series' earlier rows.
//! Detectors are plain `&mut self` state machines — no I/O, no async — so they are trivial to
//! test and to benchmark.

pub mod ewma;

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, DictionaryArray, Float64Array, Int32Array, StringArray,
};
use arrow::datatypes::Int32Type;
use arrow::record_batch::RecordBatch;

use crate::error::Result;
use crate::schema::scored_schema_for;

pub use self::ewma::{EwmaConfig, EwmaDetector};

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
}

impl Verdict {
    /// No opinion (warm-up, a non-finite value): score 0, no band.
    pub const NONE: Verdict = Verdict {
        score: 0.0,
        is_anomaly: false,
        expected: f64::NAN,
        lower: f64::NAN,
        upper: f64::NAN,
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
    }

    /// `batch` with the collected columns appended; `detector` fills the `detector` column.
    pub fn finish(mut self, batch: &RecordBatch, detector: &str) -> Result<RecordBatch> {
        let rows = self.score.len();
        let names: ArrayRef = Arc::new(StringArray::from(vec![detector]));
        let keys = Int32Array::from(vec![0; rows]);
        let detector_col: ArrayRef = Arc::new(DictionaryArray::<Int32Type>::try_new(keys, names)?);
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(Float64Array::from(std::mem::take(
            &mut self.score,
        ))));
        columns.push(Arc::new(self.is_anomaly.finish()));
        columns.push(Arc::new(Float64Array::from(std::mem::take(
            &mut self.expected,
        ))));
        columns.push(Arc::new(Float64Array::from(std::mem::take(
            &mut self.lower,
        ))));
        columns.push(Arc::new(Float64Array::from(std::mem::take(
            &mut self.upper,
        ))));
        columns.push(detector_col);
        Ok(RecordBatch::try_new(
            scored_schema_for(&batch.schema()),
            columns,
        )?)
    }
}
