//! Runtime overhead: batches through no-op stages (identity prep, pass-through detector,
//! an action that takes every batch), acknowledgement included.
//!
//! `cargo bench -p smartcloudops-benches --bench pipeline`

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use smartcloudops_core::action::FnAction;
use smartcloudops_core::prep::FnPrep;
use smartcloudops_core::source::generator::{Generator, GeneratorConfig};
use smartcloudops_core::source::{SourceContext, SourceStream};
use smartcloudops_core::{Ack, Detector, Pipeline, RecordBatch, Result, Source, SourceBatch};
use tokio_util::sync::CancellationToken;

/// Replays prepared batches, each with a real ack.
#[derive(Debug)]
struct Replay(Vec<RecordBatch>);

impl Source for Replay {
    fn name(&self) -> &str {
        "replay"
    }
    fn open(self: Box<Self>, _ctx: SourceContext) -> Result<SourceStream> {
        Ok(futures::stream::iter(self.0)
            .map(|batch| Ok(SourceBatch::new(batch, Ack::new(|_| {}))))
            .boxed())
    }
}

/// Passes batches through unscored.
#[derive(Debug)]
struct PassThrough;

impl Detector for PassThrough {
    fn name(&self) -> &str {
        "pass"
    }
    fn score(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        Ok(batch.clone())
    }
    fn series_count(&self) -> usize {
        0
    }
    fn state_bytes(&self) -> usize {
        0
    }
}

fn bench_runtime(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    const BATCHES: usize = 1_000;
    let mut generator = Generator::new(GeneratorConfig {
        series: 1_000,
        points: 0,
        ..GeneratorConfig::default()
    });
    let batch = generator.fill(1024).unwrap();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCHES as u64));
    group.bench_function("noop_stages/1000_batches", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let input = vec![batch.clone(); BATCHES];
                let pipeline = Pipeline::builder(Replay(input))
                    .prep(FnPrep::new("identity", |b: &RecordBatch| Ok(b.clone())))
                    .detector(PassThrough)
                    .action(FnAction::new("sink", |_| Ok(())).every_batch())
                    .build();
                let started = Instant::now();
                let report = runtime
                    .block_on(pipeline.run(CancellationToken::new()))
                    .unwrap();
                total += started.elapsed();
                assert_eq!(report.metrics.batches_acked as usize, BATCHES);
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, bench_runtime);
criterion_main!(benches);
