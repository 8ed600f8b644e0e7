//! The decision journal (`state_dir`): what the engine decided survives an engine dropped
//! without shutdown (as a `kill -9` would leave it) and a new engine on the same directory.
//! A local HTTP receiver counts what is sent; the clock is a test clock.

mod decision_support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use decision_support::{Hook, T0, input, outcomes};
use smartcloudops_core::Action;
use smartcloudops_core::decision::dispatch::SilenceConfig;
use smartcloudops_core::decision::guard::MemoryIdempotency;
use smartcloudops_core::decision::journal::FILE_NAME;
use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions, ManualClock};

/// An engine for `toml_text` keeping its state in `dir`, on `clock`, without a ticker.
fn journaled(toml_text: &str, dir: &Path, clock: Arc<ManualClock>) -> DecisionEngine {
    try_journaled(toml_text, dir, clock).unwrap()
}

fn try_journaled(
    toml_text: &str,
    dir: &Path,
    clock: Arc<ManualClock>,
) -> smartcloudops_core::Result<DecisionEngine> {
    let mut config: DecisionConfig = toml::from_str(toml_text).unwrap();
    config.state_dir = Some(dir.to_owned());
    DecisionEngine::with_options(
        config,
        EngineOptions {
            clock,
            ticker: false,
            idempotency: Some(Arc::new(MemoryIdempotency::default())),
            ..EngineOptions::default()
        },
    )
}

fn webhook_rule(addr: std::net::SocketAddr, rule: &str) -> String {
    format!(
        r#"
        {rule}
        receivers = ["hook"]

        [[receiver]]
        name = "hook"
        type = "alertmanager"
        url = "http://{addr}/hook"
        "#
    )
}

/// `(status, [alert statuses])` of each notification the hook received.
fn received(hook: &Hook) -> Vec<(String, Vec<String>)> {
    hook.bodies("/hook")
        .iter()
        .map(|b| {
            let statuses = b["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["status"].as_str().unwrap().to_owned())
                .collect();
            (b["status"].as_str().unwrap().to_owned(), statuses)
        })
        .collect()
}

#[tokio::test]
async fn an_alert_in_group_wait_is_notified_after_a_crash_when_its_wait_ends() {
    let (hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let config = webhook_rule(
        addr,
        "[[rule]]\nname = \"cpu\"\ngroup_wait = \"30s\"\ngroup_by = [\"alertname\", \"service\"]",
    );
    let engine = journaled(&config, dir.path(), clock.clone());
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    assert!(received(&hook).is_empty(), "waiting for group_wait");
    drop(engine); // no shutdown: the pending group is not flushed

    clock.advance(Duration::from_secs(10));
    let engine = journaled(&config, dir.path(), clock.clone());
    assert_eq!(engine.firing().len(), 1, "the firing alert is back");
    assert!(outcomes(&engine, "decision").contains(&"state_restored".to_owned()));
    engine.tick().await.unwrap();
    assert!(
        received(&hook).is_empty(),
        "the wait is measured from the group's creation before the restart: 20 s left"
    );
    clock.advance(Duration::from_secs(20));
    engine.tick().await.unwrap();
    assert_eq!(
        received(&hook),
        vec![("firing".to_owned(), vec!["firing".to_owned()])]
    );
    engine.tick().await.unwrap();
    assert_eq!(received(&hook).len(), 1, "notified once");

    // That it was notified is saved too: a second restart does not notify it again.
    drop(engine);
    clock.advance(Duration::from_secs(60));
    let engine = journaled(&config, dir.path(), clock.clone());
    engine.tick().await.unwrap();
    assert_eq!(received(&hook).len(), 1);
}

#[tokio::test]
async fn a_firing_alert_resolves_after_a_restart_with_a_resolved_notification() {
    let (hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let config = webhook_rule(
        addr,
        "[[rule]]\nname = \"cpu\"\ngroup_wait = \"0s\"\ngroup_interval = \"1s\"",
    );
    let engine = journaled(&config, dir.path(), clock.clone());
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    assert_eq!(received(&hook).len(), 1);
    drop(engine);

    clock.advance(Duration::from_secs(60));
    let engine = journaled(&config, dir.path(), clock.clone());
    assert_eq!(engine.firing().len(), 1);
    engine
        .execute(&input(&[("web-1", "api", 60, true)]))
        .await
        .unwrap();
    assert_eq!(
        received(&hook).len(),
        1,
        "still firing, unchanged: no repeat before repeat_interval"
    );
    clock.advance(Duration::from_secs(2));
    engine
        .execute(&input(&[("web-1", "api", 120, false)]))
        .await
        .unwrap();
    assert_eq!(
        received(&hook),
        vec![
            ("firing".to_owned(), vec!["firing".to_owned()]),
            ("resolved".to_owned(), vec!["resolved".to_owned()]),
        ]
    );
    assert!(engine.firing().is_empty());
    let bodies = hook.bodies("/hook");
    assert_eq!(
        bodies[0]["alerts"][0]["startsAt"], bodies[1]["alerts"][0]["startsAt"],
        "the resolution closes the episode that fired before the restart"
    );

    // Resolved and notified: its group is gone; only its flap history is left.
    drop(engine);
    let engine = journaled(&config, dir.path(), clock.clone());
    assert!(engine.firing().is_empty());
    let restored = engine
        .audit()
        .recent()
        .into_iter()
        .find(|r| r.outcome == "state_restored")
        .unwrap();
    assert_eq!(restored.details["groups"], 0);
    assert_eq!(restored.details["firing"], 0);
}

#[tokio::test]
async fn a_for_timer_continues_across_a_restart() {
    let (hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let config = webhook_rule(
        addr,
        "[[rule]]\nname = \"cpu\"\nfor = \"2m\"\ngroup_wait = \"0s\"",
    );
    let engine = journaled(&config, dir.path(), clock.clone());
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    engine
        .execute(&input(&[("web-1", "api", 60, true)]))
        .await
        .unwrap();
    assert!(received(&hook).is_empty(), "pending");
    drop(engine);

    clock.advance(Duration::from_secs(60));
    let engine = journaled(&config, dir.path(), clock.clone());
    engine
        .execute(&input(&[("web-1", "api", 120, true)]))
        .await
        .unwrap();
    assert_eq!(
        received(&hook).len(),
        1,
        "fires two minutes after the first active row, not two minutes after the restart"
    );
    assert_eq!(
        hook.bodies("/hook")[0]["alerts"][0]["startsAt"],
        "2025-11-25T12:00:00.000Z"
    );
}

#[tokio::test]
async fn runtime_silences_and_their_ids_survive_a_restart() {
    let (hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let config = webhook_rule(addr, "[[rule]]\nname = \"cpu\"\ngroup_wait = \"0s\"");
    let engine = journaled(&config, dir.path(), clock.clone());
    let silence = |host: &str| SilenceConfig {
        matchers: [("host".to_owned(), host.to_owned())].into(),
        created_by: "ops".into(),
        comment: "maintenance".into(),
        starts_at: None,
        ends_at: None,
        duration: Some(Duration::from_secs(3600)),
    };
    let id = engine.add_silence(silence("web-1")).unwrap();
    drop(engine);

    clock.advance(Duration::from_secs(60));
    let engine = journaled(&config, dir.path(), clock.clone());
    let silences = engine.silences();
    assert_eq!(silences.len(), 1);
    assert_eq!(silences[0].id, id);
    assert_eq!(silences[0].starts_ms, T0, "as it was, not restarted");
    engine
        .execute(&input(&[("web-1", "api", 60, true)]))
        .await
        .unwrap();
    assert!(received(&hook).is_empty(), "still silenced");
    let second = engine.add_silence(silence("web-2")).unwrap();
    assert_ne!(second, id, "the id sequence continues");

    // An expired silence leaves the journal.
    drop(engine);
    clock.advance(Duration::from_secs(3600));
    let engine = journaled(&config, dir.path(), clock.clone());
    assert!(engine.silences().is_empty());
}

#[tokio::test]
async fn suggestions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let config = r#"
        allowed_commands = ["/usr/bin/systemctl"]

        [[rule]]
        name = "cpu"
        group_wait = "0s"
        group_by = ["alertname", "service"]
        receivers = ["restart"]

        [[receiver]]
        name = "restart"
        type = "command"
        [receiver.command]
        argv = ["/usr/bin/systemctl", "restart", "{service}"]
        mode = "suggest"
        params = { service = { pattern = "[a-z]+" } }
        "#;
    let engine = journaled(config, dir.path(), clock.clone());
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    let before = engine.suggestions();
    assert_eq!(before.len(), 1);
    drop(engine);

    let engine = journaled(config, dir.path(), clock.clone());
    assert_eq!(engine.suggestions(), before);
}

#[tokio::test]
async fn the_state_of_a_rule_removed_from_the_config_is_dropped_with_an_audit_record() {
    let (_hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let both = webhook_rule(
        addr,
        "[[rule]]\nname = \"gone\"\ngroup_wait = \"1h\"\nreceivers = [\"hook\"]\n\n\
         [[rule]]\nname = \"cpu\"\ngroup_wait = \"1h\"",
    );
    let engine = journaled(&both, dir.path(), clock.clone());
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    assert_eq!(engine.firing().len(), 2);
    drop(engine);

    let one = webhook_rule(addr, "[[rule]]\nname = \"cpu\"\ngroup_wait = \"1h\"");
    let engine = journaled(&one, dir.path(), clock.clone());
    let firing = engine.firing();
    assert_eq!(firing.len(), 1);
    assert_eq!(
        firing[0].rule, "cpu",
        "rules are found by name, not position"
    );
    let dropped: Vec<_> = engine
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.outcome == "state_dropped")
        .collect();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].rule.as_deref(), Some("gone"));
    assert_eq!(dropped[0].details["alerts"], 1);
    assert_eq!(dropped[0].details["groups"], 1);

    // Dropped from the journal too, not only from memory.
    drop(engine);
    let engine = journaled(&both, dir.path(), clock.clone());
    assert_eq!(engine.firing().len(), 1);
}

#[tokio::test]
async fn alerts_that_fired_and_resolved_leave_nothing_behind() {
    let (hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let config = webhook_rule(
        addr,
        "max_new_groups_per_minute = 10000\n\
         [[rule]]\nname = \"cpu\"\ngroup_wait = \"0s\"\ngroup_interval = \"1ms\"\n\
         group_by = [\"alertname\", \"host\"]\nflap = { max_changes = 1000 }",
    );
    let engine = journaled(&config, dir.path(), clock.clone());
    let hosts: Vec<String> = (0..50).map(|i| format!("web-{i}")).collect();
    for round in 0..10i64 {
        let rows: Vec<_> = hosts
            .iter()
            .map(|h| (h.as_str(), "api", round * 60, round % 2 == 0))
            .collect();
        clock.advance(Duration::from_secs(1));
        engine.execute(&input(&rows)).await.unwrap();
    }
    assert_eq!(received(&hook).len(), 50 * 10);
    assert!(engine.firing().is_empty());
    drop(engine);
    let size = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();

    // Removed groups were deleted; a restart finds only the flap history, which the sweep
    // forgets once the series stay quiet (counted from the restart).
    let engine = journaled(&config, dir.path(), clock.clone());
    assert!(engine.firing().is_empty());
    clock.advance(Duration::from_secs(3600));
    engine.tick().await.unwrap();
    drop(engine);
    let engine = journaled(&config, dir.path(), clock.clone());
    assert!(
        !outcomes(&engine, "decision").contains(&"state_restored".to_owned()),
        "nothing left: {:?}",
        engine.audit().recent()
    );
    drop(engine);
    let compacted = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
    assert!(
        compacted <= size,
        "the file does not grow with history: {compacted} > {size}"
    );
}

#[tokio::test]
async fn a_corrupt_or_truncated_journal_is_a_clear_error_not_a_panic() {
    let (_hook, addr) = Hook::spawn().await;
    let config = webhook_rule(addr, "[[rule]]\nname = \"cpu\"\ngroup_wait = \"1h\"");
    let clock = Arc::new(ManualClock::at(T0));

    // Not a journal at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 64 * 1024]).unwrap();
    let e = try_journaled(&config, dir.path(), clock.clone())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(FILE_NAME) && e.contains("cannot be read") && e.contains("Move it aside"),
        "{e}"
    );

    // A real journal, cut short, or with its pages or its header overwritten.
    for damage in ["truncate", "pages", "header"] {
        let dir = tempfile::tempdir().unwrap();
        let engine = journaled(&config, dir.path(), clock.clone());
        let hosts: Vec<String> = (0..200).map(|i| format!("web-{i}")).collect();
        let rows: Vec<_> = hosts.iter().map(|h| (h.as_str(), "api", 0, true)).collect();
        engine.execute(&input(&rows)).await.unwrap();
        drop(engine);
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        match damage {
            "truncate" => bytes.truncate(bytes.len() / 2),
            "pages" => bytes[4096..].fill(0xa5),
            _ => bytes[..512].fill(0xa5),
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = try_journaled(&config, dir.path(), clock.clone())
            .err()
            .unwrap_or_else(|| panic!("{damage}: opened a damaged journal"))
            .to_string();
        assert!(
            e.contains(FILE_NAME) && e.contains("cannot be read"),
            "{damage}: {e}"
        );
    }
}

#[tokio::test]
async fn without_a_state_dir_nothing_survives() {
    let (_hook, addr) = Hook::spawn().await;
    let config = webhook_rule(addr, "[[rule]]\nname = \"cpu\"\ngroup_wait = \"1h\"");
    let clock = Arc::new(ManualClock::at(T0));
    let engine = decision_support::engine(&config, clock.clone());
    assert!(engine.journal_path().is_none());
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    drop(engine);
    let engine = decision_support::engine(&config, clock);
    assert!(engine.firing().is_empty());
}

#[tokio::test]
async fn a_restored_group_is_notified_by_the_ticker_without_waiting_for_a_batch() {
    let (hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let config = format!(
        "tick = \"20ms\"\n{}",
        webhook_rule(addr, "[[rule]]\nname = \"cpu\"\ngroup_wait = \"30s\"")
    );
    let engine = journaled(&config, dir.path(), clock.clone());
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    drop(engine);

    clock.advance(Duration::from_secs(30));
    let mut parsed: DecisionConfig = toml::from_str(&config).unwrap();
    parsed.state_dir = Some(dir.path().to_owned());
    let _engine = DecisionEngine::with_options(
        parsed,
        EngineOptions {
            clock,
            ticker: true,
            idempotency: Some(Arc::new(MemoryIdempotency::default())),
            ..EngineOptions::default()
        },
    )
    .unwrap();
    // No batch arrives (a quiet source after the restart): the ticker sends it anyway.
    for _ in 0..250 {
        if !received(&hook).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        received(&hook),
        vec![("firing".to_owned(), vec!["firing".to_owned()])]
    );
}
