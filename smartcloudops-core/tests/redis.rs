//! The Redis connectors against a real Redis on 127.0.0.1:6379 (`SMARTCLOUDOPS_REDIS_URL`
//! overrides it; `scripts/redis.sh start` starts one if none answers):
//!
//! ```sh
//! cargo test -p smartcloudops-core --features redis --test redis -- --ignored
//! ```
//!
//! Every test works on keys, channels and streams of its own (a random suffix) and deletes
//! them at the end, so tests run in parallel against one Redis.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::AsyncCommands;
use smartcloudops_core::action::{
    MemoryAction, RedisPublish, RedisPublishConfig, RedisStreamSink, RedisStreamSinkConfig,
    ResultCache, ResultCacheConfig, SinkPayload,
};
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::detector::{
    EwmaConfig, EwmaDetector, RedisStateStore, RedisStateStoreConfig,
};
use smartcloudops_core::redis::RedisConnection;
use smartcloudops_core::source::generator::{GeneratorConfig, GeneratorSource, InjectedAnomaly};
use smartcloudops_core::source::{
    FileSource, FileSourceConfig, RedisPubSubSource, RedisPubSubSourceConfig, RedisStreamSource,
    RedisStreamSourceConfig, StreamStart,
};
use smartcloudops_core::{Action, ActionInput, Detector, Pipeline, PipelineHandle, Result};
use tokio::sync::Mutex as AsyncMutex;

fn url() -> String {
    std::env::var("SMARTCLOUDOPS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn connection() -> RedisConnection {
    RedisConnection::new(url())
}

async fn raw() -> redis::aio::MultiplexedConnection {
    connection()
        .connect()
        .await
        .expect("Redis on 127.0.0.1:6379 (scripts/redis.sh start)")
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sco-test:{name}:{}-{nanos}", std::process::id())
}

/// Pub/sub tests kill pub/sub clients: they take turns.
static PUBSUB: AsyncMutex<()> = AsyncMutex::const_new(());

/// Records every batch it sees; fails batches holding a `fail` metric.
#[derive(Debug, Default)]
struct Rows {
    memory: MemoryAction,
    fail_metric: Option<String>,
    /// Stop completing (hang) after this many batches: a consumer killed mid-batch.
    hang_after: Option<usize>,
    batches: AtomicUsize,
}

impl Rows {
    /// `(metric, value)` of every row seen.
    fn seen(&self) -> Vec<(String, f64)> {
        common::rows(&self.memory.batches())
            .into_iter()
            .map(|r| (r.metric, r.value))
            .collect()
    }
    fn values(&self) -> Vec<f64> {
        self.seen().into_iter().map(|(_, v)| v).collect()
    }
    fn len(&self) -> usize {
        self.memory.row_count()
    }
}

impl Action for Rows {
    fn name(&self) -> &str {
        "rows"
    }
    fn wants_every_batch(&self) -> bool {
        true
    }
    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let n = self.batches.fetch_add(1, Ordering::SeqCst);
            self.memory.record(input)?;
            if self.hang_after.is_some_and(|h| n >= h) {
                futures::future::pending::<()>().await;
            }
            if let Some(fail) = &self.fail_metric
                && common::rows(std::slice::from_ref(&input.batch))
                    .iter()
                    .any(|r| &r.metric == fail)
            {
                return Err(smartcloudops_core::Error::Action {
                    action: "rows".into(),
                    message: "refusing the poison row".into(),
                    retryable: true,
                });
            }
            Ok(())
        })
    }
}

fn line(metric: &str, value: f64) -> String {
    format!(r#"{{"ts":1764000000000,"metric":"{metric}","labels":{{"host":"a"}},"value":{value}}}"#)
}

async fn subscribers(con: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let reply: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(con)
        .await
        .unwrap();
    reply.1
}

fn gauge(handle: &PipelineHandle, stage: &str, name: &str) -> f64 {
    handle
        .metrics()
        .stage(stage)
        .unwrap()
        .snapshot()
        .gauges
        .iter()
        .find(|g| g.name == name)
        .map_or(f64::NAN, |g| g.value)
}

fn spawn_pubsub(channel: &str, rows: Arc<Rows>, letters: Arc<MemoryDeadLetters>) -> PipelineHandle {
    let mut config = RedisPubSubSourceConfig::new(vec![channel.to_owned()]);
    config.batch_timeout = Duration::from_millis(20);
    config.reconnect_backoff = Duration::from_millis(20);
    Pipeline::builder(RedisPubSubSource::new(config, connection()))
        .shared_action(rows)
        .dead_letters(letters)
        .build()
        .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn pubsub_round_trip_decodes_and_dead_letters_bad_records() {
    let _turn = PUBSUB.lock().await;
    let channel = unique("pubsub");
    let rows = Arc::new(Rows::default());
    let letters = Arc::new(MemoryDeadLetters::default());
    let handle = spawn_pubsub(&channel, rows.clone(), letters.clone());
    let mut con = raw().await;
    common::eventually("the subscription", Duration::from_secs(5), || true).await;
    while subscribers(&mut con, &channel).await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two records in one message, one bad record, one good message.
    let two = format!("{}\n{}", line("cpu", 1.0), line("cpu", 2.0));
    let _: i64 = con.publish(&channel, two).await.unwrap();
    let _: i64 = con.publish(&channel, "{not json").await.unwrap();
    let _: i64 = con.publish(&channel, line("mem", 3.0)).await.unwrap();
    common::eventually("three rows", Duration::from_secs(5), || rows.len() == 3).await;
    common::eventually("one dead letter", Duration::from_secs(5), || {
        letters.letters().len() == 1
    })
    .await;
    assert_eq!(rows.values(), vec![1.0, 2.0, 3.0]);
    let letter = letters.letters()[0].clone();
    assert_eq!(letter.stage, "source:redis_pubsub");
    assert!(letter.origin.starts_with(&channel), "{letter:?}");
    assert_eq!(letter.payload, "{not json");
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(
        report
            .metrics
            .stage("source:redis_pubsub")
            .unwrap()
            .dead_lettered,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn pubsub_source_resubscribes_after_client_kill_and_counts_the_outage() {
    let _turn = PUBSUB.lock().await;
    let channel = unique("pubsub-kill");
    let rows = Arc::new(Rows::default());
    let handle = spawn_pubsub(&channel, rows.clone(), Arc::default());
    let mut con = raw().await;
    while subscribers(&mut con, &channel).await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: i64 = con.publish(&channel, line("cpu", 1.0)).await.unwrap();
    common::eventually("the first row", Duration::from_secs(5), || rows.len() == 1).await;

    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(killed >= 1);
    // Subscribed again, by itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if subscribers(&mut con, &channel).await == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never resubscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for v in 2..=10 {
        let _: i64 = con
            .publish(&channel, line("cpu", f64::from(v)))
            .await
            .unwrap();
    }
    common::eventually("the rows after the kill", Duration::from_secs(5), || {
        rows.len() == 10
    })
    .await;
    assert_eq!(rows.values(), (1..=10).map(f64::from).collect::<Vec<_>>());
    assert_eq!(
        gauge(&handle, "source:redis_pubsub", "redis_reconnects_total"),
        1.0
    );
    assert!(
        gauge(
            &handle,
            "source:redis_pubsub",
            "redis_disconnected_seconds_total"
        ) >= 0.0
    );
    handle.shutdown();
    handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn publish_sink_sends_cloudevents_in_the_body() {
    let _turn = PUBSUB.lock().await;
    let channel = unique("alerts");
    let client = connection().client().unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(&channel).await.unwrap();
    let sink = Arc::new(RedisPublish::new(
        RedisPublishConfig::new(&channel),
        connection(),
    ));
    let report = Pipeline::builder(incident_generator())
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .shared_action(sink.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    assert!(report.metrics.alerts > 0);
    let mut messages = sub.on_message();
    let mut events = Vec::new();
    while events.len() < report.metrics.alerts as usize {
        let msg = tokio::time::timeout(
            Duration::from_secs(5),
            futures::StreamExt::next(&mut messages),
        )
        .await
        .expect("every alert is published")
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
        events.push(v);
    }
    let e = &events[0];
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["type"], "io.smartcloudops.anomaly");
    assert_eq!(e["source"], "smartcloudops");
    assert_eq!(e["datacontenttype"], "application/json");
    assert!(
        e["data"]["reason"].as_str().unwrap().contains("by ewma"),
        "{e}"
    );
    assert_eq!(e["time"], e["data"]["time"]);
    assert_eq!(sink.unheard(), 0);
}

fn incident_generator() -> GeneratorSource {
    GeneratorSource::new(GeneratorConfig {
        series: 5,
        points: 300,
        anomalies: vec![InjectedAnomaly {
            series: vec![2],
            at: 250,
            duration: 1,
            magnitude: 40.0,
            kind: Default::default(),
        }],
        ..GeneratorConfig::default()
    })
}

async fn xadd_lines(con: &mut redis::aio::MultiplexedConnection, stream: &str, lines: &[String]) {
    let mut pipe = redis::pipe();
    for l in lines {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("data")
            .arg(l)
            .ignore();
    }
    pipe.query_async::<()>(con).await.unwrap();
}

async fn pending(con: &mut redis::aio::MultiplexedConnection, stream: &str, group: &str) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(con)
        .await
        .unwrap();
    match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("unexpected XPENDING reply {other:?}"),
        },
        other => panic!("unexpected XPENDING reply {other:?}"),
    }
}

fn stream_config(stream: &str, group: &str, consumer: &str) -> RedisStreamSourceConfig {
    let mut c = RedisStreamSourceConfig::new(vec![stream.to_owned()], group);
    c.consumer = Some(consumer.to_owned());
    c.start = StreamStart::Earliest;
    c.batch_size = 100;
    c.block = Duration::from_millis(50);
    c.claim_idle = Duration::from_millis(500);
    c.claim_interval = Duration::from_millis(100);
    c.retry_backoff = Duration::from_millis(20);
    c
}

#[test]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
fn streams_deliver_every_entry_at_least_once_across_a_consumer_killed_mid_batch() {
    let stream = unique("stream");
    let group = "pipeline";
    let total = 2_000usize;
    let bad = [17usize, 444, 1999];
    let lines: Vec<String> = (0..total)
        .map(|i| {
            if bad.contains(&i) {
                format!("garbage {i}")
            } else {
                line("cpu", i as f64)
            }
        })
        .collect();
    let setup = tokio::runtime::Runtime::new().unwrap();
    setup.block_on(async {
        let mut con = raw().await;
        xadd_lines(&mut con, &stream, &lines).await;
    });

    // Consumer A completes three batches, then hangs in the middle of the fourth; its
    // process then dies (the runtime is dropped without any shutdown).
    let first = Arc::new(Rows {
        hang_after: Some(3),
        ..Rows::default()
    });
    let letters_a = Arc::new(MemoryDeadLetters::default());
    {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let handle = runtime.block_on(async {
            let h = Pipeline::builder(RedisStreamSource::new(
                stream_config(&stream, group, "consumer-a"),
                connection(),
            ))
            .shared_action(first.clone())
            .dead_letters(letters_a.clone())
            .build()
            .spawn();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while first.batches.load(Ordering::SeqCst) < 4 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "consumer A never got going"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Let the acker acknowledge the three finished batches.
            tokio::time::sleep(Duration::from_millis(200)).await;
            h
        });
        std::mem::forget(handle); // no orderly shutdown: the "process" just dies
        runtime.shutdown_background();
    }
    let seen_by_a = first.len();
    assert!(seen_by_a >= 300 && seen_by_a < total, "A saw {seen_by_a}");

    // Consumer B takes over A's pending entries once they are idle, and reads the rest.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut con = raw().await;
        assert!(
            pending(&mut con, &stream, group).await > 0,
            "A left entries pending"
        );
        let second = Arc::new(Rows::default());
        let letters = Arc::new(MemoryDeadLetters::default());
        let handle = Pipeline::builder(RedisStreamSource::new(
            stream_config(&stream, group, "consumer-b"),
            connection(),
        ))
        .shared_action(second.clone())
        .dead_letters(letters.clone())
        .build()
        .spawn();
        let good: BTreeSet<u64> = (0..total)
            .filter(|i| !bad.contains(i))
            .map(|i| i as u64)
            .collect();
        let covered = |a: &Rows, b: &Rows| -> BTreeSet<u64> {
            a.values()
                .into_iter()
                .chain(b.values())
                .map(|v| v as u64)
                .collect()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while covered(&first, &second) != good || pending(&mut con, &stream, group).await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not every entry was processed and acknowledged: {} of {} rows, {} pending",
                covered(&first, &second).len(),
                good.len(),
                pending(&mut con, &stream, group).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            gauge(&handle, "source:redis_stream", "redis_stream_claimed_total") > 0.0,
            "B claimed A's entries"
        );
        handle.shutdown();
        let report = handle.wait().await.unwrap();
        let dead: usize = letters_a.letters().len() + letters.letters().len();
        assert!(
            dead >= bad.len(),
            "every bad record is dead-lettered ({dead})"
        );
        let b_letters: Vec<String> = letters
            .letters()
            .iter()
            .map(|l| l.payload.clone())
            .collect();
        let a_letters: Vec<String> = letters_a
            .letters()
            .iter()
            .map(|l| l.payload.clone())
            .collect();
        for i in bad {
            let text = format!("garbage {i}");
            assert!(
                b_letters.contains(&text) || a_letters.contains(&text),
                "{text} dead-lettered"
            );
        }
        assert_eq!(report.metrics.batches_nacked, 0);
        assert_eq!(pending(&mut con, &stream, group).await, 0);
        let _: () = con.del(&stream).await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_poison_entry_goes_to_the_dead_letter_stream_after_max_deliveries() {
    let stream = unique("poison");
    let dlq = format!("{stream}:dead");
    let group = "pipeline";
    let mut con = raw().await;
    let mut lines: Vec<String> = (0..20).map(|i| line("cpu", f64::from(i))).collect();
    lines.insert(7, line("poison", 666.0));
    xadd_lines(&mut con, &stream, &lines).await;

    let rows = Arc::new(Rows {
        fail_metric: Some("poison".into()),
        ..Rows::default()
    });
    let mut config = stream_config(&stream, group, "c1");
    config.max_deliveries = 3;
    config.dead_letter_stream = Some(dlq.clone());
    let handle = Pipeline::builder(RedisStreamSource::new(config, connection()))
        .shared_action(rows.clone())
        .build()
        .spawn();
    // Healthy traffic keeps flowing: the poison entry's failures happen while other batches
    // succeed, so they count toward max_deliveries (an outage of the whole pipeline would not).
    let mut trickle = raw().await;
    let mut next_good = 20;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let dead: i64 = con.xlen(&dlq).await.unwrap();
        if dead == 1 && pending(&mut con, &stream, group).await == 0 {
            break;
        }
        xadd_lines(&mut trickle, &stream, &[line("cpu", f64::from(next_good))]).await;
        next_good += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "poison entry not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The good entries read with the poison one were redelivered one by one and passed.
    let good: BTreeSet<u64> = rows
        .seen()
        .iter()
        .filter(|(m, _)| m == "cpu")
        .map(|(_, v)| *v as u64)
        .collect();
    assert!(
        good.is_superset(&(0..20).collect()),
        "every good entry passed"
    );
    let poison_tries = rows.seen().iter().filter(|(m, _)| m == "poison").count();
    assert!(
        poison_tries >= 3,
        "processed at least max_deliveries times, then dead-lettered ({poison_tries})"
    );
    let reply: redis::streams::StreamRangeReply = con.xrange_all(&dlq).await.unwrap();
    let entry = &reply.ids[0];
    let field = |k: &str| -> String { entry.get(k).unwrap() };
    assert!(field("dlq_deliveries").parse::<u32>().unwrap() > 3);
    assert!(
        field("dlq_reason").contains("max_deliveries = 3"),
        "{}",
        field("dlq_reason")
    );
    assert_eq!(field("dlq_stream"), stream);
    assert!(field("data").contains("poison"));
    assert_eq!(
        gauge(&handle, "source:redis_stream", "redis_stream_poison_total"),
        1.0
    );
    handle.shutdown();
    handle.wait().await.unwrap();
    let _: () = con.del(&[&stream, &dlq]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn stream_sink_appends_cloudevents_fields_and_trims_to_about_maxlen() {
    let stream = unique("scored");
    let mut config = RedisStreamSinkConfig::new(&stream);
    config.maxlen = 200;
    config.payload = SinkPayload::Scored;
    let report = Pipeline::builder(incident_generator())
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .action(RedisStreamSink::new(config, connection()))
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    assert_eq!(report.metrics.rows_acked, 1_500);
    let mut con = raw().await;
    let len: usize = con.xlen(&stream).await.unwrap();
    // `~` trims whole radix-tree nodes (100 entries each by default): about maxlen, never
    // fewer.
    assert!((200..=400).contains(&len), "stream length {len}");
    let reply: redis::streams::StreamRangeReply =
        con.xrevrange_count(&stream, "+", "-", 1).await.unwrap();
    let last = &reply.ids[0];
    let get = |k: &str| -> String { last.get(k).unwrap() };
    assert_eq!(get("ce_specversion"), "1.0");
    assert_eq!(get("ce_type"), "io.smartcloudops.scored");
    assert_eq!(get("content-type"), "application/json");
    let data: serde_json::Value = serde_json::from_str(&get("data")).unwrap();
    assert_eq!(data["series_id"].as_str().unwrap(), get("key"));
    assert!(data["score"].is_number());
    let _: () = con.del(&stream).await.unwrap();
}

/// Writes `rows` as JSON lines: three series of a noisy level with a slow cycle.
fn series_file(
    dir: &std::path::Path,
    name: &str,
    range: std::ops::Range<usize>,
) -> std::path::PathBuf {
    let lines = range.flat_map(|i| {
        ["a", "b", "c"].map(|host| {
            let v = 50.0 + 10.0 * ((i as f64) / 30.0).sin() + ((i * 7919 + host.len()) % 13) as f64;
            format!(
                r#"{{"ts":{},"metric":"cpu","labels":{{"host":"{host}"}},"value":{v}}}"#,
                1_764_000_000_000i64 + i as i64 * 60_000
            )
        })
    });
    common::jsonl_file(dir, name, lines)
}

/// `(series_id, ts, score)` of every row of the scored `batches`, in order.
fn scores(batches: &[smartcloudops_core::RecordBatch]) -> Vec<(u64, i64, f64)> {
    let mut out = Vec::new();
    for batch in batches {
        let cols = smartcloudops_core::schema::MetricsColumns::try_new(batch, "scores").unwrap();
        let scores = smartcloudops_core::schema::ScoreColumns::try_new(batch, "scores").unwrap();
        for r in 0..batch.num_rows() {
            out.push((
                cols.series_id.value(r),
                cols.ts.value(r),
                scores.score.value(r),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_restarted_replica_resumes_from_per_series_state_in_redis() {
    let dir = tempfile::tempdir().unwrap();
    let first_half = series_file(dir.path(), "first.jsonl", 0..400);
    let second_half = series_file(dir.path(), "second.jsonl", 400..800);
    let whole = series_file(dir.path(), "whole.jsonl", 0..800);
    let prefix = unique("state");
    let store_config = RedisStateStoreConfig {
        key_prefix: prefix.clone(),
        ttl: Duration::from_secs(600),
        interval: Duration::from_secs(3600), // only the save at shutdown
        ..RedisStateStoreConfig::default()
    };
    let detector = || EwmaDetector::new(EwmaConfig::default());
    let run = |path: std::path::PathBuf, store: bool| {
        let store_config = store_config.clone();
        async move {
            let scored = Arc::new(MemoryAction::new().every_batch());
            let mut builder = Pipeline::builder(FileSource::new(FileSourceConfig::new(path)))
                .detector(detector())
                .shared_action(scored.clone());
            if store {
                builder = builder.series_state_store(
                    Arc::new(RedisStateStore::new(&store_config, connection())),
                    store_config.interval,
                );
            }
            let report = builder.build().spawn().wait().await.unwrap();
            (scores(&scored.batches()), report)
        }
    };
    let (uninterrupted, _) = run(whole, false).await;
    let (mut resumed, _) = run(first_half, true).await;
    let (after_restart, report) = run(second_half.clone(), true).await;
    resumed.extend(after_restart);
    assert_eq!(resumed.len(), uninterrupted.len());
    assert_eq!(
        resumed, uninterrupted,
        "scores after the restart equal scores without it"
    );
    let gauges = &report.metrics.stage("detector:ewma").unwrap().gauges;
    let loaded = gauges
        .iter()
        .find(|g| g.name == "detector_states_loaded_total")
        .unwrap();
    assert_eq!(loaded.value, 3.0);

    // Without the store, the restarted detector relearns: its scores differ.
    let (cold, _) = run(second_half, false).await;
    assert_ne!(cold, uninterrupted[uninterrupted.len() - cold.len()..]);

    // One key per series, versioned, with the TTL set.
    let mut con = raw().await;
    let namespace = detector().series_state_namespace().unwrap();
    assert!(namespace.starts_with("v1:ewma:"), "{namespace}");
    let keys: Vec<String> = con
        .keys(format!("{prefix}:state:{namespace}:*"))
        .await
        .unwrap();
    assert_eq!(keys.len(), 3);
    for key in &keys {
        let ttl: i64 = con.ttl(key).await.unwrap();
        assert!(ttl > 0 && ttl <= 600, "ttl {ttl}");
    }
    let _: () = con.del(&keys).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn result_cache_holds_the_latest_score_and_last_anomaly_per_series() {
    let prefix = unique("cache");
    let config = ResultCacheConfig {
        key_prefix: prefix.clone(),
        ..ResultCacheConfig::default()
    };
    let cache = Arc::new(ResultCache::new(&config, connection()));
    let report = Pipeline::builder(incident_generator())
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .shared_action(cache.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    assert!(report.metrics.alerts > 0);
    let recent = cache.recent(10).await.unwrap();
    assert_eq!(recent.len(), 5, "one entry per series");
    let by_host: HashMap<String, _> = recent
        .iter()
        .map(|r| (r.labels["host"].clone(), r.clone()))
        .collect();
    let hit = &by_host["host-00002"];
    let (latest, anomaly) = cache.get(hit.series_id).await.unwrap();
    let latest = latest.unwrap();
    assert_eq!(latest.ts_ms, recent.iter().map(|r| r.ts_ms).max().unwrap());
    assert_eq!(latest.detector, "ewma");
    assert!(!latest.explanation.is_empty());
    let anomaly = anomaly.expect("the incident is cached as the last anomaly");
    assert!(anomaly.is_anomaly);
    assert!(
        anomaly.explanation.contains("above expected"),
        "{}",
        anomaly.explanation
    );
    let mut con = raw().await;
    let key = format!("{prefix}:result:{}", hit.series_id);
    let ttl: i64 = con.ttl(&key).await.unwrap();
    assert!(ttl > 0);
    let keys: Vec<String> = con.keys(format!("{prefix}:*")).await.unwrap();
    let _: () = con.del(&keys).await.unwrap();
}

/// A private `redis-server` on a free loopback port, for tests that restart Redis or need
/// TLS; killed when dropped.
struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = PrivateRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.replace("{port}", &self.port.to_string()))
            .collect();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no save, no goodbye to the clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: scripts/redis.sh start installs it"]
async fn streams_survive_a_redis_restart_without_losing_entries() {
    // Every write is on disk before Redis answers, so a SIGKILL loses nothing acknowledged.
    let mut server = PrivateRedis::start(&[
        "--port",
        "{port}",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]);
    let conn = RedisConnection::new(server.url());
    let mut con = conn.connect().await.unwrap();
    let (stream, group) = ("metrics", "pipeline");
    xadd_lines(
        &mut con,
        stream,
        &(0..1000)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;

    let rows = Arc::new(Rows::default());
    let mut config = stream_config(stream, group, "c1");
    config.claim_idle = Duration::from_secs(1);
    let handle = Pipeline::builder(RedisStreamSource::new(config, conn.clone()))
        .shared_action(rows.clone())
        .build()
        .spawn();
    common::eventually("the first entries", Duration::from_secs(10), || {
        rows.len() >= 1000
    })
    .await;

    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await; // the pipeline sees it down
    server.spawn();
    let mut con = conn.connect().await.unwrap();
    xadd_lines(
        &mut con,
        stream,
        &(1000..2000)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;

    let all: BTreeSet<u64> = (0..2000).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen: BTreeSet<u64> = rows.values().into_iter().map(|v| v as u64).collect();
        if seen == all && pending(&mut con, stream, group).await == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after the restart: {} of 2000 rows, {} pending",
            seen.len(),
            pending(&mut con, stream, group).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert!(
        report.metrics.stage("source:redis_stream").unwrap().errors > 0,
        "the outage was noticed and counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and openssl: scripts/redis.sh start installs redis-server"]
async fn tls_and_a_password_from_a_file_connect_and_the_password_is_never_printed() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let server = PrivateRedis::start(&[
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert_s,
        "--tls-key-file",
        &key_s,
        "--tls-ca-cert-file",
        &cert_s,
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "s3cret-pw",
    ]);
    let password_file = certs.path().join("password");
    std::fs::write(&password_file, "s3cret-pw\n").unwrap();
    let tls = RedisConnection {
        tls: true,
        tls_insecure: true, // self-signed
        password_file: Some(password_file),
        ..RedisConnection::new(server.url())
    };
    let mut con = tls.connect().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");

    // The stream sink over TLS, read back.
    let sink = RedisStreamSink::new(RedisStreamSinkConfig::new("alerts"), tls.clone());
    let report = Pipeline::builder(incident_generator())
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .action(sink)
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let len: u64 = con.xlen("alerts").await.unwrap();
    assert_eq!(len, report.metrics.alerts);

    // Without the password, or without TLS, it fails, and says why without the secret.
    let no_password = RedisConnection {
        password_file: None,
        ..tls.clone()
    };
    let mut c = no_password.connect().await;
    if let Ok(con) = c.as_mut() {
        // Some servers accept the connection and refuse the first command.
        let err = redis::cmd("PING")
            .query_async::<String>(con)
            .await
            .unwrap_err();
        assert!(err.to_string().to_lowercase().contains("auth"), "{err}");
    }
    let plain = RedisConnection {
        tls: false,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(1),
        ..tls.clone()
    };
    let err = plain.connect().await.unwrap_err().to_string();
    assert!(!err.contains("s3cret-pw"), "{err}");
    let with_url_password =
        RedisConnection::new(format!("rediss://:s3cret-pw@127.0.0.1:{}", server.port));
    assert!(!format!("{with_url_password:?}").contains("s3cret-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn decision_notifications_reach_a_redis_stream_and_keys_dedupe_in_redis() {
    use smartcloudops_core::decision::guard::{IdempotencyStore, RedisIdempotency};
    use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions};
    let stream = unique("notifications");
    let prefix = unique("decision");
    let config: DecisionConfig = toml::from_str(&format!(
        r#"
        idempotency = {{ store = "redis", key_prefix = "{prefix}" }}

        [[rule]]
        name = "incident"
        group_wait = "0s"
        group_by = ["alertname", "host"]
        receivers = ["bus"]

        [[receiver]]
        name = "bus"
        type = "redis"
        stream = "{stream}"
        "#
    ))
    .unwrap();
    let engine = Arc::new(
        DecisionEngine::with_options(
            config,
            EngineOptions {
                ticker: false,
                redis: Some(connection()),
                ..EngineOptions::default()
            },
        )
        .unwrap(),
    );
    Pipeline::builder(incident_generator())
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .shared_action(engine.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let delivered = engine.stats().delivered.load(Ordering::Relaxed);
    assert!(delivered >= 1);
    let mut con = raw().await;
    let reply: redis::streams::StreamRangeReply = con.xrange_all(&stream).await.unwrap();
    assert_eq!(reply.ids.len() as u64, delivered);
    let body: String = reply.ids[0].get("data").unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["rule"], "incident");
    // The keys the engine claimed are in Redis: claiming one again fails, for any replica.
    let store = RedisIdempotency::new(connection(), prefix.clone());
    let id = body["id"].as_str().unwrap();
    assert!(!store.claim(id, Duration::from_secs(60), 0).await.unwrap());
    assert!(
        store
            .claim("never-seen", Duration::from_secs(60), 0)
            .await
            .unwrap()
    );
    let keys: Vec<String> = con.keys(format!("{prefix}:*")).await.unwrap();
    let _: () = con.del(&keys).await.unwrap();
    let _: () = con.del(&stream).await.unwrap();
}

/// Fails every batch until `until`, then takes them all.
#[derive(Debug)]
struct Outage {
    until: std::time::Instant,
    rows: Rows,
}

impl Action for Outage {
    fn name(&self) -> &str {
        "outage"
    }
    fn wants_every_batch(&self) -> bool {
        true
    }
    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if std::time::Instant::now() < self.until {
                return Err(smartcloudops_core::Error::Action {
                    action: "outage".into(),
                    message: "the sink is down".into(),
                    retryable: true,
                });
            }
            self.rows.execute(input).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_downstream_outage_does_not_turn_good_entries_into_poison() {
    let stream = unique("outage");
    let dlq = format!("{stream}:dead");
    let group = "pipeline";
    let mut con = raw().await;
    xadd_lines(
        &mut con,
        &stream,
        &(0..50)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;
    let sink = Arc::new(Outage {
        until: std::time::Instant::now() + Duration::from_millis(1500),
        rows: Rows::default(),
    });
    let mut config = stream_config(&stream, group, "c1");
    config.max_deliveries = 2;
    config.dead_letter_stream = Some(dlq.clone());
    let handle = Pipeline::builder(RedisStreamSource::new(config, connection()))
        .shared_action(sink.clone())
        .build()
        .spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen: BTreeSet<u64> = sink.rows.values().into_iter().map(|v| v as u64).collect();
        if seen.len() == 50 && pending(&mut con, &stream, group).await == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let dead: i64 = con.xlen(&dlq).await.unwrap();
            panic!(
                "{} of 50 after the outage; {dead} dead-lettered, {} pending",
                seen.len(),
                pending(&mut con, &stream, group).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead: i64 = con.xlen(&dlq).await.unwrap();
    assert_eq!(
        dead, 0,
        "nothing is poison when every batch failed for the same reason"
    );
    handle.shutdown();
    handle.wait().await.unwrap();
    let _: () = con.del(&[&stream, &dlq]).await.unwrap();
}

/// The keys the stream source keeps beside its group (default `key_prefix`).
fn attempts_key(stream: &str, group: &str) -> String {
    format!("smartcloudops:{stream}:{group}:attempts")
}
fn acked_key(stream: &str, group: &str) -> String {
    format!("smartcloudops:{stream}:{group}:acked")
}

/// The ids of `stream`'s entries, oldest first, with their `data` field.
async fn entry_ids(
    con: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = con.xrange_all(stream).await.unwrap();
    reply
        .ids
        .iter()
        .map(|e| (e.id.clone(), e.get::<String>("data").unwrap_or_default()))
        .collect()
}

/// Redis's own delivery count of `id` in `group` (0 if not pending).
async fn delivery_count(
    con: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    id: &str,
) -> u64 {
    let reply: redis::streams::StreamPendingCountReply =
        con.xpending_count(stream, group, id, id, 1).await.unwrap();
    reply.ids.first().map_or(0, |p| p.times_delivered as u64)
}

/// Starts a stream pipeline for `config` on a runtime of its own, which the caller may drop
/// without any shutdown (a `kill -9` of the process).
fn spawn_on(
    runtime: &tokio::runtime::Runtime,
    config: RedisStreamSourceConfig,
    action: Arc<dyn Action>,
    letters: Arc<MemoryDeadLetters>,
) -> PipelineHandle {
    runtime.block_on(async {
        Pipeline::builder(RedisStreamSource::new(config, connection()))
            .shared_action(action)
            .dead_letters(letters)
            .build()
            .spawn()
    })
}

#[test]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
fn an_outage_then_a_pod_restart_dead_letters_nothing_good() {
    let stream = unique("outage-restart");
    let group = "pipeline";
    let setup = tokio::runtime::Runtime::new().unwrap();
    let mut con = setup.block_on(raw());
    setup.block_on(xadd_lines(
        &mut con,
        &stream,
        &(0..50)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    ));
    let mut config = stream_config(&stream, group, "pod-a");
    config.max_deliveries = 2;

    // The downstream is down: every batch fails, again and again, far more often than
    // max_deliveries; then the pod dies (no shutdown at all).
    let down = Arc::new(Outage {
        until: std::time::Instant::now() + Duration::from_secs(3600),
        rows: Rows::default(),
    });
    let letters_a = Arc::new(MemoryDeadLetters::default());
    let first = tokio::runtime::Runtime::new().unwrap();
    let handle = spawn_on(&first, config.clone(), down.clone(), letters_a.clone());
    std::thread::sleep(Duration::from_millis(1500));
    std::mem::forget(handle);
    first.shutdown_background();
    let ids = setup.block_on(entry_ids(&mut con, &stream));
    let delivered = setup.block_on(delivery_count(&mut con, &stream, group, &ids[0].0));
    assert!(
        delivered > 2,
        "Redis counted {delivered} deliveries: more than max_deliveries would allow"
    );
    assert!(
        letters_a.letters().is_empty(),
        "nothing dead-lettered during the outage"
    );

    // Another pod takes the entries over while the outage lasts a little longer, then ends.
    config.consumer = Some("pod-b".into());
    let sink = Arc::new(Outage {
        until: std::time::Instant::now() + Duration::from_millis(1000),
        rows: Rows::default(),
    });
    let letters = Arc::new(MemoryDeadLetters::default());
    let second = tokio::runtime::Runtime::new().unwrap();
    let handle = spawn_on(&second, config, sink.clone(), letters.clone());
    second.block_on(async {
        let all: BTreeSet<u64> = (0..50).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen: BTreeSet<u64> = sink.rows.values().into_iter().map(|v| v as u64).collect();
            if seen == all && pending(&mut con, &stream, group).await == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of 50 processed after the outage; {} dead-lettered, the first: {:?}",
                seen.len(),
                letters.letters().len(),
                letters.letters().first()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            letters.letters().is_empty(),
            "good entries dead-lettered: {:?}",
            letters.letters()
        );
        assert_eq!(
            gauge(&handle, "source:redis_stream", "redis_stream_poison_total"),
            0.0
        );
        let counts: i64 = con.exists(attempts_key(&stream, group)).await.unwrap();
        assert_eq!(counts, 0, "an outage counts no failure");
        handle.shutdown();
        handle.wait().await.unwrap();
        let _: () = con
            .del(&[&stream, &acked_key(&stream, group)])
            .await
            .unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_poison_entry_is_dead_lettered_whole_after_max_deliveries_failures_across_a_restart() {
    let stream = unique("poison-restart");
    let group = "pipeline";
    let mut con = raw().await;
    let poison_line = line("poison", 666.0);
    let mut lines: Vec<String> = (0..20).map(|i| line("cpu", f64::from(i))).collect();
    lines.insert(7, poison_line.clone());
    xadd_lines(&mut con, &stream, &lines).await;
    let poison_id = entry_ids(&mut con, &stream)
        .await
        .into_iter()
        .find(|(_, data)| data.contains("poison"))
        .unwrap()
        .0;
    let mut config = stream_config(&stream, group, "c1");
    config.max_deliveries = 4;
    let failures = || async {
        let mut con = raw().await;
        let n: Option<u32> = con
            .hget(attempts_key(&stream, group), &poison_id)
            .await
            .unwrap();
        n.unwrap_or(0)
    };
    let poison_tries = |rows: &Rows| rows.seen().iter().filter(|(m, _)| m == "poison").count();

    // First run: healthy traffic makes the poison entry's failures count. Stopped after two.
    let rows = Arc::new(Rows {
        fail_metric: Some("poison".into()),
        ..Rows::default()
    });
    let letters = Arc::new(MemoryDeadLetters::default());
    let handle = Pipeline::builder(RedisStreamSource::new(config.clone(), connection()))
        .shared_action(rows.clone())
        .dead_letters(letters.clone())
        .build()
        .spawn();
    let mut next_good = 20;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while failures().await < 2 {
        xadd_lines(&mut con, &stream, &[line("cpu", f64::from(next_good))]).await;
        next_good += 1;
        assert!(tokio::time::Instant::now() < deadline, "no failure counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // no traffic: nothing more counts
    handle.shutdown();
    handle.wait().await.unwrap();
    let counted_before = failures().await;
    assert!(
        (2..4).contains(&counted_before),
        "counted {counted_before} failures before the restart"
    );
    assert!(letters.letters().is_empty(), "not poison yet");
    let reason: String = con
        .hget(attempts_key(&stream, group), format!("{poison_id}:error"))
        .await
        .unwrap();
    assert!(reason.contains("refusing the poison row"), "{reason}");

    // Second run: the count carried over, so fewer failures finish it.
    let rows = Arc::new(Rows {
        fail_metric: Some("poison".into()),
        ..Rows::default()
    });
    let handle = Pipeline::builder(RedisStreamSource::new(config, connection()))
        .shared_action(rows.clone())
        .dead_letters(letters.clone())
        .build()
        .spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while letters.letters().is_empty() || pending(&mut con, &stream, group).await != 0 {
        xadd_lines(&mut con, &stream, &[line("cpu", f64::from(next_good))]).await;
        next_good += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "poison entry not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // One try may not count (nothing succeeded yet since its delivery); a count starting
    // from zero would need four more.
    let tries = poison_tries(&rows);
    assert!(
        tries <= 4 - counted_before as usize + 1,
        "{tries} tries after the restart, {counted_before} failures counted before it"
    );
    let dead = letters.letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let letter = &dead[0];
    assert_eq!(letter.payload, poison_line, "the whole record");
    assert_eq!(letter.origin, format!("{stream}/{poison_id}"));
    assert!(
        letter
            .reason
            .contains("failed 4 times (max_deliveries = 4)")
            && letter.reason.contains("refusing the poison row"),
        "{}",
        letter.reason
    );
    assert_eq!(
        gauge(&handle, "source:redis_stream", "redis_stream_poison_total"),
        1.0
    );
    handle.shutdown();
    handle.wait().await.unwrap();
    let counts: i64 = con.exists(attempts_key(&stream, group)).await.unwrap();
    assert_eq!(counts, 0, "counts are deleted with the XACK");
    let _: () = con
        .del(&[&stream, &acked_key(&stream, group)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_lost_group_is_created_again_after_what_was_acknowledged_and_before_what_was_not() {
    let stream = unique("lost-group");
    let group = "pipeline";
    let mut con = raw().await;
    let values =
        |rows: &Rows| -> BTreeSet<u64> { rows.values().into_iter().map(|v| v as u64).collect() };
    let run = |rows: Arc<Rows>| {
        let mut config = stream_config(&stream, group, "c1");
        // `$` if the group were simply created again: the mark must win.
        config.start = StreamStart::Latest;
        config.claim_idle = Duration::from_secs(60); // leaves the other consumer's entry alone
        Pipeline::builder(RedisStreamSource::new(config, connection()))
            .shared_action(rows)
            .build()
            .spawn()
    };
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(group)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await
        .unwrap();
    xadd_lines(
        &mut con,
        &stream,
        &(0..10)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;

    // Everything acknowledged: the mark is the last entry.
    let rows = Arc::new(Rows::default());
    let handle = run(rows.clone());
    common::eventually("the first ten", Duration::from_secs(10), || {
        values(&rows) == (0..10).collect()
    })
    .await;
    let ids = entry_ids(&mut con, &stream).await;
    let mark = || async {
        let mut con = raw().await;
        let m: Option<String> = con.get(acked_key(&stream, group)).await.unwrap();
        m
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while mark().await.as_deref() != Some(ids[9].0.as_str()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mark {:?}, last entry {}",
            mark().await,
            ids[9].0
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown();
    handle.wait().await.unwrap();

    // The group is lost while no consumer runs; producers go on.
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(group)
        .query_async(&mut con)
        .await
        .unwrap();
    xadd_lines(
        &mut con,
        &stream,
        &(10..15)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;
    let rows = Arc::new(Rows::default());
    let handle = run(rows.clone());
    common::eventually(
        "the entries written after the loss",
        Duration::from_secs(10),
        || values(&rows) == (10..15).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        values(&rows),
        (10..15).collect(),
        "acknowledged entries skipped"
    );
    assert_eq!(
        gauge(
            &handle,
            "source:redis_stream",
            "redis_stream_group_recreated_total"
        ),
        1.0
    );

    handle.shutdown();
    handle.wait().await.unwrap();

    // Another consumer holds entry 15 unacknowledged: the mark stays below it.
    xadd_lines(&mut con, &stream, &[line("cpu", 15.0)]).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("elsewhere")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    xadd_lines(
        &mut con,
        &stream,
        &(16..20)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;
    let rows = Arc::new(Rows::default());
    let handle = run(rows.clone());
    common::eventually(
        "the entries after the held one",
        Duration::from_secs(10),
        || (16..20).all(|v| values(&rows).contains(&v)),
    )
    .await;
    handle.shutdown();
    handle.wait().await.unwrap();
    let ids = entry_ids(&mut con, &stream).await;
    let held = &ids[15].0;
    let m = mark().await.expect("a mark");
    let after: redis::streams::StreamRangeReply = con.xrange(&stream, &m, "+").await.unwrap();
    assert_eq!(
        after.ids.first().map(|e| e.id.as_str()),
        Some(held.as_str()),
        "the mark {m} is just below the entry still pending"
    );

    // Lost again: the held entry comes back (at-least-once), nothing is skipped.
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(group)
        .query_async(&mut con)
        .await
        .unwrap();
    let rows = Arc::new(Rows::default());
    let handle = run(rows.clone());
    common::eventually("the entry held elsewhere", Duration::from_secs(10), || {
        values(&rows).contains(&15)
    })
    .await;
    handle.shutdown();
    handle.wait().await.unwrap();
    let _: () = con
        .del(&[&stream, &acked_key(&stream, group)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: scripts/redis.sh start installs it"]
async fn a_redis_restart_without_persistence_loses_no_entry_written_after_it() {
    let mut server = PrivateRedis::start(&["--port", "{port}", "--appendonly", "no"]);
    let conn = RedisConnection::new(server.url());
    let mut con = conn.connect().await.unwrap();
    let (stream, group) = ("metrics", "pipeline");
    xadd_lines(
        &mut con,
        stream,
        &(0..500)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;
    let rows = Arc::new(Rows::default());
    let mut config = stream_config(stream, group, "c1");
    // Created at `$` the first time: after the loss, `$` would skip what follows.
    config.start = StreamStart::Latest;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(&mut con)
        .await
        .unwrap();
    let handle = Pipeline::builder(RedisStreamSource::new(config, conn.clone()))
        .shared_action(rows.clone())
        .build()
        .spawn();
    let values = || -> BTreeSet<u64> { rows.values().into_iter().map(|v| v as u64).collect() };
    common::eventually("the first entries", Duration::from_secs(10), || {
        values().len() == 500
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending(&mut con, stream, group).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "not acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Redis restarts empty. Producers write at once, before the pipeline is back.
    server.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.spawn();
    let mut con = conn.connect().await.unwrap();
    xadd_lines(
        &mut con,
        stream,
        &(500..1000)
            .map(|i| line("cpu", f64::from(i)))
            .collect::<Vec<_>>(),
    )
    .await;
    let all: BTreeSet<u64> = (0..1000).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if values() == all && pending(&mut con, stream, group).await == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after the restart: {} of 1000 rows, {} pending",
            values().len(),
            pending(&mut con, stream, group).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gauge(
            &handle,
            "source:redis_stream",
            "redis_stream_group_recreated_total"
        ) >= 1.0,
        "the recreation is counted"
    );
    // And it was not at `$`: the group delivered the stream from its start.
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(groups.len(), 1);
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(report.metrics.batches_nacked, 0);
}
