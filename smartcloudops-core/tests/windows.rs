//! Windows and resampling inside a pipeline: out-of-order rows counted in, late rows dropped,
//! and the windows still open at the end of the input emitted before the pipeline stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use smartcloudops_core::prep::window::{Aggregation, ResampleMethod};
use smartcloudops_core::prep::{ResampleConfig, WindowConfig, WindowPrep};
use smartcloudops_core::schema::MetricsColumns;
use smartcloudops_core::source::{FileSource, FileSourceConfig};
use smartcloudops_core::{Action, ActionInput, Pipeline, Result};

#[derive(Debug, Default)]
struct Rows(Mutex<Vec<(String, i64, f64)>>);

impl Action for Rows {
    fn name(&self) -> &str {
        "rows"
    }
    fn wants_every_batch(&self) -> bool {
        true
    }
    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        let cols = MetricsColumns::try_new(&input.batch, "rows").unwrap();
        let mut rows = self.0.lock().unwrap();
        for r in 0..input.batch.num_rows() {
            rows.push((
                cols.metric(r).to_owned(),
                cols.ts.value(r),
                cols.value.value(r),
            ));
        }
        Box::pin(async { Ok(()) })
    }
}

fn file(dir: &std::path::Path, rows: &[(i64, f64)]) -> std::path::PathBuf {
    let path = dir.join("in.jsonl");
    let text: String = rows
        .iter()
        .map(|(t, v)| {
            format!(
                "{{\"ts\":{t},\"metric\":\"cpu\",\"labels\":{{\"host\":\"a\"}},\"value\":{v}}}\n"
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

async fn run(prep: WindowPrep, path: std::path::PathBuf) -> Vec<(String, i64, f64)> {
    let rows = Arc::new(Rows::default());
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
    let mut out = rows.0.lock().unwrap().clone();
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
