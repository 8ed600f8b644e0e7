//! `smartcloudops run` on Redis Streams, real processes killed with SIGKILL:
//!
//! - a consumer group of two processes, one of them killed mid-stream: the survivor claims
//!   the entries it left pending, every entry is processed at least once, and nothing stays
//!   pending;
//! - a downstream outage (every batch fails, many more times than `max_deliveries`), the
//!   process killed during it and started again: nothing good is dead-lettered, everything
//!   is processed once the outage ends.
//!
//! Needs Redis on 127.0.0.1:6379 (`scripts/redis.sh start`), then
//! `cargo test -p smartcloudops-bin --test redis_streams -- --ignored`.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

fn url() -> String {
    std::env::var("SMARTCLOUDOPS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sco-test:{name}:{}-{nanos}", std::process::id())
}

/// A member process, killed and reaped if the test ends early.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_member(config: &std::path::Path, consumer: &str, log: &std::path::Path) -> Member {
    let child = Command::new(env!("CARGO_BIN_EXE_smartcloudops"))
        .arg("run")
        .arg(config)
        .env("RUST_LOG", "info")
        .env("CONSUMER", consumer)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Member(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_member_killed_mid_stream_loses_nothing() {
    let (input, output) = (unique("metrics"), unique("scored"));
    let group = "detect";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("member.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[redis]
url = "{url}"

[source]
type = "redis_stream"
streams = ["{input}"]
group = "{group}"
consumer = "${{CONSUMER}}"
start = "earliest"
batch_size = 200
block = "50ms"
claim_idle = "1s"
claim_interval = "200ms"

[detector]
type = "ewma"

[[action]]
type = "redis_stream"
stream = "{output}"
maxlen = 0
payload = "scored"
"#,
            url = url()
        ),
    )
    .unwrap();
    let client = redis::Client::open(url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut doomed = spawn_member(&config, "a", &dir.path().join("a.log"));
    let mut survivor = spawn_member(&config, "b", &dir.path().join("b.log"));

    // 20 000 entries over ~3 s while both members run; kill one after ~1.5 s.
    const ROUNDS: usize = 20;
    const SERIES: usize = 1000;
    let started = Instant::now();
    let mut killed = false;
    let mut left_pending_by_a = 0usize;
    // Live data: dated within the ingestion check's window (an hour ago onwards).
    let first_ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    for round in 0..ROUNDS {
        let mut pipe = redis::pipe();
        for s in 0..SERIES {
            let payload = format!(
                r#"{{"ts": {}, "metric": "cpu", "labels": {{"host": "h{s}"}}, "value": {}}}"#,
                first_ts + round as i64 * 10_000,
                (s % 7) as f64
            );
            pipe.cmd("XADD")
                .arg(&input)
                .arg("*")
                .arg("data")
                .arg(payload)
                .ignore();
        }
        pipe.query_async::<()>(&mut con).await.unwrap();
        if !killed && started.elapsed() > Duration::from_millis(1500) {
            doomed.0.kill().unwrap(); // SIGKILL: no drain, no XACK, no goodbye
            doomed.0.wait().unwrap();
            killed = true;
            let pending: redis::streams::StreamPendingReply =
                con.xpending(&input, group).await.unwrap();
            if let redis::streams::StreamPendingReply::Data(data) = pending {
                left_pending_by_a = data
                    .consumers
                    .iter()
                    .filter(|c| c.name == "a")
                    .map(|c| c.pending)
                    .sum();
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(killed, "the kill happened mid-stream");

    // Every entry reaches the output at least once, and none stays pending.
    let mut distinct = HashSet::new();
    let mut total = 0usize;
    let mut last = "0-0".to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply: redis::streams::StreamRangeReply = con
            .xrange_count(&output, format!("({last}"), "+", 5000)
            .await
            .unwrap();
        for entry in &reply.ids {
            total += 1;
            let id: String = entry.get("ce_id").expect("ce_id field");
            distinct.insert(id);
            last = entry.id.clone();
        }
        let pending: redis::streams::StreamPendingReply =
            con.xpending(&input, group).await.unwrap();
        if distinct.len() == ROUNDS * SERIES && pending.count() == 0 {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default();
            panic!(
                "{} of {} entries processed, {} pending; survivor log:\n{log}",
                distinct.len(),
                ROUNDS * SERIES,
                pending.count()
            );
        }
        if reply.ids.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &survivor.0.id().to_string()])
        .status();
    let status = survivor.0.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default();
    println!(
        "{} entries, {total} published ({} redelivered after the kill)",
        ROUNDS * SERIES,
        total - ROUNDS * SERIES
    );
    assert!(status.success(), "survivor exits cleanly on SIGTERM: {log}");
    println!("the killed member left {left_pending_by_a} entries pending");
    if left_pending_by_a > 0 {
        // Whatever the kill caught in flight, the survivor took over.
        assert!(log.contains("claimed stale pending entries"), "{log}");
    }
    let _: () = con.del(&[&input, &output]).await.unwrap();
}

/// Consumes `input` as `pod-0` (a stable name, as a StatefulSet gives) and writes every scored
/// row to `output`; poison entries go to `dead`.
fn outage_config(
    dir: &std::path::Path,
    input: &str,
    output: &str,
    dead: &str,
) -> std::path::PathBuf {
    let config = dir.join("pod.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[redis]
url = "{url}"

[source]
type = "redis_stream"
streams = ["{input}"]
group = "detect"
consumer = "pod-0"
start = "earliest"
batch_size = 50
block = "50ms"
claim_idle = "1s"
claim_interval = "200ms"
retry_backoff = "20ms"
max_deliveries = 2
dead_letter_stream = "{dead}"

[detector]
type = "ewma"

[[action]]
type = "redis_stream"
stream = "{output}"
maxlen = 0
payload = "scored"
"#,
            url = url()
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn an_outage_then_a_kill_9_and_a_restart_dead_letters_nothing_good() {
    let (input, output, dead) = (unique("metrics"), unique("scored"), unique("dead"));
    let group = "detect";
    const ENTRIES: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let config = outage_config(dir.path(), &input, &output, &dead);
    let client = redis::Client::open(url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();

    // The downstream is down: the output key holds a string, so every XADD to it fails
    // (WRONGTYPE) and every batch is nacked.
    let _: () = con.set(&output, "down").await.unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut pipe = redis::pipe();
    for i in 0..ENTRIES {
        let payload = format!(
            r#"{{"ts": {}, "metric": "cpu", "labels": {{"host": "h{i}"}}, "value": 1}}"#,
            now_ms - 60_000
        );
        pipe.cmd("XADD")
            .arg(&input)
            .arg("*")
            .arg("data")
            .arg(payload)
            .ignore();
    }
    pipe.query_async::<()>(&mut con).await.unwrap();

    let mut pod = spawn_member(&config, "pod-0", &dir.path().join("first.log"));
    let first: String = {
        let reply: redis::streams::StreamRangeReply =
            con.xrange_count(&input, "-", "+", 1).await.unwrap();
        reply.ids[0].id.clone()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // NOGROUP until the process created the group.
        let reply: Option<redis::streams::StreamPendingCountReply> = con
            .xpending_count(&input, group, &first, &first, 1)
            .await
            .ok();
        if reply
            .as_ref()
            .and_then(|r| r.ids.first())
            .is_some_and(|p| p.times_delivered > 4)
        {
            break; // far beyond max_deliveries by Redis's count
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("first.log")).unwrap_or_default();
            panic!("the outage never made Redis count deliveries: {reply:?}\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pod.0.kill().unwrap(); // SIGKILL during the outage
    pod.0.wait().unwrap();
    let dead_len: usize = con.xlen(&dead).await.unwrap();
    assert_eq!(dead_len, 0, "nothing dead-lettered during the outage");

    // The pod comes back while the outage lasts a little longer; then the downstream heals.
    let pod = spawn_member(&config, "pod-0", &dir.path().join("second.log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _: () = con.del(&output).await.unwrap();

    let mut distinct = HashSet::new();
    let mut last = "0-0".to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply: redis::streams::StreamRangeReply = con
            .xrange_count(&output, format!("({last}"), "+", 5000)
            .await
            .unwrap_or_default();
        for entry in &reply.ids {
            let id: String = entry.get("ce_id").expect("ce_id field");
            distinct.insert(id);
            last = entry.id.clone();
        }
        let pending: redis::streams::StreamPendingReply =
            con.xpending(&input, group).await.unwrap();
        if distinct.len() == ENTRIES && pending.count() == 0 {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default();
            let dead_len: usize = con.xlen(&dead).await.unwrap();
            panic!(
                "{} of {ENTRIES} processed, {} pending, {dead_len} dead-lettered; log:\n{log}",
                distinct.len(),
                pending.count()
            );
        }
        if reply.ids.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let dead_len: usize = con.xlen(&dead).await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default();
    assert_eq!(
        dead_len, 0,
        "good entries dead-lettered after the restart:\n{log}"
    );
    drop(pod);
    let _: () = con
        .del(&[
            input.clone(),
            output,
            dead,
            format!("smartcloudops:{input}:{group}:attempts"),
            format!("smartcloudops:{input}:{group}:acked"),
        ])
        .await
        .unwrap();
}
