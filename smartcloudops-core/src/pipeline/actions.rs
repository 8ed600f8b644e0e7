//! The action task: runs every action on each scored batch, up to a number of batches at
//! once, and resolves the batch's ack when all of them finished. A failed action nacks its
//! share with its error's kind (retryable or permanent, [`NackKind::of`]).

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use super::StageMetrics;
use super::run::Scored;
use crate::ack::NackKind;
use crate::action::Action;
use crate::error::Result;

/// The actions of a pipeline with their stage metrics.
type ActionSlots = Arc<Vec<(Arc<dyn Action>, Arc<StageMetrics>)>>;

pub(super) async fn action_task(
    mut rx: mpsc::Receiver<Scored>,
    actions: Vec<(Arc<dyn Action>, Arc<StageMetrics>)>,
    concurrency: usize,
    queue_stage: Arc<StageMetrics>,
) -> Result<()> {
    let actions: ActionSlots = Arc::new(actions);
    let mut in_flight = FuturesUnordered::new();
    let mut closed = false;
    loop {
        tokio::select! {
            received = rx.recv(), if !closed && in_flight.len() < concurrency => match received {
                Some(scored) => {
                    queue_stage.queue_pop();
                    in_flight.push(run_actions(actions.clone(), scored));
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

async fn run_actions(actions: ActionSlots, scored: Scored) {
    let Scored { input, ack } = scored;
    let calls = actions.iter().map(|(action, stage)| {
        let share = ack.share();
        let input = &input;
        async move {
            let every = action.wants_every_batch();
            if !every && input.alerts.is_empty() {
                share.ack();
                return;
            }
            let rows = if every { input.batch.num_rows() } else { input.alerts.len() };
            stage.record_in(rows);
            let started = Instant::now();
            match action.execute(input).await {
                Ok(()) => {
                    stage.record_out(rows, started.elapsed());
                    share.ack();
                }
                Err(e) => {
                    stage.record_error();
                    stage.record_latency(started.elapsed());
                    // The error's kind goes with the nack: a source may give up on a batch
                    // that fails for good, never on one that met an outage.
                    let kind = NackKind::of(&e);
                    tracing::warn!(action = action.name(), error = %e, %kind, "action failed; batch nacked");
                    share.nack_as(kind, format!("action `{}`: {e}", action.name()));
                }
            }
        }
    });
    futures::future::join_all(calls).await;
    ack.ack();
}
