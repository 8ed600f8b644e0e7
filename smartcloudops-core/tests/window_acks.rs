//! Windows keep the acknowledgement contract: with a source that replays what was not
//! acknowledged, a batch is acknowledged only once every window holding its rows was
//! emitted and went through the actions; a stop mid-window leaves those batches
//! unacknowledged, and replaying from the first of them emits the same windows; the end of a
//! finite input still emits and acknowledges everything; and a source at its limit of
//! unacknowledged input does not stall behind open windows.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::prep::window::{Aggregation, LatePolicy};
use smartcloudops_core::prep::{FillPolicy, ResampleConfig, WindowConfig, WindowPrep};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::source::{Source, SourceBatch, SourceContext, SourceStream};
use smartcloudops_core::{
    Ack, AckOutcome, Pipeline, PipelineHandle, PipelineOptions, RecordBatch, Result,
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
            let ack = Ack::new(move |outcome| {
                drop(permit);
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
        let mut run = Run::build(batches, prep, in_flight, state.path(), dead_letters);
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
        Run::build(batches, prep, in_flight, state, Arc::default())
    }

    fn build(
        batches: &Arc<Vec<RecordBatch>>,
        prep: WindowPrep,
        in_flight: Option<u32>,
        state: &std::path::Path,
        dead_letters: Arc<MemoryDeadLetters>,
    ) -> Run {
        let (feed, rx) = mpsc::channel(batches.len().max(1));
        let outcomes = Outcomes::default();
        let output = Arc::new(MemoryAction::new().every_batch());
        let source = ReplayingSource {
            batches: batches.clone(),
            feed: rx,
            outcomes: outcomes.clone(),
            in_flight: in_flight.map(|rows| Arc::new(Semaphore::new(rows as usize))),
            replays: true,
        };
        let options = PipelineOptions {
            state_dir: state.to_owned(),
            ..PipelineOptions::default()
        };
        let handle = Pipeline::builder(source)
            .prep(prep)
            .shared_action(output.clone())
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
