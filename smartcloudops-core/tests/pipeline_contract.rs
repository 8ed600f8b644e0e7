//! The pipeline's contract: acknowledgement, backpressure, shutdown, dead letters.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Event, FlagAll, Log, RecordingAction, TestSource, outcomes};
use smartcloudops_core::ack::NackKind;
use smartcloudops_core::dead_letter::{DeadLetter, DeadLetterSink, MemoryDeadLetters};
use smartcloudops_core::detector::{EwmaConfig, EwmaDetector};
use smartcloudops_core::pipeline::WhenFull;
use smartcloudops_core::prep::FnPrep;
use smartcloudops_core::{AckOutcome, Error, Pipeline, PipelineOptions};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

fn options(capacity: usize, concurrency: usize) -> PipelineOptions {
    PipelineOptions {
        channel_capacity: capacity,
        action_concurrency: concurrency,
        ..PipelineOptions::default()
    }
}

#[tokio::test]
async fn every_batch_is_acked_once_and_only_after_all_actions() {
    let log: Log = Arc::default();
    let slow = Arc::new(RecordingAction {
        log: log.clone(),
        delay: Duration::from_millis(5),
        ..Default::default()
    });
    let fast = Arc::new(RecordingAction {
        log: log.clone(),
        ..Default::default()
    });
    let report = Pipeline::builder(TestSource::new(Some(20), log.clone()))
        .detector(FlagAll)
        .shared_action(slow.clone())
        .shared_action(fast.clone())
        .options(options(2, 3))
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();

    let events = log.lock().unwrap().clone();
    for i in 0..20 {
        let done: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| **e == Event::ActionDone(i))
            .map(|(pos, _)| pos)
            .collect();
        let acked: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| **e == Event::Outcome(i, AckOutcome::Acked))
            .map(|(pos, _)| pos)
            .collect();
        assert_eq!(done.len(), 2, "both actions ran for batch {i}");
        assert_eq!(acked.len(), 1, "batch {i} acked exactly once");
        assert!(
            acked[0] > done[1],
            "batch {i} acked before its actions finished: {events:?}"
        );
    }
    assert_eq!(report.metrics.batches_acked, 20);
    assert_eq!(report.metrics.rows_acked, 200);
    assert_eq!(report.metrics.alerts, 200);
    let action = report.metrics.stage("action:recording").unwrap();
    assert_eq!(action.batches_out, 20);
    assert_eq!(
        report
            .metrics
            .stage("action:recording#2")
            .unwrap()
            .batches_out,
        20
    );
}

#[tokio::test]
async fn a_failed_action_nacks_its_batch_with_the_reason() {
    let log: Log = Arc::default();
    let action = RecordingAction {
        log: log.clone(),
        fail: vec![3],
        ..Default::default()
    };
    let report = Pipeline::builder(TestSource::new(Some(6), log.clone()))
        .detector(FlagAll)
        .action(action)
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();
    let outcomes: HashMap<usize, AckOutcome> = outcomes(&log).into_iter().collect();
    assert_eq!(outcomes.len(), 6);
    match &outcomes[&3] {
        AckOutcome::Nacked(nack) => {
            let reason = &nack.reason;
            assert!(
                reason.contains("action `recording`") && reason.contains("batch 3 refused"),
                "{reason}"
            );
            // The action's error was not retryable: the source may dead-letter the batch.
            assert_eq!(nack.kind, NackKind::Permanent);
        }
        other => panic!("batch 3 should be nacked, got {other:?}"),
    }
    assert!(
        outcomes
            .iter()
            .filter(|(i, _)| **i != 3)
            .all(|(_, o)| o.is_acked())
    );
    assert_eq!(
        (report.metrics.batches_acked, report.metrics.batches_nacked),
        (5, 1)
    );
    assert_eq!(report.metrics.stage("action:recording").unwrap().errors, 1);
}

#[tokio::test]
async fn batches_without_alerts_are_acked_after_the_detector() {
    let log: Log = Arc::default();
    let action = Arc::new(RecordingAction {
        log: log.clone(),
        ..Default::default()
    });
    // Every series is constant: the detector scores every row and flags none.
    let report = Pipeline::builder(TestSource::new(Some(4), log.clone()))
        .detector(EwmaDetector::new(EwmaConfig {
            warmup: 1,
            ..EwmaConfig::default()
        }))
        .shared_action(action.clone())
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.metrics.batches_acked, 4);
    assert_eq!(report.metrics.alerts, 0);
    assert_eq!(
        report.metrics.stage("detector:ewma").unwrap().batches_out,
        4
    );
    assert_eq!(
        action.calls.load(Ordering::SeqCst),
        0,
        "no alerts, no action call"
    );
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .all(|e| matches!(e, Event::Outcome(_, AckOutcome::Acked)))
    );
}

#[tokio::test]
async fn the_detectors_memory_is_published_as_gauges() {
    let log: Log = Arc::default();
    let pipeline = Pipeline::builder(TestSource::new(Some(4), log.clone()))
        .detector(EwmaDetector::with_max_series(EwmaConfig::default(), 1))
        .build();
    let metrics = pipeline.metrics();
    pipeline.run(CancellationToken::new()).await.unwrap();
    let text = metrics.render_prometheus();
    let gauge = |name: &str| -> f64 {
        let prefix = format!("smartcloudops_{name}{{stage=\"detector:ewma\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .parse()
            .unwrap()
    };
    // The test source's batches hold more than one series; the cap keeps one.
    assert_eq!(gauge("detector_series"), 1.0);
    assert!(gauge("detector_state_bytes") > 0.0);
    assert!(gauge("detector_evicted_series") >= 1.0);
}

#[tokio::test]
async fn a_stalled_action_stalls_the_source_with_bounded_memory() {
    let log: Log = Arc::default();
    let gate = Arc::new(Semaphore::new(0));
    let action = Arc::new(RecordingAction {
        log: log.clone(),
        gate: Some(gate.clone()),
        ..Default::default()
    });
    let source = TestSource::new(None, log.clone());
    let produced = source.produced.clone();
    let (capacity, concurrency) = (2, 1);
    let handle = Pipeline::builder(source)
        .detector(FlagAll)
        .shared_action(action.clone())
        .options(options(capacity, concurrency))
        .build()
        .spawn();

    tokio::time::sleep(Duration::from_millis(200)).await;
    let stalled_at = produced.load(Ordering::SeqCst);
    // In flight at most: one per queue slot, one being acted on, one held by each of the
    // source and transform tasks while they wait to send.
    let bound = 2 * capacity + concurrency + 2;
    assert!(
        stalled_at <= bound,
        "source ran ahead: {stalled_at} batches > {bound}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        produced.load(Ordering::SeqCst),
        stalled_at,
        "the source must stay stalled"
    );
    assert!(
        outcomes(&log).is_empty(),
        "nothing may be acked while the action is stuck"
    );
    let depth = handle
        .metrics()
        .snapshot()
        .stage("action:recording")
        .unwrap()
        .queue_depth;
    assert_eq!(depth, capacity as u64, "action queue full");

    // Let everything through and shut down: all produced batches drain and are acked.
    gate.add_permits(1_000_000);
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    let produced = produced.load(Ordering::SeqCst);
    assert_eq!(report.metrics.batches_acked as usize, produced);
    assert_eq!(report.metrics.batches_nacked, 0);
    assert!(!report.timed_out);
}

#[tokio::test]
async fn shutdown_drains_every_in_flight_batch() {
    let log: Log = Arc::default();
    let action = RecordingAction {
        log: log.clone(),
        delay: Duration::from_millis(2),
        ..Default::default()
    };
    let source = TestSource::new(None, log.clone());
    let produced = source.produced.clone();
    let handle = Pipeline::builder(source)
        .detector(FlagAll)
        .action(action)
        .options(options(4, 4))
        .build()
        .spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    let produced = produced.load(Ordering::SeqCst);
    let events = log.lock().unwrap().clone();
    let outcomes = outcomes(&log);
    assert!(produced > 5, "the pipeline ran");
    assert_eq!(
        outcomes.len(),
        produced,
        "every produced batch got an outcome"
    );
    assert!(
        outcomes.iter().all(|(_, o)| o.is_acked()),
        "drained, not dropped: {outcomes:?}"
    );
    for (i, _) in &outcomes {
        let done = events.iter().position(|e| *e == Event::ActionDone(*i));
        let acked = events
            .iter()
            .position(|e| *e == Event::Outcome(*i, AckOutcome::Acked));
        assert!(
            done.is_some() && done < acked,
            "batch {i} acked without its action having run"
        );
    }
    assert_eq!(report.metrics.batches_acked as usize, produced);
    assert!(!report.timed_out);
}

#[tokio::test]
async fn a_shutdown_that_cannot_drain_times_out_and_nacks() {
    let log: Log = Arc::default();
    let gate = Arc::new(Semaphore::new(0)); // never opened: the action hangs
    let action = RecordingAction {
        log: log.clone(),
        gate: Some(gate),
        ..Default::default()
    };
    let source = TestSource::new(None, log.clone());
    let produced = source.produced.clone();
    let handle = Pipeline::builder(source)
        .detector(FlagAll)
        .action(action)
        .options(PipelineOptions {
            shutdown_timeout: Duration::from_millis(100),
            ..options(2, 1)
        })
        .build()
        .spawn();
    tokio::time::sleep(Duration::from_millis(50)).await;
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert!(report.timed_out);
    let outcomes = outcomes(&log);
    assert_eq!(outcomes.len(), produced.load(Ordering::SeqCst));
    assert!(
        outcomes.iter().all(|(_, o)| !o.is_acked()),
        "nothing acked without its action: {outcomes:?}"
    );
}

#[tokio::test]
async fn drop_newest_nacks_and_counts_what_it_drops() {
    let log: Log = Arc::default();
    let action = RecordingAction {
        log: log.clone(),
        delay: Duration::from_millis(20),
        ..Default::default()
    };
    let report = Pipeline::builder(TestSource::new(Some(50), log.clone()))
        .detector(FlagAll)
        .action(action)
        .options(PipelineOptions {
            when_full: WhenFull::DropNewest,
            ..options(1, 1)
        })
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();
    let outcomes = outcomes(&log);
    assert_eq!(outcomes.len(), 50);
    let dropped: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, AckOutcome::Nacked(n) if n.reason.contains("queue full")))
        .collect();
    assert!(!dropped.is_empty(), "a slow action with drop_newest drops");
    assert_eq!(report.metrics.batches_nacked as usize, dropped.len());
    let dropped_rows: u64 = report.metrics.stages.iter().map(|s| s.dropped).sum();
    assert_eq!(dropped_rows as usize, dropped.len() * 10);
}

#[tokio::test]
async fn a_failing_prep_dead_letters_the_batch_and_the_pipeline_goes_on() {
    let log: Log = Arc::default();
    let dead = Arc::new(MemoryDeadLetters::default());
    let prep = FnPrep::new("picky", |batch| {
        let ts = smartcloudops_core::schema::MetricsColumns::try_new(batch, "picky")?
            .ts
            .value(0);
        if ts == 2 {
            Err(Error::schema("prep:picky", "batch 2 is not welcome"))
        } else {
            Ok(batch.clone())
        }
    });
    let report = Pipeline::builder(TestSource::new(Some(5), log.clone()))
        .prep(prep)
        .detector(FlagAll)
        .action(RecordingAction {
            log: log.clone(),
            ..Default::default()
        })
        .dead_letters(dead.clone())
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();
    let letters = dead.letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].stage, "prep:picky");
    assert!(letters[0].reason.contains("batch 2 is not welcome"));
    assert_eq!(
        letters[0].payload.lines().count(),
        10,
        "every row of the batch is in the letter"
    );
    // Dead-lettered is handled: acked, counted, and the other batches went through.
    assert_eq!(report.metrics.batches_acked, 5);
    let prep = report.metrics.stage("prep:picky").unwrap();
    assert_eq!((prep.errors, prep.dead_lettered), (1, 10));
    assert_eq!(
        report
            .metrics
            .stage("action:recording")
            .unwrap()
            .batches_out,
        4
    );
}

#[derive(Debug)]
struct BrokenDeadLetters;

impl DeadLetterSink for BrokenDeadLetters {
    fn send(&self, _: DeadLetter) -> smartcloudops_core::Result<()> {
        Err(Error::DeadLetter("disk full".into()))
    }
}

#[tokio::test]
async fn when_the_dead_letter_output_fails_the_batch_is_nacked_not_lost() {
    let log: Log = Arc::default();
    let prep = FnPrep::new("reject_all", |_| {
        Err(Error::schema("prep:reject_all", "no"))
    });
    let report = Pipeline::builder(TestSource::new(Some(3), log.clone()))
        .prep(prep)
        .dead_letters(Arc::new(BrokenDeadLetters))
        .build()
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.metrics.batches_nacked, 3);
    let outcomes = outcomes(&log);
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| matches!(o, AckOutcome::Nacked(n) if n.reason.contains("disk full")))
    );
}

#[tokio::test]
async fn metrics_are_readable_while_running() {
    let log: Log = Arc::default();
    let seen = Arc::new(Mutex::new(0u64));
    let handle = Pipeline::builder(TestSource::new(None, log.clone()))
        .detector(FlagAll)
        .action(RecordingAction {
            log,
            delay: Duration::from_millis(1),
            ..Default::default()
        })
        .build()
        .spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let snap = handle.metrics().snapshot();
    *seen.lock().unwrap() = snap.rows_acked;
    let detector = snap.stage("detector:flag_all").unwrap();
    assert!(detector.rows_in > 0 && detector.latency_count > 0);
    assert!(
        handle
            .metrics()
            .render_prometheus()
            .contains("smartcloudops_stage_rows_in_total{stage=\"source:test\"}")
    );
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert!(report.metrics.rows_acked >= *seen.lock().unwrap());
}

#[tokio::test]
async fn undecodable_records_are_dead_lettered_counted_and_the_rest_flows() {
    use smartcloudops_core::source::{FileSource, FileSourceConfig};

    let dir = tempfile::tempdir().unwrap();
    let path = common::jsonl_file(
        dir.path(),
        "in.jsonl",
        (0..100).map(|i| {
            if i % 25 == 7 {
                format!("{{\"ts\": {i}, \"metric\": \"cpu\", \"value\": null}}")
            } else {
                format!("{{\"ts\": {i}, \"metric\": \"cpu\", \"value\": {i}}}")
            }
        }),
    );
    let dead = Arc::new(MemoryDeadLetters::default());
    let log: Log = Arc::default();
    let report = Pipeline::builder(FileSource::new(FileSourceConfig {
        batch_size: 10,
        ..FileSourceConfig::new(path)
    }))
    .detector(FlagAll)
    .action(RecordingAction {
        log,
        ..Default::default()
    })
    .dead_letters(dead.clone())
    .build()
    .run(CancellationToken::new())
    .await
    .unwrap();
    let letters = dead.letters();
    let lines: Vec<String> = letters
        .iter()
        .map(|l| l.origin.rsplit(':').next().unwrap().to_owned())
        .collect();
    assert_eq!(lines, vec!["8", "33", "58", "83"]);
    assert!(
        letters
            .iter()
            .all(|l| l.stage == "source:file" && l.reason.contains("null"))
    );
    assert_eq!(
        report.metrics.stage("source:file").unwrap().dead_lettered,
        4
    );
    assert_eq!(report.metrics.rows_acked, 96);
    assert_eq!(report.metrics.batches_nacked, 0);
}

#[tokio::test]
async fn draining_after_the_input_ends_is_bounded_too() {
    let log: Log = Arc::default();
    let gate = Arc::new(Semaphore::new(0)); // the action never finishes
    let report = Pipeline::builder(TestSource::new(Some(3), log.clone()))
        .detector(FlagAll)
        .action(RecordingAction {
            log: log.clone(),
            gate: Some(gate),
            ..Default::default()
        })
        .options(PipelineOptions {
            shutdown_timeout: Duration::from_millis(100),
            ..options(4, 1)
        })
        .build()
        .run(CancellationToken::new()) // nobody cancels: the source simply ends
        .await
        .unwrap();
    assert!(report.timed_out);
    let outcomes = outcomes(&log);
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes.iter().all(|(_, o)| !o.is_acked()));
}
