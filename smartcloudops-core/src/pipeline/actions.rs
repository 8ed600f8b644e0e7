//! The action task: runs every action on each scored batch, up to a number of batches at
//! once, and resolves the batch's ack when all of them finished. A failed action nacks its
//! share with its error's kind (retryable or permanent, [`NackKind::of`]).
//!
//! **Batches their source cannot deliver again** (windows emitted from held input,
//! [`Scored::replayable`] false) are not nacked on a failure: their input's rows would come
//! back late and be dropped, and the windows would be lost. Instead, per failing action:
//! - a retryable error is retried with exponential backoff ([`FIRST_RETRY`] doubling up to
//!   [`MAX_RETRY`]) for as long as it lasts; the batch keeps its slot, so the queues fill and
//!   the source stalls, and memory stays bounded;
//! - a permanent error dead-letters the batch's rows whole, with the reason, then acks;
//! - once the pipeline stops (not at the end of a finite input, where the retries go on
//!   within `shutdown_timeout`), the retry stops and the share is abandoned
//!   ([`Ack::abandon`](crate::ack::Ack::abandon)): the windows were not marked emitted, so
//!   the source's replay after the restart rebuilds them.
//!
//! Actions that succeeded are not called again: only the failing one is retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::StageMetrics;
use super::run::Scored;
use crate::ack::{Ack, NackKind};
use crate::action::{Action, ActionInput};
use crate::dead_letter::{DeadLetterQueue, DeadLetterSink};
use crate::error::{Error, Result};

/// The first wait before an action is called again on a batch that is not replayable.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between two calls.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What the action stage needs for batches that are not replayable.
#[derive(Debug, Clone)]
pub(super) struct Unreplayable {
    /// Cancelled once the pipeline stops before the end of its input (a shutdown, a failed
    /// source): retries give up then. At the end of a finite input they go on, within
    /// `shutdown_timeout`.
    pub(super) stopping: CancellationToken,
    /// Where the rows go when an action rejects them for good.
    pub(super) dead_letters: Arc<dyn DeadLetterSink>,
}

/// The actions of a pipeline with their stage metrics.
type ActionSlots = Arc<Vec<(Arc<dyn Action>, Arc<StageMetrics>)>>;

pub(super) async fn action_task(
    mut rx: mpsc::Receiver<Scored>,
    actions: Vec<(Arc<dyn Action>, Arc<StageMetrics>)>,
    concurrency: usize,
    queue_stage: Arc<StageMetrics>,
    unreplayable: Unreplayable,
) -> Result<()> {
    let actions: ActionSlots = Arc::new(actions);
    let mut in_flight = FuturesUnordered::new();
    let mut closed = false;
    loop {
        tokio::select! {
            received = rx.recv(), if !closed && in_flight.len() < concurrency => match received {
                Some(scored) => {
                    queue_stage.queue_pop();
                    in_flight.push(run_actions(actions.clone(), scored, unreplayable.clone()));
                }
                None => closed = true,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            else => break,
        }
        if closed && in_flight.is_empty() {
            break;
        }
    }
    let mut first_error = None;
    for (action, stage) in actions.iter() {
        if let Err(e) = action.shutdown().await {
            stage.record_error();
            tracing::error!(action = action.name(), error = %e, "action failed to shut down");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn run_actions(actions: ActionSlots, scored: Scored, unreplayable: Unreplayable) {
    let Scored {
        input,
        ack,
        replayable,
    } = scored;
    let calls = actions.iter().map(|(action, stage)| {
        let share = ack.share();
        let input = &input;
        let unreplayable = &unreplayable;
        async move {
            let every = action.wants_every_batch();
            if !every && input.alerts.is_empty() {
                share.ack();
                return;
            }
            let rows = if every { input.batch.num_rows() } else { input.alerts.len() };
            stage.record_in(rows);
            let mut backoff = FIRST_RETRY;
            loop {
                let started = Instant::now();
                let e = match action.execute(input).await {
                    Ok(()) => {
                        stage.record_out(rows, started.elapsed());
                        share.ack();
                        return;
                    }
                    Err(e) => e,
                };
                stage.record_error();
                stage.record_latency(started.elapsed());
                // The error's kind goes with the nack: a source may give up on a batch
                // that fails for good, never on one that met an outage.
                let kind = NackKind::of(&e);
                let reason = format!("action `{}`: {e}", action.name());
                if replayable {
                    tracing::warn!(action = action.name(), error = %e, %kind, "action failed; batch nacked");
                    share.nack_as(kind, reason);
                    return;
                }
                if kind == NackKind::Permanent {
                    dead_letter_whole(stage, input, &e, &reason, share, unreplayable).await;
                    return;
                }
                tracing::warn!(
                    action = action.name(),
                    error = %e,
                    retry_in = ?backoff,
                    "action failed on emitted windows; retrying (their input cannot rebuild them)"
                );
                if !wait_or_stop(&unreplayable.stopping, &mut backoff).await {
                    share.abandon("the pipeline stopped while an action was failing on emitted windows");
                    return;
                }
            }
        }
    });
    futures::future::join_all(calls).await;
    ack.ack();
}

/// Waits `backoff` (then doubles it, up to [`MAX_RETRY`]); false if the pipeline stopped
/// first or had stopped already.
async fn wait_or_stop(stopping: &CancellationToken, backoff: &mut Duration) -> bool {
    if stopping.is_cancelled() {
        return false;
    }
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_RETRY);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = stopping.cancelled() => false,
    }
}

/// An action rejected a batch that is not replayable for good: its rows go to the
/// dead-letter output whole, with the reason, and the share is acked. A dead-letter output
/// that fails is retried like an action; at a stop the share is abandoned.
async fn dead_letter_whole(
    stage: &Arc<StageMetrics>,
    input: &ActionInput,
    error: &Error,
    reason: &str,
    share: Ack,
    unreplayable: &Unreplayable,
) {
    let queue = DeadLetterQueue::new(unreplayable.dead_letters.clone(), stage.clone());
    let rows = input.batch.num_rows();
    let payload = crate::util::batch_to_json_lines(&input.batch);
    let mut backoff = FIRST_RETRY;
    loop {
        match queue.send(
            format!("emitted windows, {rows} rows"),
            format!("{reason} (permanent; the rows cannot be delivered again)"),
            payload.clone(),
        ) {
            Ok(()) => {
                // `send` counted one letter; the other rows of the batch went with it.
                stage.record_dead_lettered(rows.saturating_sub(1));
                tracing::warn!(stage = stage.name(), error = %error, rows, "emitted windows dead-lettered");
                share.ack();
                return;
            }
            Err(e) => {
                tracing::error!(stage = stage.name(), error = %e, retry_in = ?backoff, "dead-lettering emitted windows failed; retrying");
                if !wait_or_stop(&unreplayable.stopping, &mut backoff).await {
                    share.abandon("the pipeline stopped while the dead-letter output was failing");
                    return;
                }
            }
        }
    }
}
