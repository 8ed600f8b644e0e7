//! Decode limits are configurable on every line-based source, not only remote-write: a
//! source's `limits` table reaches its decoder, over-limit records are dead-lettered naming
//! the limit, and the rest of the payload goes on.

mod common;

use smartcloudops_core::config::PipelineConfig;

#[tokio::test]
async fn a_file_sources_limits_table_reaches_its_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"ts":1000,"metric":"cpu","labels":{"host":"a"},"value":1.0}"#,
        r#"{"ts":2000,"metric":"cpu","labels":{"host":"a","dc":"x","rack":"7"},"value":2.0}"#,
        r#"{"ts":3000,"metric":"cpu","labels":{"host":"a-very-long-host-name"},"value":3.0}"#,
        r#"{"ts":4000,"metric":"cpu","labels":{"host":"b"},"value":4.0}"#,
    ];
    std::fs::write(dir.path().join("in.jsonl"), lines.join("\n")).unwrap();
    let text = r#"
[source]
type = "file"
path = "in.jsonl"
limits = { max_labels = 2, max_label_value_bytes = 8 }
"#;
    let config = PipelineConfig::parse(text, dir.path(), |_| None).unwrap();
    let (rows, dead) = common::run_config(config).await;

    let values: Vec<f64> = common::rows(&rows.batches())
        .iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values, [1.0, 4.0]);
    let reasons: Vec<String> = dead.letters().into_iter().map(|l| l.reason).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("max_labels"), "{reasons:?}");
    assert!(reasons[1].contains("max_label_value_bytes"), "{reasons:?}");
}

#[test]
fn every_line_based_source_checks_its_limits_table() {
    let dir = tempfile::tempdir().unwrap();
    for table in [
        "type = \"file\"\npath = \"in.jsonl\"",
        "type = \"prometheus_scrape\"\ntargets = [\"http://127.0.0.1:9100/metrics\"]",
    ] {
        let text = format!("[source]\n{table}\nlimits = {{ max_labels = 0 }}\n");
        let errors = PipelineConfig::parse(&text, dir.path(), |_| None).unwrap_err();
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.path == "source.limits.max_labels"),
            "{table}: {errors:?}"
        );
    }
}
