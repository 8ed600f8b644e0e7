//! The transform task: preps, the detector and alerts, between the source's queue and the
//! actions' queue; detector snapshots and state handoff; rows preps hold back.
//!
//! **Held acknowledgements.** A prep that retains rows (open windows) would otherwise let its
//! input be acknowledged as soon as the rows entered a window, and a crash would lose the
//! window. When the source replays what was not acknowledged, each input batch's
//! acknowledgement is held, in order, until the stage reports that no open window holds rows
//! of it ([`Prep::oldest_retained_input`]); the acknowledgements it releases are joined
//! ([`Ack::all`]) into the acknowledgement of the batch the stage emits, which the actions
//! resolve. At a shutdown (or a failed source) the open windows are not emitted and their
//! held acknowledgements are abandoned ([`Ack::abandon`]), so the source delivers their rows
//! again after a restart without counting a failure; only at the end of a finite input are
//! they emitted and acknowledged.
//!
//! **Emitted rows are not replayable.** Their input's rows would come back late, so a batch
//! out of such a stage is marked so for the actions ([`Scored::replayable`]), which retry it
//! rather than nack it, and is never dropped at a full queue. The stage's emissions are
//! passed on in order ([`Emissions`]): an emission's input acknowledgements, and its hook
//! ([`Prep::take_acked_hook`]: the window marks), wait for every earlier emission.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;

use super::builder::SnapshotFile;
use super::handoff::StateHandoff;
use super::run::{Pending, Scored, send_with_policy, unsent_reason};
use super::state_flush::recv_or_flush;
use super::{PipelineMetrics, StageMetrics, WhenFull};
use crate::ack::{Ack, AckOutcome, Nack, NackKind};
use crate::action::{ActionInput, Alert};
use crate::dead_letter::{DeadLetterQueue, DeadLetterSink};
use crate::detector::Detector;
use crate::error::{Error, Result};
use crate::prep::{AckedHook, Prep};
use crate::source::Origin;

pub(super) struct TransformTask {
    pub(super) rx: mpsc::Receiver<Pending>,
    /// The source's name, the origin of rows preps release on their own.
    pub(super) source_name: String,
    pub(super) tx: mpsc::Sender<Scored>,
    pub(super) preps: Vec<(Box<dyn Prep>, Arc<StageMetrics>)>,
    pub(super) detector: Option<(Box<dyn Detector>, Arc<StageMetrics>)>,
    /// The snapshot file and when it was last written.
    pub(super) snapshot: Option<(SnapshotFile, Instant)>,
    /// Per-series states kept in a store outside the process.
    pub(super) handoff: Option<StateHandoff>,
    /// When the stages' gauges were last published.
    pub(super) gauges_at: Option<Instant>,
    pub(super) dead_letters: Arc<dyn DeadLetterSink>,
    pub(super) has_every_batch_action: bool,
    pub(super) has_actions: bool,
    pub(super) policy: WhenFull,
    /// The first transform stage: its metrics carry the depth of the queue from the source.
    pub(super) queue_stage: Arc<StageMetrics>,
    /// The last transform stage: it is charged with rows dropped at the action queue.
    pub(super) last_stage: Arc<StageMetrics>,
    pub(super) action_queue_stage: Arc<StageMetrics>,
    pub(super) metrics: Arc<PipelineMetrics>,
    pub(super) holding: AckHolding,
    /// Per prep, the acknowledgements it holds; filled in when the task starts.
    pub(super) held: Vec<Option<HeldAcks>>,
}

/// Whether acknowledgements of rows in open windows are held, and what decides their fate
/// when the pipeline stops.
pub(super) struct AckHolding {
    /// The source delivers again what was not acknowledged: hold them.
    pub(super) replays: bool,
    /// The pipeline's durable state directory, for the stages that hold rows.
    pub(super) state_dir: PathBuf,
    /// Set by the source task when the input ended (rather than a shutdown or an error).
    pub(super) input_ended: Arc<AtomicBool>,
}

/// The acknowledgements of the input batches of one prep whose rows it may still hold, in
/// the order of its inputs, and those of its emissions not yet passed on.
#[derive(Debug, Default)]
pub(super) struct HeldAcks {
    /// The position of the stage's next input.
    next: u64,
    acks: VecDeque<(u64, Ack)>,
    emissions: Emissions,
}

impl HeldAcks {
    /// Holds the acknowledgement of the input the stage is given now.
    fn hold(&mut self, ack: Ack) {
        self.acks.push_back((self.next, ack));
        self.next += 1;
    }

    /// The acknowledgement of the rows the stage just emitted: it releases the
    /// acknowledgements of every input before `oldest` (all when `None`) and runs `hook`
    /// ([`Prep::take_acked_hook`]), in emission order (see [`Emissions`]).
    fn emit(
        &mut self,
        oldest: Option<u64>,
        hook: Option<AckedHook>,
        stage: &Arc<StageMetrics>,
    ) -> Ack {
        let mut released = Vec::new();
        while let Some((position, _)) = self.acks.front() {
            if oldest.is_some_and(|oldest| *position >= oldest) {
                break;
            }
            if let Some((_, ack)) = self.acks.pop_front() {
                released.push(ack);
            }
        }
        self.emissions.push(released, hook, stage.clone())
    }

    /// Abandons every held acknowledgement ([`Ack::abandon`]): their rows were not emitted.
    fn abandon(&mut self, why: &str) -> usize {
        let count = self.acks.len();
        for (_, ack) in self.acks.drain(..) {
            ack.abandon(why);
        }
        count
    }
}

/// The emissions of one holding stage whose outcome was not passed on yet, in order.
///
/// An emission's input acknowledgements are passed on, and its hook run, only once it and
/// every earlier emission of the stage were resolved: an input's rows may sit in a window
/// emitted before the one whose emission releases the input (a window opened earlier stayed
/// open), and a mark of a later window of a series would hide an earlier one from the
/// replay. So:
/// - an emission resolved while an earlier one is still out (an action retrying) waits;
/// - a failure is passed on to the emissions resolved with it: they are nacked too (the
///   most severe failure, as [`Ack`] joins them, but a permanent one only as retryable: it
///   was not theirs), and their hooks do not run;
/// - once an emission is abandoned (the pipeline stopped with it undelivered), every later
///   one is abandoned as well, delivered or not: the replay after the restart rebuilds
///   them all.
#[derive(Debug, Default)]
struct Emissions(Arc<Mutex<EmissionQueue>>);

#[derive(Default)]
struct EmissionQueue {
    /// The sequence number of the front of `waiting`.
    front: u64,
    waiting: VecDeque<Emission>,
    /// Set once an emission was abandoned.
    abandoned: Option<Nack>,
}

impl std::fmt::Debug for EmissionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmissionQueue")
            .field("front", &self.front)
            .field("waiting", &self.waiting.len())
            .field("abandoned", &self.abandoned.is_some())
            .finish()
    }
}

struct Emission {
    /// Known once the emitted rows were resolved.
    outcome: Option<AckOutcome>,
    inputs: Vec<Ack>,
    hook: Option<AckedHook>,
}

impl Emissions {
    /// Registers an emission releasing `inputs`; the acknowledgement of its rows.
    fn push(&self, inputs: Vec<Ack>, hook: Option<AckedHook>, stage: Arc<StageMetrics>) -> Ack {
        let mut queue = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let sequence = queue.front + queue.waiting.len() as u64;
        queue.waiting.push_back(Emission {
            outcome: None,
            inputs,
            hook,
        });
        drop(queue);
        let queue = self.0.clone();
        Ack::new(move |outcome| Emissions::resolved(&queue, sequence, outcome, &stage))
    }

    /// The emission at `sequence` was resolved with `outcome`: passes on every emission at
    /// the front whose outcome is known.
    fn resolved(
        queue: &Mutex<EmissionQueue>,
        sequence: u64,
        outcome: AckOutcome,
        stage: &StageMetrics,
    ) {
        let mut ready = Vec::new();
        {
            let mut queue = queue.lock().unwrap_or_else(|p| p.into_inner());
            let index = sequence.saturating_sub(queue.front) as usize;
            if let Some(emission) = queue.waiting.get_mut(index) {
                emission.outcome = Some(outcome);
            }
            // The failure of the emissions before, as the next one inherits it.
            let mut carried: Option<Nack> = queue.abandoned.clone();
            while queue.waiting.front().is_some_and(|e| e.outcome.is_some()) {
                let Some(emission) = queue.waiting.pop_front() else {
                    break;
                };
                queue.front += 1;
                let mut failure = carried.clone();
                if let Some(AckOutcome::Nacked(nack)) = &emission.outcome
                    && failure.as_ref().is_none_or(|f| nack.kind > f.kind)
                {
                    failure = Some(nack.clone());
                }
                if let Some(f) = &failure {
                    if f.kind == NackKind::Abandoned {
                        queue.abandoned = Some(f.clone());
                    }
                    // A later emission's own rows did not fail for good: its input must not
                    // count towards a poison limit.
                    let kind = f.kind.min(NackKind::Retryable);
                    carried = Some(Nack::new(kind, f.reason.clone()));
                }
                ready.push((emission, failure));
            }
        }
        // Outside the lock: a hook syncs a file, and the inputs' callbacks reach the source.
        for (emission, failure) in ready {
            match failure {
                None => {
                    if let Some(hook) = emission.hook
                        && let Err(e) = hook()
                    {
                        // The rows were delivered all the same (for windows: only a crash
                        // before the next successful save could emit them again).
                        stage.record_error();
                        tracing::error!(
                            stage = stage.name(),
                            "recording an acknowledged emission failed: {e}"
                        );
                    }
                    emission.inputs.into_iter().for_each(Ack::ack);
                }
                Some(nack) => {
                    for input in emission.inputs {
                        input.fail(nack.clone());
                    }
                }
            }
        }
    }
}

/// A prep or the detector failed on a batch; the batch goes to the dead-letter output.
struct StageFailure {
    stage: Arc<StageMetrics>,
    batch: RecordBatch,
    error: Error,
}

impl StageFailure {
    /// Sends the batch to the dead-letter output with the error (see [`dead_letter_batch`]).
    fn dead_letter(self, sink: &Arc<dyn DeadLetterSink>, ack: Ack) {
        dead_letter_batch(sink, &self.stage, &self.batch, &self.error, ack);
    }
}

pub(super) async fn transform_task(mut t: TransformTask) -> Result<()> {
    t.held = Vec::with_capacity(t.preps.len());
    for (i, (prep, stage)) in t.preps.iter_mut().enumerate() {
        let holds = t.holding.replays && prep.retains_rows();
        if holds {
            // By position and kind: the same stage of the same configuration finds it again.
            let state = t
                .holding
                .state_dir
                .join(format!("prep{i}-{}.state", prep.name()));
            prep.acks_held(&state)
                .inspect_err(|_| stage.record_error())?;
        }
        t.held.push(holds.then(HeldAcks::default));
    }
    let result = transform_loop(&mut t).await;
    // At shutdown, whatever ended the loop: the state learned so far is worth keeping.
    save_snapshot(&mut t);
    if let (Some(handoff), Some((detector, stage))) = (t.handoff.as_mut(), t.detector.as_mut()) {
        handoff.save_final(detector.as_mut(), stage).await;
    }
    publish_gauges(&mut t);
    result
}

/// How often the detector's state gauges are refreshed: `state_bytes` walks every series.
const DETECTOR_GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Publishes the preps' gauges ([`Prep::gauges`]) and the detector's memory accounting as
/// gauges of their stages: `smartcloudops_detector_series`, `…_detector_state_bytes`,
/// `…_detector_evicted_series`.
fn publish_gauges(t: &mut TransformTask) {
    for (prep, stage) in &t.preps {
        for (name, value) in prep.gauges() {
            stage.set_gauge(name, &[], value);
        }
    }
    t.gauges_at = Some(Instant::now());
    if let Some((detector, stage)) = &t.detector {
        stage.set_gauge("detector_series", &[], detector.series_count() as f64);
        stage.set_gauge("detector_state_bytes", &[], detector.state_bytes() as f64);
        stage.set_gauge(
            "detector_evicted_series",
            &[],
            detector.evicted_series() as f64,
        );
    }
}

/// Writes the detector's snapshot (temporary file, then rename). A failure is logged, not
/// fatal: scoring goes on, and the next save tries again. Encoding and writing block this
/// task (the detector cannot score meanwhile) but, on a multi-threaded runtime, not the
/// others: the source and the actions keep running.
fn save_snapshot(t: &mut TransformTask) {
    let (Some((file, last)), Some((detector, _))) = (t.snapshot.as_mut(), t.detector.as_ref())
    else {
        return;
    };
    *last = Instant::now();
    let started = Instant::now();
    let write = || -> Result<usize> {
        let bytes = detector.snapshot()?;
        let tmp = file.path.with_extension("tmp");
        if let Some(dir) = file.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, &file.path))
            .map_err(|e| Error::io(format!("saving {}", file.path.display()), e))?;
        Ok(bytes.len())
    };
    let written = crate::util::run_blocking(write);
    match written {
        Ok(bytes) => tracing::debug!(
            path = %file.path.display(),
            bytes,
            series = detector.series_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "detector snapshot saved"
        ),
        Err(e) => tracing::error!("detector snapshot not saved: {e}"),
    }
}

async fn transform_loop(t: &mut TransformTask) -> Result<()> {
    // Stages that release rows as time passes (idle watermark advance) are ticked on a fixed
    // period, whether batches arrive or not: a stage can be idle while the source is busy
    // (an earlier stage filters every row out).
    let tick_every = t.preps.iter().filter_map(|(p, _)| p.tick_interval()).min();
    let mut next_tick = tick_every.map(|every| tokio::time::Instant::now() + every);
    loop {
        if let (Some(every), Some(at)) = (tick_every, next_tick)
            && tokio::time::Instant::now() >= at
        {
            next_tick = Some(tokio::time::Instant::now() + every);
            if !release_held(t, Held::Tick).await {
                break;
            }
        }
        let next = match next_tick {
            Some(at) => match tokio::time::timeout_at(at, recv_or_flush(t)).await {
                Ok(next) => next,
                Err(_) => continue, // time to tick
            },
            None => recv_or_flush(t).await,
        };
        let Some(Pending { batch, ack, origin }) = next else {
            break;
        };
        t.queue_stage.queue_pop();
        if t.snapshot
            .as_ref()
            .is_some_and(|(file, last)| last.elapsed() >= file.every)
        {
            save_snapshot(t);
        }
        if t.gauges_at
            .is_none_or(|at| at.elapsed() >= DETECTOR_GAUGES_EVERY)
        {
            publish_gauges(t);
        }
        if let (Some(handoff), Some((detector, stage))) = (t.handoff.as_mut(), t.detector.as_mut())
            && handoff.save_due()
        {
            handoff.save(detector.as_mut(), stage).await;
        }
        let (batch, ack) = match run_preps(t, 0, batch, ack) {
            Ok(passed) => passed,
            Err((failure, ack)) => {
                failure.dead_letter(&t.dead_letters, ack);
                continue;
            }
        };
        // Rows that went through a stage holding acknowledgements are its windows' output:
        // their source could not rebuild them.
        let replayable = t.held.iter().all(Option::is_none);
        if !score_and_send(t, batch, ack, origin, replayable).await {
            break;
        }
    }
    if !t.holding.replays || t.holding.input_ended.load(Ordering::SeqCst) {
        release_held(t, Held::Flush).await;
    } else {
        abandon_held(t);
    }
    Ok(())
}

/// At a shutdown (or a failed source) with acknowledgements held: the open windows are not
/// emitted, and the batches whose rows they hold are nacked, so the source delivers them
/// again after a restart and the windows are rebuilt whole.
fn abandon_held(t: &mut TransformTask) {
    for ((_, stage), held) in t.preps.iter().zip(&mut t.held) {
        let Some(held) = held else {
            continue;
        };
        let batches =
            held.abandon("its rows were in open windows; delivered again after a restart");
        if batches > 0 {
            tracing::info!(
                stage = stage.name(),
                batches,
                "open windows not emitted at shutdown; their input is left unacknowledged"
            );
        }
    }
}

/// Runs the detector on a batch that went through the preps and hands it to the actions.
/// A batch that is not `replayable` (windows emitted from held input: nacked, its rows would
/// come back late) is never dropped at a full queue, and the actions retry it rather than
/// nack it ([`Scored::replayable`]). Returns false once the action stage is gone.
async fn score_and_send(
    t: &mut TransformTask,
    batch: RecordBatch,
    ack: Ack,
    origin: Origin,
    replayable: bool,
) -> bool {
    if let (Some(handoff), Some((detector, stage))) = (t.handoff.as_mut(), t.detector.as_mut()) {
        handoff.load_unknown(detector.as_mut(), stage, &batch).await;
    }
    let scored = match run_detector(t, batch) {
        Ok(scored) => scored,
        Err(failure) => {
            failure.dead_letter(&t.dead_letters, ack);
            return true;
        }
    };
    let alerts = match Alert::from_scored(&scored) {
        Ok(alerts) => alerts,
        Err(error) => {
            let stage = t
                .detector
                .as_ref()
                .map(|(_, m)| m.clone())
                .unwrap_or_else(|| t.queue_stage.clone());
            dead_letter_batch(&t.dead_letters, &stage, &scored, &error, ack);
            return true;
        }
    };
    t.metrics.record_alerts(alerts.len());
    if !t.has_actions || (alerts.is_empty() && !t.has_every_batch_action) {
        // Nothing downstream has work for this batch: it is fully handled.
        ack.ack();
        return true;
    }
    let rows = scored.num_rows();
    let item = Scored {
        input: Arc::new(ActionInput {
            batch: scored,
            alerts,
            origin,
        }),
        ack,
        replayable,
    };
    let policy = if replayable {
        t.policy
    } else {
        WhenFull::Block
    };
    send_with_policy(
        &t.tx,
        item,
        policy,
        &t.action_queue_stage,
        &t.last_stage,
        rows,
        |s| s.ack.nack(unsent_reason(policy)),
    )
    .await
}

/// Why held rows are released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The input ended: every open window.
    Flush,
    /// No batch for a while: what a stage releases as time passes.
    Tick,
}

/// Rows preps held back (open windows) go through the rest of the pipeline: at the end of the
/// input, or on a tick while the source is quiet. They carry the acknowledgements of the input
/// batches the stage let go of (held ones; none when the source does not replay). Returns
/// false once the action stage is gone.
async fn release_held(t: &mut TransformTask, why: Held) -> bool {
    for i in 0..t.preps.len() {
        let (released, ack) = {
            let (prep, stage) = &mut t.preps[i];
            let released = match why {
                Held::Flush => prep.flush(),
                Held::Tick => prep.tick(),
            };
            let ack = match &mut t.held[i] {
                Some(held) => {
                    held.emit(prep.oldest_retained_input(), prep.take_acked_hook(), stage)
                }
                None => Ack::none(),
            };
            match released {
                Ok(Some(batch)) if batch.num_rows() > 0 => {
                    stage.record_out(batch.num_rows(), Duration::ZERO);
                    (batch, ack)
                }
                Ok(_) => {
                    // Nothing emitted: the inputs let go of had only rows already emitted.
                    ack.ack();
                    continue;
                }
                Err(e) => {
                    stage.record_error();
                    tracing::error!(stage = stage.name(), "flushing held rows failed: {e}");
                    ack.nack_as(NackKind::of(&e), format!("flushing held rows failed: {e}"));
                    continue;
                }
            }
        };
        // The released rows go through the later stages as any batch does (counted in and
        // out, timed); on a failure the input of the failing stage is dead-lettered.
        let (batch, ack) = match run_preps(t, i + 1, released, ack) {
            Ok(passed) => passed,
            Err((failure, ack)) => {
                failure.dead_letter(&t.dead_letters, ack);
                continue;
            }
        };
        // Rows of many input batches: the source is known, the senders are not.
        let origin = Origin {
            source: t.source_name.clone(),
            via: Some(format!("released by {}", t.preps[i].1.name())),
            ..Origin::default()
        };
        let replayable = t.held[i..].iter().all(Option::is_none);
        if !score_and_send(t, batch, ack, origin, replayable).await {
            return false;
        }
    }
    true
}

/// Sends the rows a prep set aside (late rows) to the dead-letter output, one letter for
/// all of them.
fn dead_letter_rejected(
    sink: &Arc<dyn DeadLetterSink>,
    prep: &mut dyn Prep,
    stage: &Arc<StageMetrics>,
) -> Result<()> {
    let Some((rows, reason)) = prep.take_rejected() else {
        return Ok(());
    };
    if rows.num_rows() == 0 {
        return Ok(());
    }
    let queue = DeadLetterQueue::new(sink.clone(), stage.clone());
    queue.send(
        format!("{} rows set aside", rows.num_rows()),
        reason,
        crate::util::batch_to_json_lines(&rows),
    )?;
    stage.record_dead_lettered(rows.num_rows().saturating_sub(1));
    Ok(())
}

/// Runs one stage on `batch`, counting the rows in and out and the time it took; on an error
/// the stage's error count goes up and the batch it was given comes back for the dead-letter
/// output.
fn run_stage(
    stage: &Arc<StageMetrics>,
    batch: RecordBatch,
    process: impl FnOnce(&RecordBatch) -> Result<RecordBatch>,
) -> Result<RecordBatch, StageFailure> {
    let started = Instant::now();
    stage.record_in(batch.num_rows());
    match process(&batch) {
        Ok(out) => {
            stage.record_out(out.num_rows(), started.elapsed());
            Ok(out)
        }
        Err(error) => {
            stage.record_error();
            Err(StageFailure {
                stage: stage.clone(),
                batch,
                error,
            })
        }
    }
}

/// Runs the preps from the `from`-th on `batch`. A prep that retains rows holds the batch's
/// acknowledgement and passes on those it let go of; on a failure, the acknowledgement to
/// resolve comes back with the batch to dead-letter.
fn run_preps(
    t: &mut TransformTask,
    from: usize,
    mut batch: RecordBatch,
    mut ack: Ack,
) -> Result<(RecordBatch, Ack), (StageFailure, Ack)> {
    for ((prep, stage), held) in t.preps.iter_mut().zip(&mut t.held).skip(from) {
        // A cheap copy (shared arrays): the input is what gets dead-lettered if the rows the
        // prep set aside cannot be.
        let processed = run_stage(stage, batch.clone(), |b| prep.process(b));
        if let Some(held) = held {
            // Held even when the stage failed: rows before the failing one may be in windows.
            held.hold(ack);
            ack = held.emit(prep.oldest_retained_input(), prep.take_acked_hook(), stage);
        }
        let out = match processed {
            Ok(out) => out,
            Err(failure) => return Err((failure, ack)),
        };
        // Rows set aside go to the dead-letter output before the batch can be acked; if that
        // output fails, the whole batch fails (and is nacked if it fails too).
        if let Err(error) = dead_letter_rejected(&t.dead_letters, prep.as_mut(), stage) {
            let failure = StageFailure {
                stage: stage.clone(),
                batch,
                error,
            };
            return Err((failure, ack));
        }
        batch = out;
    }
    Ok((batch, ack))
}

fn run_detector(t: &mut TransformTask, batch: RecordBatch) -> Result<RecordBatch, StageFailure> {
    match &mut t.detector {
        Some((detector, stage)) => run_stage(stage, batch, |b| detector.score(b)),
        None => Ok(batch),
    }
}

/// Sends every row of a failed batch to the dead-letter output (one letter for the batch),
/// then acks it — or nacks it if the dead-letter output failed.
fn dead_letter_batch(
    sink: &Arc<dyn DeadLetterSink>,
    stage: &Arc<StageMetrics>,
    batch: &RecordBatch,
    error: &Error,
    ack: Ack,
) {
    let queue = DeadLetterQueue::new(sink.clone(), stage.clone());
    let payload = crate::util::batch_to_json_lines(batch);
    match queue.send(
        format!("batch of {} rows", batch.num_rows()),
        error.to_string(),
        payload,
    ) {
        Ok(()) => {
            // `send` counted one letter; the other rows of the batch went with it.
            stage.record_dead_lettered(batch.num_rows().saturating_sub(1));
            ack.ack();
        }
        // The batch's own error was handled by dead-lettering it; what failed is the
        // dead-letter output, so the nack has its kind.
        Err(e) => ack.nack_as(
            NackKind::of(&e),
            format!("{error}; and the dead-letter output failed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Arc<Mutex<Vec<String>>>;

    /// An input acknowledgement that records `name` and its outcome.
    fn input(seen: &Seen, name: &str) -> Ack {
        let (seen, name) = (seen.clone(), name.to_owned());
        Ack::new(move |outcome| {
            let what = match outcome.nack() {
                None => "acked".to_owned(),
                Some(nack) => nack.kind.to_string(),
            };
            seen.lock().unwrap().push(format!("{name} {what}"));
        })
    }

    /// A hook that records that it ran.
    fn hook(seen: &Seen, name: &str) -> Option<AckedHook> {
        let (seen, name) = (seen.clone(), name.to_owned());
        Some(Box::new(move || {
            seen.lock().unwrap().push(format!("{name} hook"));
            Ok(())
        }))
    }

    #[test]
    fn an_emission_waits_for_the_earlier_ones() {
        let seen = Seen::default();
        let stage = Arc::new(StageMetrics::new("prep:window"));
        let emissions = Emissions::default();
        let first = emissions.push(vec![input(&seen, "a")], hook(&seen, "first"), stage.clone());
        let second = emissions.push(
            vec![input(&seen, "b")],
            hook(&seen, "second"),
            stage.clone(),
        );
        let third = emissions.push(vec![input(&seen, "c")], hook(&seen, "third"), stage);
        second.ack();
        assert!(
            seen.lock().unwrap().is_empty(),
            "the first emission is still out: its rows may be in the second's input"
        );
        first.ack();
        assert_eq!(
            *seen.lock().unwrap(),
            ["first hook", "a acked", "second hook", "b acked"]
        );
        third.nack("503");
        assert_eq!(
            seen.lock().unwrap()[4..],
            ["c retryable"],
            "no hook for a failure"
        );
    }

    #[test]
    fn a_failure_is_passed_on_and_an_abandonment_sticks() {
        let seen = Seen::default();
        let stage = Arc::new(StageMetrics::new("prep:window"));
        let emissions = Emissions::default();
        let failing = emissions.push(vec![input(&seen, "a")], hook(&seen, "1"), stage.clone());
        let waiting = emissions.push(vec![input(&seen, "b")], hook(&seen, "2"), stage.clone());
        waiting.ack();
        failing.nack_permanent("400");
        assert_eq!(
            *seen.lock().unwrap(),
            ["a permanent", "b retryable"],
            "resolved with the failure before it, which is not its own fault"
        );
        seen.lock().unwrap().clear();
        let later = emissions.push(vec![input(&seen, "c")], hook(&seen, "3"), stage.clone());
        later.ack();
        assert_eq!(
            *seen.lock().unwrap(),
            ["3 hook", "c acked"],
            "a failure passes"
        );
        seen.lock().unwrap().clear();

        let stopped = emissions.push(vec![input(&seen, "d")], hook(&seen, "4"), stage.clone());
        stopped.abandon("stopping");
        let delivered = emissions.push(vec![input(&seen, "e")], hook(&seen, "5"), stage);
        delivered.ack();
        assert_eq!(
            *seen.lock().unwrap(),
            ["d abandoned", "e abandoned"],
            "after an abandoned emission nothing is marked or acknowledged"
        );
    }
}
