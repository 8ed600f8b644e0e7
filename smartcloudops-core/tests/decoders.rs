//! Decoders on realistic payloads, against golden files: every row and every reject with its
//! reason. `UPDATE_GOLDEN=1 cargo test --test decoders` rewrites the expected files after an
//! intended change.

use smartcloudops_core::decode::{Decoder, InfluxDecoder, PrometheusDecoder};
use smartcloudops_core::schema::{MetricsBatchBuilder, MetricsColumns};

fn golden(input: &str, decoder: &mut dyn Decoder) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/decode");
    let payload = std::fs::read(dir.join(input)).unwrap();
    let mut out = MetricsBatchBuilder::default();
    let mut rejects = Vec::new();
    decoder.decode(&payload, &mut out, &mut rejects);
    let batch = out.finish();
    let cols = MetricsColumns::try_new(&batch, "golden").unwrap();
    let mut text = String::new();
    for r in 0..batch.num_rows() {
        let row = serde_json::json!({
            "ts": cols.ts.value(r),
            "metric": cols.metric(r),
            "labels": cols.labels(r),
            "value": cols.value.value(r).to_string(),
            "series_id": cols.series_id.value(r).to_string(),
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    for reject in &rejects {
        let line = serde_json::json!({ "reject": reject.record, "raw": reject.raw, "reason": reject.reason });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let expected_path = dir.join(format!("{input}.expected.jsonl"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
        panic!(
            "{} missing: run with UPDATE_GOLDEN=1",
            expected_path.display()
        )
    });
    assert_eq!(
        text, expected,
        "{input} decodes differently from its golden file"
    );
}

#[test]
fn influx_line_protocol_matches_its_golden_file() {
    golden(
        "telegraf.influx",
        &mut InfluxDecoder::default().with_default_ts(1_764_065_160_000),
    );
}

#[test]
fn prometheus_exposition_matches_its_golden_file() {
    golden(
        "node.prom",
        &mut PrometheusDecoder::with_default_ts(1_764_065_160_000),
    );
}
