//! The crash suite of the decision layer: `smartcloudops run` killed with SIGKILL at the
//! dangerous moments of a notification's life, restarted on the same state directory, and a
//! local HTTP receiver counting what arrives.
//!
//! - killed while an alert waits in `group_wait` (its batch already acknowledged);
//! - killed while the receiver is down (failed deliveries were retried and gave out);
//! - killed mid-delivery (the receiver holds the request);
//! - killed while an alert fires: the resolved notification follows after the restart;
//! - stopped (SIGTERM) with a delivery in flight.
//!
//! Every notification that should arrive arrives at least once, and a re-sent one carries the
//! same `Idempotency-Key`.
//!
//! The source is a Redis stream (entries are acknowledged with XACK once the pipeline is done
//! with them), so it needs Redis on 127.0.0.1:6379 (`scripts/redis.sh start`), then
//! `cargo test --workspace --test crash_decision -- --ignored`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use redis::AsyncCommands;

fn url() -> String {
    std::env::var("SMARTCLOUDOPS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sco-crash:{name}:{}-{nanos}", std::process::id())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Accept,
    Unavailable,
    /// Holds every request without answering.
    Hang,
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    body: String,
    answered: StatusCode,
}

#[derive(Debug)]
struct Receiver {
    mode: Mutex<Mode>,
    seen: Mutex<Vec<Seen>>,
}

impl Receiver {
    async fn start() -> (Arc<Self>, SocketAddr) {
        let receiver = Arc::new(Self {
            mode: Mutex::new(Mode::Accept),
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, addr)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests answered 2xx whose body mentions `status`.
    fn accepted(&self, status: &str) -> Vec<Seen> {
        let needle = format!("\"status\":\"{status}\"");
        self.seen()
            .into_iter()
            .filter(|s| s.answered.is_success() && s.body.contains(&needle))
            .collect()
    }

    /// Waits until a request announcing `status` was accepted.
    async fn wait_accepted(&self, status: &str) {
        self.wait_for(&format!("a {status} notification"), ARRIVAL, |r| {
            !r.accepted(status).is_empty()
        })
        .await;
    }

    /// Waits until a delivery reached the receiver (whatever it answered).
    async fn wait_in_flight(&self) {
        self.wait_for("a delivery", ARRIVAL, |r| !r.seen().is_empty())
            .await;
    }

    async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; the receiver saw {:#?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn hook(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mode = *receiver.mode.lock().unwrap();
    let answered = match mode {
        Mode::Accept => StatusCode::OK,
        Mode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Mode::Hang => StatusCode::REQUEST_TIMEOUT, // recorded as not accepted
    };
    receiver.seen.lock().unwrap().push(Seen {
        key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: String::from_utf8_lossy(&body).into_owned(),
        answered,
    });
    if mode == Mode::Hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    answered
}

/// A `smartcloudops run` process, killed and reaped if the test ends early.
struct Run(Child);

impl Run {
    fn start(config: &Path, log: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_smartcloudops"))
            .arg("run")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        Self(child)
    }

    fn kill9(mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }

    /// SIGTERM, then waits for the process to exit.
    fn terminate(mut self, within: Duration) {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        while self.0.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < within, "no exit {within:?} after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pipeline reading `stream`, an EWMA detector and one rule notifying the webhook.
struct Setup {
    dir: tempfile::TempDir,
    stream: String,
    group: String,
    receiver: Arc<Receiver>,
    redis: redis::aio::MultiplexedConnection,
}

impl Setup {
    async fn new(name: &str, group_wait: &str) -> Self {
        let (receiver, addr) = Receiver::start().await;
        let dir = tempfile::tempdir().unwrap();
        let stream = unique(name);
        let group = "decide".to_owned();
        let config = format!(
            r#"
[redis]
url = "{url}"

[source]
type = "redis_stream"
streams = ["{stream}"]
group = "{group}"
consumer = "only"
start = "earliest"
batch_size = 100
block = "50ms"
claim_idle = "500ms"
claim_interval = "200ms"

[detector]
type = "ewma"
alpha = 0.1
threshold = 4.0
warmup = 20

[decision]
tick = "200ms"

[[decision.rule]]
name = "cpu-anomaly"
metric = "cpu"
min_score = 0.9999
resolve_score = 0.99
group_by = ["alertname", "host"]
group_wait = "{group_wait}"
group_interval = "1s"
repeat_interval = "4h"
receivers = ["hook"]

[[decision.receiver]]
name = "hook"
type = "webhook"
url = "http://{addr}/hook"
retry = {{ attempts = 2, initial_backoff = "100ms", max_backoff = "200ms" }}
timeout = "1s"

[runtime]
shutdown_timeout = "2s"
"#,
            url = url(),
        );
        std::fs::write(dir.path().join("pipeline.toml"), config).unwrap();
        let client = redis::Client::open(url()).unwrap();
        let redis = client.get_multiplexed_async_connection().await.unwrap();
        Self {
            dir,
            stream,
            group,
            receiver,
            redis,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("pipeline.toml")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("run.log")
    }

    fn start(&self) -> Run {
        Run::start(&self.config(), &self.log())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Appends points of host `a`, one second apart, ending now.
    async fn send(&mut self, values: &[f64]) -> String {
        let end = now_ms();
        let mut last = String::new();
        for (i, v) in values.iter().enumerate() {
            let ts = end - (values.len() - 1 - i) as i64 * 1000;
            let data =
                format!(r#"{{"ts":{ts},"metric":"cpu","labels":{{"host":"a"}},"value":{v}}}"#);
            last = self
                .redis
                .xadd(&self.stream, "*", &[("data", data)])
                .await
                .unwrap();
        }
        last
    }

    /// Waits until the group has read and acknowledged everything up to `id`.
    async fn wait_acked(&mut self, id: &str) {
        let start = Instant::now();
        loop {
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&self.stream)
                .query_async(&mut self.redis)
                .await
                .unwrap_or(redis::Value::Nil);
            let text = format!("{groups:?}");
            let pending: redis::Value = redis::cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .query_async(&mut self.redis)
                .await
                .unwrap_or(redis::Value::Nil);
            let none_pending = matches!(
                &pending,
                redis::Value::Array(v) if matches!(v.first(), Some(redis::Value::Int(0)))
            );
            if none_pending && text.contains(id) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "entries up to {id} not acknowledged: {text} {pending:?}\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A warm-up of normal points, then a spike: one firing alert for host `a`.
    async fn fire(&mut self) -> String {
        let mut values: Vec<f64> = (0..40).map(|i| 10.0 + (i % 5) as f64 * 0.1).collect();
        values.push(1000.0);
        self.send(&values).await
    }

    async fn recover(&mut self) -> String {
        let values: Vec<f64> = (0..30).map(|i| 10.0 + (i % 5) as f64 * 0.1).collect();
        self.send(&values).await
    }
}

const ARRIVAL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn killed_during_group_wait_the_notification_still_arrives() {
    let mut setup = Setup::new("group-wait", "4s").await;
    let run = setup.start();
    let last = setup.fire().await;
    setup.wait_acked(&last).await; // the batch is acknowledged; the alert waits in memory...
    assert!(setup.receiver.seen().is_empty(), "sent before group_wait");
    run.kill9(); // ... and the process dies before the wait ends

    let _run = setup.start();
    setup.receiver.wait_accepted("firing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_delivery_that_failed_before_the_crash_is_sent_after_the_restart() {
    let mut setup = Setup::new("receiver-down", "0s").await;
    setup.receiver.set(Mode::Unavailable);
    let run = setup.start();
    let last = setup.fire().await;
    setup
        .receiver
        .wait_for("failed attempts", ARRIVAL, |r| r.seen().len() >= 2)
        .await;
    // The retries gave out and the batch is acknowledged: only the outbox still knows.
    setup.wait_acked(&last).await;
    run.kill9();

    setup.receiver.set(Mode::Accept);
    let _run = setup.start();
    setup.receiver.wait_accepted("firing").await;
    let seen = setup.receiver.seen();
    let delivered = setup.receiver.accepted("firing");
    assert_eq!(
        delivered[0].key, seen[0].key,
        "the retry after the restart is the same notification"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn killed_mid_delivery_the_notification_is_resent_with_the_same_key() {
    let mut setup = Setup::new("mid-delivery", "0s").await;
    setup.receiver.set(Mode::Hang);
    let run = setup.start();
    setup.fire().await;
    setup.receiver.wait_in_flight().await;
    run.kill9();

    setup.receiver.set(Mode::Accept);
    let _run = setup.start();
    setup.receiver.wait_accepted("firing").await;
    let first = &setup.receiver.seen()[0];
    assert!(!first.key.is_empty(), "webhooks carry an Idempotency-Key");
    for s in setup.receiver.accepted("firing") {
        assert_eq!(s.key, first.key, "a duplicate carries the same key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn an_alert_firing_before_the_crash_resolves_after_the_restart() {
    let mut setup = Setup::new("resolve", "0s").await;
    let run = setup.start();
    let last = setup.fire().await;
    setup.receiver.wait_accepted("firing").await;
    setup.wait_acked(&last).await;
    run.kill9();

    let _run = setup.start();
    setup.recover().await;
    setup.receiver.wait_accepted("resolved").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn a_delivery_in_flight_at_shutdown_resumes_after_the_restart() {
    let mut setup = Setup::new("shutdown", "0s").await;
    setup.receiver.set(Mode::Hang);
    let run = setup.start();
    setup.fire().await;
    setup.receiver.wait_in_flight().await;
    run.terminate(Duration::from_secs(20)); // shutdown_timeout is 2 s

    setup.receiver.set(Mode::Accept);
    let _run = setup.start();
    setup.receiver.wait_accepted("firing").await;
}
