//! Detector speed on in-memory batches of many series, and state per series.
//!
//! `cargo bench -p smartcloudops-benches --bench detector`
//!
//! Each case warms the state first (every series seen 64 times), so the figure is
//! steady-state scoring through the `Detector` trait — Arrow batch in, scored batch out —
//! not inserts. The state per series is printed to stderr.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use smartcloudops_core::Detector;
use smartcloudops_core::detector::{EnsembleDetector, EwmaConfig, EwmaDetector, Preset};
use smartcloudops_core::source::generator::{Generator, GeneratorConfig};

const ROWS: usize = 8_192;

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

fn bench_case(
    c: &mut Criterion,
    group: &str,
    series_counts: &[usize],
    make: &dyn Fn() -> Box<dyn Detector>,
) {
    let mut g = c.benchmark_group(group);
    for &series in series_counts {
        // Enough batches that every series is seen ~64 times while warming.
        let count = (series * 64 / ROWS).clamp(8, 800);
        let input = batches(series, ROWS, count);
        g.throughput(Throughput::Elements(ROWS as u64));
        let mut detector = make();
        for batch in &input {
            detector.score(batch).unwrap();
        }
        eprintln!(
            "{group}: {:.0} bytes/series over {} series",
            detector.state_bytes() as f64 / detector.series_count() as f64,
            detector.series_count()
        );
        g.bench_function(format!("{series}_series/batch_{ROWS}"), |b| {
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
    }
    g.finish();
}

fn bench_detectors(c: &mut Criterion) {
    bench_case(c, "detector/ewma", &[1_000, 100_000], &|| {
        Box::new(EwmaDetector::new(EwmaConfig::default()))
    });
    bench_case(c, "detector/fast", &[1_000, 10_000, 100_000], &|| {
        Box::new(EnsembleDetector::preset(Preset::Fast))
    });
    bench_case(c, "detector/precise", &[1_000, 10_000], &|| {
        Box::new(EnsembleDetector::preset(Preset::Precise))
    });
}

criterion_group!(benches, bench_detectors);
criterion_main!(benches);
