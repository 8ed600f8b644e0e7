//! Test doubles and helpers shared by the integration tests: a source that records the fate
//! of every batch it produced, a detector that flags every row, an action that records what it
//! did, the rows of collected batches, JSON-lines input files and wait loops. (Actions that
//! only collect are [`smartcloudops_core::action::MemoryAction`] and
//! [`smartcloudops_core::action::FnAction`].)
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use smartcloudops_core::detector::{ScoreColumnsBuilder, Verdict};
use smartcloudops_core::schema::{MetricsBatchBuilder, MetricsColumns};
use smartcloudops_core::source::{SourceContext, SourceStream};
use smartcloudops_core::{
    Ack, AckOutcome, Action, ActionInput, Detector, RecordBatch, Result, Source, SourceBatch,
};
use tokio::sync::Semaphore;

/// Something that happened, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An action finished with batch `i`.
    ActionDone(usize),
    /// Batch `i` reached its source's ack callback.
    Outcome(usize, AckOutcome),
}

pub type Log = Arc<Mutex<Vec<Event>>>;

/// A metrics batch of `rows` rows whose timestamps all equal `index`, so stages downstream
/// can tell which batch they are looking at.
pub fn numbered_batch(index: usize, rows: usize) -> RecordBatch {
    let mut b = MetricsBatchBuilder::with_capacity(rows);
    for r in 0..rows {
        b.push(index as i64, "cpu", &[("host", format!("h{r}"))], r as f64);
    }
    b.finish()
}

/// Yields `count` numbered batches (or endless ones) and logs each batch's outcome.
#[derive(Debug)]
pub struct TestSource {
    pub count: Option<usize>,
    pub rows: usize,
    pub produced: Arc<AtomicUsize>,
    pub log: Log,
}

impl TestSource {
    pub fn new(count: Option<usize>, log: Log) -> Self {
        Self {
            count,
            rows: 10,
            produced: Arc::default(),
            log,
        }
    }
}

impl Source for TestSource {
    fn name(&self) -> &str {
        "test"
    }

    fn open(self: Box<Self>, _ctx: SourceContext) -> Result<SourceStream> {
        let TestSource {
            count,
            rows,
            produced,
            log,
        } = *self;
        let stream = futures::stream::iter(0..count.unwrap_or(usize::MAX)).map(move |i| {
            produced.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            let ack = Ack::new(move |outcome| log.lock().unwrap().push(Event::Outcome(i, outcome)));
            Ok(SourceBatch::new(numbered_batch(i, rows), ack))
        });
        Ok(stream.boxed())
    }
}

/// Flags every row as anomalous.
#[derive(Debug, Default)]
pub struct FlagAll;

impl Detector for FlagAll {
    fn name(&self) -> &str {
        "flag_all"
    }

    fn score(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let mut out = ScoreColumnsBuilder::with_capacity(batch.num_rows());
        for _ in 0..batch.num_rows() {
            out.push(Verdict {
                score: 1.0,
                is_anomaly: true,
                expected: 0.0,
                lower: -1.0,
                upper: 1.0,
                ..Verdict::NONE
            });
        }
        out.finish(batch, "flag_all")
    }

    fn series_count(&self) -> usize {
        0
    }

    fn state_bytes(&self) -> usize {
        0
    }
}

/// Records each batch it finished; can be slow, gated or failing.
#[derive(Debug, Default)]
pub struct RecordingAction {
    pub log: Log,
    pub delay: Duration,
    /// When set, each call waits for a permit (tests release them to let work through).
    pub gate: Option<Arc<Semaphore>>,
    /// Batches that fail.
    pub fail: Vec<usize>,
    pub calls: AtomicUsize,
}

impl Action for RecordingAction {
    fn name(&self) -> &str {
        "recording"
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let index = input.alerts[0].ts_ms as usize;
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate open").forget();
            }
            tokio::time::sleep(self.delay).await;
            if self.fail.contains(&index) {
                return Err(smartcloudops_core::Error::Action {
                    action: "recording".into(),
                    message: format!("batch {index} refused"),
                    retryable: false,
                });
            }
            self.log.lock().unwrap().push(Event::ActionDone(index));
            Ok(())
        })
    }
}

/// The outcomes in the log, by batch index.
pub fn outcomes(log: &Log) -> Vec<(usize, AckOutcome)> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Outcome(i, o) => Some((*i, o.clone())),
            Event::ActionDone(_) => None,
        })
        .collect()
}

/// One row of a metrics batch, as the tests compare them.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub series_id: u64,
    pub ts: i64,
    pub metric: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every row of `batches`, in order (the batches a `MemoryAction` collected, say).
pub fn rows(batches: &[RecordBatch]) -> Vec<Row> {
    let mut out = Vec::new();
    for batch in batches {
        let cols = MetricsColumns::try_new(batch, "test rows").unwrap();
        out.extend((0..batch.num_rows()).map(|r| Row {
            series_id: cols.series_id.value(r),
            ts: cols.ts.value(r),
            metric: cols.metric(r).to_owned(),
            labels: cols.labels(r),
            value: cols.value.value(r),
        }));
    }
    out
}

/// Writes `lines` (one JSON object each) to `dir/name`, newline-terminated.
pub fn jsonl_file(
    dir: &std::path::Path,
    name: &str,
    lines: impl IntoIterator<Item = String>,
) -> std::path::PathBuf {
    let path = dir.join(name);
    let text: String = lines.into_iter().map(|line| line + "\n").collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Polls `done` until it holds or `timeout` passed; whether it held.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Polls `done` until it holds; fails the test after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    assert!(
        wait_until(timeout, done).await,
        "timed out waiting for {what}"
    );
}

/// Runs `config` to the end of its input with an every-batch [`MemoryAction`] and in-memory
/// dead letters; returns both.
#[allow(dead_code)] // not every test binary uses it
pub async fn run_config(
    config: smartcloudops_core::config::PipelineConfig,
) -> (
    Arc<smartcloudops_core::action::MemoryAction>,
    Arc<smartcloudops_core::dead_letter::MemoryDeadLetters>,
) {
    let rows = Arc::new(smartcloudops_core::action::MemoryAction::new().every_batch());
    let dead = Arc::new(smartcloudops_core::dead_letter::MemoryDeadLetters::default());
    config
        .builder()
        .unwrap()
        .shared_action(rows.clone())
        .dead_letters(dead.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    (rows, dead)
}
