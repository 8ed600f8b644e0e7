//! The Kafka source and sink against a real broker on loopback.
//!
//! These tests are `#[ignore]`d so that `cargo test` needs no broker. Run them with
//! `scripts/kafka.sh start` and
//! `cargo test -p smartcloudops-core --features kafka --test kafka -- --ignored`
//! (`SMARTCLOUDOPS_KAFKA_BROKERS` overrides the default `127.0.0.1:19092`).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use smartcloudops_core::action::{KafkaSink, KafkaSinkConfig, KafkaSinkPayload, MemoryAction};
use smartcloudops_core::detector::{EwmaConfig, EwmaDetector};
use smartcloudops_core::source::kafka::AutoOffsetReset;
use smartcloudops_core::source::{KafkaSource, KafkaSourceConfig};
use smartcloudops_core::{Action, ActionInput, Error, Pipeline, Result};
use tokio::time::Instant;

fn brokers() -> String {
    std::env::var("SMARTCLOUDOPS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

fn unique(name: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// Produces `(key, payload)` records; returns the end offset (last + 1) of each partition.
async fn produce(topic: &str, records: &[(String, String)]) -> BTreeMap<i32, i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let deliveries: Vec<_> = records
        .iter()
        .map(|(k, v)| {
            producer.send(
                FutureRecord::to(topic).key(k).payload(v),
                Duration::from_secs(10),
            )
        })
        .collect();
    let mut ends = BTreeMap::new();
    for d in futures::future::join_all(deliveries).await {
        let delivery = d.map_err(|(e, _)| e).unwrap();
        let end = ends.entry(delivery.partition).or_insert(0);
        *end = (*end).max(delivery.offset + 1);
    }
    ends
}

/// Reads `topic` from the beginning until `expect` messages arrived (or `timeout`).
async fn consume(topic: &str, expect: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expect {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("consuming {topic}: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// The group's committed offsets for `partitions` of `topic`.
fn committed(group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// A message's headers as text.
fn headers(m: &OwnedMessage) -> HashMap<String, String> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn events(series: usize, points: usize) -> Vec<(String, String)> {
    (0..points)
        .flat_map(|t| {
            (0..series).map(move |s| {
                let host = format!("host-{s:03}");
                let payload = format!(
                    r#"{{"ts": {}, "metric": "cpu", "labels": {{"host": "{host}"}}, "value": {}}}"#,
                    1_764_028_800_000i64 + t as i64 * 10_000,
                    40.0 + ((t * 7 + s) % 11) as f64
                );
                (host, payload)
            })
        })
        .collect()
}

fn source_config(group: &str, topic: &str) -> KafkaSourceConfig {
    let mut config = KafkaSourceConfig::new(brokers(), group, vec![topic.to_owned()]);
    config.auto_offset_reset = AutoOffsetReset::Earliest;
    config.batch_size = 200;
    config.batch_timeout = Duration::from_millis(20);
    config.drain_timeout = Duration::from_secs(3);
    config.commit_interval = Duration::from_millis(200);
    config.retry_backoff = Duration::from_millis(50);
    config
        .options
        .insert("session.timeout.ms".into(), "6000".into());
    config
        .options
        .insert("heartbeat.interval.ms".into(), "500".into());
    config
        .options
        .insert("statistics.interval.ms".into(), "300".into());
    config
}

/// Records every batch it sees; optionally fails its first `fail_first` calls and takes
/// `delay` per batch.
#[derive(Debug, Default)]
struct Seen {
    memory: MemoryAction,
    calls: AtomicUsize,
    fail_first: usize,
    delay: Duration,
    /// Extra time taken by the first call only.
    first_delay: Duration,
}

impl Action for Seen {
    fn name(&self) -> &str {
        "seen"
    }
    fn wants_every_batch(&self) -> bool {
        true
    }
    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call == 0 {
                tokio::time::sleep(self.first_delay).await;
            }
            if call < self.fail_first {
                return Err(Error::Action {
                    action: "seen".into(),
                    message: "injected failure".into(),
                    retryable: true,
                });
            }
            self.memory.record(input)
        })
    }
}

impl Seen {
    /// `(series_id, ts)` of every row seen.
    fn rows(&self) -> Vec<(u64, i64)> {
        common::rows(&self.memory.batches())
            .into_iter()
            .map(|r| (r.series_id, r.ts))
            .collect()
    }

    fn distinct(&self) -> usize {
        self.rows().into_iter().collect::<HashSet<_>>().len()
    }
}

/// Waits until the group's committed offsets reach `ends` on every partition.
async fn assert_committed(group: &str, topic: &str, ends: &BTreeMap<i32, i64>, timeout: Duration) {
    let partitions = ends.keys().max().map_or(0, |p| p + 1);
    assert!(
        common::wait_until(timeout, || committed(group, topic, partitions) == *ends).await,
        "committed {:?}, produced up to {ends:?}",
        committed(group, topic, partitions)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn every_event_is_scored_published_with_cloudevents_headers_and_committed() {
    let (input, output, group) = (unique("metrics"), unique("scored"), unique("group"));
    create_topic(&input, 4).await;
    create_topic(&output, 2).await;
    let records = events(40, 50);
    let ends = produce(&input, &records).await;
    assert_eq!(ends.values().sum::<i64>(), 2000);

    let mut sink = KafkaSinkConfig::new(brokers(), &output);
    sink.payload = KafkaSinkPayload::Scored;
    sink.event_source = "smartcloudops/test".into();
    let handle = Pipeline::builder(KafkaSource::new(source_config(&group, &input)))
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .action(KafkaSink::new(sink).unwrap())
        .build()
        .spawn();
    let published = consume(&output, 2000, Duration::from_secs(60)).await;
    assert_eq!(published.len(), 2000, "every event scored and published");
    assert_committed(&group, &input, &ends, Duration::from_secs(10)).await;
    // Consumer lag per partition, from librdkafka's statistics, on the source's metrics.
    let lag_partitions = || {
        let snapshot = handle.metrics().snapshot();
        let source = snapshot.stage("source:kafka").unwrap();
        source
            .gauges
            .iter()
            .filter(|g| g.name == "kafka_consumer_lag")
            .map(|g| (g.labels.clone(), g.value))
            .collect::<Vec<_>>()
    };
    assert!(
        common::wait_until(Duration::from_secs(10), || lag_partitions().len() == 4).await,
        "lag gauges: {:?}",
        lag_partitions()
    );
    assert!(
        handle
            .metrics()
            .render_prometheus()
            .contains("smartcloudops_kafka_consumer_lag{stage=\"source:kafka\",partition=\"0\"")
    );
    println!("consumer lag after catching up: {:?}", lag_partitions());
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(report.metrics.rows_acked, 2000);
    assert_eq!(report.metrics.batches_nacked, 0);

    // A plain consumer reads JSON bodies with CloudEvents attributes in ce_* headers.
    let mut ids = HashSet::new();
    for m in &published {
        let headers = headers(m);
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(headers["ce_type"], "io.smartcloudops.scored");
        assert_eq!(headers["ce_source"], "smartcloudops/test");
        assert!(headers["ce_time"].starts_with("2025-11-25T"));
        assert_eq!(headers["content-type"], "application/json");
        ids.insert(headers["ce_id"].clone());
        let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(
            body["series_id"].as_str().unwrap().as_bytes(),
            m.key().unwrap(),
            "keyed by series"
        );
        assert!(body["score"].as_f64().unwrap() >= 0.0);
        assert_eq!(body["metric"], "cpu");
    }
    assert_eq!(ids.len(), 2000, "ce_id is unique per event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn poison_messages_go_to_the_dead_letter_topic_with_the_reason() {
    let (input, dlq, group) = (unique("metrics"), unique("dlq"), unique("group"));
    create_topic(&input, 2).await;
    create_topic(&dlq, 1).await;
    let mut records = events(10, 10);
    for i in 0..5 {
        records.insert(
            i * 20,
            (
                format!("poison-{i}"),
                format!("{{\"ts\": {i}, \"metric\": \"cpu\", \"value\": \"broken\"}}"),
            ),
        );
    }
    let ends = produce(&input, &records).await;
    let mut config = source_config(&group, &input);
    config.dead_letter_topic = Some(dlq.clone());
    let seen = Arc::new(Seen::default());
    let handle = Pipeline::builder(KafkaSource::new(config))
        .shared_action(seen.clone())
        .build()
        .spawn();
    let letters = consume(&dlq, 5, Duration::from_secs(60)).await;
    assert_eq!(letters.len(), 5);
    assert!(common::wait_until(Duration::from_secs(20), || seen.distinct() == 100).await);
    // Poison does not block the partition: everything, poison included, is committed.
    assert_committed(&group, &input, &ends, Duration::from_secs(10)).await;
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(
        report.metrics.stage("source:kafka").unwrap().dead_lettered,
        5
    );
    for m in &letters {
        let headers = headers(m);
        assert!(
            headers["dlq_reason"].contains("not a number"),
            "{headers:?}"
        );
        assert_eq!(headers["dlq_topic"], input);
        assert!(headers["dlq_offset"].parse::<i64>().is_ok());
        assert!(
            m.key().unwrap().starts_with(b"poison-"),
            "original key kept"
        );
        assert!(
            String::from_utf8_lossy(m.payload().unwrap()).contains("broken"),
            "original payload kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn a_nacked_batch_is_redelivered_and_never_skipped() {
    let (input, group) = (unique("metrics"), unique("group"));
    create_topic(&input, 2).await;
    let ends = produce(&input, &events(20, 50)).await;
    let seen = Arc::new(Seen {
        fail_first: 3,
        ..Default::default()
    });
    let handle = Pipeline::builder(KafkaSource::new(source_config(&group, &input)))
        .shared_action(seen.clone())
        .build()
        .spawn();
    assert!(
        common::wait_until(Duration::from_secs(60), || seen.distinct() == 1000).await,
        "saw {} of 1000",
        seen.distinct()
    );
    assert_committed(&group, &input, &ends, Duration::from_secs(10)).await;
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(
        report.metrics.batches_nacked, 3,
        "the injected failures were nacked"
    );
    assert!(seen.rows().len() >= 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn two_members_share_partitions_and_lose_nothing_across_a_rebalance() {
    let (input, group) = (unique("metrics"), unique("group"));
    create_topic(&input, 4).await;
    let first_half = events(40, 100);
    produce(&input, &first_half).await;
    // The first member is slow, so batches are in flight when the second joins and the
    // revoke has to drain them before committing.
    let a = Arc::new(Seen {
        delay: Duration::from_millis(150),
        ..Default::default()
    });
    let first = Pipeline::builder(KafkaSource::new(source_config(&group, &input)))
        .shared_action(a.clone())
        .build()
        .spawn();
    assert!(
        common::wait_until(Duration::from_secs(30), || a.distinct() > 0).await,
        "first member consumes"
    );
    // A second member joins: partitions are revoked (drained, committed) and spread over both.
    let b = Arc::new(Seen::default());
    let second = Pipeline::builder(KafkaSource::new(source_config(&group, &input)))
        .shared_action(b.clone())
        .build()
        .spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let more: Vec<(String, String)> = events(40, 200).split_off(4000);
    let ends = produce(&input, &more).await;
    let union = |a: &Seen, b: &Seen| {
        let mut all: HashSet<(u64, i64)> = a.rows().into_iter().collect();
        all.extend(b.rows());
        all.len()
    };
    assert!(
        common::wait_until(Duration::from_secs(60), || union(&a, &b) == 8000).await,
        "saw {} of 8000",
        union(&a, &b)
    );
    assert!(b.distinct() > 0, "the second member got partitions");
    assert_committed(&group, &input, &ends, Duration::from_secs(15)).await;
    first.shutdown();
    second.shutdown();
    let (ra, rb) = (first.wait().await.unwrap(), second.wait().await.unwrap());
    let total = a.rows().len() + b.rows().len();
    println!(
        "rows seen {total} for 8000 events ({} duplicates)",
        total - 8000
    );
    assert_eq!(ra.metrics.batches_nacked + rb.metrics.batches_nacked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn a_slow_pipeline_pauses_partitions_instead_of_missing_the_poll_interval() {
    let (input, group) = (unique("metrics"), unique("group"));
    create_topic(&input, 2).await;
    let ends = produce(&input, &events(50, 20)).await;
    let mut config = source_config(&group, &input);
    config.batch_size = 50;
    // The first action call takes 8 s while every queue behind it is full, longer than this
    // poll interval: only a source that keeps polling (with its partitions paused) stays in
    // the group; one that simply waits is kicked out and its batches are redelivered.
    config
        .options
        .insert("max.poll.interval.ms".into(), "6000".into());
    let slow = Arc::new(Seen {
        first_delay: Duration::from_secs(8),
        ..Default::default()
    });
    let handle = Pipeline::builder(KafkaSource::new(config))
        .shared_action(slow.clone())
        .options(smartcloudops_core::PipelineOptions {
            channel_capacity: 1,
            action_concurrency: 1,
            ..Default::default()
        })
        .build()
        .spawn();
    assert!(
        common::wait_until(Duration::from_secs(60), || slow.distinct() == 1000).await,
        "saw {} of 1000",
        slow.distinct()
    );
    assert_committed(&group, &input, &ends, Duration::from_secs(10)).await;
    let source = handle
        .metrics()
        .snapshot()
        .stage("source:kafka")
        .unwrap()
        .clone();
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(
        source.errors, 0,
        "no consumer errors (a missed poll interval is one)"
    );
    assert_eq!(
        slow.rows().len(),
        1000,
        "no redelivery: the member never left the group"
    );
    assert_eq!(report.metrics.batches_nacked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_is_a_nack_never_counted_as_delivered() {
    use smartcloudops_core::source::generator::{GeneratorConfig, GeneratorSource};
    // Nothing listens on port 1: every delivery times out.
    let mut sink = KafkaSinkConfig::new("127.0.0.1:1", "nowhere");
    sink.payload = KafkaSinkPayload::Scored;
    sink.delivery_timeout = Duration::from_millis(300);
    let report = Pipeline::builder(GeneratorSource::new(GeneratorConfig {
        series: 5,
        points: 4,
        batch_size: 10,
        ..GeneratorConfig::default()
    }))
    .action(KafkaSink::new(sink).unwrap())
    .build()
    .run(Default::default())
    .await
    .unwrap();
    assert_eq!(report.metrics.batches_acked, 0, "nothing acknowledged");
    assert_eq!(report.metrics.batches_nacked, 2);
    let action = report.metrics.stage("action:kafka").unwrap();
    assert_eq!((action.errors, action.batches_out), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn message_metadata_is_available_to_prep() {
    use smartcloudops_core::prep::FnPrep;
    let (input, group) = (unique("metrics"), unique("group"));
    create_topic(&input, 2).await;
    produce(&input, &events(4, 5)).await;
    let mut config = source_config(&group, &input);
    config.metadata = true;
    /// topic, partition, offset, key of each row.
    type Row = (String, i32, i64, String);
    let seen: Arc<Mutex<Vec<Row>>> = Arc::default();
    let sink = seen.clone();
    let prep = FnPrep::new("inspect", move |batch: &smartcloudops_core::RecordBatch| {
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::{Int32Type, Int64Type};
        let topic = batch.column_by_name("kafka_topic").unwrap();
        let topic = arrow::compute::cast(topic, &arrow::datatypes::DataType::Utf8)?;
        let partition = batch
            .column_by_name("kafka_partition")
            .unwrap()
            .as_primitive::<Int32Type>()
            .clone();
        let offset = batch
            .column_by_name("kafka_offset")
            .unwrap()
            .as_primitive::<Int64Type>()
            .clone();
        let key = batch
            .column_by_name("kafka_key")
            .unwrap()
            .as_string::<i32>()
            .clone();
        assert!(
            batch
                .column_by_name("kafka_timestamp")
                .unwrap()
                .null_count()
                < batch.num_rows()
        );
        let mut rows = sink.lock().unwrap();
        for i in 0..batch.num_rows() {
            rows.push((
                topic.as_string::<i32>().value(i).to_owned(),
                partition.value(i),
                offset.value(i),
                key.value(i).to_owned(),
            ));
        }
        Ok(batch.clone())
    });
    let handle = Pipeline::builder(KafkaSource::new(config))
        .prep(prep)
        .build()
        .spawn();
    assert!(common::wait_until(Duration::from_secs(30), || seen.lock().unwrap().len() == 20).await);
    handle.shutdown();
    handle.wait().await.unwrap();
    let rows = seen.lock().unwrap();
    assert!(rows.iter().all(|(t, p, o, k)| *t == input
        && (0..2).contains(p)
        && *o >= 0
        && k.starts_with("host-")));
    let distinct: HashSet<(i32, i64)> = rows.iter().map(|(_, p, o, _)| (*p, *o)).collect();
    assert_eq!(
        distinct.len(),
        20,
        "one row per message, each with its own offset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn failed_batches_are_not_committed_and_a_restart_processes_them() {
    let (input, group) = (unique("metrics"), unique("group"));
    create_topic(&input, 2).await;
    let ends = produce(&input, &events(20, 50)).await;
    // A sink that is down: every batch fails, is rewound and retried, never committed. Its
    // failures are retryable, so the default poison limit dead-letters none of them.
    let failing = Arc::new(Seen {
        fail_first: usize::MAX,
        ..Default::default()
    });
    let config = source_config(&group, &input);
    let handle = Pipeline::builder(KafkaSource::new(config))
        .shared_action(failing.clone())
        .build()
        .spawn();
    assert!(
        common::wait_until(Duration::from_secs(30), || failing
            .calls
            .load(Ordering::SeqCst)
            >= 6)
        .await,
        "batches were attempted and retried"
    );
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert!(report.metrics.batches_nacked >= 6);
    assert_eq!(report.metrics.batches_acked, 0);
    let after_failure = committed(&group, &input, 2);
    for (partition, end) in &ends {
        let at = after_failure.get(partition).copied().unwrap_or(0);
        assert!(
            at < *end,
            "partition {partition} committed to {at} past failed batches"
        );
    }
    // The sink is back: a restart in the same group processes everything that failed.
    let seen = Arc::new(Seen::default());
    let handle = Pipeline::builder(KafkaSource::new(source_config(&group, &input)))
        .shared_action(seen.clone())
        .build()
        .spawn();
    assert!(
        common::wait_until(Duration::from_secs(60), || seen.distinct() == 1000).await,
        "saw {} of 1000 after the restart",
        seen.distinct()
    );
    assert_committed(&group, &input, &ends, Duration::from_secs(10)).await;
    handle.shutdown();
    handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn decision_notifications_are_published_to_a_topic_keyed_by_group() {
    use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions};
    use smartcloudops_core::source::generator::{
        GeneratorConfig, GeneratorSource, InjectedAnomaly,
    };
    let topic = unique("notifications");
    create_topic(&topic, 2).await;
    let config: DecisionConfig = toml::from_str(&format!(
        r#"
        idempotency = {{ store = "memory" }}

        [[rule]]
        name = "incident"
        group_wait = "0s"
        group_by = ["alertname", "host"]
        receivers = ["bus"]

        [[receiver]]
        name = "bus"
        type = "kafka"
        brokers = "{brokers}"
        topic = "{topic}"
        "#,
        brokers = brokers()
    ))
    .unwrap();
    let engine = Arc::new(
        DecisionEngine::with_options(
            config,
            EngineOptions {
                ticker: false,
                ..EngineOptions::default()
            },
        )
        .unwrap(),
    );
    let source = GeneratorSource::new(GeneratorConfig {
        series: 5,
        points: 300,
        anomalies: vec![InjectedAnomaly {
            series: vec![3],
            at: 250,
            duration: 1,
            magnitude: 40.0,
            kind: Default::default(),
        }],
        ..GeneratorConfig::default()
    });
    Pipeline::builder(source)
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .shared_action(engine.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let delivered = engine
        .stats()
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(delivered >= 1);
    let messages = consume(&topic, delivered as usize, Duration::from_secs(20)).await;
    assert_eq!(messages.len() as u64, delivered);
    let bodies: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    assert!(bodies.iter().all(|b| b["rule"] == "incident"));
    assert!(
        bodies
            .iter()
            .any(|b| b["alerts"][0]["labels"]["host"] == "host-00003"),
        "the injected incident is among the notifications"
    );
    let key = std::str::from_utf8(messages[0].key().unwrap()).unwrap();
    assert_eq!(key.len(), 16, "keyed by the group's id");
}

/// Fails every batch holding a row of `metric`; records the others.
#[derive(Debug)]
struct FailOn {
    metric: &'static str,
    memory: MemoryAction,
    failures: AtomicUsize,
}

impl FailOn {
    fn new(metric: &'static str) -> Self {
        Self {
            metric,
            memory: MemoryAction::new(),
            failures: AtomicUsize::new(0),
        }
    }
}

impl Action for FailOn {
    fn name(&self) -> &str {
        "fail_on"
    }
    fn wants_every_batch(&self) -> bool {
        true
    }
    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rows = common::rows(std::slice::from_ref(&input.batch));
            if rows.iter().any(|r| r.metric == self.metric) {
                self.failures.fetch_add(1, Ordering::SeqCst);
                return Err(Error::Action {
                    action: "fail_on".into(),
                    message: format!("injected failure on {}", self.metric),
                    retryable: false,
                });
            }
            self.memory.record(input)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn a_batch_failing_max_attempts_times_is_dead_lettered_with_headers_and_committed() {
    let (input, dlq, group) = (unique("metrics"), unique("dlq"), unique("group"));
    create_topic(&input, 1).await;
    create_topic(&dlq, 1).await;
    // One partition: record i is offset i. The one at offset 50 decodes but always fails
    // the action.
    let mut records = events(10, 10);
    records.insert(
        50,
        (
            "poison".into(),
            r#"{"ts": 1764028800000, "metric": "poison", "value": 1}"#.into(),
        ),
    );
    let ends = produce(&input, &records).await;
    let mut config = source_config(&group, &input);
    config.dead_letter_topic = Some(dlq.clone());
    config.max_attempts = 3;
    config.batch_size = 10;
    let action = Arc::new(FailOn::new("poison"));
    let handle = Pipeline::builder(KafkaSource::new(config))
        .shared_action(action.clone())
        .build()
        .spawn();
    let seen = || {
        common::rows(&action.memory.batches())
            .into_iter()
            .map(|r| (r.series_id, r.ts))
            .collect::<HashSet<_>>()
            .len()
    };
    // The offsets, poison included, are committed once its range went to the dead-letter
    // topic, and the partition goes on.
    assert_committed(&group, &input, &ends, Duration::from_secs(60)).await;
    let letters = consume(&dlq, 101, Duration::from_secs(10)).await;
    assert!(
        common::wait_until(Duration::from_secs(20), || seen() + letters.len() == 101).await,
        "every message was processed or dead-lettered: {} seen, {} dead letters",
        seen(),
        letters.len()
    );
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    assert_eq!(
        action.failures.load(Ordering::SeqCst),
        3,
        "the failing range was delivered max_attempts times, then dead-lettered"
    );
    assert_eq!(
        report.metrics.stage("source:kafka").unwrap().dead_lettered,
        letters.len() as u64
    );
    assert!(
        !letters.is_empty() && letters.len() <= 10,
        "only the failing batch's range: {}",
        letters.len()
    );
    let mut offsets = Vec::new();
    for m in &letters {
        let headers = headers(m);
        assert_eq!(headers["dlq_attempts"], "3", "{headers:?}");
        assert!(
            headers["dlq_reason"].contains("failed 3 deliveries")
                && headers["dlq_reason"].contains("injected failure on poison"),
            "{headers:?}"
        );
        assert_eq!(headers["dlq_topic"], input);
        assert_eq!(headers["dlq_partition"], "0");
        offsets.push(headers["dlq_offset"].parse::<i64>().unwrap());
    }
    offsets.sort_unstable();
    assert_eq!(offsets[0], 50, "the range starts at the poison message");
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "one contiguous range: {offsets:?}"
    );
    let poison = letters
        .iter()
        .find(|m| m.key() == Some(&b"poison"[..]))
        .expect("the poison message itself, key kept");
    assert!(String::from_utf8_lossy(poison.payload().unwrap()).contains("\"poison\""));
}

/// A downstream outage: fails every batch with a retryable error until `outage` calls
/// failed, then records what it sees. Counts the failed deliveries of the batch holding the
/// partition's first messages (those with the first timestamp).
#[derive(Debug)]
struct Outage {
    memory: MemoryAction,
    calls: AtomicUsize,
    outage: usize,
    first_ts: i64,
    first_range_failures: AtomicUsize,
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
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.outage {
                let rows = common::rows(std::slice::from_ref(&input.batch));
                if rows.iter().any(|r| r.ts == self.first_ts) {
                    self.first_range_failures.fetch_add(1, Ordering::SeqCst);
                }
                return Err(Error::Action {
                    action: "outage".into(),
                    message: "503 from the receiver".into(),
                    retryable: true,
                });
            }
            self.memory.record(input)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn an_outage_longer_than_max_attempts_dead_letters_nothing() {
    let (input, dlq, group) = (unique("metrics"), unique("dlq"), unique("group"));
    create_topic(&input, 1).await;
    create_topic(&dlq, 1).await;
    let ends = produce(&input, &events(10, 10)).await;
    let mut config = source_config(&group, &input);
    config.dead_letter_topic = Some(dlq.clone());
    config.max_attempts = 2;
    config.batch_size = 10;
    config.retry_backoff = Duration::from_millis(10);
    let max_attempts = config.max_attempts as usize;
    let action = Arc::new(Outage {
        memory: MemoryAction::new(),
        calls: AtomicUsize::new(0),
        outage: 12,
        first_ts: 1_764_028_800_000,
        first_range_failures: AtomicUsize::new(0),
    });
    let handle = Pipeline::builder(KafkaSource::new(config))
        .shared_action(action.clone())
        .build()
        .spawn();
    let seen = || {
        common::rows(&action.memory.batches())
            .into_iter()
            .map(|r| (r.series_id, r.ts))
            .collect::<HashSet<_>>()
            .len()
    };
    assert!(
        common::wait_until(Duration::from_secs(60), || seen() == 100).await,
        "every message was processed once the receiver was back: {} of 100",
        seen()
    );
    assert_committed(&group, &input, &ends, Duration::from_secs(10)).await;
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    let first_range_failures = action.first_range_failures.load(Ordering::SeqCst);
    assert!(
        first_range_failures > max_attempts,
        "the outage outlasted max_attempts deliveries of the first batch: {first_range_failures}"
    );
    assert!(report.metrics.batches_nacked >= first_range_failures as u64);
    assert_eq!(
        report.metrics.stage("source:kafka").unwrap().dead_lettered,
        0,
        "nothing good was dead-lettered"
    );
    let letters = consume(&dlq, 1, Duration::from_secs(3)).await;
    assert!(letters.is_empty(), "dead letters: {}", letters.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker and Redis: scripts/kafka.sh start"]
async fn a_revoke_saves_the_detector_states_for_the_new_owner() {
    use redis::AsyncCommands;
    use smartcloudops_core::Detector;
    use smartcloudops_core::detector::{RedisStateStore, RedisStateStoreConfig};
    use smartcloudops_core::redis::RedisConnection;

    let (input, group) = (unique("metrics"), unique("group"));
    create_topic(&input, 4).await;
    produce(&input, &events(40, 50)).await;
    let redis = RedisConnection::new(
        std::env::var("SMARTCLOUDOPS_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    );
    let store_config = RedisStateStoreConfig {
        key_prefix: unique("sco-test:kafka-state"),
        ttl: Duration::from_secs(600),
        // No periodic save: only a revoke (or the shutdown) saves.
        interval: Duration::from_secs(3600),
        ..RedisStateStoreConfig::default()
    };
    let replica = |seen: Arc<Seen>| {
        Pipeline::builder(KafkaSource::new(source_config(&group, &input)))
            .detector(EwmaDetector::new(EwmaConfig::default()))
            .series_state_store(
                Arc::new(RedisStateStore::new(&store_config, redis.clone())),
                store_config.interval,
            )
            .shared_action(seen)
            .build()
            .spawn()
    };
    let a = Arc::new(Seen::default());
    let first = replica(a.clone());
    assert!(
        common::wait_until(Duration::from_secs(60), || a.distinct() == 2000).await,
        "first member saw {} of 2000",
        a.distinct()
    );
    let mut con = redis.connect().await.unwrap();
    let namespace = EwmaDetector::new(EwmaConfig::default())
        .series_state_namespace()
        .unwrap();
    let pattern = format!("{}:state:{namespace}:*", store_config.key_prefix);
    let keys = |mut con: redis::aio::MultiplexedConnection| {
        let pattern = pattern.clone();
        async move { con.keys::<_, Vec<String>>(pattern).await.unwrap().len() }
    };
    assert_eq!(
        keys(con.clone()).await,
        0,
        "nothing saved before the revoke"
    );

    // A second member joins: the first one's partitions are revoked, and their series'
    // states saved before the new owner reads on.
    let b = Arc::new(Seen::default());
    let second = replica(b.clone());
    let mut saved = 0;
    for _ in 0..300 {
        saved = keys(con.clone()).await;
        if saved == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        saved, 40,
        "every series' state saved on revoke, first member still running"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let more = events(40, 60).split_off(2000);
    let ends = produce(&input, &more).await;
    let union = |a: &Seen, b: &Seen| {
        let mut all: HashSet<(u64, i64)> = a.rows().into_iter().collect();
        all.extend(b.rows());
        all.len()
    };
    assert!(
        common::wait_until(Duration::from_secs(60), || union(&a, &b) == 2400).await,
        "saw {} of 2400",
        union(&a, &b)
    );
    assert!(b.distinct() > 0, "the second member got partitions");
    assert_committed(&group, &input, &ends, Duration::from_secs(15)).await;
    first.shutdown();
    second.shutdown();
    let (_, rb) = (first.wait().await.unwrap(), second.wait().await.unwrap());
    let loaded = rb
        .metrics
        .stage("detector:ewma")
        .unwrap()
        .gauges
        .iter()
        .find(|g| g.name == "detector_states_loaded_total")
        .map(|g| g.value);
    assert!(
        loaded.is_some_and(|n| n > 0.0),
        "the new owner continued the saved states: {loaded:?}"
    );
    let all: Vec<String> = con
        .keys(format!("{}:*", store_config.key_prefix))
        .await
        .unwrap();
    let _: () = con.del(&all).await.unwrap();
}
