//! Prep stages: batch → batch transformations before detection.
//!
//! A [`Prep`] gets every batch by reference and returns the batch to pass on (often a
//! filtered or extended copy; Arrow arrays are shared, not copied). An error dead-letters the
//! whole batch with the reason and the pipeline goes on.

pub mod filter;
#[cfg(feature = "sql")]
pub mod sql;
pub mod window;

use std::fmt;
use std::time::Duration;

use arrow::record_batch::RecordBatch;

use arrow::datatypes::SchemaRef;

use crate::component::{BuildContext, ComponentConfig};
use crate::error::{Problems, Result};

pub use self::filter::{MetricFilter, MetricFilterConfig};
#[cfg(feature = "sql")]
pub use self::sql::{ReferenceTable, SqlConfig, SqlPlanError, SqlPrep, TableFormat};
pub use self::window::{FillPolicy, ResampleConfig, WindowConfig, WindowPrep};

/// A `[[prep]]` kind's configuration: a serde struct that checks itself
/// ([`ComponentConfig`]) and builds its stage for the schema it will receive. Listed in the
/// registry (`config::Registry`) under its `type` name.
pub trait PrepConfig: ComponentConfig {
    /// Builds the stage for batches of `input` (the source's schema after the earlier preps).
    fn build(&self, ctx: &BuildContext, input: &SchemaRef) -> Result<Box<dyn Prep>>;

    /// The schema of the batches the stage emits for batches of `input`, or the problems
    /// that stop it from taking `input` at all (a query that does not plan against it).
    /// By default a stage passes its input schema on.
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, Problems> {
        Ok(input.clone())
    }
}

/// Work a stage that retains rows wants done once the rows it emitted were acknowledged
/// downstream ([`Prep::take_acked_hook`]). It runs on whichever thread resolved the emitted
/// batch's last share, and may block briefly (a file sync).
pub type AckedHook = Box<dyn FnOnce() -> Result<()> + Send>;

/// Transforms batches between the source and the detector.
pub trait Prep: Send + fmt::Debug {
    /// A short name for metrics and logs, e.g. `filter`.
    fn name(&self) -> &str;

    /// Transforms one batch.
    fn process(&mut self, batch: &RecordBatch) -> Result<RecordBatch>;

    /// At the end of the input: the rows the stage held back (open windows), as one last
    /// batch. By default a stage holds nothing back.
    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        Ok(None)
    }

    /// Rows the last [`process`](Self::process) set aside instead of passing on (late rows of
    /// a window with `late = "dead_letter"`), with the reason. The pipeline sends them to the
    /// dead-letter output before it acknowledges the batch.
    fn take_rejected(&mut self) -> Option<(RecordBatch, String)> {
        None
    }

    /// Whether rows of a batch can stay in the stage after [`process`](Self::process)
    /// returned (open windows). For such a stage, when the source replays what was not
    /// acknowledged (Kafka, Redis Streams), the pipeline holds each input batch's
    /// acknowledgement until [`oldest_retained_input`](Self::oldest_retained_input) says the
    /// stage let go of all its rows, then attaches it to the batch that carries them on; a
    /// crash thus loses no row that waited in the stage. By default a stage retains nothing.
    fn retains_rows(&self) -> bool {
        false
    }

    /// For a stage that [retains rows](Self::retains_rows): the position (counting the calls
    /// of [`process`](Self::process) from 0, failed ones included) of the oldest input batch
    /// some of whose rows the stage still holds; `None` when it holds none. Every input
    /// before it is released, so the acknowledgements are released in order, as the sources
    /// commit them.
    fn oldest_retained_input(&self) -> Option<u64> {
        None
    }

    /// Called once, before the first batch, when the pipeline holds the acknowledgements of
    /// the rows this stage [retains](Self::retains_rows). The stage then bounds what it holds
    /// back (its source stops reading at its own limit of unacknowledged input, and must not
    /// wait forever on rows the stage keeps). `state` is a path in the pipeline's state
    /// directory reserved for this stage (a file it may create), for what it needs to know
    /// after a restart: which rows its source delivers again were emitted already.
    fn acks_held(&mut self, state: &std::path::Path) -> Result<()> {
        let _ = state;
        Ok(())
    }

    /// For a stage whose acknowledgements are [held](Self::acks_held): what to do once the
    /// rows the last [`process`](Self::process), [`tick`](Self::tick) or
    /// [`flush`](Self::flush) emitted were acknowledged by everything downstream, before the
    /// acknowledgements of the input they carry reach the source. The window stage makes its
    /// marks of emitted windows durable there, so a window whose delivery failed or was cut
    /// short is rebuilt by the source's replay rather than taken for emitted. The pipeline
    /// takes it after each of those calls and runs it only if the emitted rows, and every
    /// earlier emission of the stage, were acknowledged; an error is logged. None by default.
    fn take_acked_hook(&mut self) -> Option<AckedHook> {
        None
    }

    /// The stage's counters and levels, published about once a second as gauges of its
    /// stage (`smartcloudops_<name>{stage="…"}`); none by default.
    fn gauges(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// How often the pipeline calls [`tick`](Self::tick) while no batch arrives; `None` (the
    /// default) for stages that never release rows on their own.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Called every [`tick_interval`](Self::tick_interval) while the source is quiet: the rows
    /// the stage releases because time moved on (windows closed by an idle source's
    /// watermark advance). They go through the rest of the pipeline like a batch.
    fn tick(&mut self) -> Result<Option<RecordBatch>> {
        Ok(None)
    }
}

/// A [`Prep`] from a closure, for pipelines assembled in code.
///
/// ```
/// use smartcloudops_core::prep::{FnPrep, Prep};
/// let mut identity = FnPrep::new("identity", |batch| Ok(batch.clone()));
/// assert_eq!(identity.name(), "identity");
/// ```
pub struct FnPrep<F> {
    name: String,
    f: F,
}

impl<F> FnPrep<F>
where
    F: FnMut(&RecordBatch) -> Result<RecordBatch> + Send,
{
    /// A prep called `name` that runs `f` on every batch.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

impl<F> fmt::Debug for FnPrep<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnPrep").field("name", &self.name).finish()
    }
}

impl<F> Prep for FnPrep<F>
where
    F: FnMut(&RecordBatch) -> Result<RecordBatch> + Send,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn process(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        (self.f)(batch)
    }
}
