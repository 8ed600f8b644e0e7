//! The decision layer against real HTTP receivers on 127.0.0.1 (axum, spawned per test), with
//! a controllable clock: payload formats (golden files), retries on 500 / 429 / 400,
//! flapping, grouping and repeats, silences and inhibition, cooldown and the circuit breaker,
//! idempotency across a restart, guarded commands, and the audit trail of each path.
//!
//! Golden files live in `tests/golden/decision/`; `UPDATE_GOLDEN=1 cargo test --test
//! decision` rewrites them after an intended change.

mod decision_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use decision_support::{Hook as Receiver, T0, engine, outcomes, ran, scored_input as input};
use serde_json::Value;
use smartcloudops_core::decision::audit::AuditRecord;
use smartcloudops_core::decision::guard::MemoryIdempotency;
use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions, ManualClock};
use smartcloudops_core::{Action, ActionInput};

fn golden(name: &str, value: &Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/decision")
        .join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(text, expected, "{name} differs from its golden file");
}

#[tokio::test]
async fn every_notifier_speaks_its_format_and_the_audit_links_each_step() {
    let (rx, addr) = Receiver::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("pd-key");
    std::fs::write(&key_file, "R0UT1NGKEY\n").unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r##"
            external_url = "http://smartcloudops.test"

            [[rule]]
            name = "cpu-high"
            severity = "critical"
            group_wait = "0s"
            group_interval = "1s"
            group_by = ["alertname", "service"]
            receivers = ["hook", "am", "slack", "pd"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            body = '{{"text": {{{{ rule ~ ": " ~ (alerts | length) ~ " alert(s), first on " ~ alerts[0].labels.host }}}}}}'

            [[receiver]]
            name = "am"
            type = "alertmanager"
            url = "http://{addr}/am"

            [[receiver]]
            name = "slack"
            type = "slack"
            url = "http://{addr}/slack"
            channel = "#ops"

            [[receiver]]
            name = "pd"
            type = "pagerduty"
            url = "http://{addr}/pd"
            routing_key_file = "{key}"
            "##,
            key = key_file.display()
        ),
        clock.clone(),
    );
    engine
        .execute(&input(&[
            ("web-1", "api", 0, 97.5, 0.999, true),
            ("web-2", "api", 0, 41.0, 0.1, false),
        ]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(2));
    engine
        .execute(&input(&[("web-1", "api", 60, 42.0, 0.05, false)]))
        .await
        .unwrap();

    for path in ["/hook", "/am", "/slack", "/pd"] {
        assert_eq!(
            rx.bodies(path).len(),
            2,
            "{path}: one firing, one resolved notification"
        );
    }
    assert_eq!(
        rx.bodies("/hook")[0]["text"],
        "cpu-high: 1 alert(s), first on web-1"
    );
    golden("alertmanager-firing", &rx.bodies("/am")[0]);
    golden("alertmanager-resolved", &rx.bodies("/am")[1]);
    golden("slack-firing", &rx.bodies("/slack")[0]);
    golden("slack-resolved", &rx.bodies("/slack")[1]);
    golden("pagerduty-trigger", &rx.bodies("/pd")[0]);
    golden("pagerduty-resolve", &rx.bodies("/pd")[1]);
    let pd = rx.bodies("/pd");
    assert_eq!(
        pd[0]["dedup_key"], pd[1]["dedup_key"],
        "the resolve closes the trigger's incident"
    );

    // trigger → decision → execution → result, linked by notification id.
    let records = engine.audit().recent();
    let triggers: Vec<&AuditRecord> = records.iter().filter(|r| r.kind == "trigger").collect();
    assert_eq!(
        triggers
            .iter()
            .map(|r| r.outcome.as_str())
            .collect::<Vec<_>>(),
        ["fired", "resolved"]
    );
    let ids: std::collections::BTreeSet<&String> = records
        .iter()
        .filter_map(|r| r.notification.as_ref())
        .collect();
    assert_eq!(ids.len(), 8);
    for id in ids {
        let chain: Vec<(&str, &str)> = records
            .iter()
            .filter(|r| r.notification.as_ref() == Some(id))
            .map(|r| (r.kind, r.outcome.as_str()))
            .collect();
        assert_eq!(
            chain,
            [
                ("decision", "execute"),
                ("execution", "started"),
                ("result", "delivered")
            ]
        );
    }
    // No secret in the trail: the routing key and the receivers' paths are masked.
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains("R0UT1NGKEY"));
    assert!(text.contains(&format!("http://{addr}/***")));
}

#[tokio::test]
async fn retries_follow_the_error_class_and_the_last_failure_goes_to_the_fallback() {
    let (rx, addr) = Receiver::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_wait = "0s"
            group_by = ["alertname", "host"]
            receivers = ["hook"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            fallback = "backup"
            retry = {{ attempts = 3, initial_backoff = "10ms", max_backoff = "2s" }}

            [[receiver]]
            name = "backup"
            type = "webhook"
            url = "http://{addr}/backup"
            "#
        ),
        clock.clone(),
    );
    // 500, 500, then 200: delivered on the third try.
    rx.answer(&[(500, None), (500, None)]);
    engine
        .execute(&input(&[("a", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert_eq!(rx.bodies("/hook").len(), 3);
    assert!(rx.bodies("/backup").is_empty());

    // 429 with Retry-After: 1 → the second try waits a second.
    rx.answer(&[(429, Some("1"))]);
    engine
        .execute(&input(&[("b", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    let t = rx.times("/hook");
    assert_eq!(t.len(), 5);
    assert!(
        t[4] - t[3] >= Duration::from_millis(950),
        "Retry-After honoured: {:?}",
        t[4] - t[3]
    );

    // 400 is never retried: one try, then the fallback.
    rx.answer(&[(400, None)]);
    engine
        .execute(&input(&[("c", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert_eq!(rx.bodies("/hook").len(), 6);
    assert_eq!(rx.bodies("/backup").len(), 1);
    let results = outcomes(&engine, "result");
    assert_eq!(results.iter().filter(|o| *o == "failed").count(), 4);
    assert_eq!(results.iter().filter(|o| *o == "fallback").count(), 1);

    // Without a fallback, the notification waits in the outbox and is tried again; past
    // its max_delivery_age it is dead-lettered with its payload.
    let engine2 = self::engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_wait = "0s"
            receivers = ["hook"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            retry = {{ attempts = 2, initial_backoff = "10ms" }}
            max_delivery_age = "1m"
            "#
        ),
        clock.clone(),
    );
    rx.answer(&[(503, None), (503, None)]);
    engine2
        .execute(&input(&[("d", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert_eq!(engine2.undelivered().len(), 1, "kept for a retry");
    assert!(!outcomes(&engine2, "result").contains(&"dead_lettered".to_owned()));
    clock.advance(Duration::from_secs(61));
    rx.answer(&[(503, None), (503, None)]);
    engine2.tick().await.unwrap();
    assert!(engine2.undelivered().is_empty());
    let dead: Vec<AuditRecord> = engine2
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.outcome == "dead_lettered")
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].details["alerts"][0]["labels"]["host"], "d");
    assert_eq!(
        engine2
            .stats()
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn flapping_input_sends_one_notice_and_nothing_more() {
    let (rx, addr) = Receiver::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_wait = "0s"
            group_interval = "1ms"
            flap = {{ max_changes = 2, window = "10m" }}
            receivers = ["hook", "restart"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"

            [[receiver]]
            name = "restart"
            type = "webhook"
            url = "http://{addr}/restart"
            "#
        ),
        clock.clone(),
    );
    for i in 0..20 {
        clock.advance(Duration::from_secs(1));
        engine
            .execute(&input(&[(
                "a",
                "api",
                i * 10,
                50.0,
                if i % 2 == 0 { 1.0 } else { 0.0 },
                i % 2 == 0,
            )]))
            .await
            .unwrap();
        engine.tick().await.unwrap();
    }
    let kinds: Vec<String> = rx
        .bodies("/hook")
        .iter()
        .map(|b| {
            format!(
                "{}:{}",
                b["kind"]["type"].as_str().unwrap(),
                b["alerts"][0]["status"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        ["alerts:firing", "alerts:resolved", "flapping:firing"]
    );
    let triggers = outcomes(&engine, "trigger");
    assert_eq!(triggers.iter().filter(|o| *o == "flapping").count(), 1);
}

#[tokio::test]
async fn groups_wait_collect_and_repeat_on_the_clock() {
    let (rx, addr) = Receiver::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_by = ["alertname", "service"]
            group_wait = "30s"
            group_interval = "5m"
            repeat_interval = "1h"
            stale_after = "0s"           # the series go quiet on purpose here
            receivers = ["hook"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            "#
        ),
        clock.clone(),
    );
    let count = |b: &Value| b["alerts"].as_array().unwrap().len();
    engine
        .execute(&input(&[
            ("web-1", "api", 0, 99.0, 1.0, true),
            ("db-1", "db", 0, 99.0, 1.0, true),
        ]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(10));
    engine
        .execute(&input(&[("web-2", "api", 10, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert!(
        rx.bodies("/hook").is_empty(),
        "group_wait holds the first notification"
    );
    clock.advance(Duration::from_secs(20));
    engine.tick().await.unwrap();
    let bodies = rx.bodies("/hook");
    assert_eq!(bodies.len(), 2, "one per group");
    let api = bodies
        .iter()
        .find(|b| b["group_labels"]["service"] == "api")
        .unwrap();
    assert_eq!(
        count(api),
        2,
        "alerts that arrived within group_wait go together"
    );

    clock.advance(Duration::from_secs(60));
    engine
        .execute(&input(&[("web-3", "api", 100, 99.0, 1.0, true)]))
        .await
        .unwrap();
    engine.tick().await.unwrap();
    assert_eq!(
        rx.bodies("/hook").len(),
        2,
        "a change waits for group_interval"
    );
    clock.advance(Duration::from_secs(240));
    engine.tick().await.unwrap();
    let bodies = rx.bodies("/hook");
    assert_eq!(bodies.len(), 3);
    assert_eq!(count(&bodies[2]), 3);

    clock.advance(Duration::from_secs(30 * 60));
    engine.tick().await.unwrap();
    assert_eq!(
        rx.bodies("/hook").len(),
        3,
        "unchanged: nothing before repeat_interval"
    );
    clock.advance(Duration::from_secs(31 * 60));
    engine.tick().await.unwrap();
    let bodies = rx.bodies("/hook");
    assert_eq!(bodies.len(), 5, "both groups repeated after an hour");
    assert_ne!(
        bodies[3]["id"], bodies[2]["id"],
        "a repeat is a new notification"
    );
}

#[tokio::test]
async fn silences_and_inhibition_hold_alerts_back_and_say_why() {
    let (rx, addr) = Receiver::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            max_silence = "1d"

            [[rule]]
            name = "down"
            severity = "critical"
            min_score = 0.99
            group_wait = "0s"
            group_by = ["alertname", "host"]
            receivers = ["hook"]

            [[rule]]
            name = "slow"
            severity = "warning"
            min_score = 0.5
            group_wait = "0s"
            group_by = ["alertname", "host"]
            receivers = ["hook"]

            [[inhibit]]
            source = {{ severity = "critical" }}
            target = {{ severity = "warning" }}
            equal = ["host"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            "#
        ),
        clock.clone(),
    );
    let id = engine
        .add_silence(
            toml::from_str(
                r#"
            matchers = { service = "db" }
            created_by = "alice"
            comment = "db maintenance"
            duration = "30d"
            "#,
            )
            .unwrap(),
        )
        .unwrap();
    let silence = engine.silences().into_iter().find(|s| s.id == id).unwrap();
    assert_eq!(
        silence.ends_ms - silence.starts_ms,
        86_400_000,
        "capped at max_silence"
    );

    // h1 is down (critical) and slow (warning): the warning is inhibited. h2 is only slow.
    // db-1 is down but silenced.
    engine
        .execute(&input(&[
            ("h1", "api", 0, 99.0, 0.999, true),
            ("h2", "api", 0, 70.0, 0.7, true),
            ("db-1", "db", 0, 99.0, 0.999, true),
        ]))
        .await
        .unwrap();
    let alerts: Vec<(String, String)> = rx
        .bodies("/hook")
        .iter()
        .flat_map(|b| b["alerts"].as_array().unwrap().clone())
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap().to_owned(),
                a["labels"]["host"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut alerts = alerts;
    alerts.sort();
    assert_eq!(
        alerts,
        [
            ("down".to_owned(), "h1".to_owned()),
            ("slow".to_owned(), "h2".to_owned())
        ]
    );
    let decisions = outcomes(&engine, "decision");
    assert!(decisions.contains(&"silenced".to_owned()));
    assert!(decisions.contains(&"inhibited".to_owned()));
    assert!(decisions.contains(&"silence_added".to_owned()));

    // After the silence ends, db-1 is notified when it fires again.
    clock.advance(Duration::from_secs(86_400 + 1));
    engine
        .execute(&input(&[("db-1", "db", 10, 10.0, 0.0, false)]))
        .await
        .unwrap();
    engine
        .execute(&input(&[("db-1", "db", 20, 99.0, 0.999, true)]))
        .await
        .unwrap();
    assert!(
        rx.bodies("/hook")
            .iter()
            .any(|b| b["alerts"][0]["labels"]["host"] == "db-1")
    );
}

#[tokio::test]
async fn cooldown_holds_repeats_and_the_circuit_breaker_escalates_to_a_person() {
    let (rx, addr) = Receiver::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_wait = "0s"
            group_by = ["alertname", "host"]
            receivers = ["flaky"]

            [[receiver]]
            name = "flaky"
            type = "webhook"
            url = "http://{addr}/flaky"
            retry = {{ attempts = 1 }}
            circuit_breaker = {{ failures = 2, open_for = "5m" }}
            escalate_to = "person"

            [[receiver]]
            name = "person"
            type = "slack"
            url = "http://{addr}/person"
            "#
        ),
        clock.clone(),
    );
    rx.answer(&[(500, None), (500, None)]);
    for host in ["a", "b", "c"] {
        engine
            .execute(&input(&[(host, "api", 0, 99.0, 1.0, true)]))
            .await
            .unwrap();
    }
    assert_eq!(
        rx.bodies("/flaky").len(),
        2,
        "the third is not even tried: the circuit is open"
    );
    let person = rx.bodies("/person");
    assert_eq!(person.len(), 1, "one escalation when the circuit opened");
    assert!(
        person[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("[ESCALATION]"),
        "{}",
        person[0]
    );
    let decisions = outcomes(&engine, "decision");
    assert!(decisions.contains(&"circuit_open".to_owned()));
    assert!(outcomes(&engine, "result").contains(&"circuit_opened".to_owned()));
    // After open_for, one trial goes through; it succeeds and closes the circuit.
    clock.advance(Duration::from_secs(301));
    engine
        .execute(&input(&[("d", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert_eq!(rx.bodies("/flaky").len(), 3);

    // Cooldown: a group that fires again soon after is held back.
    let cool = self::engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_wait = "0s"
            group_interval = "1ms"
            group_by = ["alertname", "host"]
            receivers = ["hook"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/cool"
            cooldown = "10m"
            "#
        ),
        clock.clone(),
    );
    cool.execute(&input(&[("x", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    cool.execute(&input(&[("x", "api", 60, 40.0, 0.0, false)]))
        .await
        .unwrap();
    assert_eq!(
        rx.bodies("/cool").len(),
        2,
        "a resolve is never held by a cooldown"
    );
    clock.advance(Duration::from_secs(60));
    cool.execute(&input(&[("x", "api", 120, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert_eq!(
        rx.bodies("/cool").len(),
        2,
        "firing again within the cooldown is held"
    );
    assert!(outcomes(&cool, "decision").contains(&"cooldown".to_owned()));
    // A cooldown is a deliberate pause: recorded, not dead-lettered.
    assert!(!outcomes(&cool, "result").contains(&"dead_lettered".to_owned()));
    clock.advance(Duration::from_secs(600));
    cool.execute(&input(&[("x", "api", 180, 40.0, 0.0, false)]))
        .await
        .unwrap();
    cool.execute(&input(&[("x", "api", 240, 99.0, 1.0, true)]))
        .await
        .unwrap();
    // The resolve goes out (a receiver ignores a resolve it has no incident for), then the
    // new firing, the cooldown being over.
    assert_eq!(
        rx.bodies("/cool").len(),
        4,
        "after the cooldown it fires again"
    );
    assert_eq!(rx.bodies("/cool")[3]["alerts"][0]["status"], "firing");
}

fn command_engine(
    dir: &std::path::Path,
    mode: &str,
    pattern: &str,
    store: Arc<MemoryIdempotency>,
) -> DecisionEngine {
    let config: DecisionConfig = toml::from_str(&format!(
        r#"
        allowed_commands = ["/usr/bin/mktemp", "/bin/echo"]
        audit_log = "{dir}/audit.jsonl"

        [[rule]]
        name = "cpu"
        group_wait = "0s"
        group_by = ["alertname", "service"]
        receivers = ["restart", "echo"]

        [[receiver]]
        name = "restart"
        type = "command"
        [receiver.command]
        argv = ["/usr/bin/mktemp", "{dir}/ran-{{service}}.XXXXXX"]
        mode = "{mode}"
        params = {{ service = {{ pattern = "[a-z][a-z0-9-]*" }} }}

        [[receiver]]
        name = "echo"
        type = "command"
        [receiver.command]
        argv = ["/bin/echo", "service={{service}}"]
        mode = "auto"
        params = {{ service = {{ pattern = "{pattern}", path = true }} }}
        "#,
        dir = dir.display()
    ))
    .unwrap();
    DecisionEngine::with_options(
        config,
        EngineOptions {
            clock: Arc::new(ManualClock::at(T0)),
            ticker: false,
            idempotency: Some(store),
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_remediation_runs_once_across_a_restart_and_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.jsonl");
    let fire = input(&[
        ("web-1", "api", 0, 99.0, 1.0, true),
        ("web-2", "api", 0, 99.0, 1.0, true),
    ]);
    // The file store, as configured in production: it survives the restart.
    let run = |fire: ActionInput| {
        let dir = dir.path().to_owned();
        let keys = keys.clone();
        async move {
            let config: DecisionConfig = toml::from_str(&format!(
                r#"
                allowed_commands = ["/usr/bin/mktemp"]
                audit_log = "{dir}/audit.jsonl"
                idempotency = {{ store = "file", path = "{keys}" }}

                [[rule]]
                name = "cpu"
                group_wait = "0s"
                group_by = ["alertname", "service"]
                receivers = ["restart"]

                [[receiver]]
                name = "restart"
                type = "command"
                [receiver.command]
                argv = ["/usr/bin/mktemp", "{dir}/ran-{{service}}.XXXXXX"]
                mode = "auto"
                params = {{ service = {{ pattern = "[a-z]+" }} }}
                "#,
                keys = keys.display(),
                dir = dir.display()
            ))
            .unwrap();
            let engine = DecisionEngine::with_options(
                config,
                EngineOptions {
                    clock: Arc::new(ManualClock::at(T0)),
                    ticker: false,
                    ..EngineOptions::default()
                },
            )
            .unwrap();
            engine.execute(&fire).await.unwrap();
            engine.execute(&fire).await.unwrap(); // an at-least-once redelivery
            engine
        }
    };
    let first = run(fire.clone()).await;
    assert_eq!(
        ran(dir.path()).len(),
        1,
        "two alerts of one group: one remediation"
    );
    assert!(outcomes(&first, "result").contains(&"delivered".to_owned()));
    drop(first);
    let second = run(fire).await; // the process restarted and the input is replayed
    assert_eq!(ran(dir.path()).len(), 1, "the replay does not run it again");
    assert!(outcomes(&second, "decision").contains(&"duplicate".to_owned()));
}

#[tokio::test]
async fn event_data_with_shell_metacharacters_never_reaches_a_shell() {
    let dir = tempfile::tempdir().unwrap();
    // No whitespace (a pattern may not admit it), `${IFS}` in its place.
    let evil = "api;touch${IFS}/tmp/smartcloudops-pwned";
    let store = Arc::new(MemoryIdempotency::default());
    // A strict pattern blocks the value outright.
    let strict = command_engine(dir.path(), "auto", "[a-z][a-z-]*", store.clone());
    strict
        .execute(&input(&[("web-1", evil, 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert!(ran(dir.path()).is_empty());
    let blocked: Vec<AuditRecord> = strict
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.outcome == "blocked")
        .collect();
    assert_eq!(blocked.len(), 2, "both commands refuse the value");
    assert!(
        blocked[0].reason.contains("is not a valid value"),
        "{}",
        blocked[0].reason
    );

    // A permissive pattern lets it through, as one literal argument: echo prints it.
    let loose = command_engine(
        dir.path(),
        "dry_run",
        "[a-zA-Z;${}][a-zA-Z;${}/-]*",
        Arc::new(MemoryIdempotency::default()),
    );
    loose
        .execute(&input(&[("web-1", evil, 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    let delivered = loose
        .audit()
        .recent()
        .into_iter()
        .find(|r| r.outcome == "delivered" && r.receiver.as_deref() == Some("echo"))
        .unwrap_or_else(|| panic!("{:#?}", loose.audit().recent()));
    let report: Value =
        serde_json::from_str(delivered.details["detail"].as_str().unwrap()).unwrap();
    assert_eq!(report["stdout"], format!("service={evil}\n"));
    assert_eq!(report["exit"], 0);
    assert!(!std::path::Path::new("/tmp/smartcloudops-pwned").exists());
    assert!(
        ran(dir.path()).is_empty(),
        "the strict command refused it again"
    );

    // dry_run records the argv it would run, and runs nothing.
    let dry_run = command_engine(
        dir.path(),
        "dry_run",
        "[a-z]+",
        Arc::new(MemoryIdempotency::default()),
    );
    dry_run
        .execute(&input(&[("web-1", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    let dry = dry_run
        .audit()
        .recent()
        .into_iter()
        .find(|r| r.outcome == "dry_run")
        .unwrap();
    assert_eq!(dry.details["plan"]["argv"][0], "/usr/bin/mktemp");
    assert!(
        dry.details["plan"]["argv"][1]
            .as_str()
            .unwrap()
            .ends_with("/ran-api.XXXXXX")
    );
    assert!(ran(dir.path()).is_empty());
}

#[tokio::test]
async fn suggest_mode_records_a_suggestion_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = command_engine(
        dir.path(),
        "suggest",
        "[a-z]+",
        Arc::new(MemoryIdempotency::default()),
    );
    engine
        .execute(&input(&[("web-1", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    let suggestions = engine.suggestions();
    assert_eq!(suggestions.len(), 1);
    assert_eq!(suggestions[0].receiver, "restart");
    assert!(
        suggestions[0].plan["argv"][1]
            .as_str()
            .unwrap()
            .contains("ran-api.")
    );
    assert!(ran(dir.path()).is_empty());
    assert!(outcomes(&engine, "decision").contains(&"suggested".to_owned()));
}

#[tokio::test]
async fn configuration_mistakes_are_refused_with_their_path() {
    let config: DecisionConfig = toml::from_str(
        r#"
        [[rule]]
        name = "cpu"
        min_score = 0.5
        resolve_score = 0.8
        receivers = ["nobody"]

        [[receiver]]
        name = "cmd"
        type = "command"
        [receiver.command]
        argv = ["/bin/sh", "-c", "reboot"]
        "#,
    )
    .unwrap();
    let problems: BTreeMap<String, String> = config
        .problems()
        .into_iter()
        .map(|e| (e.path, e.message))
        .collect();
    assert!(
        problems.contains_key("rule[0].resolve_score"),
        "{problems:?}"
    );
    assert!(problems["rule[0].receivers"].contains("nobody"));
    assert!(
        problems["receiver[0]"].contains("allowed_commands"),
        "{problems:?}"
    );
}

#[tokio::test]
async fn an_alert_whose_series_goes_quiet_resolves_after_stale_after() {
    let (rx, addr) = Receiver::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_wait = "0s"
            group_interval = "1s"
            stale_after = "10m"
            receivers = ["hook"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            "#
        ),
        clock.clone(),
    );
    engine
        .execute(&input(&[("gone", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(9 * 60));
    engine.tick().await.unwrap();
    assert_eq!(
        rx.bodies("/hook").len(),
        1,
        "still firing before stale_after"
    );
    clock.advance(Duration::from_secs(2 * 60));
    engine.tick().await.unwrap();
    let bodies = rx.bodies("/hook");
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[1]["alerts"][0]["status"], "resolved");
    assert!(outcomes(&engine, "trigger").contains(&"stale".to_owned()));
    assert!(engine.firing().is_empty());
}

#[tokio::test]
async fn a_silence_added_during_an_incident_mutes_it_and_its_end_brings_it_back() {
    let (rx, addr) = Receiver::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            [[rule]]
            name = "cpu"
            group_wait = "0s"
            group_interval = "1m"
            repeat_interval = "10m"
            stale_after = "0s"
            receivers = ["hook"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            "#
        ),
        clock.clone(),
    );
    engine
        .execute(&input(&[("web-1", "api", 0, 99.0, 1.0, true)]))
        .await
        .unwrap();
    assert_eq!(rx.bodies("/hook").len(), 1);
    engine
        .add_silence(
            toml::from_str(
                r#"
                matchers = { host = "web-1" }
                created_by = "bob"
                comment = "on it"
                duration = "30m"
                "#,
            )
            .unwrap(),
        )
        .unwrap();
    clock.advance(Duration::from_secs(20 * 60));
    engine.tick().await.unwrap();
    assert_eq!(rx.bodies("/hook").len(), 1, "no repeat while silenced");
    assert!(outcomes(&engine, "decision").contains(&"silenced".to_owned()));
    clock.advance(Duration::from_secs(11 * 60)); // the silence ended; the alert still fires
    engine.tick().await.unwrap();
    let bodies = rx.bodies("/hook");
    assert_eq!(bodies.len(), 2, "notified again once the silence ended");
    assert_eq!(bodies[1]["alerts"][0]["status"], "firing");
    assert!(outcomes(&engine, "decision").contains(&"unmuted".to_owned()));
}
