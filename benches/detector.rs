//! Detector speed on in-memory batches of many series, and state per series.
//!
//! `cargo bench -p smartcloudops-benches --bench detector`

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use smartcloudops_core::Detector;
use smartcloudops_core::detector::{EwmaConfig, EwmaDetector};
use smartcloudops_core::source::generator::{Generator, GeneratorConfig};

fn batches(series: usize, rows: usize, count: usize) -> Vec<smartcloudops_core::RecordBatch> {
    let mut generator = Generator::new(GeneratorConfig {
        series,
        points: 0,
        ..GeneratorConfig::default()
    });
    (0..count)
        .map(|_| generator.fill(rows).expect("endless"))
        .collect()
}

fn bench_ewma(c: &mut Criterion) {
    let mut group = c.benchmark_group("detector/ewma");
    for series in [1_000usize, 100_000] {
        let rows = 8_192;
        let input = batches(series, rows, 64);
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_function(format!("{series}_series/batch_8192"), |b| {
            let mut detector = EwmaDetector::new(EwmaConfig::default());
            // Warm the state so the measurement is steady-state scoring, not inserts.
            for batch in &input {
                detector.score(batch).unwrap();
            }
            let mut i = 0;
            b.iter_batched(
                || {
                    i = (i + 1) % input.len();
                    &input[i]
                },
                |batch| black_box(detector.score(batch).unwrap()),
                BatchSize::SmallInput,
            );
        });
        let mut detector = EwmaDetector::new(EwmaConfig::default());
        for batch in &input {
            detector.score(batch).unwrap();
        }
        let per_series = detector.state_bytes() as f64 / detector.series_count() as f64;
        eprintln!(
            "ewma state: {per_series:.1} bytes/series over {} series",
            detector.series_count()
        );
    }
    group.finish();
}

criterion_group!(benches, bench_ewma);
criterion_main!(benches);
