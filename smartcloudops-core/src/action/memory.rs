//! [`MemoryAction`]: keeps what it receives in memory, the action-side counterpart of
//! [`MemoryDeadLetters`](crate::dead_letter::MemoryDeadLetters). For tests, examples and
//! embedders that read results back in the same process.

use std::sync::{Mutex, MutexGuard};

use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;

use super::{Action, ActionInput, Alert};
use crate::error::{Error, Result};

/// An [`Action`] that stores every [`ActionInput`] it receives.
///
/// By default it is called only for batches with alerts, like most actions;
/// [`every_batch`](Self::every_batch) makes it receive every scored batch.
///
/// ```
/// use std::sync::Arc;
/// use smartcloudops_core::action::{Action, ActionInput, MemoryAction};
/// use smartcloudops_core::schema::MetricsBatchBuilder;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> smartcloudops_core::Result<()> {
/// let memory = Arc::new(MemoryAction::new().every_batch());
/// let mut rows = MetricsBatchBuilder::default();
/// rows.push(0, "cpu", &[("host", "a")], 1.0);
/// memory.execute(&ActionInput::new(rows.finish(), Vec::new())).await?;
/// assert_eq!(memory.batches().len(), 1);
/// assert!(memory.alerts().is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct MemoryAction {
    every_batch: bool,
    received: Mutex<Vec<ActionInput>>,
}

impl MemoryAction {
    /// An action that keeps the batches with alerts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also receive (and keep) batches without alerts.
    pub fn every_batch(mut self) -> Self {
        self.every_batch = true;
        self
    }

    /// Stores `input` now, without awaiting: for actions in tests that record what they
    /// were given before deciding how to answer.
    pub fn record(&self, input: &ActionInput) -> Result<()> {
        self.lock()?.push(input.clone());
        Ok(())
    }

    /// A copy of every input received so far, in the order received.
    pub fn inputs(&self) -> Vec<ActionInput> {
        self.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Every batch received so far, in the order received.
    pub fn batches(&self) -> Vec<RecordBatch> {
        self.lock()
            .map(|r| r.iter().map(|input| input.batch.clone()).collect())
            .unwrap_or_default()
    }

    /// Every alert received so far, in the order received.
    pub fn alerts(&self) -> Vec<Alert> {
        self.lock()
            .map(|r| {
                r.iter()
                    .flat_map(|input| input.alerts.iter().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rows received so far, over all batches.
    pub fn row_count(&self) -> usize {
        self.lock()
            .map(|r| r.iter().map(|input| input.batch.num_rows()).sum())
            .unwrap_or_default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Vec<ActionInput>>> {
        self.received.lock().map_err(|_| Error::Action {
            action: "memory".into(),
            message: "memory action lock poisoned".into(),
            retryable: false,
        })
    }
}

impl Action for MemoryAction {
    fn name(&self) -> &str {
        "memory"
    }

    fn wants_every_batch(&self) -> bool {
        self.every_batch
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        let stored = self.record(input);
        Box::pin(async move { stored })
    }
}
