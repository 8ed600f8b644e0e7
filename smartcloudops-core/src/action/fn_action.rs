//! [`FnAction`]: an [`Action`] from a closure, the counterpart of
//! `prep::FnPrep`.

use std::fmt;

use futures::future::BoxFuture;

use super::{Action, ActionInput};
use crate::error::Result;

/// An [`Action`] from a synchronous closure, for pipelines assembled in code (counters,
/// test doubles, quick sinks). The closure runs when the pipeline calls the action; its
/// `Err` nacks the batch.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use smartcloudops_core::action::{Action, FnAction};
///
/// let rows = AtomicUsize::new(0);
/// let count = FnAction::new("count", move |input| {
///     rows.fetch_add(input.batch.num_rows(), Ordering::Relaxed);
///     Ok(())
/// })
/// .every_batch();
/// assert_eq!(count.name(), "count");
/// assert!(count.wants_every_batch());
/// ```
pub struct FnAction<F> {
    name: String,
    every_batch: bool,
    f: F,
}

impl<F> FnAction<F>
where
    F: Fn(&ActionInput) -> Result<()> + Send + Sync,
{
    /// An action called `name` that runs `f` on every batch with alerts.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            every_batch: false,
            f,
        }
    }

    /// Run on batches without alerts too.
    pub fn every_batch(mut self) -> Self {
        self.every_batch = true;
        self
    }
}

impl<F> fmt::Debug for FnAction<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnAction")
            .field("name", &self.name)
            .field("every_batch", &self.every_batch)
            .finish()
    }
}

impl<F> Action for FnAction<F>
where
    F: Fn(&ActionInput) -> Result<()> + Send + Sync,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn wants_every_batch(&self) -> bool {
        self.every_batch
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        let done = (self.f)(input);
        Box::pin(async move { done })
    }
}
