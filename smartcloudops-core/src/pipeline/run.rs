//! Running a pipeline: the source task, the queues between the tasks and the drain at
//! shutdown. The transform and action tasks are in their own modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actions::{Unreplayable, action_task};
use super::builder::Parts;
use super::handoff::StateHandoff;
use super::ingest::accepted_rows;
use super::transform::{AckHolding, TransformTask, transform_task};
use super::{Pipeline, PipelineMetrics, RunReport, StageMetrics, WhenFull};
use crate::ack::{Ack, AckOutcome, NackKind};
use crate::action::ActionInput;
use crate::dead_letter::DeadLetterQueue;
use crate::error::{Error, Result};
use crate::source::{Origin, SourceContext, TimestampPolicy};

/// A batch between the source and the transform task.
pub(super) struct Pending {
    pub(super) batch: RecordBatch,
    pub(super) ack: Ack,
    pub(super) origin: Origin,
}

/// A batch between the transform task and the action task.
pub(super) struct Scored {
    pub(super) input: Arc<ActionInput>,
    pub(super) ack: Ack,
    /// Whether a nack lets the source deliver the rows again. False for windows emitted from
    /// held input: the actions retry those, or dead-letter them, rather than nack them.
    pub(super) replayable: bool,
}

/// Sends on a bounded queue according to the when-full policy. Returns `false` when the
/// receiver is gone (the stage downstream stopped).
pub(super) async fn send_with_policy<T>(
    tx: &mpsc::Sender<T>,
    item: T,
    policy: WhenFull,
    queue_of: &StageMetrics,
    dropper: &StageMetrics,
    rows: usize,
    nack: impl FnOnce(T),
) -> bool {
    // Reserve first, so the depth gauge counts the item before the receiver can pop it.
    let permit = match policy {
        WhenFull::Block => tx.reserve().await.map_err(|_| true),
        WhenFull::DropNewest => tx.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => false,
            mpsc::error::TrySendError::Closed(()) => true,
        }),
    };
    match permit {
        Ok(permit) => {
            queue_of.queue_push();
            permit.send(item);
            true
        }
        Err(closed) => {
            if !closed {
                dropper.record_dropped(rows);
            }
            nack(item);
            !closed
        }
    }
}

/// The source's name for [`Origin`]s: its stage's name without the `source:` prefix.
fn source_name(stage: &StageMetrics) -> String {
    let name = stage.name();
    name.strip_prefix("source:").unwrap_or(name).to_owned()
}

const QUEUE_FULL: &str = "dropped: pipeline queue full (when_full = drop_newest)";
const DOWNSTREAM_GONE: &str = "pipeline stage downstream stopped";

/// The nack reason for an item [`send_with_policy`] could not send: with
/// [`WhenFull::DropNewest`] the queue was full, with [`WhenFull::Block`] only a stopped stage
/// downstream refuses an item.
pub(super) fn unsent_reason(policy: WhenFull) -> &'static str {
    if policy == WhenFull::DropNewest {
        QUEUE_FULL
    } else {
        DOWNSTREAM_GONE
    }
}

impl Pipeline {
    /// Runs until the source ends or `shutdown` is cancelled, then drains.
    ///
    /// Returns the first fatal error (a failed source, a panicked task) after draining.
    /// Cancel safety: dropping this future aborts the pipeline's tasks; their batches are
    /// nacked, never acknowledged.
    pub async fn run(self, shutdown: CancellationToken) -> Result<RunReport> {
        let started = Instant::now();
        let Pipeline {
            parts:
                Parts {
                    source,
                    timestamps,
                    preps,
                    detector,
                    snapshot,
                    state_store,
                    actions,
                    dead_letters,
                    options,
                },
            stages,
            metrics,
        } = self;
        let handoff = state_store.and_then(|s| StateHandoff::new(s, detector.as_deref()));
        let mut source = source;
        if let Some(handoff) = &handoff {
            // A revoke saves the detector's states before the revoked offsets are committed.
            source.set_revoke_listener(handoff.revoke_listener());
        }
        let capacity = options.channel_capacity.max(1);
        let (pending_tx, pending_rx) = mpsc::channel::<Pending>(capacity);
        let (scored_tx, scored_rx) = mpsc::channel::<Scored>(capacity);

        let dead_letter_output = dead_letters.clone();
        let background = TaskTracker::new();
        let ctx = SourceContext {
            dead_letters: DeadLetterQueue::new(dead_letters.clone(), stages.source.clone()),
            shutdown: shutdown.clone(),
            tasks: background.clone(),
        };
        let refused = ctx.dead_letters.clone();
        let replays = source.replays_unacknowledged();
        let stream = source.open(ctx)?;
        // Set when the source's input ended (not a shutdown, not an error): windows still open
        // are emitted then, and acknowledged.
        let input_ended = Arc::new(AtomicBool::new(false));

        // The first stage after the source owns the source→transform queue's depth gauge.
        let transform_stage = stages
            .preps
            .first()
            .or(stages.detector.as_ref())
            .cloned()
            .unwrap_or_else(|| stages.source.clone());
        let action_queue_stage = stages
            .actions
            .first()
            .cloned()
            .unwrap_or_else(|| transform_stage.clone());

        // Cancelled when the source stops for any reason (end of input, shutdown, error):
        // from then on the pipeline is draining, and the drain is bounded by
        // `shutdown_timeout`.
        let draining = CancellationToken::new();
        let drain_started: Arc<std::sync::OnceLock<Instant>> = Arc::default();
        // Cancelled when the pipeline stops before the end of its input (a shutdown, a failed
        // source): the actions' retries of emitted windows give up then.
        let stopping = shutdown.child_token();
        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        {
            let draining = draining.clone();
            let stopping = stopping.clone();
            let ended = input_ended.clone();
            let source = source_task(
                stream,
                Ingest {
                    timestamps,
                    refused,
                    ended: input_ended.clone(),
                },
                pending_tx,
                shutdown.clone(),
                options.when_full,
                transform_stage.clone(),
                metrics.clone(),
            );
            tasks.spawn(async move {
                let result = source.await;
                if !ended.load(Ordering::SeqCst) {
                    stopping.cancel();
                }
                draining.cancel();
                result
            });
        }
        tasks.spawn(transform_task(TransformTask {
            rx: pending_rx,
            source_name: source_name(&stages.source),
            tx: scored_tx,
            preps: preps
                .into_iter()
                .zip(stages.preps.iter().cloned())
                .collect(),
            detector: detector.zip(stages.detector.clone()),
            snapshot: snapshot.map(|file| (file, Instant::now())),
            handoff,
            gauges_at: None,
            dead_letters,
            has_every_batch_action: actions.iter().any(|a| a.wants_every_batch()),
            has_actions: !actions.is_empty(),
            policy: options.when_full,
            last_stage: stages
                .detector
                .clone()
                .or_else(|| stages.preps.last().cloned())
                .unwrap_or_else(|| transform_stage.clone()),
            queue_stage: transform_stage,
            action_queue_stage: action_queue_stage.clone(),
            metrics: metrics.clone(),
            holding: AckHolding {
                replays,
                state_dir: options.state_dir.clone(),
                input_ended,
            },
            held: Vec::new(),
        }));
        tasks.spawn(action_task(
            scored_rx,
            actions
                .into_iter()
                .zip(stages.actions.iter().cloned())
                .collect(),
            options.action_concurrency.max(1),
            action_queue_stage,
            Unreplayable {
                stopping,
                dead_letters: dead_letter_output.clone(),
            },
        ));

        let mut first_error: Option<Error> = None;
        let mut timed_out = false;
        let deadline = async {
            // A shutdown request starts the clock even while the source is stuck sending.
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = draining.cancelled() => {}
            }
            let _ = drain_started.set(Instant::now());
            tokio::time::sleep(options.shutdown_timeout).await;
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        tracing::error!(error = %e, "pipeline stage failed");
                        first_error.get_or_insert(e);
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "pipeline task failed");
                        first_error.get_or_insert(Error::Task(e.to_string()));
                    }
                },
                () = &mut deadline => {
                    tracing::warn!(
                        timeout = ?options.shutdown_timeout,
                        "shutdown did not drain in time; abandoning in-flight batches (nacked)"
                    );
                    timed_out = true;
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        // Sources' background work (committing offsets, leaving a group) ends after the drain,
        // within what is left of `shutdown_timeout` — plus a second's grace to commit what
        // was acknowledged even when the drain itself ran out of time.
        background.close();
        let spent = drain_started.get().map_or(Duration::ZERO, Instant::elapsed);
        let left = options
            .shutdown_timeout
            .saturating_sub(spent)
            .max(Duration::from_secs(1));
        if tokio::time::timeout(left, background.wait()).await.is_err() {
            tracing::warn!("source background tasks did not finish within shutdown_timeout");
            timed_out = true;
        }
        if let Err(e) = dead_letter_output.flush() {
            tracing::error!(error = %e, "dead-letter output failed to flush");
            first_error.get_or_insert(e);
        }
        let report = RunReport {
            metrics: metrics.snapshot(),
            elapsed: started.elapsed(),
            timed_out,
        };
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// What the source task checks each batch against, where refused rows go (on behalf of the
/// source's stage, whose metrics it carries), and where it says that the input ended.
struct Ingest {
    timestamps: TimestampPolicy,
    refused: DeadLetterQueue,
    /// Set when the source's stream ended on its own (not at a shutdown or an error).
    ended: Arc<AtomicBool>,
}

async fn source_task(
    mut stream: crate::source::SourceStream,
    ingest: Ingest,
    tx: mpsc::Sender<Pending>,
    shutdown: CancellationToken,
    policy: WhenFull,
    queue_stage: Arc<StageMetrics>,
    metrics: Arc<PipelineMetrics>,
) -> Result<()> {
    let stage = ingest.refused.stage().clone();
    loop {
        let polled = Instant::now();
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = stream.next() => next,
        };
        let source_batch = match next {
            None => {
                ingest
                    .ended
                    .store(!shutdown.is_cancelled(), Ordering::SeqCst);
                break;
            }
            Some(Err(e)) => {
                stage.record_error();
                return Err(e);
            }
            Some(Ok(b)) => b,
        };
        let rows = source_batch.batch.num_rows();
        stage.record_in(rows);
        let outer = source_batch.ack;
        let mut origin = source_batch.origin;
        if origin.source.is_empty() {
            origin.source = source_name(&stage);
        }
        let batch = match accepted_rows(&ingest.timestamps, source_batch.batch, &ingest.refused) {
            Ok(batch) => batch,
            Err(e) => {
                // A refused row could not be stored: the source may deliver the batch again.
                metrics.record_outcome(false, rows);
                outer.nack_as(
                    NackKind::of(&e),
                    format!("dead-lettering rows with bad timestamps failed: {e}"),
                );
                continue;
            }
        };
        let kept = batch.num_rows();
        stage.record_out(kept, polled.elapsed());
        // The pipeline's own share of the ack counts the outcome, then passes it on.
        let counter = metrics.clone();
        let dead_letters = ingest.refused.clone();
        let ack = Ack::new(move |outcome| {
            counter.record_outcome(outcome.is_acked(), rows);
            match outcome {
                // What the batch dead-lettered is on disk before the source forgets the batch
                // (a no-op when nothing new was dead-lettered).
                AckOutcome::Acked => match dead_letters.flush() {
                    Ok(()) => outer.ack(),
                    Err(e) => outer.nack_as(
                        NackKind::of(&e),
                        format!("syncing the dead letters failed: {e}"),
                    ),
                },
                // Passed on whole: the source decides by the kind.
                AckOutcome::Nacked(nack) => outer.fail(nack),
            }
        });
        let pending = Pending { batch, ack, origin };
        let open = send_with_policy(&tx, pending, policy, &queue_stage, &stage, kept, |p| {
            p.ack.nack(unsent_reason(policy))
        })
        .await;
        if !open {
            break;
        }
    }
    // Dropping the stream here cancels the source; dropping `tx` lets the next stage drain.
    Ok(())
}
