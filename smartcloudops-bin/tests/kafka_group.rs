//! `smartcloudops run` deployed as a Kafka consumer group of two processes, one of them
//! killed with SIGKILL mid-stream: the survivor takes over its partitions and every event is
//! processed at least once.
//!
//! Needs a broker: `scripts/kafka.sh start`, then
//! `cargo test -p smartcloudops-bin --test kafka_group -- --ignored`.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn brokers() -> String {
    std::env::var("SMARTCLOUDOPS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for r in admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// A member process, killed and reaped if the test ends early.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_member(config: &std::path::Path, log: &std::path::Path) -> Member {
    let child = Command::new(env!("CARGO_BIN_EXE_smartcloudops"))
        .arg("run")
        .arg(config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Member(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker: scripts/kafka.sh start"]
async fn a_member_killed_mid_stream_loses_nothing() {
    let (input, output, group) = (unique("metrics"), unique("scored"), unique("group"));
    create_topic(&input, 4).await;
    create_topic(&output, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("member.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[source]
type = "kafka"
brokers = "{brokers}"
group_id = "{group}"
topics = ["{input}"]
auto_offset_reset = "earliest"
batch_size = 100
batch_timeout = "20ms"
commit_interval = "200ms"
drain_timeout = "3s"
options = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}

[detector]
type = "ewma"

[[action]]
type = "kafka"
brokers = "{brokers}"
topic = "{output}"
payload = "scored"
"#,
            brokers = brokers()
        ),
    )
    .unwrap();
    let mut doomed = spawn_member(&config, &dir.path().join("a.log"));
    let mut survivor = spawn_member(&config, &dir.path().join("b.log"));

    // Produce 30 000 events over ~4 s while both members run; kill one after ~2 s.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut killed = false;
    const ROUNDS: usize = 30;
    const SERIES: usize = 1000;
    // Live data: dated within the ingestion check's window (an hour ago onwards).
    let first_ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    for round in 0..ROUNDS {
        let deliveries: Vec<_> = (0..SERIES)
            .map(|s| {
                let payload = format!(
                    r#"{{"ts": {}, "metric": "cpu", "labels": {{"host": "h{s}"}}, "value": {}}}"#,
                    first_ts + round as i64 * 10_000,
                    (s % 7) as f64
                );
                let key = format!("h{s}");
                let record = FutureRecord::to(&input).key(&key).payload(&payload);
                producer.send_result(record).map_err(|(e, _)| e).unwrap()
            })
            .collect();
        for d in futures::future::join_all(deliveries).await {
            d.unwrap().map_err(|(e, _)| e).unwrap();
        }
        if !killed && started.elapsed() > Duration::from_millis(4000) {
            doomed.0.kill().unwrap(); // SIGKILL: no drain, no commit, no goodbye to the group
            doomed.0.wait().unwrap();
            killed = true;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(killed, "the kill happened mid-stream");

    // Every event reaches the output at least once (duplicates are allowed: at-least-once).
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    reader.subscribe(&[&output]).unwrap();
    let mut distinct = HashSet::new();
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while distinct.len() < ROUNDS * SERIES {
        let quiet = tokio::time::Instant::now() + Duration::from_secs(20);
        match tokio::time::timeout_at(deadline.min(quiet), reader.recv()).await {
            Ok(Ok(m)) => {
                total += 1;
                let id = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "ce_id"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .expect("ce_id header");
                distinct.insert(id);
            }
            Ok(Err(e)) => panic!("reading the output: {e}"),
            Err(_) => break,
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &survivor.0.id().to_string()])
        .status();
    let status = survivor.0.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default();
    // Keep the members' logs for a post-mortem.
    let keep = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kafka_group");
    let _ = std::fs::create_dir_all(&keep);
    for f in ["a.log", "b.log"] {
        let _ = std::fs::copy(dir.path().join(f), keep.join(f));
    }
    println!("reader finished after {:?}", started.elapsed());
    if distinct.len() < ROUNDS * SERIES {
        let mut missing_ts: std::collections::BTreeMap<String, usize> = Default::default();
        let mut missing_series: std::collections::BTreeMap<String, usize> = Default::default();
        let seen_ts: HashSet<String> = distinct
            .iter()
            .map(|id| id.split('-').nth(1).unwrap().to_owned())
            .collect();
        let _ = seen_ts;
        // Rebuild the expected ids from the series ids seen per ts.
        let mut by_series: std::collections::BTreeMap<String, usize> = Default::default();
        for id in &distinct {
            let (series, ts) = id.split_once('-').unwrap();
            *by_series.entry(series.to_owned()).or_default() += 1;
            *missing_ts.entry(ts.to_owned()).or_default() += 1;
        }
        for n in by_series.values() {
            if *n < ROUNDS {
                *missing_series.entry(format!("{}", ROUNDS - n)).or_default() += 1;
            }
        }
        eprintln!("per-ts counts: {missing_ts:?}");
        eprintln!(
            "series missing k rounds -> number of series: {missing_series:?}; series seen {}",
            by_series.len()
        );
        let alog = std::fs::read_to_string(dir.path().join("a.log")).unwrap_or_default();
        eprintln!("killed member log:\n{alog}");
    }
    assert_eq!(
        distinct.len(),
        ROUNDS * SERIES,
        "events lost; survivor log:\n{log}"
    );
    println!(
        "{} events, {total} published ({} redelivered after the kill)",
        ROUNDS * SERIES,
        total - ROUNDS * SERIES
    );
    assert!(status.success(), "survivor exits cleanly on SIGTERM: {log}");
    assert!(log.contains("partitions assigned"), "{log}");
}
