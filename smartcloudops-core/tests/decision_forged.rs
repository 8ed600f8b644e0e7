//! Forged data cannot suppress real alerts or remediations (issue 14, item 8): a
//! remediation held by a rate limit keeps its idempotency key, a flood of new series trips a
//! per-rule cap (one escalation) instead of using up the shared rate limit, and the queue of
//! suggestions stays bounded.

mod decision_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use decision_support::{Hook, T0, engine, input, outcomes, ran};
use smartcloudops_core::Action;
use smartcloudops_core::decision::ManualClock;

#[tokio::test]
async fn a_rate_limited_remediation_runs_later_in_the_same_episode() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            allowed_commands = ["/usr/bin/mktemp"]
            audit_log = "{dir}/audit.jsonl"

            [[rule]]
            name = "cpu"
            group_wait = "0s"
            group_interval = "1s"
            repeat_interval = "1m"
            group_by = ["alertname", "service"]
            receivers = ["restart"]

            [[receiver]]
            name = "restart"
            type = "command"
            rate_limit = {{ per_minute = 1 }}
            [receiver.command]
            argv = ["/usr/bin/mktemp", "{dir}/ran-{{service}}.XXXXXX"]
            mode = "auto"
            params = {{ service = {{ pattern = "[a-z]+" }} }}
            "#,
            dir = dir.path().display()
        ),
        clock.clone(),
    );
    engine
        .execute(&input(&[
            ("web-1", "api", 0, true),
            ("web-2", "web", 0, true),
        ]))
        .await
        .unwrap();
    assert_eq!(ran(dir.path()).len(), 1, "one token: one restart");
    assert!(outcomes(&engine, "decision").contains(&"rate_limited".to_owned()));

    // A minute later the groups repeat and the bucket has a token again: the held restart
    // runs, in the same firing episode; the one that ran is a duplicate (and spends nothing).
    clock.advance(Duration::from_secs(61));
    engine.tick().await.unwrap();
    let names = ran(dir.path());
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("ran-api.")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("ran-web.")), "{names:?}");
    assert!(outcomes(&engine, "decision").contains(&"duplicate".to_owned()));
}

#[tokio::test]
async fn a_flood_of_new_series_trips_the_cap_once_and_leaves_the_rate_limit_to_others() {
    let (hook, addr) = Hook::spawn().await;
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        &format!(
            r#"
            max_new_groups_per_minute = 5
            rate_limit = {{ per_minute = 10 }}

            [[rule]]
            name = "edge"
            labels = {{ service = "edge" }}
            group_wait = "0s"
            group_by = ["alertname", "host"]
            receivers = ["hook"]

            [[rule]]
            name = "db"
            labels = {{ service = "db" }}
            group_wait = "0s"
            group_by = ["alertname", "host"]
            receivers = ["hook"]

            [[receiver]]
            name = "hook"
            type = "webhook"
            url = "http://{addr}/hook"
            "#
        ),
        clock.clone(),
    );
    let hosts: Vec<String> = (0..50).map(|i| format!("forged-{i}")).collect();
    let flood: Vec<_> = hosts
        .iter()
        .map(|h| (h.as_str(), "edge", 0, true))
        .collect();
    engine.execute(&input(&flood)).await.unwrap();
    // More of it within the same minute: counted, no second escalation.
    clock.advance(Duration::from_secs(10));
    let more: Vec<String> = (50..60).map(|i| format!("forged-{i}")).collect();
    let more: Vec<_> = more
        .iter()
        .map(|h| (h.as_str(), "edge", 10, true))
        .collect();
    engine.execute(&input(&more)).await.unwrap();
    // The real alert of another rule still gets a token of the shared limit.
    engine
        .execute(&input(&[("db-1", "db", 10, true)]))
        .await
        .unwrap();

    let bodies = hook.bodies("/hook");
    let escalations: Vec<_> = bodies
        .iter()
        .filter(|b| b["kind"]["type"] == "escalation")
        .collect();
    assert_eq!(escalations.len(), 1, "{escalations:?}");
    assert!(
        escalations[0]["kind"]["reason"]
            .as_str()
            .unwrap()
            .contains("5 new alert groups"),
        "{}",
        escalations[0]
    );
    let edge = bodies
        .iter()
        .filter(|b| b["rule"] == "edge" && b["kind"]["type"] == "alerts")
        .count();
    assert_eq!(edge, 5, "only the cap's worth of groups is notified");
    assert!(
        bodies
            .iter()
            .any(|b| b["rule"] == "db" && b["alerts"][0]["labels"]["host"] == "db-1"),
        "the real alert went out: {bodies:?}"
    );
    assert!(!outcomes(&engine, "decision").contains(&"rate_limited".to_owned()));
    let trips = outcomes(&engine, "decision")
        .into_iter()
        .filter(|o| o == "group_cap_reached")
        .count();
    assert_eq!(trips, 1);
    assert_eq!(engine.stats().over_group_cap.load(Ordering::Relaxed), 55);
}

#[tokio::test]
async fn the_suggestion_queue_stays_at_its_bound() {
    let clock = Arc::new(ManualClock::at(T0));
    let engine = engine(
        r#"
        allowed_commands = ["/usr/bin/systemctl"]
        max_pending_suggestions = 3

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
        "#,
        clock,
    );
    let services = ["alpha", "bravo", "charlie", "delta", "echo"];
    let rows: Vec<_> = services
        .iter()
        .enumerate()
        .map(|(i, s)| (["h0", "h1", "h2", "h3", "h4"][i], *s, 0, true))
        .collect();
    engine.execute(&input(&rows)).await.unwrap();
    let suggestions = engine.suggestions();
    assert_eq!(suggestions.len(), 3);
    let kept: Vec<&str> = suggestions
        .iter()
        .map(|s| s.plan["argv"][2].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["charlie", "delta", "echo"], "the oldest went");
    let dropped = outcomes(&engine, "decision")
        .into_iter()
        .filter(|o| o == "suggestion_dropped")
        .count();
    assert_eq!(dropped, 2);
    assert_eq!(
        engine.stats().suggestions_dropped.load(Ordering::Relaxed),
        2
    );
}
