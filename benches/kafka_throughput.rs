//! Kafka end to end: events/s from a topic through decode → detect → action, beside a bare
//! rdkafka consumer reading the same topic in the same run.
//!
//! Needs a broker (`scripts/kafka.sh start`; `SMARTCLOUDOPS_KAFKA_BROKERS` overrides
//! `127.0.0.1:19092`):
//!
//! ```sh
//! cargo bench -p smartcloudops-benches --bench kafka_throughput            # 1 000 000 events
//! SMARTCLOUDOPS_BENCH_EVENTS=200000 cargo bench -p smartcloudops-benches --bench kafka_throughput
//! ```
//!
//! Times exclude the consumer-group join: each clock starts at the first message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use smartcloudops_core::Pipeline;
use smartcloudops_core::action::FnAction;
use smartcloudops_core::detector::{EwmaConfig, EwmaDetector};
use smartcloudops_core::source::kafka::AutoOffsetReset;
use smartcloudops_core::source::{KafkaSource, KafkaSourceConfig};

const PARTITIONS: i32 = 4;
const SERIES: usize = 10_000;

fn brokers() -> String {
    std::env::var("SMARTCLOUDOPS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

async fn produce(topic: &str, events: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let started = Instant::now();
    for i in 0..events {
        let s = i % SERIES;
        let payload = format!(
            r#"{{"ts":{},"metric":"cpu_utilization","labels":{{"host":"host-{s:05}","region":"eu-west-1"}},"value":{:.2}}}"#,
            1_764_028_800_000i64 + (i / SERIES) as i64 * 10_000,
            40.0 + (i % 37) as f64 * 0.7
        );
        let key = format!("host-{s:05}");
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send_result(record) {
                Ok(_delivery) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {events} events in {secs:.2} s ({:.0}/s)",
        events as f64 / secs
    );
}

/// A consumer in a group of its own, subscribed to `topic` from the beginning.
fn subscribed(topic: &str) -> StreamConsumer {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("reader-{topic}-{nanos}"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

async fn bare_consumer(topic: &str, events: usize) -> f64 {
    let consumer = subscribed(topic);
    let mut first = None;
    let mut n = 0usize;
    let mut bytes = 0usize;
    while n < events {
        let m = consumer.recv().await.unwrap();
        first.get_or_insert_with(Instant::now);
        bytes += rdkafka::Message::payload(&m).map_or(0, <[u8]>::len);
        n += 1;
    }
    let secs = first.unwrap().elapsed().as_secs_f64();
    println!(
        "bare rdkafka consumer: {n} messages ({bytes} payload bytes) in {secs:.2} s = {:.0} msg/s",
        n as f64 / secs
    );
    n as f64 / secs
}

/// A bare consumer that stops for 5 ms after every 4096 messages, like a pipeline that
/// decodes between batches: shows whether the broker keeps up with a consumer that pauses.
async fn paced_consumer(topic: &str, events: usize) -> f64 {
    let consumer = subscribed(topic);
    let mut first = None;
    let mut n = 0usize;
    while n < events {
        let m = consumer.recv().await.unwrap();
        first.get_or_insert_with(Instant::now);
        let _owned = m.detach();
        n += 1;
        if n.is_multiple_of(4096) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let secs = first.unwrap().elapsed().as_secs_f64();
    println!(
        "paced bare consumer (5 ms pause per 4096): {n} in {secs:.2} s = {:.0} msg/s",
        n as f64 / secs
    );
    n as f64 / secs
}

async fn pipeline(topic: &str, events: usize) -> f64 {
    let mut config = KafkaSourceConfig::new(
        brokers(),
        format!("pipeline-{topic}"),
        vec![topic.to_owned()],
    );
    config.auto_offset_reset = AutoOffsetReset::Earliest;
    config.batch_size = 4096;
    config
        .options
        .insert("session.timeout.ms".into(), "6000".into());
    // Counts rows and remembers when the first batch arrived.
    let rows = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::OnceLock::<Instant>::new());
    let count = {
        let (rows, first) = (rows.clone(), first.clone());
        FnAction::new("count", move |input| {
            first.get_or_init(Instant::now);
            rows.fetch_add(input.batch.num_rows() as u64, Ordering::Relaxed);
            Ok(())
        })
        .every_batch()
    };
    let handle = Pipeline::builder(KafkaSource::new(config))
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .action(count)
        .build()
        .spawn();
    while rows.load(Ordering::Relaxed) < events as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = first.get().unwrap().elapsed().as_secs_f64();
    let snapshot = handle.metrics().snapshot();
    handle.shutdown();
    let report = handle.wait().await.unwrap();
    println!(
        "pipeline kafka → json decode → ewma → action: {events} events in {secs:.2} s = {:.0} events/s \
         (acked {} rows, {} nacked batches)",
        events as f64 / secs,
        report.metrics.rows_acked,
        report.metrics.batches_nacked
    );
    for s in &snapshot.stages {
        println!(
            "  {:<18} batches {:>6}  p50 {:>8.1} µs  p99 {:>8.1} µs",
            s.name,
            s.batches_out,
            s.latency_p50_ns as f64 / 1e3,
            s.latency_p99_ns as f64 / 1e3
        );
    }
    events as f64 / secs
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // RUST_LOG=smartcloudops_core=trace shows the source's batching and flow control.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let events: usize = std::env::var("SMARTCLOUDOPS_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let topic = format!("bench-{}", std::process::id());
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
        for r in admin
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    PARTITIONS,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new(),
            )
            .await
            .unwrap()
        {
            r.unwrap();
        }
        produce(&topic, events).await;
        let bare = bare_consumer(&topic, events).await;
        paced_consumer(&topic, events).await;
        let ours = pipeline(&topic, events).await;
        let bare_after = bare_consumer(&topic, events).await;
        let bare = bare.max(bare_after);
        println!("pipeline / bare consumer = {:.0}%", 100.0 * ours / bare);
    });
}
