//! The pipeline runtime: source → prep → detector → actions, with acknowledgements,
//! backpressure, metrics and graceful shutdown.
//!
//! ```text
//!  source task ──[queue: capacity N]──▶ transform task ──[queue: capacity N]──▶ action task
//!  (poll stream)                         (preps, detector,                       (up to K batches,
//!                                         alerts)                                 every action)
//! ```
//!
//! - **Bounded queues** between the three tasks, each with a [`WhenFull`] policy. With the
//!   default [`WhenFull::Block`] a slow action stalls the transform task, which stalls the
//!   source: memory is bounded by `2 × capacity + concurrency + 2` batches (the `2` are
//!   the batches the source and transform tasks hold while they wait to send).
//! - **Ingestion check**: right after the source, rows dated outside the source's
//!   [`TimestampPolicy`](crate::source::TimestampPolicy) (too far behind or ahead of the wall
//!   clock) are dead-lettered with the reason, and the rest of their batch goes on.
//! - **Acknowledgement**: a batch's [`Ack`](crate::ack::Ack) is resolved after every action
//!   finished with it — or right after the detector when no action has anything to do. A prep
//!   or detector error dead-letters the batch (acked once stored); an action error nacks it.
//! - **Shutdown**: cancelling the token stops the source from being polled; queued and
//!   in-flight batches drain through every stage and are acknowledged. If draining takes longer
//!   than `shutdown_timeout`, the remaining tasks are aborted and their batches nacked.
//!
//! Inside: `builder` assembles a pipeline, `run` drives the source task and the drain,
//! `ingest` is the timestamp check,
//! `transform` and `actions` are the other two tasks, `handle` and `options` the public
//! handle, report and settings.

mod actions;
mod builder;
mod handle;
mod handoff;
mod ingest;
mod options;
mod run;
mod state_flush;
mod transform;

pub use crate::metrics;

use std::sync::Arc;

use self::builder::Parts;

pub use self::builder::PipelineBuilder;
pub use self::handle::{PipelineHandle, RunReport};
pub use self::metrics::{MetricsSnapshot, PipelineMetrics, StageMetrics, StageSnapshot};
pub use self::options::{DEFAULT_STATE_DIR, PipelineOptions, WhenFull};

/// An assembled pipeline, ready to [`run`](Pipeline::run) or [`spawn`](Pipeline::spawn).
#[derive(Debug)]
pub struct Pipeline {
    parts: Parts,
    stages: Stages,
    metrics: Arc<PipelineMetrics>,
}

/// The metrics of each stage, registered when the pipeline is built.
#[derive(Debug)]
struct Stages {
    source: Arc<StageMetrics>,
    preps: Vec<Arc<StageMetrics>>,
    detector: Option<Arc<StageMetrics>>,
    actions: Vec<Arc<StageMetrics>>,
}

impl Pipeline {
    /// The pipeline's metrics; the same object keeps updating while it runs.
    pub fn metrics(&self) -> Arc<PipelineMetrics> {
        self.metrics.clone()
    }
}
