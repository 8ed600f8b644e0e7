//! A running pipeline: [`PipelineHandle`] and the [`RunReport`] it ends with.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{MetricsSnapshot, Pipeline, PipelineMetrics};
use crate::error::{Error, Result};

/// The result of a finished run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Metrics at the end of the run.
    pub metrics: MetricsSnapshot,
    /// Wall-clock duration of the run.
    pub elapsed: Duration,
    /// Whether draining hit `shutdown_timeout` and in-flight batches were abandoned (nacked).
    pub timed_out: bool,
}

/// A pipeline running on the tokio runtime. Dropping the handle aborts the pipeline (its
/// in-flight batches are nacked); call [`shutdown`](Self::shutdown) and
/// [`wait`](Self::wait) to drain instead.
#[derive(Debug)]
pub struct PipelineHandle {
    shutdown: CancellationToken,
    metrics: Arc<PipelineMetrics>,
    task: Option<tokio::task::JoinHandle<Result<RunReport>>>,
}

impl PipelineHandle {
    /// Asks the pipeline to stop taking input and drain.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The token that shuts the pipeline down when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Live metrics.
    pub fn metrics(&self) -> &Arc<PipelineMetrics> {
        &self.metrics
    }

    /// Waits for the pipeline to finish (the source ended, or a shutdown drained).
    pub async fn wait(mut self) -> Result<RunReport> {
        let task = self.task.take().expect("wait consumes the handle");
        task.await.map_err(|e| Error::Task(e.to_string()))?
    }
}

impl Drop for PipelineHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.shutdown.cancel();
            task.abort();
        }
    }
}

impl Pipeline {
    /// Runs on the current tokio runtime and returns a handle.
    pub fn spawn(self) -> PipelineHandle {
        let shutdown = CancellationToken::new();
        let metrics = self.metrics();
        let task = tokio::spawn(self.run(shutdown.clone()));
        PipelineHandle {
            shutdown,
            metrics,
            task: Some(task),
        }
    }
}
