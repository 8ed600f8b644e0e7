//! Windows and resampling inside a pipeline: out-of-order rows counted in, late rows dropped,
//! and the windows still open at the end of the input emitted before the pipeline stops.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::prep::window::{Aggregation, LatePolicy, ResampleMethod};
use smartcloudops_core::prep::{
    FillPolicy, MetricFilter, MetricFilterConfig, ResampleConfig, WindowConfig, WindowPrep,
};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::source::{
    FileSource, FileSourceConfig, Source, SourceBatch, SourceContext, SourceStream,
};
use smartcloudops_core::{Ack, Pipeline, RecordBatch, Result};
use tokio_util::sync::CancellationToken;

/// Metric, time and value of every row `memory` received.
fn received(memory: &MemoryAction) -> Vec<(String, i64, f64)> {
    common::rows(&memory.batches())
        .into_iter()
        .map(|r| (r.metric, r.ts, r.value))
        .collect()
}

fn file(dir: &std::path::Path, rows: &[(i64, f64)]) -> std::path::PathBuf {
    common::jsonl_file(
        dir,
        "in.jsonl",
        rows.iter().map(|(t, v)| {
            format!("{{\"ts\":{t},\"metric\":\"cpu\",\"labels\":{{\"host\":\"a\"}},\"value\":{v}}}")
        }),
    )
}

async fn run(prep: WindowPrep, path: std::path::PathBuf) -> Vec<(String, i64, f64)> {
    let rows = Arc::new(MemoryAction::new().every_batch());
    let mut source = FileSourceConfig::new(path);
    source.batch_size = 2; // windows close across batches
    Pipeline::builder(FileSource::new(source))
        .prep(prep)
        .shared_action(rows.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let mut out = received(&rows);
    out.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    out
}

#[tokio::test]
async fn resampling_an_irregular_series_gives_every_step_including_the_last() {
    let dir = tempfile::tempdir().unwrap();
    // Irregular: two samples in the first minute, none in the third, one out of order.
    let path = file(
        dir.path(),
        &[
            (5_000, 1.0),
            (50_000, 2.0),
            (65_000, 3.0),
            (55_000, 9.0),
            (190_000, 4.0),
        ],
    );
    let prep = WindowPrep::resample(&ResampleConfig {
        step: Duration::from_secs(60),
        method: ResampleMethod::Mean,
        max_out_of_orderness: Duration::from_secs(20),
        ..ResampleConfig::new(Duration::ZERO)
    })
    .unwrap();
    let rows = run(prep, path).await;
    assert_eq!(
        rows,
        vec![
            ("cpu".to_owned(), 0, 4.0), // 1, 2 and the out-of-order 9
            ("cpu".to_owned(), 60_000, 3.0),
            ("cpu".to_owned(), 180_000, 4.0), // emitted at the end of the input
        ]
    );
}

#[tokio::test]
async fn late_rows_are_dropped_after_their_window_was_emitted() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        dir.path(),
        &[(0, 1.0), (61_000, 1.0), (62_000, 1.0), (1_000, 50.0)],
    );
    let prep = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Max],
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    let rows = run(prep, path).await;
    assert_eq!(
        rows,
        vec![
            ("cpu_max".to_owned(), 60_000, 1.0),
            ("cpu_max".to_owned(), 120_000, 1.0)
        ],
        "the late 50 changed nothing"
    );
}

#[tokio::test]
async fn late_rows_can_go_to_the_dead_letter_output_while_the_batch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        dir.path(),
        &[(0, 1.0), (61_000, 1.0), (62_000, 2.0), (1_000, 50.0)],
    );
    let prep = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Max],
        late: LatePolicy::DeadLetter,
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    let rows = Arc::new(MemoryAction::new().every_batch());
    let dead = Arc::new(MemoryDeadLetters::default());
    let mut source = FileSourceConfig::new(path);
    source.batch_size = 2;
    let report = Pipeline::builder(FileSource::new(source))
        .prep(prep)
        .shared_action(rows.clone())
        .dead_letters(dead.clone())
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();
    let letters = dead.letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].stage, "prep:window");
    assert!(
        letters[0].reason.starts_with("late: "),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[0].payload.contains("\"value\":\"50.0\""),
        "{}",
        letters[0].payload
    );
    // The batch the late row came in with was processed and acknowledged.
    assert_eq!(report.metrics.batches_acked, 2);
    assert_eq!(
        report.metrics.stage("prep:window").unwrap().dead_lettered,
        1
    );
    let mut out = received(&rows);
    out.sort_by_key(|r| r.1);
    assert_eq!(
        out,
        vec![
            ("cpu_max".to_owned(), 60_000, 1.0),
            ("cpu_max".to_owned(), 120_000, 2.0)
        ]
    );
}

/// Waits (at most 10 s) until the action has seen a row.
async fn wait_for_a_window(rows: &MemoryAction) {
    common::eventually("a closed window", Duration::from_secs(10), || {
        rows.row_count() > 0
    })
    .await;
}

/// One batch, then silence until cancelled: a source gone quiet.
#[derive(Debug)]
struct QuietAfterOne(RecordBatch);

impl Source for QuietAfterOne {
    fn name(&self) -> &str {
        "quiet"
    }

    fn open(self: Box<Self>, _ctx: SourceContext) -> Result<SourceStream> {
        let first = futures::stream::iter([Ok(SourceBatch::new(self.0, Ack::none()))]);
        Ok(first.chain(futures::stream::pending()).boxed())
    }
}

#[tokio::test]
async fn an_idle_source_still_closes_its_windows() {
    let mut b = MetricsBatchBuilder::default();
    for (ts, v) in [(50_000, 1.0), (59_990, 3.0)] {
        b.push(ts, "cpu", &[("host", "a")], v);
    }
    let prep = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Avg],
        idle_timeout: Some(Duration::from_millis(100)),
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    let rows = Arc::new(MemoryAction::new().every_batch());
    let stop = CancellationToken::new();
    let pipeline = Pipeline::builder(QuietAfterOne(b.finish()))
        .prep(prep)
        .shared_action(rows.clone())
        .build();
    let running = tokio::spawn(pipeline.run(stop.clone()));
    // The window [0, 60 s) closes once the watermark, moving on with the wall clock after
    // 100 ms of silence, passes 60 s: while the source is still open.
    wait_for_a_window(&rows).await;
    assert!(!running.is_finished());
    assert_eq!(received(&rows), vec![("cpu_avg".to_owned(), 60_000, 2.0)]);
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(rows.row_count(), 1, "nothing emitted twice");
}

#[tokio::test]
async fn resampling_fills_short_gaps_with_the_previous_value() {
    let dir = tempfile::tempdir().unwrap();
    // Steps 0, 1, 4 (a gap of two), then 15 (a gap of ten: longer than max_fill).
    let path = file(
        dir.path(),
        &[(0, 1.0), (60_000, 2.0), (240_000, 5.0), (900_000, 9.0)],
    );
    let prep = WindowPrep::resample(&ResampleConfig {
        fill: FillPolicy::Previous,
        max_fill: 3,
        ..ResampleConfig::new(Duration::from_secs(60))
    })
    .unwrap();
    let rows = run(prep, path).await;
    let steps: Vec<(i64, f64)> = rows.iter().map(|r| (r.1 / 60_000, r.2)).collect();
    assert_eq!(
        steps,
        vec![(0, 1.0), (1, 2.0), (2, 2.0), (3, 2.0), (4, 5.0), (15, 9.0)]
    );
}

/// One batch of `cpu`, then a `mem` batch every 10 ms until cancelled: busy, but nothing
/// reaches a window behind a filter for `cpu`.
#[derive(Debug)]
struct BusyWithOtherMetrics(RecordBatch);

impl Source for BusyWithOtherMetrics {
    fn name(&self) -> &str {
        "busy"
    }

    fn open(self: Box<Self>, _ctx: SourceContext) -> Result<SourceStream> {
        let first = futures::stream::iter([Ok(SourceBatch::new(self.0, Ack::none()))]);
        let others = futures::stream::unfold(0_i64, |n| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut b = MetricsBatchBuilder::default();
            b.push(60_000 + n, "mem", &[("host", "a")], 1.0);
            Some((Ok(SourceBatch::new(b.finish(), Ack::none())), n + 1))
        });
        Ok(first.chain(others).boxed())
    }
}

#[tokio::test]
async fn a_window_behind_a_filter_closes_while_the_source_stays_busy() {
    let mut b = MetricsBatchBuilder::default();
    b.push(59_990, "cpu", &[("host", "a")], 4.0);
    let rows = Arc::new(MemoryAction::new().every_batch());
    let stop = CancellationToken::new();
    let pipeline = Pipeline::builder(BusyWithOtherMetrics(b.finish()))
        .prep(MetricFilter::new(MetricFilterConfig {
            include: vec!["cpu".into()],
            exclude: Vec::new(),
        }))
        .prep(
            WindowPrep::new(&WindowConfig {
                aggregations: vec![Aggregation::Max],
                idle_timeout: Some(Duration::from_millis(100)),
                ..WindowConfig::tumbling(Duration::from_secs(60))
            })
            .unwrap(),
        )
        .shared_action(rows.clone())
        .build();
    let running = tokio::spawn(pipeline.run(stop.clone()));
    wait_for_a_window(&rows).await;
    assert_eq!(received(&rows), vec![("cpu_max".to_owned(), 60_000, 4.0)]);
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn windows_flushed_at_the_end_are_counted_through_the_stages_after_them() {
    let dir = tempfile::tempdir().unwrap();
    // Two one-minute windows; the second is still open when the input ends.
    let path = file(dir.path(), &[(5_000, 1.0), (65_000, 2.0), (70_000, 3.0)]);
    let rows = Arc::new(MemoryAction::new().every_batch());
    let report = Pipeline::builder(FileSource::new(FileSourceConfig::new(path)))
        .prep(
            WindowPrep::new(&WindowConfig {
                aggregations: vec![Aggregation::Max],
                ..WindowConfig::tumbling(Duration::from_secs(60))
            })
            .unwrap(),
        )
        .prep(MetricFilter::new(MetricFilterConfig {
            include: vec!["cpu_max".into()],
            exclude: Vec::new(),
        }))
        .shared_action(rows.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    assert_eq!(received(&rows).len(), 2, "both windows");
    let filter = report.metrics.stage("prep:filter").unwrap();
    assert_eq!(filter.rows_in, 2);
    assert_eq!(filter.rows_out, 2, "the flushed window counted out too");
    assert_eq!(filter.batches_in, filter.batches_out);
}
