//! Event time that cannot be trusted: rows dated outside the source's window are
//! dead-lettered at ingestion, one series dated ahead does not make the others' rows late,
//! forged timestamps do not satisfy a rule's `for`, and a replay of 2014 data still fires
//! windows and `for` rules.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::config::PipelineConfig;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::decision::guard::MemoryIdempotency;
use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions};
use smartcloudops_core::detector::{ScoreColumnsBuilder, Verdict};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::{Action, ActionInput, Alert};

const MINUTE: i64 = 60_000;
const YEAR: i64 = 365 * 24 * 60 * MINUTE;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One row a minute for 20 minutes from `start` for each of `hosts`, and one row of host
/// `forged` dated `forged_at`, after the fifth minute.
fn rows_with_one_from_the_future(start: i64, forged_at: i64, hosts: &[&str]) -> Vec<String> {
    let row = |host: &str, ts: i64| {
        format!(r#"{{"ts":{ts},"metric":"cpu","labels":{{"host":"{host}"}},"value":1.0}}"#)
    };
    let mut lines = Vec::new();
    for minute in 0..20 {
        for host in hosts {
            lines.push(row(host, start + minute * MINUTE + 1_000));
        }
        if minute == 5 {
            lines.push(row("forged", forged_at));
        }
    }
    lines
}

/// Runs `source_table` (a file source reading `in.jsonl` of `dir`) into one-minute count
/// windows; returns each host's window count and the dead letters.
async fn windows_per_host(
    dir: &std::path::Path,
    source_table: &str,
) -> (
    std::collections::BTreeMap<String, usize>,
    Vec<smartcloudops_core::dead_letter::DeadLetter>,
) {
    let text = format!(
        r#"
{source_table}

[[prep]]
type = "window"
size = "1m"
aggregations = ["count"]
"#
    );
    let config = PipelineConfig::parse(&text, dir, |_| None).unwrap();
    let (rows, dead) = common::run_config(config).await;
    let mut per_host = std::collections::BTreeMap::new();
    for row in common::rows(&rows.batches()) {
        let host = row.labels.iter().find(|(k, _)| k == "host").unwrap();
        *per_host.entry(host.1.clone()).or_insert(0) += 1;
    }
    (per_host, dead.letters())
}

#[tokio::test]
async fn a_sample_dated_a_year_ahead_is_dead_lettered_and_the_other_series_windows_keep_emitting() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let start = (now - 30 * MINUTE) / MINUTE * MINUTE;
    common::jsonl_file(
        dir.path(),
        "in.jsonl",
        rows_with_one_from_the_future(start, now + YEAR + MINUTE, &["a", "b"]),
    );
    let (windows, letters) = windows_per_host(
        dir.path(),
        r#"[source]
type = "file"
path = "in.jsonl"
batch_size = 3
timestamps = { max_age = "7d", max_ahead = "10m" }"#,
    )
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].stage, "source:file");
    assert!(
        letters[0].reason.starts_with("timestamp ")
            && letters[0]
                .reason
                .ends_with("is 365d ahead of the clock (at most 10m accepted)"),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[0].payload.contains("forged"),
        "{}",
        letters[0].payload
    );
    assert_eq!(windows.get("a"), Some(&20), "{windows:?}");
    assert_eq!(windows.get("b"), Some(&20), "{windows:?}");
    assert_eq!(windows.get("forged"), None);
}

#[tokio::test]
async fn unchecked_one_series_dated_ahead_makes_no_other_series_rows_late() {
    let dir = tempfile::tempdir().unwrap();
    // A replay source (not checked by default), with the future row let through.
    common::jsonl_file(
        dir.path(),
        "in.jsonl",
        rows_with_one_from_the_future(0, YEAR, &["a", "b", "c"]),
    );
    let (windows, letters) = windows_per_host(
        dir.path(),
        r#"[source]
type = "file"
path = "in.jsonl"
batch_size = 3"#,
    )
    .await;
    assert!(letters.is_empty(), "{letters:?}");
    for host in ["a", "b", "c"] {
        assert_eq!(windows.get(host), Some(&20), "{host}: {windows:?}");
    }
    assert_eq!(windows.get("forged"), Some(&1));
}

const FOR_RULE: &str = r#"
[[rule]]
name = "cpu-high"
for = "30m"
group_wait = "0s"
receivers = ["console"]

[[receiver]]
name = "console"
type = "log"
"#;

fn engine() -> DecisionEngine {
    let config: DecisionConfig = toml::from_str(FOR_RULE).unwrap();
    DecisionEngine::with_options(
        config,
        EngineOptions {
            ticker: false,
            idempotency: Some(Arc::new(MemoryIdempotency::default())),
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

/// One anomalous row of host `a` at `ts`.
fn anomaly_at(ts: i64) -> ActionInput {
    let mut b = MetricsBatchBuilder::default();
    b.push(ts, "cpu", &[("host", "a")], 99.0);
    let mut s = ScoreColumnsBuilder::with_capacity(1);
    s.push(Verdict {
        score: 1.0,
        is_anomaly: true,
        expected: 40.0,
        lower: 30.0,
        upper: 50.0,
        since_ms: Some(ts),
        ..Verdict::NONE
    });
    let batch = s.finish(&b.finish(), "ewma").unwrap();
    let alerts = Alert::from_scored(&batch).unwrap();
    ActionInput::new(batch, alerts)
}

#[tokio::test]
async fn forged_timestamps_an_hour_apart_arriving_within_a_second_do_not_fire_a_for_rule() {
    let engine = engine();
    let now = now_ms();
    engine.execute(&anomaly_at(now)).await.unwrap();
    engine
        .execute(&anomaly_at(now + 60 * MINUTE))
        .await
        .unwrap();
    assert!(engine.firing().is_empty(), "{:?}", engine.firing());
}

#[tokio::test]
async fn a_replay_of_2014_data_still_fires_windows_and_for_rules() {
    let dir = tempfile::tempdir().unwrap();
    // 2014-01-01, one row a minute: normal for 10 minutes, then high for 40.
    let start = 1_388_534_400_000i64;
    common::jsonl_file(
        dir.path(),
        "in.jsonl",
        (0..50).map(|minute| {
            let value = if minute < 10 { 1.0 } else { 100.0 };
            format!(
                r#"{{"ts":{},"metric":"cpu","labels":{{"host":"a"}},"value":{value}}}"#,
                start + minute * MINUTE + 1_000
            )
        }),
    );
    let text = r#"
[source]
type = "file"
path = "in.jsonl"
batch_size = 4

[[prep]]
type = "window"
size = "1m"
aggregations = ["max"]

[detector]
type = "threshold"
[[detector.rule]]
above = 50.0
"#;
    let config = PipelineConfig::parse(text, dir.path(), |_| None).unwrap();
    let windows = Arc::new(MemoryAction::new().every_batch());
    let decision = Arc::new(engine());
    let dead = Arc::new(MemoryDeadLetters::default());
    config
        .builder()
        .unwrap()
        .shared_action(windows.clone())
        .shared_action(decision.clone())
        .dead_letters(dead.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    assert!(dead.letters().is_empty(), "{:?}", dead.letters());
    assert_eq!(common::rows(&windows.batches()).len(), 50, "every minute");
    let firing = decision.firing();
    assert_eq!(firing.len(), 1, "{firing:?}");
    // Pending from the first high minute (its window ends at minute 11).
    assert_eq!(firing[0].starts_at_ms, start + 11 * MINUTE, "{firing:?}");
}
