//! Event-time windows per series (`[[prep]] type = "window"`), and resampling to a fixed step
//! (`type = "resample"`).
//!
//! - **Tumbling** windows of `size`, or **sliding** windows of `size` every `slide`, aligned
//!   to the epoch, per series.
//! - **Aggregations**: `avg`, `min`, `max`, `sum`, `count`, `last`, `p50`, `p90`, `p95`,
//!   `p99`. Each becomes one output row per window, named `{metric}_{aggregation}`, at the
//!   window's end, with `window_start` and `window_end` columns appended.
//! - **Watermarks, per series**: a series' watermark is the largest event time it sent, minus
//!   `max_out_of_orderness`. A window is emitted once its series' watermark passes its end
//!   plus `allowed_lateness`, so rows up to that late still count. One series dated far ahead
//!   thus makes only its own later rows late, never another series'.
//! - **The stage watermark** closes the windows of series gone quiet while the others go on:
//!   about once per as many rows as there are series (a *round*), it becomes the upper median
//!   of the series' watermarks, and a series that sent nothing since the previous round has
//!   its windows closed at it. A series new to the stage starts at it. Being a median, it
//!   moves only when most series move: a minority dated ahead cannot drag it along (with two
//!   series, the later one is the upper median).
//! - **Late rows**, whose every window was already emitted, are dropped and counted
//!   ([`WindowPrep::late_rows`]); or, with `late = "dead_letter"`, sent to the dead-letter
//!   output as a side output while the rest of the batch goes on; or, with `late = "fail"`,
//!   they fail their batch, which the pipeline dead-letters with the reason.
//! - **Idle sources**: with `idle_timeout`, once no row has arrived for that long, every
//!   series' watermark moves on with the wall clock ([`Prep::tick`]), so the last windows of
//!   a source gone quiet close without waiting for its next row.
//! - At the end of the input, every open window is emitted ([`Prep::flush`]).
//! - **Acknowledgements are held until the windows are emitted** (when the source replays
//!   what was not acknowledged: Kafka, Redis Streams). Each window knows the input batch
//!   that opened it; an input batch's acknowledgement waits until every window opened by it
//!   or by an earlier batch was emitted ([`Prep::oldest_retained_input`]), then rides with
//!   the emitted rows through the actions. Released in order, acknowledgements match the
//!   sources' contiguous commits: after a crash the source delivers again from the oldest
//!   batch with rows in an open window, and the open windows are rebuilt from their rows.
//!   Chosen over snapshots of the windows, which would need the sources' positions stored
//!   with them to avoid counting replayed rows twice; only the small marks below are kept.
//!   Late rows and dead-lettered rows hold nothing: their batch is acknowledged as soon as
//!   the batches before it are.
//!   - *Bounds.* The rows waiting are bounded by `max_held_rows`: past it, the windows the
//!     oldest waiting batch opened are emitted early with the rows they have (counted,
//!     [`WindowPrep::early_windows`], the gauge `smartcloudops_window_early_windows_total`,
//!     and a warning); their later rows open them again. A source stops reading at its own
//!     limit (`max_unacked` for Kafka and Redis Streams, 100 000 by default): keep
//!     `max_held_rows` below it, with room for the batches in the pipeline's queues, or the
//!     source would wait for acknowledgements that wait for its rows. Redis Streams'
//!     `claim_idle` must outlast a window too, or another consumer takes its entries over.
//!   - *Shutdown.* Open windows are not emitted at a shutdown; their batches are nacked and
//!     delivered again after the restart. Only at the end of a finite input are they emitted
//!     and acknowledged.
//!   - *After a crash* the source delivers again from the oldest batch with rows in an open
//!     window, and such a batch usually also holds the last rows of a window emitted before
//!     the crash. So the stage keeps, per series, the start of the last window its
//!     watermark closed (for resampling, with that step's value, to fill the next gap) in a
//!     file in the state directory (`prep{i}-{kind}.state`); rows delivered again whose
//!     windows are that old are dropped and counted ([`WindowPrep::replayed_rows`]). A mark
//!     reaches the file only once every action acknowledged its window, and is synced
//!     before the window's input is acknowledged ([`Prep::take_acked_hook`]): a window
//!     whose delivery a crash or a stop cut short is not marked, so the replay rebuilds it. The restarted process thus emits exactly the
//!     windows an uninterrupted run would have (plus, at least once, windows emitted just
//!     before the crash whose acknowledgement had not reached the source: the same rows,
//!     the same values). A mark is forgotten once the stage watermark is two windows (plus
//!     lateness and out-of-orderness, plus the steps a gap may be filled with) past it. To
//!     process old data again on purpose (offsets reset, a stream re-read), delete the file.
//!   - *Rebalance, takeover.* A revoked partition's offsets stay uncommitted while its rows
//!     wait in open windows, so the new owner reads them again and emits those windows. The
//!     old owner still emits them too when they close, with the rows it had: a window
//!     cannot give back the rows of one partition. The marks are per process (its state
//!     directory), so the new owner, or a Redis Streams consumer taking over a dead one's
//!     entries, can emit a second, partial copy of a window the old owner emitted.
//!   - *Failed actions.* Nacked, the batches whose rows emitted windows hold would come
//!     back late and be dropped, and the windows lost. So the pipeline does not nack
//!     emitted windows: the action stage retries a retryable failure with backoff (the
//!     source waits meanwhile), dead-letters the window rows whole on a permanent one, and
//!     at a stop abandons their input, not yet marked, for the replay to rebuild them.
//! - **Gauges** of the stage: `smartcloudops_window_late_rows_total`,
//!   `…_out_of_range_rows_total`, `…_tracked_series`, `…_held_rows`, `…_early_windows_total`,
//!   `…_replayed_rows_total`.
//! - **Event-time arithmetic** cannot overflow: window bounds are computed in `i128` and
//!   saturate at the ends of `i64`; a row too near `i64::MIN` for any window holding it to
//!   start is dropped and counted ([`WindowPrep::out_of_range_rows`]).
//!
//! Resampling is a tumbling window of `step` with one aggregation, `last` or `mean`, that
//! keeps the metric's name and stamps rows at the window's start. Irregular series thus come
//! out one row per step, and a detector sees regular series; with `fill = "previous"`, steps
//! missing between two samples repeat the previous value (up to `max_fill` steps a gap, at
//! most 10 000).

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use self::marks::Marks;
use super::{AckedHook, Prep, PrepConfig};
use crate::component::{BuildContext, ComponentConfig};
use crate::error::{Error, Problems, Result};
use crate::schema::{MetricsBatchBuilder, MetricsColumns, TIME_ZONE, metrics_schema};

/// An aggregation of a window's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Sum.
    Sum,
    /// Number of values.
    Count,
    /// The value with the latest event time.
    Last,
    /// Median.
    P50,
    /// 90th percentile.
    P90,
    /// 95th percentile.
    P95,
    /// 99th percentile.
    P99,
}

impl Aggregation {
    fn name(self) -> &'static str {
        match self {
            Aggregation::Avg => "avg",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::Last => "last",
            Aggregation::P50 => "p50",
            Aggregation::P90 => "p90",
            Aggregation::P95 => "p95",
            Aggregation::P99 => "p99",
        }
    }

    fn quantile(self) -> Option<f64> {
        match self {
            Aggregation::P50 => Some(0.5),
            Aggregation::P90 => Some(0.9),
            Aggregation::P95 => Some(0.95),
            Aggregation::P99 => Some(0.99),
            _ => None,
        }
    }
}

/// What happens to a row that arrives after all its windows were emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Drop it and count it.
    #[default]
    Drop,
    /// Fail the batch (the pipeline dead-letters it with the reason).
    Fail,
    /// Send the late rows to the dead-letter output (a side output, with the reason) and
    /// pass the rest of the batch on.
    DeadLetter,
}

/// `[[prep]] type = "window"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Window length.
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    /// For sliding windows: how often a window starts (at most `size`). Tumbling when absent.
    #[serde(default, with = "humantime_serde")]
    pub slide: Option<Duration>,
    /// Aggregations, one output row each per window.
    #[serde(default = "default_aggregations")]
    pub aggregations: Vec<Aggregation>,
    /// How far behind the latest event time rows may still arrive in order.
    #[serde(default, with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// How long after the watermark passed a window's end it stays open for late rows.
    #[serde(default, with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Rows later than that.
    #[serde(default)]
    pub late: LatePolicy,
    /// When no row arrives for this long (processing time), the watermark moves on with the
    /// wall clock, so the windows of a source gone quiet still close. Off by default: a
    /// replay's event time has nothing to do with the wall clock.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// When the pipeline holds acknowledgements (a source that replays what was not
    /// acknowledged: Kafka, Redis Streams), at most this many input rows may wait in open
    /// windows for their acknowledgement; past it the oldest windows are emitted early, with
    /// the rows they have, and counted ([`WindowPrep::early_windows`], and a warning); their
    /// later rows open them again. Keep it below the source's `max_unacked`,
    /// which otherwise stops reading while the windows wait for rows it will not read.
    #[serde(default = "default_max_held_rows")]
    pub max_held_rows: usize,
}

fn default_max_held_rows() -> usize {
    50_000
}

fn default_aggregations() -> Vec<Aggregation> {
    vec![Aggregation::Avg]
}

impl WindowConfig {
    /// Tumbling windows of `size` with the average.
    pub fn tumbling(size: Duration) -> Self {
        Self {
            size,
            slide: None,
            aggregations: default_aggregations(),
            max_out_of_orderness: Duration::ZERO,
            allowed_lateness: Duration::ZERO,
            late: LatePolicy::Drop,
            idle_timeout: None,
            max_held_rows: default_max_held_rows(),
        }
    }

    /// Configuration problems, as `(field, message)`.
    pub fn problems(&self) -> Problems {
        let mut out = Problems::new();
        if self.size.as_millis() == 0 {
            out.push("size", "must be at least 1ms");
        }
        if let Some(slide) = self.slide {
            if slide.as_millis() == 0 || slide > self.size {
                out.push("slide", "must be at least 1ms and at most `size`");
            } else if self.size.as_millis() / slide.as_millis() > 1000 {
                out.push("slide", "at most 1000 windows may overlap");
            }
        }
        if self.aggregations.is_empty() {
            out.push("aggregations", "name at least one");
        }
        if self
            .idle_timeout
            .is_some_and(|t| t < Duration::from_millis(10))
        {
            out.push("idle_timeout", "must be at least 10ms");
        }
        if self.max_held_rows == 0 {
            out.push("max_held_rows", "must be at least 1");
        }
        out
    }
}

/// The two resampling methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResampleMethod {
    /// The last value in each step.
    #[default]
    Last,
    /// The mean of the values in each step.
    Mean,
}

/// `[[prep]] type = "resample"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResampleConfig {
    /// The fixed step.
    #[serde(with = "humantime_serde")]
    pub step: Duration,
    /// How a step's values become one.
    #[serde(default)]
    pub method: ResampleMethod,
    /// As for windows.
    #[serde(default, with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// Steps without a sample between two that have one: left out (`none`), or given the
    /// previous step's value (`previous`).
    #[serde(default)]
    pub fill: FillPolicy,
    /// At most this many steps are filled in one gap; a longer gap is left as it is (the
    /// series was down, and a straight line would hide that).
    #[serde(default = "default_max_fill")]
    pub max_fill: u32,
    /// As for windows.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// As for windows.
    #[serde(default = "default_max_held_rows")]
    pub max_held_rows: usize,
}

fn default_max_fill() -> u32 {
    10
}

/// Most steps one gap may be filled with: each is an output row.
const MAX_FILL: u32 = 10_000;

impl ResampleConfig {
    /// Resampling to `step` with `last`, no out-of-orderness and no filling.
    pub fn new(step: Duration) -> Self {
        Self {
            step,
            method: ResampleMethod::Last,
            max_out_of_orderness: Duration::ZERO,
            fill: FillPolicy::None,
            max_fill: default_max_fill(),
            idle_timeout: None,
            max_held_rows: default_max_held_rows(),
        }
    }
}

/// How a resampled series' missing steps are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillPolicy {
    /// Missing steps stay missing.
    #[default]
    None,
    /// Missing steps repeat the previous step's value.
    Previous,
}

#[derive(Debug, Default, Clone)]
struct Acc {
    /// The input (its position among the batches given to `process`) that opened the window:
    /// the pipeline holds that input's acknowledgement, and every later one's, until the
    /// window is emitted.
    first_input: u64,
    /// Emitted before its watermark closed it (`max_held_rows`): later rows open it again.
    early: bool,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    last: (i64, f64),
    values: Vec<f64>,
}

impl Acc {
    fn opened_by(first_input: u64) -> Self {
        Self {
            first_input,
            ..Self::default()
        }
    }

    fn add(&mut self, ts: i64, v: f64, keep_values: bool) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
            self.last = (ts, v);
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if ts >= self.last.0 {
            self.last = (ts, v);
        }
        if keep_values {
            self.values.push(v);
        }
    }

    fn value(&mut self, agg: Aggregation) -> f64 {
        match agg {
            Aggregation::Avg => self.sum / self.count as f64,
            Aggregation::Min => self.min,
            Aggregation::Max => self.max,
            Aggregation::Sum => self.sum,
            Aggregation::Count => self.count as f64,
            Aggregation::Last => self.last.1,
            _ => {
                let q = agg.quantile().unwrap_or(0.5);
                self.values.sort_by(f64::total_cmp);
                // Nearest rank.
                let rank =
                    ((q * self.values.len() as f64).ceil() as usize).clamp(1, self.values.len());
                self.values[rank - 1]
            }
        }
    }
}

/// Windows per series. See the [module docs](self).
#[derive(Debug)]
pub struct WindowPrep {
    name: String,
    size: i64,
    slide: i64,
    aggregations: Vec<Aggregation>,
    ooo: i64,
    lateness: i64,
    late: LatePolicy,
    max_held_rows: usize,
    /// Resample: keep the metric name and stamp rows at the window start.
    resample: bool,
    keep_values: bool,
    /// The series with open windows (and, until the next round, those whose windows just
    /// closed): their windows, names and event time.
    series: FxHashMap<u64, SeriesWindows>,
    /// The stage's watermark: the upper median of the series' watermarks at the last round.
    /// It closes the windows of series gone quiet and starts new series off; one series (or
    /// any minority) dated far ahead cannot move it.
    stage_watermark: Option<i64>,
    /// Rows since the last round; a round comes once there were as many as series, so its
    /// cost (a pass over the series) is constant per row.
    rows_since_round: usize,
    late_rows: u64,
    out_of_range_rows: u64,
    /// Late rows set aside for the dead-letter output (`late = "dead_letter"`).
    rejected: Option<MetricsBatchBuilder>,
    /// Resample gap filling: the last step emitted per series and its value.
    fill: FillPolicy,
    max_fill: i64,
    last_step: HashMap<u64, (i64, f64)>,
    idle: Option<Idle>,
    /// Inputs given to `process` so far: the next one's position.
    inputs: u64,
    /// Open windows by the input that opened them: the first key is the oldest input of
    /// which the stage holds rows ([`Prep::oldest_retained_input`]).
    open_by_input: BTreeMap<u64, usize>,
    /// Set once the pipeline holds acknowledgements for this stage ([`Prep::acks_held`]).
    held: Option<HeldInputs>,
    /// With held acknowledgements: per series, the last window emitted, kept in a file.
    marks: Option<Marks>,
    replayed_rows: u64,
}

/// The inputs whose acknowledgements the pipeline holds for this stage, and the bound on
/// their rows.
#[derive(Debug)]
struct HeldInputs {
    max_rows: usize,
    /// Position and row count of each input not yet released, oldest first.
    inputs: std::collections::VecDeque<(u64, usize)>,
    rows: usize,
    early_windows: u64,
}

/// One series: its open windows, output names and event time.
#[derive(Debug)]
struct SeriesWindows {
    names: SeriesNames,
    /// Open windows by start.
    windows: BTreeMap<i64, Acc>,
    /// The series' largest event time.
    max_ts: Option<i64>,
    /// The watermark the stage imposed: when the series was new, or went quiet while the
    /// others moved on. Its windows ending (plus `allowed_lateness`) by then are closed.
    floor: i64,
    /// Whether a row came since the last round.
    seen: bool,
}

impl SeriesWindows {
    /// The series' watermark: its largest event time minus `max_out_of_orderness`, or what
    /// the stage imposed if that is later.
    fn watermark(&self, ooo: i64) -> i64 {
        self.max_ts
            .map_or(i64::MIN, |t| t.saturating_sub(ooo))
            .max(self.floor)
    }
}

/// Watermark advance while the source is quiet.
#[derive(Debug)]
struct Idle {
    timeout: Duration,
    /// When the last row arrived.
    quiet_since: std::time::Instant,
    /// Wall-clock time up to which the watermarks have been advanced.
    advanced_to: std::time::Instant,
}

/// The names and ids of a series' output rows.
#[derive(Debug)]
struct SeriesNames {
    labels: Vec<(String, String)>,
    /// Per aggregation, in configuration order: output metric name and series id.
    outputs: Vec<(String, u64)>,
}

impl SeriesNames {
    fn new(
        metric: &str,
        labels: Vec<(String, String)>,
        aggregations: &[Aggregation],
        resample: bool,
        series: u64,
    ) -> Self {
        let outputs = aggregations
            .iter()
            .map(|agg| {
                if resample {
                    (metric.to_owned(), series)
                } else {
                    let name = format!("{metric}_{}", agg.name());
                    let id = crate::schema::series_id(&name, &labels);
                    (name, id)
                }
            })
            .collect();
        Self { labels, outputs }
    }
}

/// What a `window` stage emits: the canonical metrics columns, then `window_start` and
/// `window_end`.
pub fn window_schema() -> SchemaRef {
    let mut fields: Vec<Field> = metrics_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let ts_type = DataType::Timestamp(TimeUnit::Millisecond, Some(TIME_ZONE.into()));
    fields.push(Field::new("window_start", ts_type.clone(), false));
    fields.push(Field::new("window_end", ts_type, false));
    Arc::new(Schema::new(fields))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A closed window of one series, ready to be emitted.
type Closed = (i64, u64, Acc);

/// A window opened by the input at `first_input` was closed.
fn window_left(open_by_input: &mut BTreeMap<u64, usize>, first_input: u64) {
    if let std::collections::btree_map::Entry::Occupied(mut open) = open_by_input.entry(first_input)
    {
        *open.get_mut() -= 1;
        if *open.get() == 0 {
            open.remove();
        }
    }
}

impl WindowPrep {
    /// Windows as configured.
    pub fn new(config: &WindowConfig) -> Result<Self> {
        if let Some(e) = config.problems().into_iter().next() {
            return Err(Error::schema(
                "prep:window",
                format!("{}: {}", e.path, e.message),
            ));
        }
        let size = ms(config.size);
        Ok(Self {
            name: "window".into(),
            size,
            slide: config.slide.map_or(size, ms),
            keep_values: config.aggregations.iter().any(|a| a.quantile().is_some()),
            aggregations: config.aggregations.clone(),
            ooo: ms(config.max_out_of_orderness),
            lateness: ms(config.allowed_lateness),
            late: config.late,
            resample: false,
            series: FxHashMap::default(),
            stage_watermark: None,
            rows_since_round: 0,
            late_rows: 0,
            out_of_range_rows: 0,
            rejected: None,
            fill: FillPolicy::None,
            max_fill: 0,
            last_step: HashMap::new(),
            idle: config.idle_timeout.map(|timeout| Idle {
                timeout,
                quiet_since: std::time::Instant::now(),
                advanced_to: std::time::Instant::now(),
            }),
            inputs: 0,
            open_by_input: BTreeMap::new(),
            held: None,
            marks: None,
            replayed_rows: 0,
            max_held_rows: config.max_held_rows,
        })
    }

    /// Resampling as configured.
    pub fn resample(config: &ResampleConfig) -> Result<Self> {
        if let Some(e) = ComponentConfig::problems(config).into_iter().next() {
            return Err(Error::schema(
                "prep:resample",
                format!("{}: {}", e.path, e.message),
            ));
        }
        let mut w = Self::new(&WindowConfig {
            max_out_of_orderness: config.max_out_of_orderness,
            idle_timeout: config.idle_timeout,
            max_held_rows: config.max_held_rows,
            aggregations: vec![match config.method {
                ResampleMethod::Last => Aggregation::Last,
                ResampleMethod::Mean => Aggregation::Avg,
            }],
            ..WindowConfig::tumbling(config.step)
        })?;
        w.name = "resample".into();
        w.resample = true;
        w.fill = config.fill;
        w.max_fill = i64::from(config.max_fill);
        Ok(w)
    }

    /// Rows dropped for arriving after their windows were emitted.
    pub fn late_rows(&self) -> u64 {
        self.late_rows
    }

    /// Rows dated so near the ends of time (`i64::MIN` milliseconds, say) that no window
    /// holding them can be represented; dropped.
    pub fn out_of_range_rows(&self) -> u64 {
        self.out_of_range_rows
    }

    /// Windows emitted before their watermark closed them because the rows waiting for
    /// acknowledgement reached `max_held_rows` (each with the rows it had; the window's later
    /// rows come out again when it closes).
    pub fn early_windows(&self) -> u64 {
        self.held.as_ref().map_or(0, |h| h.early_windows)
    }

    /// Rows dropped because a window holding them had been emitted before a restart (the
    /// source delivered them again after a crash).
    pub fn replayed_rows(&self) -> u64 {
        self.replayed_rows
    }

    /// Input rows whose acknowledgement waits for an open window of this stage (0 unless the
    /// pipeline holds acknowledgements).
    pub fn held_rows(&self) -> usize {
        self.held.as_ref().map_or(0, |h| h.rows)
    }

    /// Series the stage keeps names for: those with an open window, and until the next
    /// round those whose windows just closed.
    pub fn tracked_series(&self) -> usize {
        self.series.len()
    }

    /// Whether the window at `start` is closed at `watermark`: its end plus
    /// `allowed_lateness` is not after it. In `i128`, so no sum overflows.
    fn is_closed(&self, start: i64, watermark: i64) -> bool {
        i128::from(start) + i128::from(self.size) + i128::from(self.lateness)
            <= i128::from(watermark)
    }

    /// Moves the windows of `series` that are closed at its watermark to `out`.
    fn close_series(&mut self, series: u64, out: &mut Vec<Closed>) {
        let (ooo, size, lateness) = (self.ooo, self.size, self.lateness);
        let Some(state) = self.series.get_mut(&series) else {
            return;
        };
        let watermark = state.watermark(ooo);
        // Closed: start + size + lateness <= watermark.
        let last_closed = i128::from(watermark) - i128::from(size) - i128::from(lateness);
        if last_closed < i128::from(i64::MIN) {
            return;
        }
        let still_open = match i64::try_from(last_closed + 1) {
            Ok(first_open) => state.windows.split_off(&first_open),
            Err(_) => BTreeMap::new(), // past the end of time: all closed
        };
        let closed = std::mem::replace(&mut state.windows, still_open);
        for acc in closed.values() {
            window_left(&mut self.open_by_input, acc.first_input);
        }
        out.extend(closed.into_iter().map(|(start, acc)| (start, series, acc)));
    }

    /// Records the input of `rows` rows at `position` as held, lets go of the inputs no open
    /// window holds rows of, and, while more than `max_held_rows` rows are held, closes the
    /// windows opened by the oldest held input (they go to `out`, emitted early).
    fn hold_input(&mut self, position: u64, rows: usize, out: &mut Vec<Closed>) {
        let Some(held) = self.held.as_mut() else {
            return;
        };
        held.inputs.push_back((position, rows));
        held.rows = held.rows.saturating_add(rows);
        loop {
            self.release_inputs();
            let Some(held) = self.held.as_ref() else {
                return;
            };
            let Some(&oldest) = self.open_by_input.keys().next() else {
                return;
            };
            if held.rows <= held.max_rows {
                return;
            }
            // The windows the oldest input opened are emitted now, with the rows they have:
            // later rows of the same windows open them again, to be emitted in turn.
            let before = out.len();
            for (id, state) in &mut self.series {
                let early: Vec<i64> = state
                    .windows
                    .iter()
                    .filter(|(_, acc)| acc.first_input == oldest)
                    .map(|(start, _)| *start)
                    .collect();
                for start in early {
                    if let Some(mut acc) = state.windows.remove(&start) {
                        window_left(&mut self.open_by_input, acc.first_input);
                        acc.early = true;
                        out.push((start, *id, acc));
                    }
                }
            }
            let emitted = (out.len() - before) as u64;
            if let Some(held) = self.held.as_mut() {
                held.early_windows += emitted;
                tracing::warn!(
                    stage = %self.name,
                    windows = emitted,
                    held_rows = held.rows,
                    max_held_rows = held.max_rows,
                    "windows emitted early: too many input rows wait for their acknowledgement \
                     (raise max_held_rows and the source's max_unacked, or shorten the window)"
                );
            }
            if emitted == 0 {
                return; // cannot happen (the oldest input opened a window); never spin
            }
        }
    }

    /// Forgets the held inputs older than every open window's first input.
    fn release_inputs(&mut self) {
        let oldest = self.open_by_input.keys().next().copied();
        let Some(held) = self.held.as_mut() else {
            return;
        };
        while let Some(&(position, rows)) = held.inputs.front() {
            if oldest.is_some_and(|oldest| position >= oldest) {
                break;
            }
            held.inputs.pop_front();
            held.rows = held.rows.saturating_sub(rows);
        }
    }

    /// Once there were as many rows as series since the last one: the stage watermark
    /// becomes the upper median of the series' watermarks, series that sent nothing since
    /// the last round have their windows closed at it, and series without open windows are
    /// forgotten.
    fn round(&mut self, out: &mut Vec<Closed>) {
        self.rows_since_round = 0;
        if self.series.is_empty() {
            return;
        }
        let ooo = self.ooo;
        let mut marks: Vec<i64> = self.series.values().map(|s| s.watermark(ooo)).collect();
        let middle = marks.len() / 2;
        let (_, median, _) = marks.select_nth_unstable(middle);
        let stage = self.stage_watermark.map_or(*median, |w| w.max(*median));
        self.stage_watermark = Some(stage);
        let quiet: Vec<u64> = self
            .series
            .iter_mut()
            .filter_map(|(id, s)| {
                let quiet = !s.seen;
                s.seen = false;
                if quiet {
                    s.floor = s.floor.max(stage);
                }
                quiet.then_some(*id)
            })
            .collect();
        for series in quiet {
            self.close_series(series, out);
        }
        if let Some(marks) = self.marks.as_mut() {
            // Rows delivered again after a crash are of windows near the stage watermark;
            // a mark two windows (and the lateness and out-of-orderness) behind it, plus
            // the steps a gap may be filled with, is no longer needed.
            let horizon = self
                .size
                .saturating_add(self.lateness)
                .saturating_add(self.ooo)
                .saturating_mul(2)
                .saturating_add((self.max_fill + 1).saturating_mul(self.size));
            marks.forget_up_to(stage.saturating_sub(horizon));
        }
        if self.fill == FillPolicy::Previous {
            // Every step still to be emitted ends after `stage - lateness`, and a gap is
            // filled only up to `max_fill` steps: a last step further back than that is never
            // needed again.
            let horizon = (self.max_fill + 2)
                .saturating_mul(self.size)
                .saturating_add(self.lateness);
            self.last_step
                .retain(|_, (start, _)| start.saturating_add(horizon) > stage);
        }
    }

    /// Forgets series without open windows (after their closed windows were emitted: they
    /// need their names until then). A new row brings a series back.
    fn forget_closed_series(&mut self) {
        self.series.retain(|_, s| !s.windows.is_empty());
    }

    /// Appends the output rows of one closed window of one series.
    fn emit_window(
        &mut self,
        (start, series, mut acc): Closed,
        out: &mut MetricsBatchBuilder,
        starts: &mut Vec<i64>,
        ends: &mut Vec<i64>,
    ) {
        let end = start.saturating_add(self.size);
        let Some(state) = self.series.get(&series) else {
            return;
        };
        let names = &state.names;
        for (&agg, (metric, id)) in self.aggregations.iter().zip(&names.outputs) {
            let value = acc.value(agg);
            if let Some(marks) = self.marks.as_mut().filter(|_| !acc.early) {
                marks.set(series, start, value);
            }
            if self.resample {
                if self.fill == FillPolicy::Previous {
                    if let Some(&(previous, last)) = self.last_step.get(&series) {
                        // In i128: the two steps may be the ends of time apart.
                        let missing =
                            (i128::from(start) - i128::from(previous)) / i128::from(self.size) - 1;
                        if (1..=i128::from(self.max_fill)).contains(&missing) {
                            // Every filled step lies between `previous` and `start`.
                            let mut step = previous;
                            for _ in 0..missing {
                                step = step.saturating_add(self.size);
                                out.push_with_id(step, metric, &names.labels, last, *id);
                                starts.push(step);
                                ends.push(step.saturating_add(self.size));
                            }
                        }
                    }
                    self.last_step.insert(series, (start, value));
                }
                out.push_with_id(start, metric, &names.labels, value, *id);
            } else {
                out.push_with_id(end, metric, &names.labels, value, *id);
            }
            starts.push(start);
            ends.push(end);
        }
    }

    /// The output batch of `closed` windows: in order of their start, then of series id, so
    /// the output does not depend on hashing.
    fn emit(&mut self, mut closed: Vec<Closed>) -> Result<RecordBatch> {
        closed.sort_unstable_by_key(|(start, series, _)| (*start, *series));
        let mut out = MetricsBatchBuilder::with_capacity(closed.len() * self.aggregations.len());
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        for window in closed {
            self.emit_window(window, &mut out, &mut starts, &mut ends);
        }
        let batch = out.finish();
        if self.resample {
            return Ok(batch);
        }
        let ts = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMillisecondArray::from(v).with_timezone(TIME_ZONE))
        };
        let mut columns = batch.columns().to_vec();
        columns.push(ts(starts));
        columns.push(ts(ends));
        Ok(RecordBatch::try_new(window_schema(), columns)?)
    }
}

impl Prep for WindowPrep {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let position = self.inputs;
        self.inputs += 1;
        let stage = format!("prep:{}", self.name);
        let cols = MetricsColumns::try_new(batch, &stage)?;
        let (size, slide) = (i128::from(self.size), i128::from(self.slide));
        // Windows holding one time: at most `size / slide` (checked to be at most 1000).
        let overlap = (size - 1) / slide + 1;
        let mut touched = Vec::new();
        for row in 0..batch.num_rows() {
            let ts = cols.ts.value(row);
            let value = cols.value.value(row);
            let series = cols.series_id.value(row);
            let watermark = match self.series.get(&series) {
                Some(state) => state.watermark(self.ooo),
                None => self.stage_watermark.unwrap_or(i64::MIN),
            };
            // The windows holding `ts`: starts `k * slide` with start <= ts < start + size,
            // in i128 (a start near the ends of time need not fit in an i64).
            let last_start = i128::from(ts).div_euclid(slide) * slide;
            let Ok(newest) = i64::try_from(last_start) else {
                self.out_of_range_rows += 1;
                continue; // before the first window an i64 can start
            };
            if self.is_closed(newest, watermark) {
                match self.late {
                    LatePolicy::Drop => {
                        self.late_rows += 1;
                        continue;
                    }
                    LatePolicy::DeadLetter => {
                        self.late_rows += 1;
                        self.rejected
                            .get_or_insert_with(MetricsBatchBuilder::default)
                            .push_with_id(ts, cols.metric(row), &cols.labels(row), value, series);
                        continue;
                    }
                    LatePolicy::Fail => {
                        return Err(Error::schema(
                            stage,
                            format!(
                                "row at {} arrived after its windows closed",
                                crate::schema::format_ts(ts)
                            ),
                        ));
                    }
                }
            }
            // Rows delivered again after a restart whose windows were emitted before it.
            let mark = self
                .marks
                .as_ref()
                .and_then(|m| m.get(series))
                .map(|(start, _)| start);
            if mark.is_some_and(|mark| newest <= mark) {
                self.replayed_rows += 1;
                continue;
            }
            if !value.is_finite() {
                continue; // a window of numbers: NaN and infinities do not aggregate
            }
            let floor = self.stage_watermark.unwrap_or(i64::MIN);
            let state = self.series.entry(series).or_insert_with(|| SeriesWindows {
                names: SeriesNames::new(
                    cols.metric(row),
                    cols.labels(row),
                    &self.aggregations,
                    self.resample,
                    series,
                ),
                windows: BTreeMap::new(),
                max_ts: None,
                floor,
                seen: true,
            });
            state.seen = true;
            for k in 0..overlap {
                let start = last_start - k * slide;
                let Ok(start) = i64::try_from(start) else {
                    break;
                };
                let open = start.saturating_add(self.size) > ts
                    && i128::from(start) + size + i128::from(self.lateness) > i128::from(watermark)
                    && mark.is_none_or(|mark| start > mark);
                if open {
                    let open_by_input = &mut self.open_by_input;
                    state
                        .windows
                        .entry(start)
                        .or_insert_with(|| {
                            *open_by_input.entry(position).or_default() += 1;
                            Acc::opened_by(position)
                        })
                        .add(ts, value, self.keep_values);
                }
            }
            if state.max_ts.is_none_or(|m| ts > m) {
                state.max_ts = Some(ts);
                touched.push(series);
            }
        }
        if let Some(idle) = self.idle.as_mut().filter(|_| batch.num_rows() > 0) {
            let now = std::time::Instant::now();
            idle.quiet_since = now;
            idle.advanced_to = now;
        }
        // Each series' windows close at its own watermark.
        touched.sort_unstable();
        touched.dedup();
        let mut closed = Vec::new();
        for series in touched {
            self.close_series(series, &mut closed);
        }
        self.rows_since_round = self.rows_since_round.saturating_add(batch.num_rows());
        let round = self.rows_since_round >= self.series.len().max(1);
        if round {
            self.round(&mut closed);
        }
        self.hold_input(position, batch.num_rows(), &mut closed);
        let out = self.emit(closed)?;
        if round {
            self.forget_closed_series();
        }
        Ok(out)
    }

    fn retains_rows(&self) -> bool {
        true
    }

    fn gauges(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("window_late_rows_total", self.late_rows as f64),
            (
                "window_out_of_range_rows_total",
                self.out_of_range_rows as f64,
            ),
            ("window_tracked_series", self.series.len() as f64),
            ("window_held_rows", self.held_rows() as f64),
            ("window_early_windows_total", self.early_windows() as f64),
            ("window_replayed_rows_total", self.replayed_rows as f64),
        ]
    }

    fn oldest_retained_input(&self) -> Option<u64> {
        self.open_by_input.keys().next().copied()
    }

    fn acks_held(&mut self, state: &std::path::Path) -> Result<()> {
        self.held.get_or_insert_with(|| HeldInputs {
            max_rows: self.max_held_rows,
            inputs: std::collections::VecDeque::new(),
            rows: 0,
            early_windows: 0,
        });
        let marks = crate::util::run_blocking(|| Marks::open(state))?;
        if self.resample && self.fill == FillPolicy::Previous {
            // Gaps after the restart are filled from the last steps emitted before it.
            self.last_step.extend(marks.iter());
        }
        self.marks = Some(marks);
        Ok(())
    }

    fn take_acked_hook(&mut self) -> Option<AckedHook> {
        let commit = self.marks.as_mut()?.take_commit()?;
        Some(Box::new(move || crate::util::run_blocking(commit)))
    }

    fn take_rejected(&mut self) -> Option<(RecordBatch, String)> {
        let rows = self.rejected.take()?.finish();
        Some((
            rows,
            "late: arrived after its series' watermark passed the end of its windows plus \
             allowed_lateness"
                .to_owned(),
        ))
    }

    fn tick_interval(&self) -> Option<Duration> {
        self.idle
            .as_ref()
            .map(|idle| (idle.timeout / 2).max(Duration::from_millis(5)))
    }

    fn tick(&mut self) -> Result<Option<RecordBatch>> {
        let Some(idle) = self.idle.as_mut() else {
            return Ok(None);
        };
        let now = std::time::Instant::now();
        if now.duration_since(idle.quiet_since) < idle.timeout {
            return Ok(None);
        }
        // Quiet for `timeout`: event time is taken to have moved on with the wall clock since
        // the last row (or the last advance), for every series.
        let elapsed = ms(now.duration_since(idle.advanced_to));
        idle.advanced_to = now;
        if self.series.is_empty() {
            return Ok(None);
        }
        self.stage_watermark = self.stage_watermark.map(|w| w.saturating_add(elapsed));
        let mut ids = Vec::with_capacity(self.series.len());
        for (id, state) in &mut self.series {
            state.max_ts = state.max_ts.map(|t| t.saturating_add(elapsed));
            state.floor = state.floor.saturating_add(elapsed);
            ids.push(*id);
        }
        let mut closed = Vec::new();
        for series in ids {
            self.close_series(series, &mut closed);
        }
        self.release_inputs();
        let batch = self.emit(closed)?;
        self.forget_closed_series();
        Ok((batch.num_rows() > 0).then_some(batch))
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        self.open_by_input.clear();
        self.release_inputs();
        let closed: Vec<Closed> = self
            .series
            .iter_mut()
            .flat_map(|(id, state)| {
                std::mem::take(&mut state.windows)
                    .into_iter()
                    .map(|(start, acc)| (start, *id, acc))
            })
            .collect();
        if closed.is_empty() {
            return Ok(None);
        }
        let batch = self.emit(closed)?;
        self.series.clear();
        Ok(Some(batch))
    }
}

impl ComponentConfig for WindowConfig {
    fn problems(&self) -> Problems {
        WindowConfig::problems(self)
    }
}

impl PrepConfig for WindowConfig {
    fn build(&self, _ctx: &BuildContext, _input: &SchemaRef) -> Result<Box<dyn Prep>> {
        Ok(Box::new(WindowPrep::new(self)?))
    }

    fn output_schema(&self, _input: &SchemaRef) -> Result<SchemaRef, Problems> {
        Ok(window_schema())
    }
}

impl ComponentConfig for ResampleConfig {
    fn problems(&self) -> Problems {
        // Resampling is a tumbling window of `step`: the same checks, under its own names.
        let window = WindowConfig {
            idle_timeout: self.idle_timeout,
            max_held_rows: self.max_held_rows,
            ..WindowConfig::tumbling(self.step)
        };
        let renamed = window
            .problems()
            .into_iter()
            .map(|mut e| {
                if e.path == "size" {
                    e.path = "step".into();
                }
                e
            })
            .collect::<Vec<_>>();
        let mut problems = Problems(renamed);
        problems.check(
            self.max_fill <= MAX_FILL,
            "max_fill",
            format!("must be at most {MAX_FILL}, got {}", self.max_fill),
            "a longer gap is an outage: leave it unfilled",
        );
        problems
    }
}

impl PrepConfig for ResampleConfig {
    fn build(&self, _ctx: &BuildContext, _input: &SchemaRef) -> Result<Box<dyn Prep>> {
        Ok(Box::new(WindowPrep::resample(self)?))
    }

    fn output_schema(&self, _input: &SchemaRef) -> Result<SchemaRef, Problems> {
        Ok(metrics_schema())
    }
}

mod marks;
#[cfg(test)]
mod tests;
