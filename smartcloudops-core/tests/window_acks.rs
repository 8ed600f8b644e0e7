//! Windows keep the acknowledgement contract: with a source that replays what was not
//! acknowledged, a batch is acknowledged only once every window holding its rows was
//! emitted and went through the actions; a stop mid-window leaves those batches
//! unacknowledged, and replaying from the first of them emits the same windows; the end of a
//! finite input still emits and acknowledges everything; a source at its limit of
//! unacknowledged input does not stall behind open windows; and an action failing on
//! emitted windows loses none of them (retried in process, rebuilt after a stop,
//! dead-lettered whole when rejected for good).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::prep::window::{Aggregation, LatePolicy};
use smartcloudops_core::prep::{FillPolicy, ResampleConfig, WindowConfig, WindowPrep};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::source::{Source, SourceBatch, SourceContext, SourceStream};
use smartcloudops_core::{
    Ack, AckOutcome, Action, ActionInput, Error, Pipeline, PipelineHandle, PipelineOptions,
    RecordBatch, Result,
};
use tokio::sync::{Semaphore, mpsc};

type Outcomes = Arc<Mutex<Vec<(usize, AckOutcome)>>>;

/// Yields the batches whose indices it is sent (the input ends when the sender is dropped)
/// and records each one's outcome. With `in_flight`, it stops reading once that many rows
/// wait for their acknowledgement, as Kafka and Redis Streams do at `max_unacked`.
#[derive(Debug)]
struct ReplayingSource {
    batches: Arc<Vec<RecordBatch>>,
    feed: mpsc::Receiver<usize>,
    outcomes: Outcomes,
    in_flight: Option<Arc<Semaphore>>,
    replays: bool,
    /// With an [`Outage`]: the windows delivered when each batch was acknowledged.
    witness: Option<Arc<Outage>>,
}

impl Source for ReplayingSource {
    fn name(&self) -> &str {
        "replaying"
    }

    fn replays_unacknowledged(&self) -> bool {
        self.replays
    }

    fn open(self: Box<Self>, _ctx: SourceContext) -> Result<SourceStream> {
        let this = *self;
        let stream = futures::stream::unfold(this, |mut s| async move {
            let index = s.feed.recv().await?;
            let batch = s.batches[index].clone();
            let permit = match &s.in_flight {
                Some(limit) => Some(
                    limit
                        .clone()
                        .acquire_many_owned(batch.num_rows() as u32)
                        .await
                        .ok()?,
                ),
                None => None,
            };
            let outcomes = s.outcomes.clone();
            let witness = s.witness.clone();
            let ack = Ack::new(move |outcome| {
                drop(permit);
                if let Some(outage) = witness.filter(|_| outcome.is_acked()) {
                    let delivered = outage.delivered_ends();
                    outage.acked_with.lock().unwrap().push((index, delivered));
                }
                outcomes.lock().unwrap().push((index, outcome));
            });
            Some((Ok(SourceBatch::new(batch, ack)), s))
        });
        Ok(stream.boxed())
    }
}

/// A pipeline from a [`ReplayingSource`] over `batches` through `prep` into a memory action.
struct Run {
    handle: PipelineHandle,
    feed: mpsc::Sender<usize>,
    outcomes: Outcomes,
    output: Arc<MemoryAction>,
    /// The state directory of a run that has its own.
    _state: Option<tempfile::TempDir>,
}

/// An action in front of a memory action that fails, on batches with rows, while told to:
/// for a number of attempts or until the outage is over, retryable or for good.
#[derive(Debug, Default)]
struct Outage {
    output: MemoryAction,
    /// Attempts still to fail.
    failing: AtomicUsize,
    /// Fails every attempt while set.
    down: AtomicBool,
    permanent: bool,
    attempts: AtomicUsize,
    /// Per acknowledged input batch: the ends of the windows delivered by then.
    acked_with: Mutex<Vec<(usize, BTreeSet<i64>)>>,
}

impl Outage {
    fn failing_for(attempts: usize) -> Arc<Self> {
        let outage = Outage::default();
        outage.failing.store(attempts, Ordering::SeqCst);
        Arc::new(outage)
    }

    fn delivered_ends(&self) -> BTreeSet<i64> {
        common::rows(&self.output.batches())
            .into_iter()
            .map(|r| r.ts)
            .collect()
    }
}

impl Action for Outage {
    fn name(&self) -> &str {
        "outage"
    }

    fn wants_every_batch(&self) -> bool {
        true
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if input.batch.num_rows() > 0 {
                self.attempts.fetch_add(1, Ordering::SeqCst);
                let counted = self
                    .failing
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if counted || self.down.load(Ordering::SeqCst) {
                    return Err(Error::Action {
                        action: "outage".into(),
                        message: "receiver unavailable".into(),
                        retryable: !self.permanent,
                    });
                }
            }
            self.output.execute(input).await
        })
    }
}

impl Run {
    fn start(batches: &Arc<Vec<RecordBatch>>, prep: WindowPrep, in_flight: Option<u32>) -> Run {
        Run::with_dead_letters(batches, prep, in_flight, Arc::default())
    }

    fn with_dead_letters(
        batches: &Arc<Vec<RecordBatch>>,
        prep: WindowPrep,
        in_flight: Option<u32>,
        dead_letters: Arc<MemoryDeadLetters>,
    ) -> Run {
        let state = tempfile::tempdir().unwrap();
        let mut run = Run::build(batches, prep, in_flight, state.path(), dead_letters, None);
        run._state = Some(state);
        run
    }

    /// A run keeping its durable state in `state` (a restart passes the same).
    fn resume(
        batches: &Arc<Vec<RecordBatch>>,
        prep: WindowPrep,
        in_flight: Option<u32>,
        state: &std::path::Path,
    ) -> Run {
        Run::build(batches, prep, in_flight, state, Arc::default(), None)
    }

    /// A run whose action fails as `outage` says, keeping its durable state in `state`.
    fn with_outage(
        batches: &Arc<Vec<RecordBatch>>,
        prep: WindowPrep,
        state: &std::path::Path,
        dead_letters: Arc<MemoryDeadLetters>,
        outage: Arc<Outage>,
    ) -> Run {
        Run::build(batches, prep, None, state, dead_letters, Some(outage))
    }

    fn build(
        batches: &Arc<Vec<RecordBatch>>,
        prep: WindowPrep,
        in_flight: Option<u32>,
        state: &std::path::Path,
        dead_letters: Arc<MemoryDeadLetters>,
        outage: Option<Arc<Outage>>,
    ) -> Run {
        let (feed, rx) = mpsc::channel(batches.len().max(1));
        let outcomes = Outcomes::default();
        let output = Arc::new(MemoryAction::new().every_batch());
        let action: Arc<dyn Action> = match &outage {
            Some(outage) => outage.clone(),
            None => output.clone(),
        };
        let source = ReplayingSource {
            batches: batches.clone(),
            feed: rx,
            outcomes: outcomes.clone(),
            in_flight: in_flight.map(|rows| Arc::new(Semaphore::new(rows as usize))),
            replays: true,
            witness: outage,
        };
        let options = PipelineOptions {
            state_dir: state.to_owned(),
            ..PipelineOptions::default()
        };
        let handle = Pipeline::builder(source)
            .prep(prep)
            .shared_action(action)
            .dead_letters(dead_letters)
            .options(options)
            .build()
            .spawn();
        Run {
            handle,
            feed,
            outcomes,
            output,
            _state: None,
        }
    }

    async fn send(&self, indices: impl IntoIterator<Item = usize>) {
        for i in indices {
            self.feed.send(i).await.unwrap();
        }
    }

    fn acked(&self) -> BTreeSet<usize> {
        let outcomes = self.outcomes.lock().unwrap();
        outcomes
            .iter()
            .filter(|(_, o)| o.is_acked())
            .map(|(i, _)| *i)
            .collect()
    }

    fn resolved(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Every window row emitted so far: (series, time, value).
    fn windows(&self) -> Vec<(u64, i64, f64)> {
        common::rows(&self.output.batches())
            .into_iter()
            .map(|r| (r.series_id, r.ts, r.value))
            .collect()
    }
}

/// `series` series sampled every 10 s for `steps` steps, one batch per step (every row of a
/// batch at the same time).
fn rows_by_step(series: usize, steps: usize) -> Vec<Vec<(i64, String, f64)>> {
    (0..steps)
        .map(|step| {
            (0..series)
                .map(|s| {
                    let value = ((step * 7 + s * 13) % 23) as f64;
                    (step as i64 * 10_000, format!("h{s}"), value)
                })
                .collect()
        })
        .collect()
}

fn batch_of(rows: &[(i64, String, f64)]) -> RecordBatch {
    let mut b = MetricsBatchBuilder::with_capacity(rows.len());
    for (ts, host, value) in rows {
        b.push(*ts, "cpu", &[("host", host.clone())], *value);
    }
    b.finish()
}

fn one_minute_windows() -> WindowPrep {
    WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Sum, Aggregation::Count],
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap()
}

/// Runs every batch to the end of the input; the windows emitted.
async fn uncrashed(batches: &Arc<Vec<RecordBatch>>, prep: WindowPrep) -> Vec<(u64, i64, f64)> {
    let run = Run::start(batches, prep, None);
    run.send(0..batches.len()).await;
    let Run {
        handle,
        feed,
        output,
        outcomes,
        ..
    } = run;
    drop(feed);
    handle.wait().await.unwrap();
    assert_eq!(
        outcomes.lock().unwrap().len(),
        batches.len(),
        "every batch resolved at the end of the input"
    );
    assert!(outcomes.lock().unwrap().iter().all(|(_, o)| o.is_acked()));
    common::rows(&output.batches())
        .into_iter()
        .map(|r| (r.series_id, r.ts, r.value))
        .collect()
}

fn sorted(mut rows: Vec<(u64, i64, f64)>) -> Vec<(u64, i64, f64)> {
    rows.sort_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)).then(a.2.total_cmp(&b.2)));
    rows
}

fn distinct(rows: Vec<(u64, i64, f64)>) -> Vec<(u64, i64, f64)> {
    let mut rows = sorted(rows);
    rows.dedup();
    rows
}

#[tokio::test]
async fn rows_in_an_open_window_are_acknowledged_only_once_it_was_emitted() {
    let batches = Arc::new(rows_by_step(3, 8).iter().map(|r| batch_of(r)).collect());
    let run = Run::start(&batches, one_minute_windows(), None);
    // 0 s … 50 s: all in the windows [0, 60 s).
    run.send(0..6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        run.resolved(),
        0,
        "batches acknowledged while their window is open"
    );
    assert!(run.windows().is_empty());
    // 60 s closes [0, 60 s) and opens [60 s, 120 s).
    run.send([6]).await;
    common::eventually(
        "the first windows' batches acked",
        Duration::from_secs(5),
        || run.acked() == (0..6).collect(),
    )
    .await;
    assert_eq!(run.windows().len(), 3 * 2, "3 series × (sum, count)");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        run.resolved(),
        6,
        "the batch at 60 s waits for [60 s, 120 s)"
    );
    run.handle.shutdown();
    let outcomes = run.outcomes.clone();
    run.handle.wait().await.unwrap();
    // Stopped mid-window: that window is not emitted and its batch is nacked, to be
    // delivered again.
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), 7);
    assert!(
        matches!(&outcomes[6], (6, AckOutcome::Nacked(_))),
        "{outcomes:?}"
    );
    assert!(
        outcomes[6].1.is_abandoned(),
        "not a failure of its rows: {outcomes:?}"
    );
}

/// Stops a run after the first `crash_after` batches, then replays from the first batch not
/// acknowledged to the end: what both runs emitted.
async fn crashed(
    batches: &Arc<Vec<RecordBatch>>,
    prep: impl Fn() -> WindowPrep,
    crash_after: usize,
) -> Vec<(u64, i64, f64)> {
    let state = tempfile::tempdir().unwrap();
    let first = Run::resume(batches, prep(), None, state.path());
    first.send(0..crash_after).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = first.windows();
    first.handle.shutdown();
    let outcomes = first.outcomes.clone();
    first.handle.wait().await.unwrap();
    let acked: BTreeSet<usize> = outcomes
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, o)| o.is_acked())
        .map(|(i, _)| *i)
        .collect();
    let replay_from = (0..crash_after)
        .find(|i| !acked.contains(i))
        .unwrap_or(crash_after);
    assert_eq!(
        acked,
        (0..replay_from).collect(),
        "acknowledged in order, as the sources commit"
    );
    assert!(
        replay_from < crash_after,
        "the open windows' batches were left unacknowledged"
    );
    // Restarted on the same state directory.
    let second = Run::resume(batches, prep(), None, state.path());
    second.send(replay_from..batches.len()).await;
    let Run {
        handle,
        feed,
        output,
        ..
    } = second;
    drop(feed);
    handle.wait().await.unwrap();
    let mut all = before;
    all.extend(
        common::rows(&output.batches())
            .into_iter()
            .map(|r| (r.series_id, r.ts, r.value)),
    );
    all
}

#[tokio::test]
async fn a_replay_from_the_first_unacknowledged_batch_emits_the_same_windows() {
    // 4 series for 5 minutes; a stop at every point of the second and third windows.
    let batches: Arc<Vec<RecordBatch>> =
        Arc::new(rows_by_step(4, 30).iter().map(|r| batch_of(r)).collect());
    let expected = sorted(uncrashed(&batches, one_minute_windows()).await);
    assert_eq!(
        expected.len(),
        4 * 5 * 2,
        "4 series × 5 windows × (sum, count)"
    );
    for crash_after in [7, 9, 12, 13, 17] {
        let got = crashed(&batches, one_minute_windows, crash_after).await;
        assert_eq!(
            distinct(got),
            expected,
            "stopped after batch {crash_after}: windows differ from an uninterrupted run"
        );
    }
}

#[tokio::test]
async fn a_resample_replayed_after_a_stop_fills_the_same_steps() {
    // Two series every 10 s, the second silent for a minute: resampled to 30 s steps with
    // gaps filled.
    let steps: Vec<Vec<(i64, String, f64)>> = rows_by_step(2, 24)
        .into_iter()
        .enumerate()
        .map(|(i, rows)| {
            rows.into_iter()
                .filter(|(_, host, _)| !(host == "h1" && (6..12).contains(&i)))
                .collect()
        })
        .collect();
    let batches: Arc<Vec<RecordBatch>> = Arc::new(steps.iter().map(|r| batch_of(r)).collect());
    let resample = || {
        WindowPrep::resample(&ResampleConfig {
            fill: FillPolicy::Previous,
            ..ResampleConfig::new(Duration::from_secs(30))
        })
        .unwrap()
    };
    let expected = sorted(uncrashed(&batches, resample()).await);
    for crash_after in [8, 10, 13] {
        let got = crashed(&batches, resample, crash_after).await;
        assert_eq!(distinct(got), expected, "stopped after batch {crash_after}");
    }
}

#[tokio::test]
async fn batches_straddling_window_ends_replay_to_the_same_windows() {
    // Batches of 5 rows over 3 series: most batches hold the last rows of one window and
    // the first of the next, so a replay delivers again rows of windows already emitted.
    let flat: Vec<(i64, String, f64)> = rows_by_step(3, 30).into_iter().flatten().collect();
    let batches: Arc<Vec<RecordBatch>> = Arc::new(flat.chunks(5).map(batch_of).collect());
    let expected = sorted(uncrashed(&batches, one_minute_windows()).await);
    for crash_after in [5, 8, 11, 14] {
        let got = crashed(&batches, one_minute_windows, crash_after).await;
        assert_eq!(
            distinct(got),
            expected,
            "stopped after batch {crash_after}: windows differ from an uninterrupted run"
        );
    }
}

#[tokio::test]
async fn the_end_of_a_finite_input_emits_the_open_windows_and_acknowledges_them() {
    let batches: Arc<Vec<RecordBatch>> =
        Arc::new(rows_by_step(2, 9).iter().map(|r| batch_of(r)).collect());
    let windows = uncrashed(&batches, one_minute_windows()).await;
    // [0, 60 s) closed by the row at 60 s; [60 s, 120 s) emitted at the end.
    let ends: BTreeSet<i64> = windows.iter().map(|w| w.1).collect();
    assert_eq!(ends, [60_000, 120_000].into());
}

#[tokio::test]
async fn a_source_at_its_limit_of_unacknowledged_rows_does_not_stall_behind_open_windows() {
    // One hour-long window per series; 40 batches of 3 rows. The source stops reading at 30
    // unacknowledged rows.
    let batches: Arc<Vec<RecordBatch>> =
        Arc::new(rows_by_step(3, 40).iter().map(|r| batch_of(r)).collect());
    let hour = |max_held_rows| {
        WindowPrep::new(&WindowConfig {
            aggregations: vec![Aggregation::Count],
            max_held_rows,
            ..WindowConfig::tumbling(Duration::from_secs(3600))
        })
        .unwrap()
    };

    // Holding more than the source lets out: the source stops, the window never closes.
    let stuck = Run::start(&batches, hour(1000), Some(30));
    stuck.send(0..batches.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stuck.resolved(),
        0,
        "the windows hold every row the source let out"
    );
    stuck.handle.shutdown();
    stuck.handle.wait().await.unwrap();

    // Bounded below the source's limit: the oldest windows are emitted early and the
    // source goes on to the end.
    let bounded = Run::start(&batches, hour(20), Some(30));
    bounded.send(0..batches.len()).await;
    let Run {
        handle,
        feed,
        outcomes,
        output,
        ..
    } = bounded;
    drop(feed);
    let metrics = handle.metrics().clone();
    tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("the pipeline stalled behind its open windows")
        .unwrap();
    let text = metrics.render_prometheus();
    let early: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("smartcloudops_window_early_windows_total{"))
        .and_then(|l| l.split_once("} "))
        .unwrap_or_else(|| panic!("no early-window gauge in:\n{text}"))
        .1
        .parse()
        .unwrap();
    assert!(early >= 3.0, "{text}");
    let outcomes = outcomes.lock().unwrap();
    assert_eq!(outcomes.len(), batches.len());
    assert!(outcomes.iter().all(|(_, o)| o.is_acked()));
    // Emitted early, in parts: each series' hour window came out more than once, and the
    // parts hold every row.
    let parts = common::rows(&output.batches());
    assert!(parts.len() > 3, "{parts:?}");
    for host in ["h0", "h1", "h2"] {
        let rows: f64 = parts
            .iter()
            .filter(|r| r.labels == [("host".to_owned(), host.to_owned())])
            .map(|r| r.value)
            .sum();
        assert_eq!(rows, 40.0, "{host}: {parts:?}");
    }
}

#[tokio::test]
async fn late_and_dead_lettered_rows_hold_nothing_and_are_acknowledged_in_order() {
    let batches: Arc<Vec<RecordBatch>> = Arc::new(vec![
        batch_of(&[(0, "a".into(), 1.0)]),
        batch_of(&[(61_000, "a".into(), 1.0)]), // closes [0, 60 s), opens [60 s, 120 s)
        batch_of(&[(1_000, "a".into(), 1.0)]),  // late: dead-lettered
        batch_of(&[(2_000, "a".into(), 1.0)]),  // late
    ]);
    let dead = Arc::new(MemoryDeadLetters::default());
    let prep = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Count],
        late: LatePolicy::DeadLetter,
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    let run = Run::with_dead_letters(&batches, prep, None, dead.clone());
    run.send(0..4).await;
    common::eventually(
        "the late rows dead-lettered",
        Duration::from_secs(5),
        || dead.letters().len() == 2,
    )
    .await;
    common::eventually(
        "the first window's batch acked",
        Duration::from_secs(5),
        || run.acked() == [0].into(),
    )
    .await;
    // The late batches are done, but wait behind batch 1 (its window is open): the sources
    // commit contiguously.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(run.resolved(), 1);
    let Run {
        handle,
        feed,
        outcomes,
        ..
    } = run;
    drop(feed); // the end of the input emits [60 s, 120 s)
    handle.wait().await.unwrap();
    let outcomes = outcomes.lock().unwrap().clone();
    let order: Vec<usize> = outcomes.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
    assert!(outcomes.iter().all(|(_, o)| o.is_acked()), "{outcomes:?}");
}

/// The window rows an action delivered: (series, end, value).
fn delivered(outage: &Outage) -> Vec<(u64, i64, f64)> {
    common::rows(&outage.output.batches())
        .into_iter()
        .map(|r| (r.series_id, r.ts, r.value))
        .collect()
}

/// The end of the one-minute window holding the rows of batch `index` of [`rows_by_step`].
fn window_end_of_step(index: usize) -> i64 {
    (index as i64 * 10_000 / 60_000 + 1) * 60_000
}

#[tokio::test]
async fn windows_an_action_fails_on_are_retried_until_delivered_once() {
    // 3 series for 200 s: windows ending at 60, 120 and 180 s close on the way, the one
    // ending at 240 s at the end of the input.
    let batches: Arc<Vec<RecordBatch>> =
        Arc::new(rows_by_step(3, 20).iter().map(|r| batch_of(r)).collect());
    let expected = sorted(uncrashed(&batches, one_minute_windows()).await);
    assert_eq!(expected.len(), 3 * 4 * 2);

    // The receiver refuses the first 4 attempts (retryable), then takes everything.
    let outage = Outage::failing_for(4);
    let state = tempfile::tempdir().unwrap();
    let dead = Arc::new(MemoryDeadLetters::default());
    let run = Run::with_outage(
        &batches,
        one_minute_windows(),
        state.path(),
        dead.clone(),
        outage.clone(),
    );
    run.send(0..batches.len()).await;
    let Run {
        handle,
        feed,
        outcomes,
        ..
    } = run;
    drop(feed);
    tokio::time::timeout(Duration::from_secs(20), handle.wait())
        .await
        .expect("the retries ended")
        .unwrap();

    assert!(
        outage.attempts.load(Ordering::SeqCst) >= 4 + 4,
        "4 failed attempts, then one per window batch: {} attempts",
        outage.attempts.load(Ordering::SeqCst)
    );
    assert_eq!(
        sorted(delivered(&outage)),
        expected,
        "every window delivered exactly once, none lost to the failures"
    );
    assert!(dead.letters().is_empty(), "an outage dead-letters nothing");
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), batches.len());
    assert!(outcomes.iter().all(|(_, o)| o.is_acked()), "{outcomes:?}");
    // No input batch was acknowledged before the window holding its rows was delivered.
    let acked_with = outage.acked_with.lock().unwrap().clone();
    assert_eq!(acked_with.len(), batches.len());
    for (index, ends) in acked_with {
        assert!(
            ends.contains(&window_end_of_step(index)),
            "batch {index} acknowledged before its window (ending at {} ms) was delivered; \
             delivered then: {ends:?}",
            window_end_of_step(index)
        );
    }
}

#[tokio::test]
async fn a_stop_during_an_outage_leaves_the_windows_to_the_replay() {
    let batches: Arc<Vec<RecordBatch>> =
        Arc::new(rows_by_step(3, 20).iter().map(|r| batch_of(r)).collect());
    let expected = sorted(uncrashed(&batches, one_minute_windows()).await);

    // The receiver is down while the windows ending at 60 and 120 s close (batches 6 and
    // 12), and the pipeline is stopped.
    let outage = Outage::failing_for(0);
    outage.down.store(true, Ordering::SeqCst);
    let state = tempfile::tempdir().unwrap();
    let first = Run::with_outage(
        &batches,
        one_minute_windows(),
        state.path(),
        Arc::default(),
        outage.clone(),
    );
    first.send(0..14).await;
    common::eventually("both windows tried", Duration::from_secs(5), || {
        outage.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        first.resolved(),
        0,
        "nothing acknowledged while its windows are undelivered"
    );
    first.handle.shutdown();
    let outcomes = first.outcomes.clone();
    tokio::time::timeout(Duration::from_secs(10), first.handle.wait())
        .await
        .expect("the retries stop at a shutdown")
        .unwrap();
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), 14, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|(_, o)| o.is_abandoned()),
        "left for the replay, and not counted as failures: {outcomes:?}"
    );
    assert!(delivered(&outage).is_empty());

    // Restarted on the same state directory, the receiver back: the source delivers again
    // from the first unacknowledged batch, the first one.
    let second = Run::resume(&batches, one_minute_windows(), None, state.path());
    second.send(0..batches.len()).await;
    let Run {
        handle,
        feed,
        output,
        ..
    } = second;
    drop(feed);
    handle.wait().await.unwrap();
    let replayed = common::rows(&output.batches())
        .into_iter()
        .map(|r| (r.series_id, r.ts, r.value))
        .collect();
    assert_eq!(
        sorted(replayed),
        expected,
        "the windows not delivered before the stop are emitted whole, once"
    );
}

#[tokio::test]
async fn windows_an_action_rejects_for_good_are_dead_lettered_whole_and_acknowledged() {
    let batches: Arc<Vec<RecordBatch>> =
        Arc::new(rows_by_step(3, 20).iter().map(|r| batch_of(r)).collect());
    let expected = sorted(uncrashed(&batches, one_minute_windows()).await);

    let outage = Arc::new(Outage {
        permanent: true,
        ..Outage::default()
    });
    outage.down.store(true, Ordering::SeqCst);
    let state = tempfile::tempdir().unwrap();
    let dead = Arc::new(MemoryDeadLetters::default());
    let run = Run::with_outage(
        &batches,
        one_minute_windows(),
        state.path(),
        dead.clone(),
        outage.clone(),
    );
    run.send(0..batches.len()).await;
    let Run {
        handle,
        feed,
        outcomes,
        ..
    } = run;
    drop(feed);
    tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("a permanent failure is not retried")
        .unwrap();

    assert!(delivered(&outage).is_empty());
    let letters = dead.letters();
    assert_eq!(
        outage.attempts.load(Ordering::SeqCst),
        letters.len(),
        "one attempt per window batch, then its dead letter"
    );
    let mut lettered = Vec::new();
    for letter in &letters {
        assert!(
            letter.reason.contains("action `outage`") && letter.reason.contains("unavailable"),
            "{letter:?}"
        );
        for line in letter.payload.lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let value: f64 = row["value"].as_str().unwrap().parse().unwrap();
            lettered.push((row["metric"].as_str().unwrap().to_owned(), value));
        }
    }
    let mut wanted = expected_metrics(&batches).await;
    lettered.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    wanted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    assert_eq!(lettered.len(), expected.len(), "every window row, whole");
    assert_eq!(lettered, wanted);
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), batches.len());
    assert!(outcomes.iter().all(|(_, o)| o.is_acked()), "{outcomes:?}");
}

/// The window rows of an uninterrupted run over `batches`: (metric, value).
async fn expected_metrics(batches: &Arc<Vec<RecordBatch>>) -> Vec<(String, f64)> {
    let run = Run::start(batches, one_minute_windows(), None);
    run.send(0..batches.len()).await;
    let Run {
        handle,
        feed,
        output,
        ..
    } = run;
    drop(feed);
    handle.wait().await.unwrap();
    common::rows(&output.batches())
        .into_iter()
        .map(|r| (r.metric, r.value))
        .collect()
}
