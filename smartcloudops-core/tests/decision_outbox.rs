//! The delivery outbox (issue 15): a notification is kept from before its batch is
//! acknowledged until its receiver accepted it. A receiver that is down gets it later (a
//! resolved one too); a delivery cut short by a crash resumes after the restart under the same
//! `Idempotency-Key`; a remediation claimed before a crash never runs again; a notification
//! too old is escalated and dead-lettered whole; the outbox is bounded.

mod decision_support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use smartcloudops_core::Action;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions, ManualClock};

use decision_support::{T0, input, outcomes};

/// One request a [`Inbox`] received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    body: Value,
    idempotency_key: Option<String>,
}

/// A local HTTP receiver on 127.0.0.1 that records each request with its `Idempotency-Key`
/// and answers from a script of (status, delay), then 200 at once; a path taken down answers
/// 503 until further notice.
#[derive(Clone, Default)]
struct Inbox {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<(u16, Duration)>>>,
    down: Arc<Mutex<Vec<String>>>,
}

impl Inbox {
    async fn spawn() -> (Self, SocketAddr) {
        let inbox = Inbox::default();
        let state = inbox.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    state.received.lock().unwrap().push(Received {
                        path: uri.path().to_owned(),
                        body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                        idempotency_key: headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned),
                    });
                    if state.down.lock().unwrap().contains(&uri.path().to_owned()) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let next = state.script.lock().unwrap().pop_front();
                    let (status, delay) = next.unwrap_or((200, Duration::ZERO));
                    tokio::time::sleep(delay).await;
                    StatusCode::from_u16(status).unwrap()
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (inbox, addr)
    }

    fn answer(&self, answers: &[(u16, Duration)]) {
        self.script.lock().unwrap().extend(answers.iter().copied());
    }

    fn take_down(&self, path: &str) {
        self.down.lock().unwrap().push(path.to_owned());
    }

    fn at(&self, path: &str) -> Vec<Received> {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

fn down(times: usize) -> Vec<(u16, Duration)> {
    vec![(503, Duration::ZERO); times]
}

/// An engine for `toml_text` on `clock`, no ticker; with `state_dir` its state (journal,
/// outbox, keys, dead letters) lives there, as when the config layer builds it.
fn engine_in(
    toml_text: &str,
    clock: Arc<ManualClock>,
    state_dir: Option<&Path>,
    dead_letters: Option<Arc<MemoryDeadLetters>>,
) -> DecisionEngine {
    let mut config: DecisionConfig = toml::from_str(toml_text).unwrap();
    config.state_dir = state_dir.map(Path::to_path_buf);
    DecisionEngine::with_options(
        config,
        EngineOptions {
            clock,
            ticker: false,
            dead_letters: dead_letters.map(|d| d as _),
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

fn webhook_config(addr: SocketAddr, keys: &str, extra: &str) -> String {
    format!(
        r#"
        idempotency = {keys}
        outbox = {{ initial_backoff = "10s", max_backoff = "1m" }}

        [[rule]]
        name = "cpu"
        group_wait = "0s"
        group_interval = "1s"
        group_by = ["alertname", "host"]
        receivers = ["hook"]

        [[receiver]]
        name = "hook"
        type = "webhook"
        url = "http://{addr}/hook"
        retry = {{ attempts = 1 }}
        {extra}

        [[receiver]]
        name = "person"
        type = "webhook"
        url = "http://{addr}/person"
        "#
    )
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_the_firing_and_the_resolved_notification() {
    let (inbox, addr) = Inbox::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    // A cooldown holds back new executions for the group, never a retry of one.
    let engine = engine_in(
        &webhook_config(addr, r#"{ store = "memory" }"#, r#"cooldown = "10m""#),
        clock.clone(),
        None,
        None,
    );
    inbox.answer(&down(2));
    engine
        .execute(&input(&[("a", "api", 0, true)]))
        .await
        .unwrap();
    assert_eq!(inbox.at("/hook").len(), 1, "tried once, failed");
    let waiting = engine.undelivered();
    assert_eq!(waiting.len(), 1, "kept in the outbox");
    assert_eq!(waiting[0].failures, 1);
    assert!(outcomes(&engine, "result").contains(&"retry_scheduled".to_owned()));

    // Not before its backoff (5 to 10 s after the first failure).
    clock.advance(Duration::from_secs(4));
    engine.tick().await.unwrap();
    assert_eq!(inbox.at("/hook").len(), 1, "waits for its backoff");
    clock.advance(Duration::from_secs(7));
    engine.tick().await.unwrap();
    assert_eq!(inbox.at("/hook").len(), 2, "tried again, failed again");
    // The second backoff is 10 to 20 s; then the receiver is back.
    clock.advance(Duration::from_secs(21));
    engine.tick().await.unwrap();
    let hook = inbox.at("/hook");
    assert_eq!(hook.len(), 3);
    assert_eq!(hook[2].body["alerts"][0]["status"], "firing");
    assert_eq!(hook[2].body["alerts"][0]["labels"]["host"], "a");
    let keys: Vec<_> = hook.iter().map(|r| r.idempotency_key.clone()).collect();
    assert!(
        keys[0].is_some() && keys.iter().all(|k| *k == keys[0]),
        "{keys:?}"
    );
    assert!(
        engine.undelivered().is_empty(),
        "delivered: out of the outbox"
    );

    // The series recovers while the receiver is down again: the resolve arrives all the same.
    inbox.answer(&down(1));
    clock.advance(Duration::from_secs(60));
    engine
        .execute(&input(&[("a", "api", 90, false)]))
        .await
        .unwrap();
    assert_eq!(inbox.at("/hook").len(), 4);
    assert_eq!(engine.undelivered().len(), 1);
    clock.advance(Duration::from_secs(11));
    engine.tick().await.unwrap();
    let hook = inbox.at("/hook");
    assert_eq!(hook.len(), 5);
    assert_eq!(hook[4].body["alerts"][0]["status"], "resolved");
    assert_ne!(hook[4].idempotency_key, hook[2].idempotency_key);
    assert!(engine.undelivered().is_empty());
    assert!(!outcomes(&engine, "result").contains(&"dead_lettered".to_owned()));
}

#[tokio::test]
async fn a_later_notification_of_a_group_waits_behind_the_one_that_failed() {
    let (inbox, addr) = Inbox::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine_in(
        &webhook_config(addr, r#"{ store = "memory" }"#, ""),
        clock.clone(),
        None,
        None,
    );
    inbox.answer(&down(1));
    engine
        .execute(&input(&[("a", "api", 0, true)]))
        .await
        .unwrap();
    // The resolve falls due while the firing one waits for its retry: not sent before it.
    clock.advance(Duration::from_secs(2));
    engine
        .execute(&input(&[("a", "api", 2, false)]))
        .await
        .unwrap();
    assert_eq!(inbox.at("/hook").len(), 1);
    assert_eq!(engine.undelivered().len(), 2);
    clock.advance(Duration::from_secs(10));
    engine.tick().await.unwrap();
    let statuses: Vec<Value> = inbox
        .at("/hook")
        .iter()
        .map(|r| r.body["alerts"][0]["status"].clone())
        .collect();
    assert_eq!(statuses, ["firing", "firing", "resolved"], "in order");
    assert!(engine.undelivered().is_empty());
}

#[tokio::test]
async fn a_delivery_cut_short_resumes_after_a_restart_under_the_same_key() {
    let (inbox, addr) = Inbox::spawn().await;
    let state = tempfile::tempdir().unwrap();
    let keys = format!(
        r#"{{ store = "file", path = "{}" }}"#,
        state.path().join("idempotency.jsonl").display()
    );
    let config = webhook_config(addr, &keys, r#"timeout = "1m""#);
    let clock = Arc::new(ManualClock::at(T0));
    // The receiver takes its time: the process dies while the request is out.
    inbox.answer(&[(200, Duration::from_secs(60))]);
    let engine = Arc::new(engine_in(&config, clock.clone(), Some(state.path()), None));
    let fire = input(&[("a", "api", 0, true)]);
    let running = {
        let engine = engine.clone();
        let fire = fire.clone();
        tokio::spawn(async move { engine.execute(&fire).await })
    };
    while inbox.at("/hook").is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.abort(); // no shutdown: as with kill -9
    let _ = running.await;
    drop(engine);

    let restarted = engine_in(&config, clock.clone(), Some(state.path()), None);
    assert_eq!(restarted.undelivered().len(), 1, "still in the outbox");
    restarted.tick().await.unwrap();
    let hook = inbox.at("/hook");
    assert_eq!(hook.len(), 2, "sent again after the restart");
    assert_eq!(hook[0].body, hook[1].body);
    assert!(hook[0].idempotency_key.is_some());
    assert_eq!(hook[0].idempotency_key, hook[1].idempotency_key, "same key");
    assert!(restarted.undelivered().is_empty());
    let resumed = restarted
        .audit()
        .recent()
        .into_iter()
        .find(|r| r.outcome == "execute")
        .unwrap();
    assert!(resumed.reason.starts_with("resumed"), "{}", resumed.reason);
    // The batch was never acknowledged, so it comes again: nothing is sent a third time
    // (the journal knows the group was notified, or the key says it was delivered).
    restarted.execute(&fire).await.unwrap();
    assert_eq!(inbox.at("/hook").len(), 2);
    assert!(restarted.undelivered().is_empty());
}

#[tokio::test]
async fn a_remediation_claimed_before_a_crash_is_not_run_again_and_a_person_is_told() {
    let (inbox, addr) = Inbox::spawn().await;
    let state = tempfile::tempdir().unwrap();
    let dir = state.path();
    let config = format!(
        r#"
        allowed_commands = ["/bin/sh"]
        audit_log = "{dir}/audit.jsonl"
        idempotency = {{ store = "file", path = "{dir}/idempotency.jsonl" }}

        [[rule]]
        name = "cpu"
        group_wait = "0s"
        group_by = ["alertname", "service"]
        receivers = ["restart"]

        [[receiver]]
        name = "restart"
        type = "command"
        timeout = "1m"
        escalate_to = "person"
        [receiver.command]
        argv = ["/bin/sh", "-c", "mktemp {dir}/ran-XXXXXX; exec sleep 60"]
        mode = "auto"
        allow_interpreter = true

        [[receiver]]
        name = "person"
        type = "webhook"
        url = "http://{addr}/person"
        "#,
        dir = dir.display()
    );
    let ran = || {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("ran-")
            })
            .count()
    };
    let clock = Arc::new(ManualClock::at(T0));
    let engine = Arc::new(engine_in(&config, clock.clone(), Some(dir), None));
    let fire = input(&[("web-1", "api", 0, true)]);
    let running = {
        let engine = engine.clone();
        let fire = fire.clone();
        tokio::spawn(async move { engine.execute(&fire).await })
    };
    while ran() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.abort(); // the process dies while the command runs
    let _ = running.await;
    drop(engine);

    let restarted = engine_in(&config, clock, Some(dir), None);
    restarted.tick().await.unwrap(); // what the outbox held
    restarted.execute(&fire).await.unwrap(); // and the batch, redelivered
    assert_eq!(ran(), 1, "at most once: not run again");
    assert_eq!(
        outcomes(&restarted, "decision")
            .iter()
            .filter(|o| *o == "outcome_unknown")
            .count(),
        1,
        "reported once"
    );
    let person = inbox.at("/person");
    assert_eq!(person.len(), 1, "a person checks what it did");
    assert_eq!(person[0].body["kind"]["type"], "escalation");
    assert_eq!(person[0].body["kind"]["failed_receiver"], "restart");
    assert!(restarted.undelivered().is_empty());
}

#[tokio::test]
async fn past_its_max_age_a_notification_is_escalated_and_dead_lettered_whole() {
    let (inbox, addr) = Inbox::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let dead = Arc::new(MemoryDeadLetters::default());
    let engine = engine_in(
        &webhook_config(
            addr,
            r#"{ store = "memory" }"#,
            "escalate_to = \"person\"\nmax_delivery_age = \"2m\"",
        ),
        clock.clone(),
        None,
        Some(dead.clone()),
    );
    inbox.take_down("/hook");
    engine
        .execute(&input(&[("a", "api", 0, true)]))
        .await
        .unwrap();
    for _ in 0..11 {
        clock.advance(Duration::from_secs(10));
        engine.tick().await.unwrap();
    }
    assert!(dead.letters().is_empty(), "still within its max age");
    let tries = inbox.at("/hook").len();
    // Backoffs of 5-10 s, 10-20 s, 20-40 s, then 30-60 s: 4 to 6 tries in 110 s.
    assert!(
        (4..=6).contains(&tries),
        "retried with backoff, not at every tick: {tries}"
    );
    clock.advance(Duration::from_secs(10));
    engine.tick().await.unwrap();
    assert!(engine.undelivered().is_empty(), "given up");
    let letters = dead.letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].stage, "decision");
    assert!(
        letters[0].reason.contains("max_delivery_age"),
        "{}",
        letters[0].reason
    );
    let body: Value = serde_json::from_str(&letters[0].payload).unwrap();
    assert_eq!(body["receiver"], "hook");
    assert_eq!(body["alerts"][0]["labels"]["host"], "a");
    assert_eq!(body["alerts"][0]["status"], "firing");
    assert_eq!(
        body,
        inbox.at("/hook")[0].body,
        "the whole notification, as posted"
    );
    let person = inbox.at("/person");
    assert_eq!(person.len(), 1);
    assert_eq!(person[0].body["kind"]["type"], "escalation");
    let results = outcomes(&engine, "result");
    assert!(results.contains(&"undeliverable".to_owned()), "{results:?}");
    assert!(results.contains(&"dead_lettered".to_owned()), "{results:?}");
}

#[tokio::test]
async fn without_a_dead_letter_output_the_state_dir_keeps_them() {
    let (inbox, addr) = Inbox::spawn().await;
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine_in(
        &webhook_config(addr, r#"{ store = "memory" }"#, ""),
        clock.clone(),
        Some(state.path()),
        None,
    );
    inbox.answer(&[(400, Duration::ZERO)]); // permanent: no retry can help
    engine
        .execute(&input(&[("a", "api", 0, true)]))
        .await
        .unwrap();
    assert!(engine.undelivered().is_empty());
    let text = std::fs::read_to_string(state.path().join("dead-letters.jsonl")).unwrap();
    let letter: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let body: Value = serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
    assert_eq!(body["alerts"][0]["labels"]["host"], "a");
    assert_eq!(body["kind"]["type"], "alerts");
}

#[tokio::test]
async fn a_full_outbox_dead_letters_what_does_not_fit() {
    let (inbox, addr) = Inbox::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let dead = Arc::new(MemoryDeadLetters::default());
    let config = webhook_config(addr, r#"{ store = "memory" }"#, "").replace(
        "max_backoff = \"1m\" }",
        "max_backoff = \"1m\", max_entries = 2 }",
    );
    let engine = engine_in(&config, clock, None, Some(dead.clone()));
    inbox.answer(&down(10));
    engine
        .execute(&input(&[
            ("a", "api", 0, true),
            ("b", "api", 0, true),
            ("c", "api", 0, true),
        ]))
        .await
        .unwrap();
    assert_eq!(engine.undelivered().len(), 2);
    let letters = dead.letters();
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.contains("outbox is full"),
        "{}",
        letters[0].reason
    );
    assert!(outcomes(&engine, "decision").contains(&"outbox_full".to_owned()));
    let body: Value = serde_json::from_str(&letters[0].payload).unwrap();
    assert_eq!(body["alerts"].as_array().unwrap().len(), 1);
}

#[cfg(feature = "redis")]
#[tokio::test]
#[ignore = "needs Redis on 127.0.0.1:6379: scripts/redis.sh start"]
async fn redis_keys_are_claimed_then_delivered_and_old_claims_stay_claims() {
    use smartcloudops_core::decision::guard::{IdempotencyStore, KeyState, RedisIdempotency};
    use smartcloudops_core::redis::RedisConnection;
    let url = std::env::var("SMARTCLOUDOPS_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("sco-test:outbox:{}-{nanos}", std::process::id());
    let store = RedisIdempotency::new(RedisConnection::new(url.clone()), prefix.clone());
    let ttl = Duration::from_secs(60);
    assert_eq!(store.state("k", 0).await.unwrap(), None);
    assert!(store.claim("k", ttl, 0).await.unwrap());
    assert_eq!(store.state("k", 0).await.unwrap(), Some(KeyState::Claimed));
    assert!(!store.claim("k", ttl, 0).await.unwrap(), "one claim wins");
    store.mark_delivered("k", ttl, 0).await.unwrap();
    assert_eq!(
        store.state("k", 0).await.unwrap(),
        Some(KeyState::Delivered)
    );
    assert!(!store.claim("k", ttl, 0).await.unwrap());

    // A key claimed by a version before keys had states (value `1`) is a claim.
    let mut con = RedisConnection::new(url).connect().await.unwrap();
    let key = format!("{prefix}:idempotency:old");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        store.state("old", 0).await.unwrap(),
        Some(KeyState::Claimed)
    );
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .arg(format!("{prefix}:idempotency:k"))
        .query_async(&mut con)
        .await
        .unwrap();
}
