//! Decoder throughput: JSON lines, CSV, Influx line protocol and Prometheus text exposition
//! into canonical metrics batches (records/s and, printed per payload, bytes).
//!
//! `cargo bench -p smartcloudops-benches --bench decode`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use smartcloudops_core::decode::{
    CsvDecoder, CsvOptions, DecodeLimits, Decoder, InfluxDecoder, JsonDecoder, PrometheusDecoder,
    RemoteWriteDecoder,
};
use smartcloudops_core::schema::MetricsBatchBuilder;

const ROWS: usize = 10_000;

fn json_payload() -> Vec<u8> {
    let mut out = String::new();
    for i in 0..ROWS {
        out.push_str(&format!(
            "{{\"ts\":{},\"metric\":\"cpu_utilization\",\"labels\":{{\"host\":\"host-{:04}\",\"region\":\"eu-west-1\",\"service\":\"svc-{}\"}},\"value\":{:.3}}}\n",
            1_764_028_800_000i64 + (i / 100) as i64 * 10_000,
            i % 100,
            i % 16,
            40.0 + (i % 37) as f64 * 0.731
        ));
    }
    out.into_bytes()
}

fn csv_payload() -> Vec<u8> {
    let mut out = String::from("ts,metric,value,host,region,service\n");
    for i in 0..ROWS {
        out.push_str(&format!(
            "{},cpu_utilization,{:.3},host-{:04},eu-west-1,svc-{}\n",
            1_764_028_800_000i64 + (i / 100) as i64 * 10_000,
            40.0 + (i % 37) as f64 * 0.731,
            i % 100,
            i % 16
        ));
    }
    out.into_bytes()
}

fn influx_payload() -> Vec<u8> {
    let mut out = String::new();
    for i in 0..ROWS {
        out.push_str(&format!(
            "cpu_utilization,host=host-{:04},region=eu-west-1,service=svc-{} value={:.3} {}\n",
            i % 100,
            i % 16,
            40.0 + (i % 37) as f64 * 0.731,
            (1_764_028_800_000i64 + (i / 100) as i64 * 10_000) * 1_000_000
        ));
    }
    out.into_bytes()
}

fn prometheus_payload() -> Vec<u8> {
    let mut out = String::from("# HELP cpu_utilization CPU use.\n# TYPE cpu_utilization gauge\n");
    for i in 0..ROWS {
        out.push_str(&format!(
            "cpu_utilization{{host=\"host-{:04}\",region=\"eu-west-1\",service=\"svc-{}\"}} {:.3} {}\n",
            i % 100,
            i % 16,
            40.0 + (i % 37) as f64 * 0.731,
            1_764_028_800_000i64 + (i / 100) as i64 * 10_000
        ));
    }
    out.into_bytes()
}

fn remote_write_payload() -> Vec<u8> {
    use smartcloudops_core::decode::remote_write::{Label, Sample, TimeSeries, WriteRequest};
    // 100 series of 100 samples: 10k samples, as a Prometheus shard sends them.
    let timeseries = (0..100)
        .map(|s| TimeSeries {
            labels: vec![
                Label {
                    name: "__name__".into(),
                    value: "cpu_utilization".into(),
                },
                Label {
                    name: "host".into(),
                    value: format!("host-{s:04}"),
                },
                Label {
                    name: "region".into(),
                    value: "eu-west-1".into(),
                },
                Label {
                    name: "service".into(),
                    value: format!("svc-{}", s % 16),
                },
            ],
            samples: (0..100)
                .map(|i| Sample {
                    value: 40.0 + ((s + i) % 37) as f64 * 0.731,
                    timestamp: 1_764_028_800_000 + i as i64 * 10_000,
                })
                .collect(),
        })
        .collect();
    WriteRequest { timeseries }.to_body()
}

/// One series whose `count` labels share a name: the shape that made label de-duplication
/// quadratic (one request could pin a worker for seconds).
fn duplicate_labels(count: usize) -> Vec<u8> {
    use smartcloudops_core::decode::remote_write::{Label, Sample, TimeSeries, WriteRequest};
    let labels = (0..count)
        .map(|i| Label {
            name: "dup".into(),
            value: format!("v{i}"),
        })
        .chain([Label {
            name: "__name__".into(),
            value: "cpu".into(),
        }])
        .collect();
    WriteRequest {
        timeseries: vec![TimeSeries {
            labels,
            samples: vec![Sample {
                value: 1.0,
                timestamp: 1_764_028_800_000,
            }],
        }],
    }
    .to_body()
}

fn bench_decoders(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let json = json_payload();
    eprintln!("json payload: {} bytes for {ROWS} records", json.len());
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("json_lines/10k_records", |b| {
        let mut decoder = JsonDecoder::default();
        let mut out = MetricsBatchBuilder::with_capacity(ROWS);
        let mut rejects = Vec::new();
        b.iter(|| {
            decoder.decode(black_box(&json), &mut out, &mut rejects);
            black_box(out.finish())
        });
    });
    let csv = csv_payload();
    let (header, body) = csv.split_at(csv.iter().position(|&b| b == b'\n').unwrap() + 1);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("csv/10k_records", |b| {
        let mut decoder = CsvDecoder::new(CsvOptions::default());
        let mut out = MetricsBatchBuilder::with_capacity(ROWS);
        let mut rejects = Vec::new();
        decoder.decode(header, &mut out, &mut rejects);
        b.iter(|| {
            decoder.decode(black_box(body), &mut out, &mut rejects);
            black_box(out.finish())
        });
    });
    for (name, payload, mut decoder) in [
        (
            "influx/10k_records",
            influx_payload(),
            Box::new(InfluxDecoder::default()) as Box<dyn Decoder>,
        ),
        (
            "prometheus/10k_records",
            prometheus_payload(),
            Box::new(PrometheusDecoder::default()) as Box<dyn Decoder>,
        ),
    ] {
        eprintln!("{name}: {} bytes", payload.len());
        group.throughput(Throughput::Elements(ROWS as u64));
        group.bench_function(name, |b| {
            let mut out = MetricsBatchBuilder::with_capacity(ROWS);
            let mut rejects = Vec::new();
            b.iter(|| {
                decoder.decode(black_box(&payload), &mut out, &mut rejects);
                black_box(out.finish())
            });
        });
    }
    let body = remote_write_payload();
    eprintln!("remote_write/10k_samples: {} bytes (snappy)", body.len());
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("remote_write/10k_samples", |b| {
        let mut decoder = smartcloudops_core::decode::RemoteWriteDecoder::default();
        let mut out = MetricsBatchBuilder::with_capacity(ROWS);
        b.iter(|| {
            decoder.decode(black_box(&body), &mut out).unwrap();
            black_box(out.finish())
        });
    });
    let hostile = duplicate_labels(20_000);
    // Limits raised so the request is accepted: this times the de-duplication itself.
    let unlimited = DecodeLimits {
        max_labels: 1_000_000,
        ..DecodeLimits::default()
    };
    group.throughput(Throughput::Elements(20_000));
    group.bench_function("remote_write/20k_duplicate_labels", |b| {
        let mut decoder = RemoteWriteDecoder::with_limits(unlimited);
        let mut out = MetricsBatchBuilder::with_capacity(1);
        b.iter(|| {
            decoder.decode(black_box(&hostile), &mut out).unwrap();
            black_box(out.finish())
        });
    });
    // The request: 80 000 labels of one name. Accepted with the limits raised, and
    // refused with the default limits (`max_labels`) after reading 129 labels.
    let hostile_80k = duplicate_labels(80_000);
    group.throughput(Throughput::Elements(80_000));
    group.bench_function("remote_write/80k_duplicate_labels_accepted", |b| {
        let mut decoder = RemoteWriteDecoder::with_limits(unlimited);
        let mut out = MetricsBatchBuilder::with_capacity(1);
        b.iter(|| {
            decoder.decode(black_box(&hostile_80k), &mut out).unwrap();
            black_box(out.finish())
        });
    });
    group.bench_function("remote_write/80k_duplicate_labels_refused", |b| {
        let mut decoder = RemoteWriteDecoder::default();
        let mut out = MetricsBatchBuilder::with_capacity(1);
        b.iter(|| {
            black_box(
                decoder
                    .decode(black_box(&hostile_80k), &mut out)
                    .unwrap_err(),
            )
        });
    });
    group.finish();
}

criterion_group!(benches, bench_decoders);
criterion_main!(benches);
