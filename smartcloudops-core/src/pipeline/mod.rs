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
//! - **Acknowledgement**: a batch's [`Ack`] is resolved after every action
//!   finished with it — or right after the detector when no action has anything to do. A prep
//!   or detector error dead-letters the batch (acked once stored); an action error nacks it.
//! - **Shutdown**: cancelling the token stops the source from being polled; queued and
//!   in-flight batches drain through every stage and are acknowledged. If draining takes longer
//!   than `shutdown_timeout`, the remaining tasks are aborted and their batches nacked.

mod handoff;
pub use crate::metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ack::{Ack, AckOutcome};
use crate::action::{Action, ActionInput, Alert};
use crate::dead_letter::{DeadLetterQueue, DeadLetterSink, LogDeadLetters};
use crate::detector::{Detector, SeriesStateStore};

use self::handoff::{StateHandoff, StateStoreSettings};
use crate::error::{Error, Result};
use crate::prep::Prep;
use crate::source::{Source, SourceContext};

pub use self::metrics::{MetricsSnapshot, PipelineMetrics, StageMetrics, StageSnapshot};

/// What a stage does when the queue to the next stage is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: backpressure reaches the source. Nothing is lost.
    #[default]
    Block,
    /// Drop the new batch, count its rows as dropped and nack it to its source (which may
    /// redeliver it). For live feeds where freshness beats completeness.
    DropNewest,
}

/// Runtime settings of a pipeline (`[runtime]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineOptions {
    /// Batches each inter-stage queue holds.
    pub channel_capacity: usize,
    /// What happens when a queue is full.
    pub when_full: WhenFull,
    /// Batches the action stage works on at once.
    pub action_concurrency: usize,
    /// How long a shutdown may drain before in-flight batches are abandoned (and nacked).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            channel_capacity: 8,
            when_full: WhenFull::Block,
            action_concurrency: 4,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// An assembled pipeline, ready to [`run`](Pipeline::run) or [`spawn`](Pipeline::spawn).
#[derive(Debug)]
pub struct Pipeline {
    source: Box<dyn Source>,
    preps: Vec<Box<dyn Prep>>,
    detector: Option<Box<dyn Detector>>,
    snapshot: Option<SnapshotFile>,
    state_store: Option<StateStoreSettings>,
    actions: Vec<Arc<dyn Action>>,
    dead_letters: Arc<dyn DeadLetterSink>,
    options: PipelineOptions,
    stages: Stages,
    metrics: Arc<PipelineMetrics>,
}

#[derive(Debug)]
struct Stages {
    source: Arc<StageMetrics>,
    preps: Vec<Arc<StageMetrics>>,
    detector: Option<Arc<StageMetrics>>,
    actions: Vec<Arc<StageMetrics>>,
}

/// Builds a [`Pipeline`] from its parts.
#[derive(Debug)]
pub struct PipelineBuilder {
    source: Box<dyn Source>,
    preps: Vec<Box<dyn Prep>>,
    detector: Option<Box<dyn Detector>>,
    snapshot: Option<SnapshotFile>,
    state_store: Option<StateStoreSettings>,
    actions: Vec<Arc<dyn Action>>,
    dead_letters: Arc<dyn DeadLetterSink>,
    options: PipelineOptions,
}

/// Where and how often the detector's state is saved.
#[derive(Debug, Clone)]
struct SnapshotFile {
    path: std::path::PathBuf,
    every: Duration,
}

impl PipelineBuilder {
    /// Adds a prep stage; preps run in the order added.
    pub fn prep(mut self, prep: impl Prep + 'static) -> Self {
        self.preps.push(Box::new(prep));
        self
    }

    /// Adds a boxed prep stage.
    pub fn boxed_prep(mut self, prep: Box<dyn Prep>) -> Self {
        self.preps.push(prep);
        self
    }

    /// Sets the detector.
    pub fn detector(mut self, detector: impl Detector + 'static) -> Self {
        self.detector = Some(Box::new(detector));
        self
    }

    /// Sets a boxed detector.
    pub fn boxed_detector(mut self, detector: Box<dyn Detector>) -> Self {
        self.detector = Some(detector);
        self
    }

    /// Saves the detector's [snapshot](Detector::snapshot) to `path` every `every` and when
    /// the pipeline stops (written to a temporary file, then renamed, so a crash mid-write
    /// leaves the previous snapshot intact). Restoring is the caller's part, before
    /// [`detector`](Self::detector): see [`Detector::restore`].
    pub fn detector_snapshot(mut self, path: std::path::PathBuf, every: Duration) -> Self {
        self.snapshot = Some(SnapshotFile { path, every });
        self
    }

    /// Keeps the detector's per-series states in `store`: series a batch brings that the
    /// detector does not hold are looked up there before the batch is scored, and the states
    /// that changed are saved every `every` and at shutdown. See [`SeriesStateStore`].
    pub fn series_state_store(mut self, store: Arc<dyn SeriesStateStore>, every: Duration) -> Self {
        self.state_store = Some(StateStoreSettings { store, every });
        self
    }

    /// Adds an action; all actions see every batch that has alerts.
    pub fn action(mut self, action: impl Action + 'static) -> Self {
        self.actions.push(Arc::new(action));
        self
    }

    /// Adds a shared action.
    pub fn shared_action(mut self, action: Arc<dyn Action>) -> Self {
        self.actions.push(action);
        self
    }

    /// Where dead letters go (default: logged as warnings).
    pub fn dead_letters(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.dead_letters = sink;
        self
    }

    /// Runtime options.
    pub fn options(mut self, options: PipelineOptions) -> Self {
        self.options = options;
        self
    }

    /// The pipeline, with its metrics registered.
    pub fn build(self) -> Pipeline {
        let mut names: Vec<String> = Vec::new();
        let mut stage = |kind: &str, name: &str| {
            let base = format!("{kind}:{name}");
            let n = names.iter().filter(|existing| **existing == base).count();
            names.push(base.clone());
            let unique = if n == 0 {
                base
            } else {
                format!("{base}#{}", n + 1)
            };
            Arc::new(StageMetrics::new(unique))
        };
        let stages = Stages {
            source: stage("source", self.source.name()),
            preps: self.preps.iter().map(|p| stage("prep", p.name())).collect(),
            detector: self.detector.as_ref().map(|d| stage("detector", d.name())),
            actions: self
                .actions
                .iter()
                .map(|a| stage("action", a.name()))
                .collect(),
        };
        let mut all = vec![stages.source.clone()];
        all.extend(stages.preps.iter().cloned());
        all.extend(stages.detector.iter().cloned());
        all.extend(stages.actions.iter().cloned());
        Pipeline {
            source: self.source,
            preps: self.preps,
            detector: self.detector,
            snapshot: self.snapshot,
            state_store: self.state_store,
            actions: self.actions,
            dead_letters: self.dead_letters,
            options: self.options,
            stages,
            metrics: Arc::new(PipelineMetrics::new(all)),
        }
    }
}

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

/// The actions of a pipeline with their stage metrics.
type ActionSlots = Arc<Vec<(Arc<dyn Action>, Arc<StageMetrics>)>>;

/// A batch between the source and the transform task.
struct Pending {
    batch: RecordBatch,
    ack: Ack,
}

/// A batch between the transform task and the action task.
struct Scored {
    input: Arc<ActionInput>,
    ack: Ack,
}

/// Sends on a bounded queue according to the when-full policy. Returns `false` when the
/// receiver is gone (the stage downstream stopped).
async fn send_with_policy<T>(
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

const QUEUE_FULL: &str = "dropped: pipeline queue full (when_full = drop_newest)";
const DOWNSTREAM_GONE: &str = "pipeline stage downstream stopped";

impl Pipeline {
    /// Starts building a pipeline that reads from `source`.
    pub fn builder(source: impl Source + 'static) -> PipelineBuilder {
        Self::builder_boxed(Box::new(source))
    }

    /// Starts building a pipeline from a boxed source.
    pub fn builder_boxed(source: Box<dyn Source>) -> PipelineBuilder {
        PipelineBuilder {
            source,
            preps: Vec::new(),
            detector: None,
            snapshot: None,
            state_store: None,
            actions: Vec::new(),
            dead_letters: Arc::new(LogDeadLetters),
            options: PipelineOptions::default(),
        }
    }

    /// The pipeline's metrics; the same object keeps updating while it runs.
    pub fn metrics(&self) -> Arc<PipelineMetrics> {
        self.metrics.clone()
    }

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

    /// Runs until the source ends or `shutdown` is cancelled, then drains.
    ///
    /// Returns the first fatal error (a failed source, a panicked task) after draining.
    /// Cancel safety: dropping this future aborts the pipeline's tasks; their batches are
    /// nacked, never acknowledged.
    pub async fn run(self, shutdown: CancellationToken) -> Result<RunReport> {
        let started = Instant::now();
        let Pipeline {
            source,
            preps,
            detector,
            snapshot,
            state_store,
            actions,
            dead_letters,
            options,
            stages,
            metrics,
        } = self;
        let handoff = state_store.and_then(|s| StateHandoff::new(s, detector.as_deref()));
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
        let stream = source.open(ctx)?;

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
        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        {
            let draining = draining.clone();
            let source = source_task(
                stream,
                pending_tx,
                shutdown.clone(),
                options.when_full,
                stages.source.clone(),
                transform_stage.clone(),
                metrics.clone(),
            );
            tasks.spawn(async move {
                let result = source.await;
                draining.cancel();
                result
            });
        }
        tasks.spawn(transform_task(TransformTask {
            rx: pending_rx,
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
        }));
        tasks.spawn(action_task(
            scored_rx,
            actions
                .into_iter()
                .zip(stages.actions.iter().cloned())
                .collect(),
            options.action_concurrency.max(1),
            action_queue_stage,
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

async fn source_task(
    mut stream: crate::source::SourceStream,
    tx: mpsc::Sender<Pending>,
    shutdown: CancellationToken,
    policy: WhenFull,
    stage: Arc<StageMetrics>,
    queue_stage: Arc<StageMetrics>,
    metrics: Arc<PipelineMetrics>,
) -> Result<()> {
    loop {
        let polled = Instant::now();
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = stream.next() => next,
        };
        let source_batch = match next {
            None => break,
            Some(Err(e)) => {
                stage.record_error();
                return Err(e);
            }
            Some(Ok(b)) => b,
        };
        let rows = source_batch.batch.num_rows();
        stage.record_in(rows);
        stage.record_out(rows, polled.elapsed());
        // The pipeline's own share of the ack counts the outcome, then passes it on.
        let outer = source_batch.ack;
        let counter = metrics.clone();
        let ack = Ack::new(move |outcome| {
            counter.record_outcome(outcome.is_acked(), rows);
            match outcome {
                AckOutcome::Acked => outer.ack(),
                AckOutcome::Nacked(reason) => outer.nack(reason),
            }
        });
        let pending = Pending {
            batch: source_batch.batch,
            ack,
        };
        let open = send_with_policy(&tx, pending, policy, &queue_stage, &stage, rows, |p| {
            p.ack.nack(if policy == WhenFull::DropNewest {
                QUEUE_FULL
            } else {
                DOWNSTREAM_GONE
            })
        })
        .await;
        if !open {
            break;
        }
    }
    // Dropping the stream here cancels the source; dropping `tx` lets the next stage drain.
    Ok(())
}

struct TransformTask {
    rx: mpsc::Receiver<Pending>,
    tx: mpsc::Sender<Scored>,
    preps: Vec<(Box<dyn Prep>, Arc<StageMetrics>)>,
    detector: Option<(Box<dyn Detector>, Arc<StageMetrics>)>,
    /// The snapshot file and when it was last written.
    snapshot: Option<(SnapshotFile, Instant)>,
    /// Per-series states kept in a store outside the process.
    handoff: Option<StateHandoff>,
    /// When the detector's state gauges were last published.
    gauges_at: Option<Instant>,
    dead_letters: Arc<dyn DeadLetterSink>,
    has_every_batch_action: bool,
    has_actions: bool,
    policy: WhenFull,
    /// The first transform stage: its metrics carry the depth of the queue from the source.
    queue_stage: Arc<StageMetrics>,
    /// The last transform stage: it is charged with rows dropped at the action queue.
    last_stage: Arc<StageMetrics>,
    action_queue_stage: Arc<StageMetrics>,
    metrics: Arc<PipelineMetrics>,
}

/// A prep or the detector failed on a batch; the batch goes to the dead-letter output.
struct StageFailure {
    stage: Arc<StageMetrics>,
    batch: RecordBatch,
    error: Error,
}

async fn transform_task(mut t: TransformTask) -> Result<()> {
    let result = transform_loop(&mut t).await;
    // At shutdown, whatever ended the loop: the state learned so far is worth keeping.
    save_snapshot(&mut t);
    if let (Some(handoff), Some((detector, stage))) = (t.handoff.as_mut(), t.detector.as_mut()) {
        handoff.save_final(detector.as_mut(), stage).await;
    }
    publish_detector_gauges(&mut t);
    result
}

/// How often the detector's state gauges are refreshed: `state_bytes` walks every series.
const DETECTOR_GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Publishes the detector's memory accounting as gauges of its stage:
/// `smartcloudops_detector_series`, `…_detector_state_bytes`, `…_detector_evicted_series`.
fn publish_detector_gauges(t: &mut TransformTask) {
    if let Some((detector, stage)) = &t.detector {
        stage.set_gauge("detector_series", &[], detector.series_count() as f64);
        stage.set_gauge("detector_state_bytes", &[], detector.state_bytes() as f64);
        stage.set_gauge(
            "detector_evicted_series",
            &[],
            detector.evicted_series() as f64,
        );
        t.gauges_at = Some(Instant::now());
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
            Some(at) => match tokio::time::timeout_at(at, t.rx.recv()).await {
                Ok(next) => next,
                Err(_) => continue, // time to tick
            },
            None => t.rx.recv().await,
        };
        let Some(Pending { batch, ack }) = next else {
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
            publish_detector_gauges(t);
        }
        if let (Some(handoff), Some((detector, stage))) = (t.handoff.as_mut(), t.detector.as_mut())
            && handoff.save_due()
        {
            handoff.save(detector.as_mut(), stage).await;
        }
        let batch = match run_preps(t, batch) {
            Ok(batch) => batch,
            Err(StageFailure {
                stage,
                batch,
                error,
            }) => {
                dead_letter_batch(&t.dead_letters, &stage, &batch, &error, ack);
                continue;
            }
        };
        if !score_and_send(t, batch, ack).await {
            break;
        }
    }
    release_held(t, Held::Flush).await;
    Ok(())
}

/// Runs the detector on a batch that went through the preps and hands it to the actions.
/// Returns false once the action stage is gone.
async fn score_and_send(t: &mut TransformTask, batch: RecordBatch, ack: Ack) -> bool {
    if let (Some(handoff), Some((detector, stage))) = (t.handoff.as_mut(), t.detector.as_mut()) {
        handoff.load_unknown(detector.as_mut(), stage, &batch).await;
    }
    let scored = match run_detector(t, batch) {
        Ok(scored) => scored,
        Err(StageFailure {
            stage,
            batch,
            error,
        }) => {
            dead_letter_batch(&t.dead_letters, &stage, &batch, &error, ack);
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
        }),
        ack,
    };
    let policy = t.policy;
    send_with_policy(
        &t.tx,
        item,
        policy,
        &t.action_queue_stage,
        &t.last_stage,
        rows,
        |s| {
            s.ack.nack(if policy == WhenFull::DropNewest {
                QUEUE_FULL
            } else {
                DOWNSTREAM_GONE
            })
        },
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
/// input, or on a tick while the source is quiet. Their input batches were acknowledged
/// already, so these carry no ack. Returns false once the action stage is gone.
async fn release_held(t: &mut TransformTask, why: Held) -> bool {
    for i in 0..t.preps.len() {
        let flushed = {
            let (prep, stage) = &mut t.preps[i];
            let released = match why {
                Held::Flush => prep.flush(),
                Held::Tick => prep.tick(),
            };
            match released {
                Ok(Some(batch)) if batch.num_rows() > 0 => {
                    stage.record_out(batch.num_rows(), Duration::ZERO);
                    batch
                }
                Ok(_) => continue,
                Err(e) => {
                    stage.record_error();
                    tracing::error!(stage = stage.name(), "flushing held rows failed: {e}");
                    continue;
                }
            }
        };
        let mut batch = flushed;
        let mut failed = None;
        for (prep, stage) in &mut t.preps[i + 1..] {
            stage.record_in(batch.num_rows());
            match prep.process(&batch) {
                Ok(out) => batch = out,
                Err(error) => {
                    stage.record_error();
                    failed = Some((stage.clone(), error));
                    break;
                }
            }
            if let Err(error) = dead_letter_rejected(&t.dead_letters, prep.as_mut(), stage) {
                failed = Some((stage.clone(), error));
                break;
            }
        }
        if let Some((stage, error)) = failed {
            dead_letter_batch(&t.dead_letters, &stage, &batch, &error, Ack::none());
            continue;
        }
        if !score_and_send(t, batch, Ack::none()).await {
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

fn run_preps(t: &mut TransformTask, mut batch: RecordBatch) -> Result<RecordBatch, StageFailure> {
    for (prep, stage) in &mut t.preps {
        let started = Instant::now();
        stage.record_in(batch.num_rows());
        match prep.process(&batch) {
            Ok(out) => {
                stage.record_out(out.num_rows(), started.elapsed());
                // Rows set aside go to the dead-letter output before the batch can be acked;
                // if that output fails, the whole batch fails (and is nacked if it fails too).
                if let Err(error) = dead_letter_rejected(&t.dead_letters, prep.as_mut(), stage) {
                    return Err(StageFailure {
                        stage: stage.clone(),
                        batch,
                        error,
                    });
                }
                batch = out;
            }
            Err(error) => {
                stage.record_error();
                return Err(StageFailure {
                    stage: stage.clone(),
                    batch,
                    error,
                });
            }
        }
    }
    Ok(batch)
}

fn run_detector(
    t: &mut TransformTask,
    mut batch: RecordBatch,
) -> Result<RecordBatch, StageFailure> {
    if let Some((detector, stage)) = &mut t.detector {
        let started = Instant::now();
        stage.record_in(batch.num_rows());
        match detector.score(&batch) {
            Ok(out) => {
                stage.record_out(out.num_rows(), started.elapsed());
                batch = out;
            }
            Err(error) => {
                stage.record_error();
                return Err(StageFailure {
                    stage: stage.clone(),
                    batch,
                    error,
                });
            }
        }
    }
    Ok(batch)
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
        Err(e) => ack.nack(format!("{error}; and the dead-letter output failed: {e}")),
    }
}

async fn action_task(
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
                    tracing::warn!(action = action.name(), error = %e, "action failed; batch nacked");
                    share.nack(format!("action `{}`: {e}", action.name()));
                }
            }
        }
    });
    futures::future::join_all(calls).await;
    ack.ack();
}
