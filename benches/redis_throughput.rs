//! Redis end to end: events/s from pub/sub and from a stream through decode → EWMA → action,
//! beside bare clients doing the same Redis work in the same run (pipelined `PUBLISH` to a
//! bare subscriber; pipelined `XADD`; `XREADGROUP` + `XACK` without decoding).
//!
//! Needs Redis (`scripts/redis.sh start`; `SMARTCLOUDOPS_REDIS_URL` overrides
//! `redis://127.0.0.1:6379`):
//!
//! ```sh
//! cargo bench -p smartcloudops-benches --bench redis_throughput            # 500 000 events
//! SMARTCLOUDOPS_BENCH_EVENTS=100000 cargo bench -p smartcloudops-benches --bench redis_throughput
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use smartcloudops_core::action::FnAction;
use smartcloudops_core::detector::{EwmaConfig, EwmaDetector};
use smartcloudops_core::redis::RedisConnection;
use smartcloudops_core::source::{
    RedisPubSubSource, RedisPubSubSourceConfig, RedisStreamSource, RedisStreamSourceConfig,
    StreamStart,
};
use smartcloudops_core::{Pipeline, PipelineHandle, Source};

const SERIES: usize = 10_000;
/// Commands per pipelined round trip for the bare clients and the producers.
const PIPELINE: usize = 1000;

fn url() -> String {
    std::env::var("SMARTCLOUDOPS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn payload(i: usize) -> String {
    let s = i % SERIES;
    format!(
        r#"{{"ts":{},"metric":"cpu_utilization","labels":{{"host":"host-{s:05}","region":"eu-west-1"}},"value":{:.2}}}"#,
        1_764_028_800_000i64 + (i / SERIES) as i64 * 10_000,
        40.0 + (i % 37) as f64 * 0.7
    )
}

/// Runs `source` through EWMA into an action that counts rows: the handle and the count.
fn spawn_counted(source: impl Source + 'static) -> (PipelineHandle, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let rows = count.clone();
    let counting = FnAction::new("count", move |input| {
        rows.fetch_add(input.batch.num_rows() as u64, Ordering::Relaxed);
        Ok(())
    })
    .every_batch();
    let handle = Pipeline::builder(source)
        .detector(EwmaDetector::new(EwmaConfig::default()))
        .action(counting)
        .build()
        .spawn();
    (handle, count)
}

/// Waits until `count` reached `events` rows.
async fn until_counted(count: &AtomicU64, events: usize) {
    while (count.load(Ordering::Relaxed) as usize) < events {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn connect() -> redis::aio::MultiplexedConnection {
    RedisConnection::new(url()).connect().await.unwrap()
}

async fn publish_all(channel: &str, events: usize) -> f64 {
    let mut con = connect().await;
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(PIPELINE) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("PUBLISH").arg(channel).arg(payload(i)).ignore();
        }
        pipe.query_async::<()>(&mut con).await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

async fn wait_for_subscriber(channel: &str) {
    let mut con = connect().await;
    loop {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut con)
            .await
            .unwrap();
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bare pub/sub: a subscriber that only counts, while pipelined PUBLISHes go out.
async fn bare_pubsub(events: usize) -> f64 {
    let channel = format!("bench:bare:{}", std::process::id());
    let client = redis::Client::open(url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(&channel).await.unwrap();
    let counter = tokio::spawn(async move {
        let mut stream = sub.into_on_message();
        let mut n = 0usize;
        let mut first = None;
        while n < events {
            let m = stream.next().await.unwrap();
            first.get_or_insert_with(Instant::now);
            std::hint::black_box(m.get_payload_bytes().len());
            n += 1;
        }
        first.unwrap().elapsed().as_secs_f64()
    });
    let started = Instant::now();
    publish_all(&channel, events).await;
    counter.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    report(
        "bare pub/sub (pipelined PUBLISH → counting subscriber)",
        events,
        secs,
    )
}

async fn pipeline_pubsub(events: usize) -> f64 {
    let channel = format!("bench:pipeline:{}", std::process::id());
    let mut config = RedisPubSubSourceConfig::new(vec![channel.clone()]);
    config.batch_size = 4096;
    config.batch_timeout = Duration::from_millis(20);
    let (handle, count) =
        spawn_counted(RedisPubSubSource::new(config, RedisConnection::new(url())));
    wait_for_subscriber(&channel).await;
    let started = Instant::now();
    publish_all(&channel, events).await;
    until_counted(&count, events).await;
    let secs = started.elapsed().as_secs_f64();
    handle.shutdown();
    handle.wait().await.unwrap();
    report(
        "pipeline from pub/sub (decode → ewma → action)",
        events,
        secs,
    )
}

async fn fill_stream(stream: &str, events: usize) {
    let mut con = connect().await;
    let _: () = redis::cmd("DEL")
        .arg(stream)
        .query_async(&mut con)
        .await
        .unwrap();
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(PIPELINE) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("data")
                .arg(payload(i))
                .ignore();
        }
        pipe.query_async::<()>(&mut con).await.unwrap();
    }
    report(
        "bare XADD (pipelined)",
        events,
        started.elapsed().as_secs_f64(),
    );
}

/// Bare consumer group: XREADGROUP COUNT 1000 then XACK of those ids, no decoding.
async fn bare_streams(stream: &str, events: usize) -> f64 {
    let mut con = connect().await;
    let group = "bare";
    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(&mut con)
        .await;
    let started = Instant::now();
    let mut n = 0usize;
    while n < events {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c")
            .arg("COUNT")
            .arg(PIPELINE)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut con)
            .await
            .unwrap();
        let ids: Vec<String> = reply
            .keys
            .iter()
            .flat_map(|k| k.ids.iter().map(|e| e.id.clone()))
            .collect();
        n += ids.len();
        let _: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&ids)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    report(
        "bare consumer group (XREADGROUP + XACK)",
        events,
        started.elapsed().as_secs_f64(),
    )
}

async fn pipeline_streams(stream: &str, events: usize) -> f64 {
    let mut config = RedisStreamSourceConfig::new(vec![stream.to_owned()], "pipeline");
    config.start = StreamStart::Earliest;
    config.consumer = Some("bench".into());
    config.batch_size = 4096;
    let started = Instant::now();
    let (handle, count) =
        spawn_counted(RedisStreamSource::new(config, RedisConnection::new(url())));
    until_counted(&count, events).await;
    let secs = started.elapsed().as_secs_f64();
    handle.shutdown();
    handle.wait().await.unwrap();
    report(
        "pipeline from a stream (XREADGROUP → decode → ewma → action → XACK)",
        events,
        secs,
    )
}

/// Saving and loading per-series detector states (`[detector.redis_state]`): 100 000 series
/// of the `fast` preset, the cost of a periodic save and of a replica's warm start.
async fn state_store() {
    use smartcloudops_core::Detector;
    use smartcloudops_core::detector::{EnsembleDetector, Preset, SeriesStateStore};
    use smartcloudops_core::detector::{RedisStateStore, RedisStateStoreConfig};
    use smartcloudops_core::schema::MetricsBatchBuilder;
    const N: usize = 100_000;
    let mut detector = EnsembleDetector::new("fast", Preset::Fast.config(), N);
    for round in 0..3 {
        let mut b = MetricsBatchBuilder::with_capacity(N);
        for s in 0..N {
            let host = format!("host-{s:06}");
            b.push(
                1_764_028_800_000 + round * 60_000,
                "cpu",
                &[("host", host.as_str())],
                40.0 + (s % 7) as f64,
            );
        }
        detector.score(&b.finish()).unwrap();
    }
    let states = detector.export_changed_series().unwrap();
    let bytes: usize = states.iter().map(|(_, s)| s.len()).sum();
    let config = RedisStateStoreConfig {
        key_prefix: format!("bench:{}", std::process::id()),
        ..RedisStateStoreConfig::default()
    };
    let store = RedisStateStore::new(&config, RedisConnection::new(url()));
    let namespace = detector.series_state_namespace().unwrap();
    let started = Instant::now();
    store.save(&namespace, &states).await.unwrap();
    let save = started.elapsed().as_secs_f64();
    let ids: Vec<u64> = states.iter().map(|(id, _)| *id).collect();
    let started = Instant::now();
    let loaded = store.load(&namespace, &ids).await.unwrap();
    let load = started.elapsed().as_secs_f64();
    assert_eq!(loaded.len(), N);
    println!(
        "detector state store, fast preset: {N} series ({} B each): save {save:.2} s ({:.0} series/s), load {load:.2} s ({:.0} series/s)",
        bytes / N,
        N as f64 / save,
        N as f64 / load
    );
    let mut con = connect().await;
    for chunk in ids.chunks(PIPELINE) {
        let keys: Vec<String> = chunk.iter().map(|id| store.key(&namespace, *id)).collect();
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut con)
            .await
            .unwrap();
    }
}

fn report(what: &str, events: usize, secs: f64) -> f64 {
    let rate = events as f64 / secs;
    println!("{what}: {events} events in {secs:.2} s = {rate:.0}/s");
    rate
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and expects a
    // quick exit.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let events: usize = std::env::var("SMARTCLOUDOPS_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bare = bare_pubsub(events).await;
        let ours = pipeline_pubsub(events).await;
        println!(
            "pub/sub: pipeline at {:.0} % of the bare subscriber",
            100.0 * ours / bare
        );

        let stream = format!("bench:stream:{}", std::process::id());
        fill_stream(&stream, events).await;
        let bare = bare_streams(&stream, events).await;
        let ours = pipeline_streams(&stream, events).await;
        println!(
            "streams: pipeline at {:.0} % of the bare consumer",
            100.0 * ours / bare
        );
        let mut con = connect().await;
        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .query_async(&mut con)
            .await
            .unwrap();

        state_store().await;
    });
}
