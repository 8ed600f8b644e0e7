//! The decision layer: scored rows through rules, alert state, grouping and dedup, and the
//! notification path (guards, idempotency, audit) with a dry-run command receiver, so no
//! network time is counted.
//!
//! `cargo bench -p smartcloudops-benches --bench decision`
//!
//! The `journaled` cases keep the decision state in a `state_dir` (on the temporary
//! directory's file system): each batch's changes in one commit, durable before `execute`
//! returns. Each case runs with one batch in the engine at a time, and with four (the
//! pipeline's default `action_concurrency`), where batches waiting for the state file's fsync
//! share it.
//!
//! Input: 1 000 series (10 services), 8 samples each per batch (8 000 rows), a minute apart;
//! each series is anomalous one sample in 50 (2 % of rows), so alerts keep firing and
//! resolving: every batch brings about 160 anomalous rows, 160 alerts firing and 160
//! resolving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use smartcloudops_core::decision::guard::MemoryIdempotency;
use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions};
use smartcloudops_core::detector::{ScoreColumnsBuilder, Verdict};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::{Action, ActionInput, Alert};

const SERIES: usize = 1_000;
const SAMPLES: usize = 8;

fn batch(round: usize) -> ActionInput {
    let mut b = MetricsBatchBuilder::with_capacity(SERIES * SAMPLES);
    let mut s = ScoreColumnsBuilder::with_capacity(SERIES * SAMPLES);
    for k in 0..SAMPLES {
        let sample = round * SAMPLES + k;
        for series in 0..SERIES {
            let host = format!("host-{series:04}");
            let service = format!("svc-{}", series % 10);
            b.push(
                1_764_028_800_000 + sample as i64 * 60_000,
                "cpu_utilization",
                &[
                    ("host", host.as_str()),
                    ("service", service.as_str()),
                    ("region", "eu-west-1"),
                ],
                40.0,
            );
            let anomalous = (sample + series).is_multiple_of(50);
            s.push(Verdict {
                score: if anomalous { 0.99999 } else { 0.2 },
                is_anomaly: anomalous,
                expected: 40.0,
                lower: 30.0,
                upper: 50.0,
                ..Verdict::NONE
            });
        }
    }
    let batch = s.finish(&b.finish(), "ewma").unwrap();
    let alerts = Alert::from_scored(&batch).unwrap();
    ActionInput::new(batch, alerts)
}

/// A fresh state directory per engine (event time restarts with it); the previous one goes.
fn fresh_state_dir(previous: Option<PathBuf>, n: usize) -> PathBuf {
    if let Some(dir) = previous {
        let _ = std::fs::remove_dir_all(dir);
    }
    std::env::temp_dir().join(format!(
        "smartcloudops-bench-decision-{}-{n}",
        std::process::id()
    ))
}

fn engine(group_wait: &str, state_dir: Option<PathBuf>) -> DecisionEngine {
    let mut config: DecisionConfig = toml::from_str(&format!(
        r#"
        allowed_commands = ["/usr/bin/systemctl"]

        [[rule]]
        name = "cpu-high"
        metric = "cpu_*"
        labels = {{ region = "~eu-.*" }}
        min_score = 0.999
        resolve_score = 0.99
        group_by = ["alertname", "service"]
        group_wait = "{group_wait}"
        group_interval = "1ms"
        receivers = ["restart"]

        [[rule]]
        name = "not-matching"
        metric = "mem_*"
        receivers = ["restart"]

        [[rule]]
        name = "flagged"
        labels = {{ service = "!svc-9" }}
        group_by = ["alertname", "host"]
        group_wait = "{group_wait}"
        group_interval = "1ms"
        receivers = ["restart"]

        [[receiver]]
        name = "restart"
        type = "command"
        [receiver.command]
        argv = ["/usr/bin/systemctl", "restart", "{{service}}.service"]
        mode = "dry_run"
        params = {{ service = {{ pattern = "[a-z0-9][a-z0-9-]*" }} }}
        "#
    ))
    .unwrap();
    config.state_dir = state_dir;
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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let batches: Vec<ActionInput> = (0..50).map(batch).collect();
    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements((SERIES * SAMPLES) as u64));
    for in_flight in [1, 4] {
        for (name, wait, journaled) in [
            ("rules_and_grouping", "1h", false),
            ("with_dry_run_notifications", "0s", false),
            ("rules_and_grouping_journaled", "1h", true),
            ("with_dry_run_notifications_journaled", "0s", true),
        ] {
            let mut dir = journaled.then(|| fresh_state_dir(None, 0));
            let mut engine = engine(wait, dir.clone());
            let mut i = 0usize;
            let id = BenchmarkId::new(name, format!("{in_flight}_in_flight"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    let mut left = iters as usize;
                    while left > 0 {
                        // Event time only moves forward: a fresh engine each time the batches
                        // repeat (its construction is negligible against 50 batches).
                        if i > 0 && i.is_multiple_of(batches.len()) {
                            if journaled {
                                dir = Some(fresh_state_dir(dir.take(), i));
                            }
                            engine = self::engine(wait, dir.clone());
                        }
                        let round = left.min(batches.len() - i % batches.len());
                        let first = i % batches.len();
                        run(&rt, &engine, &batches[first..first + round], in_flight);
                        i += round;
                        left -= round;
                    }
                    started.elapsed()
                })
            });
            drop(engine);
            if let Some(dir) = dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    group.finish();
}

/// Runs `batches` through `engine` in order with up to `in_flight` at once, as the pipeline's
/// action stage does (one task, `action_concurrency` futures).
fn run(
    rt: &tokio::runtime::Runtime,
    engine: &DecisionEngine,
    batches: &[ActionInput],
    in_flight: usize,
) {
    rt.block_on(async {
        let mut running: FuturesUnordered<_> = FuturesUnordered::new();
        let wait = |done: Option<smartcloudops_core::Result<()>>| done.unwrap().unwrap();
        for input in batches {
            if running.len() >= in_flight {
                wait(running.next().await);
            }
            running.push(engine.execute(input));
        }
        while !running.is_empty() {
            wait(running.next().await);
        }
    });
}

/// `DECISION_FIXED=CASE:IN_FLIGHT:ROUNDS` runs a fixed amount of work (ROUNDS × 50 batches of
/// CASE, `journaled` or not) and exits, for timing whole processes from outside (CPU seconds
/// as the operating system counts them, and wall): `farm-bench --vs 'B' -- A`.
fn fixed(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [case, in_flight, rounds] = parts[..] else {
        panic!("DECISION_FIXED={spec}: expected CASE:IN_FLIGHT:ROUNDS");
    };
    let (wait, journaled) = match case {
        "rules_and_grouping" => ("1h", false),
        "with_dry_run_notifications" => ("0s", false),
        "rules_and_grouping_journaled" => ("1h", true),
        "with_dry_run_notifications_journaled" => ("0s", true),
        other => panic!("unknown case {other}"),
    };
    let (in_flight, rounds): (usize, usize) = (in_flight.parse().unwrap(), rounds.parse().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let batches: Vec<ActionInput> = (0..50).map(batch).collect();
    let mut dir = None;
    for round in 0..rounds {
        if journaled {
            dir = Some(fresh_state_dir(dir.take(), round));
        }
        let engine = engine(wait, dir.clone());
        run(&rt, &engine, &batches, in_flight);
    }
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = bench
}

fn main() {
    match std::env::var("DECISION_FIXED") {
        Ok(spec) => fixed(&spec),
        Err(_) => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
