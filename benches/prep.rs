//! Prep stages per batch: the `sql` stage against a hand-written Arrow-compute filter of the
//! same predicate, against planning the query for every batch (what the stage avoids), with a
//! reference-table join; and event-time windows.
//!
//! `cargo bench -p smartcloudops-benches --bench prep`
//!
//! Input: batches of 8 192 rows, four metrics over 1 000 hosts with three labels each,
//! values spread over 0–100, event time 10 s apart per host.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{BooleanArray, Float64Array, RecordBatch, StringArray};
use arrow::compute::kernels::{boolean, cmp};
use arrow::compute::{filter_record_batch, kernels::cast};
use arrow::datatypes::DataType;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use smartcloudops_core::prep::window::Aggregation;
use smartcloudops_core::prep::{
    Prep, ReferenceTable, SqlConfig, SqlPrep, WindowConfig, WindowPrep,
};
use smartcloudops_core::schema::{MetricsBatchBuilder, metrics_schema};

const ROWS: usize = 8_192;
const HOSTS: usize = 1_000;
const METRICS: [&str; 4] = ["cpu", "mem", "disk", "net"];
const PREDICATE: &str = "metric = 'cpu' AND value > 50";

fn batch(round: usize) -> RecordBatch {
    let mut b = MetricsBatchBuilder::with_capacity(ROWS);
    for i in 0..ROWS {
        let n = round * ROWS + i;
        let host = format!("host-{:04}", n % HOSTS);
        let service = format!("svc-{}", n % HOSTS % 16);
        b.push(
            1_764_028_800_000 + (n / HOSTS) as i64 * 10_000,
            METRICS[(n / 7) % METRICS.len()],
            &[
                ("host", host.as_str()),
                ("region", "eu-west-1"),
                ("service", service.as_str()),
            ],
            (n * 37 % 1000) as f64 / 10.0,
        );
    }
    b.finish()
}

/// `metric = 'cpu' AND value > 50` with Arrow kernels: the floor any SQL engine is measured
/// against.
fn arrow_filter(batch: &RecordBatch) -> RecordBatch {
    let metric = cast::cast(batch.column(1), &DataType::Utf8).unwrap();
    let is_cpu = cmp::eq(&metric, &StringArray::new_scalar("cpu")).unwrap();
    let value = batch
        .column(3)
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    let above = cmp::gt(value, &Float64Array::new_scalar(50.0)).unwrap();
    let mask: BooleanArray = boolean::and(&is_cpu, &above).unwrap();
    filter_record_batch(batch, &mask).unwrap()
}

fn sql(c: &mut Criterion) {
    let batches: Vec<RecordBatch> = (0..8).map(batch).collect();
    let mut group = c.benchmark_group("prep");
    group.throughput(Throughput::Elements(ROWS as u64));

    let kept = arrow_filter(&batches[0]).num_rows();
    println!("prep: {kept} of {ROWS} rows pass `{PREDICATE}`");
    let mut i = 0;
    group.bench_function("arrow_compute_filter/8k_rows", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            black_box(arrow_filter(&batches[i]))
        })
    });

    let config = SqlConfig {
        query: format!("SELECT * FROM input WHERE {PREDICATE}"),
        tables: Vec::new(),
        into_labels: Vec::new(),
    };
    let mut prep = SqlPrep::new(&config, metrics_schema()).unwrap();
    assert_eq!(prep.process(&batches[0]).unwrap().num_rows(), kept);
    group.bench_function("sql_filter_planned_once/8k_rows", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            black_box(prep.process(&batches[i]).unwrap())
        })
    });

    // What the stage avoids: a session, a table and a plan for every batch.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let replan = |batch: &RecordBatch| {
        runtime.block_on(async {
            let ctx = SessionContext::new();
            let table = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]]).unwrap();
            ctx.register_table("input", Arc::new(table)).unwrap();
            let frame = ctx.sql(&config.query).await.unwrap();
            frame.collect().await.unwrap()
        })
    };
    assert_eq!(
        replan(&batches[0])
            .iter()
            .map(RecordBatch::num_rows)
            .sum::<usize>(),
        kept
    );
    group.bench_function("sql_filter_planned_per_batch/8k_rows", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            black_box(replan(&batches[i]))
        })
    });

    // A host → service/owner table joined in and turned into labels.
    let dir = std::env::temp_dir().join(format!("smartcloudops-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hosts.csv");
    let mut csv = String::from("host,team,owner\n");
    for h in 0..HOSTS {
        csv.push_str(&format!("host-{h:04},team-{},owner-{}\n", h % 20, h % 50));
    }
    std::fs::write(&path, csv).unwrap();
    let join = SqlConfig {
        query: "SELECT i.*, h.team, h.owner FROM input i LEFT JOIN hosts h \
                ON i.labels['host'] = h.host"
            .into(),
        tables: vec![ReferenceTable {
            name: "hosts".into(),
            path,
            format: None,
        }],
        into_labels: vec!["team".into(), "owner".into()],
    };
    let mut join = SqlPrep::new(&join, metrics_schema()).unwrap();
    assert!(!join.resets_per_batch());
    group.bench_function("sql_join_into_labels/8k_rows", |b| {
        b.iter(|| {
            i = (i + 1) % batches.len();
            black_box(join.process(&batches[i]).unwrap())
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    group.finish();
}

fn windows(c: &mut Criterion) {
    // 1 000 hosts × 4 metrics; one batch covers 82 s of event time, so 1-minute windows
    // close every batch or two.
    let batches: Vec<RecordBatch> = (0..64).map(batch).collect();
    let mut group = c.benchmark_group("prep");
    group.throughput(Throughput::Elements(ROWS as u64));
    for (name, config) in [
        (
            "window_tumbling_1m_avg_max/8k_rows",
            WindowConfig {
                aggregations: vec![Aggregation::Avg, Aggregation::Max],
                ..WindowConfig::tumbling(Duration::from_secs(60))
            },
        ),
        (
            "window_tumbling_1m_p99/8k_rows",
            WindowConfig {
                aggregations: vec![Aggregation::P99],
                ..WindowConfig::tumbling(Duration::from_secs(60))
            },
        ),
        (
            "window_sliding_1m_by_20s_avg/8k_rows",
            WindowConfig {
                slide: Some(Duration::from_secs(20)),
                aggregations: vec![Aggregation::Avg],
                ..WindowConfig::tumbling(Duration::from_secs(60))
            },
        ),
    ] {
        let mut prep = WindowPrep::new(&config).unwrap();
        let mut i = 0;
        // Event time only moves forward: a fresh stage per pass over the batches.
        group.bench_function(name, |b| {
            b.iter(|| {
                if i == batches.len() {
                    i = 0;
                    prep = WindowPrep::new(&config).unwrap();
                }
                i += 1;
                black_box(prep.process(&batches[i - 1]).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sql, windows);
criterion_main!(benches);
