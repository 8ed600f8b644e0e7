//! `smartcloudops run` with one-minute windows over a Redis stream, killed with SIGKILL while
//! windows are open, then restarted: the windows it emits are the same as those of a run that
//! was never killed. Rows waiting in open windows are not acknowledged (`XACK`), so the
//! restarted process reads them again from its pending entries.
//!
//! Needs Redis on 127.0.0.1:6379 (`scripts/redis.sh start`), then
//! `cargo test --workspace --test crash_windows -- --ignored`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// The process, killed and reaped if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Running {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_smartcloudops"))
        .arg("run")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Running(child)
}

const SERIES: usize = 5;
/// Steps of 10 s: six per window. The last window stays open (no later row closes it).
const STEPS: usize = 42;
const CLOSED_WINDOWS: usize = STEPS / 6 - 1;
/// Two aggregations per window and series.
const EXPECTED_LINES: usize = CLOSED_WINDOWS * SERIES * 2;

/// A config in `dir` (its state directory next to it) reading `stream` five entries (five
/// steps) per batch into one-minute windows (six steps), so most batches hold the end of one
/// window and the start of the next; every window row is an alert (`above = -1`) appended to `out`.
fn config(dir: &Path, stream: &str, out: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("windows.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[redis]
url = "{url}"

[source]
type = "redis_stream"
streams = ["{stream}"]
group = "windows"
consumer = "only"
start = "earliest"
batch_size = 5
block = "50ms"
claim_idle = "10m"

[[prep]]
type = "window"
size = "1m"
aggregations = ["sum", "count"]

[detector]
type = "threshold"
[[detector.rule]]
above = -1.0

[[action]]
type = "jsonl"
path = "{out}"
fsync = true
"#,
            url = url(),
            out = out.display()
        ),
    )
    .unwrap();
    path
}

/// The entry of step `step`: one JSON line per series, all at the same time.
fn entry(first_ts: i64, step: usize) -> String {
    (0..SERIES)
        .map(|s| {
            format!(
                r#"{{"ts": {}, "metric": "cpu", "labels": {{"host": "h{s}"}}, "value": {}}}"#,
                first_ts + step as i64 * 10_000,
                (step * 7 + s * 3) % 11
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn add_steps(
    con: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    first_ts: i64,
    steps: std::ops::Range<usize>,
) {
    for step in steps {
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("data")
            .arg(entry(first_ts, step))
            .query_async(con)
            .await
            .unwrap();
    }
}

/// The value after `"key":` in a JSON object written without spaces.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The distinct windows in `out`, as (metric, series, time, value) strings, and how many
/// lines there were. A line cut short by the kill is skipped: its batch was not
/// acknowledged, so it is written again.
fn windows(out: &Path) -> (BTreeSet<(String, String, String, String)>, usize) {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut set = BTreeSet::new();
    let mut lines = 0;
    for line in text.lines() {
        let parsed = (|| {
            Some((
                field(line, "metric")?.to_owned(),
                field(line, "series_id")?.to_owned(),
                field(line, "ts_ms")?.to_owned(),
                field(line, "value")?.to_owned(),
            ))
        })();
        if let Some(window) = parsed.filter(|_| line.ends_with('}')) {
            set.insert(window);
            lines += 1;
        }
    }
    (set, lines)
}

async fn wait_for_windows(out: &Path, count: usize, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while windows(out).0.len() < count {
        if Instant::now() > deadline {
            panic!(
                "{} of {count} window rows; log:\n{}",
                windows(out).0.len(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stop(mut running: Running) {
    let _ = Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status();
    let _ = running.0.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn windows_killed_mid_way_come_out_the_same_after_a_restart() {
    let client = redis::Client::open(url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Live data (the ingestion check takes up to 7 days back), aligned to the minute.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let first_ts = (now - 3_600_000) / 60_000 * 60_000;

    // Uninterrupted.
    let (calm_stream, calm_out) = (unique("calm"), dir.path().join("calm.jsonl"));
    let calm_log = dir.path().join("calm.log");
    add_steps(&mut con, &calm_stream, first_ts, 0..STEPS).await;
    let calm_config = config(&dir.path().join("calm"), &calm_stream, &calm_out);
    let calm = spawn(&calm_config, &calm_log);
    wait_for_windows(&calm_out, EXPECTED_LINES, &calm_log).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(calm);
    let (expected, _) = windows(&calm_out);
    assert_eq!(expected.len(), EXPECTED_LINES, "the last window stays open");

    // Killed with windows open: after two windows were emitted, mid-way through the third.
    let (stream, out) = (unique("killed"), dir.path().join("killed.jsonl"));
    let log = dir.path().join("killed.log");
    let killed_config = config(&dir.path().join("killed"), &stream, &out);
    add_steps(&mut con, &stream, first_ts, 0..17).await;
    let doomed = spawn(&killed_config, &log);
    wait_for_windows(&out, 2 * SERIES * 2, &log).await;
    // Read in batches of steps 0…4, 5…9, 10…14 and 15…16. The third closed the second
    // window (steps 6…11) and opened the third: it waits, with the fourth, for the third
    // window. After the restart it is delivered again, with steps 10 and 11 of the second
    // window, which was emitted already and must not come out again, partial.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("windows")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        pending.count(),
        7,
        "the entries of the batches holding the open window's rows are not acknowledged"
    );
    let mut doomed = doomed;
    doomed.0.kill().unwrap(); // SIGKILL: no drain, no flush, no XACK
    doomed.0.wait().unwrap();
    let (before_restart, _) = windows(&out);
    assert_eq!(before_restart.len(), 2 * SERIES * 2);

    add_steps(&mut con, &stream, first_ts, 17..STEPS).await;
    let restarted = spawn(&killed_config, &log);
    wait_for_windows(&out, EXPECTED_LINES, &log).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(restarted);
    let (got, lines) = windows(&out);
    println!("{lines} window rows written, {} distinct", got.len());
    let state = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!state.contains("window marks not saved"), "{state}");
    assert_eq!(got, expected, "windows differ from the uninterrupted run");

    let _: () = redis::cmd("DEL")
        .arg(&calm_stream)
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
}
