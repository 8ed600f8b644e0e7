//! The remote-write receiver with real protobuf + snappy payloads built in the test and posted
//! over HTTP on 127.0.0.1: 204 after the pipeline acked, 400 (and a dead letter) for a body
//! that does not decode, 500 when the pipeline fails the batch, stale markers skipped.

mod common;

use std::sync::Arc;

use smartcloudops_core::action::{FnAction, MemoryAction};
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::decode::remote_write::{
    Label, STALE_NAN, Sample, TimeSeries, WriteRequest,
};
use smartcloudops_core::source::{RemoteWriteConfig, RemoteWriteSource};
use smartcloudops_core::{Error, Pipeline};

fn series(name: &str, samples: &[(f64, i64)]) -> TimeSeries {
    TimeSeries {
        labels: vec![
            Label {
                name: "__name__".into(),
                value: name.into(),
            },
            Label {
                name: "instance".into(),
                value: "node:9100".into(),
            },
        ],
        samples: samples
            .iter()
            .map(|&(value, timestamp)| Sample { value, timestamp })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_write_answers_as_the_spec_says_and_loses_nothing_it_acknowledged() {
    let source = RemoteWriteSource::bind(RemoteWriteConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..RemoteWriteConfig::default()
    })
    .unwrap();
    let url = format!("http://{}/api/v1/write", source.local_addr().unwrap());
    let rows = Arc::new(MemoryAction::new().every_batch());
    let letters = Arc::new(MemoryDeadLetters::default());
    // Records rows; fails batches holding the metric `fail_me`.
    let recorder = rows.clone();
    let action = FnAction::new("rows", move |input| {
        recorder.record(input)?;
        if common::rows(std::slice::from_ref(&input.batch))
            .iter()
            .any(|r| r.metric == "fail_me")
        {
            return Err(Error::Action {
                action: "rows".into(),
                message: "refused".into(),
                retryable: true,
            });
        }
        Ok(())
    })
    .every_batch();
    let handle = Pipeline::builder(source)
        .action(action)
        .dead_letters(letters.clone())
        .build()
        .spawn();
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        client
            .post(&url)
            .header("Content-Encoding", "snappy")
            .header("Content-Type", "application/x-protobuf")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(body)
            .send()
    };

    // A good request: 204 once the pipeline acknowledged it; the stale marker is skipped.
    let request = WriteRequest {
        timeseries: vec![
            series(
                "node_load1",
                &[(0.42, 1_764_065_100_000), (0.5, 1_764_065_115_000)],
            ),
            series(
                "node_gone",
                &[(f64::from_bits(STALE_NAN), 1_764_065_100_000)],
            ),
        ],
    };
    let response = post(request.to_body()).await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(
        common::rows(&rows.batches())
            .into_iter()
            .map(|r| (r.metric, r.value, r.ts))
            .collect::<Vec<_>>(),
        vec![
            ("node_load1".to_owned(), 0.42, 1_764_065_100_000),
            ("node_load1".to_owned(), 0.5, 1_764_065_115_000)
        ],
        "the rows were processed before the 204"
    );

    // Not snappy: 400 (Prometheus will not retry), and the body is dead-lettered.
    let response = post(b"definitely not snappy".to_vec()).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("snappy"));
    assert_eq!(letters.letters().len(), 1);

    // The pipeline fails the batch: 500, so Prometheus retries.
    let failing = WriteRequest {
        timeseries: vec![series("fail_me", &[(1.0, 1)])],
    };
    let response = post(failing.to_body()).await.unwrap();
    assert_eq!(response.status(), 500);

    // GET is not allowed.
    assert_eq!(client.get(&url).send().await.unwrap().status(), 405);

    handle.shutdown();
    let report = handle.wait().await.unwrap();
    let stage = report.metrics.stage("source:remote_write").unwrap();
    let gauge = |name: &str| stage.gauges.iter().find(|g| g.name == name).unwrap().value;
    assert_eq!(gauge("remote_write_requests_total"), 3.0);
    assert_eq!(gauge("remote_write_stale_markers_total"), 1.0);
    assert_eq!(gauge("remote_write_rejected_requests_total"), 1.0);
    assert_eq!(stage.dead_lettered, 1);
}

#[test]
fn the_fuzz_seed_is_a_request_prometheus_could_send() {
    use smartcloudops_core::decode::RemoteWriteDecoder;
    use smartcloudops_core::schema::MetricsBatchBuilder;
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds/decode_remote_write/request.bin");
    let body = std::fs::read(seed).unwrap();
    let mut out = MetricsBatchBuilder::default();
    let decoded = RemoteWriteDecoder::default()
        .decode(&body, &mut out)
        .unwrap();
    assert_eq!((decoded.samples, decoded.stale), (2, 1));
}
