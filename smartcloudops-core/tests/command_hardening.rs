//! Guarded commands cannot outlive their timeout, exceed their limits, run an unchecked
//! interpreter, take a loose parameter, flood a person's channel with their output, or leak
//! their environment (issue 14, item 6).

mod decision_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use decision_support::{Hook, T0, engine, input};
use smartcloudops_core::Action;
use smartcloudops_core::decision::command::{CommandConfig, CommandReceiver};
use smartcloudops_core::decision::receiver::Receiver;
use smartcloudops_core::decision::{
    AlertRecord, AlertStatus, DecisionConfig, ManualClock, Notification, NotificationKind,
};

/// A firing notification with no labels (the commands here take no parameters).
fn firing() -> Notification {
    Notification {
        id: "n".into(),
        receiver: "cmd".into(),
        rule: "cpu".into(),
        group_key: "cpu:{}".into(),
        group_labels: BTreeMap::new(),
        kind: NotificationKind::Alerts,
        alerts: vec![AlertRecord {
            fingerprint: "f".into(),
            rule: "cpu".into(),
            status: AlertStatus::Firing,
            severity: Default::default(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            starts_at_ms: T0,
            ends_at_ms: None,
            series_id: 1,
        }],
        epoch_ms: T0,
        sequence: 0,
    }
}

/// A shell command (`allow_interpreter = true`), with `extra` TOML lines.
fn shell(script: &str, extra: &str, timeout: Duration) -> CommandReceiver {
    let config: CommandConfig = toml::from_str(&format!(
        "argv = [\"/bin/sh\", \"-c\", {script:?}]\nmode = \"auto\"\nallow_interpreter = true\n{extra}"
    ))
    .unwrap();
    CommandReceiver::new(config, &[PathBuf::from("/bin/sh")], timeout).unwrap()
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: dead all the same).
fn dead(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[tokio::test]
async fn a_grandchild_of_a_timed_out_command_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let receiver = shell(
        &format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
        "",
        Duration::from_secs(1),
    );
    let err = receiver.deliver(&firing()).await.unwrap_err();
    assert!(err.message.contains("timeout"), "{}", err.message);
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    // SIGKILL was sent before deliver returned; give the kernel a moment to finish it.
    let gone = (0..100).any(|_| {
        dead(&pid) || {
            std::thread::sleep(Duration::from_millis(20));
            false
        }
    });
    if !gone {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid])
            .status();
    }
    assert!(
        gone,
        "the grandchild `sleep 300` (pid {pid}) outlived the timeout"
    );
}

#[tokio::test]
async fn the_open_files_limit_holds_for_the_command() {
    // Descriptors 3 … 9: the seventh is one too many under `open_files = 8`.
    let script = "exec 3</dev/null 4</dev/null 5</dev/null 6</dev/null 7</dev/null 8</dev/null \
                  9</dev/null; echo opened";
    let free = shell(script, "", Duration::from_secs(10));
    let out = free.deliver(&firing()).await.unwrap();
    assert!(out.contains("opened"), "{out}");
    let limited = shell(
        script,
        "limits = { open_files = 8 }",
        Duration::from_secs(10),
    );
    let err = limited.deliver(&firing()).await.unwrap_err();
    assert!(err.message.starts_with("command failed"), "{}", err.message);
    assert!(!err.message.contains("opened"), "{}", err.message);
}

#[tokio::test]
async fn the_cpu_limit_stops_a_busy_loop_long_before_the_timeout() {
    let busy = shell(
        "while :; do :; done",
        "limits = { cpu = \"1s\" }",
        Duration::from_secs(60),
    );
    let err = busy.deliver(&firing()).await.unwrap_err();
    // SIGXCPU (24) at the soft limit, SIGKILL (9) at the hard one.
    assert!(
        err.message.contains("\"signal\":24") || err.message.contains("\"signal\":9"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("timeout"), "{}", err.message);
}

fn problems(text: &str) -> BTreeMap<String, String> {
    let config: DecisionConfig = toml::from_str(text).unwrap();
    config
        .problems()
        .into_iter()
        .map(|e| (e.path, e.message))
        .collect()
}

#[test]
fn an_interpreter_and_a_loose_pattern_fail_validation_with_the_reason() {
    let p = problems(
        r#"
        allowed_commands = ["/bin/sh", "/usr/bin/systemctl"]

        [[receiver]]
        name = "shell"
        type = "command"
        [receiver.command]
        argv = ["/bin/sh", "-c", "systemctl restart api"]

        [[receiver]]
        name = "restart"
        type = "command"
        [receiver.command]
        argv = ["/usr/bin/systemctl", "restart", "{service}"]
        params = { service = { pattern = ".*" } }
        "#,
    );
    let shell = &p["receiver[0]"];
    assert!(
        shell.contains("is an interpreter") && shell.contains("allow_interpreter = true"),
        "{shell}"
    );
    let loose = &p["receiver[1]"];
    assert!(
        loose.contains("`.*` is too loose") && loose.contains("the probe \" \""),
        "{loose}"
    );
}

#[test]
fn debug_of_a_command_config_hides_env_values() {
    let config: DecisionConfig = toml::from_str(
        r#"
        allowed_commands = ["/usr/bin/systemctl"]
        [[receiver]]
        name = "restart"
        type = "command"
        [receiver.command]
        argv = ["/usr/bin/systemctl", "restart", "api"]
        env = { PATH = "/usr/bin", VAULT_TOKEN = "hvs.s3cr3t" }
        "#,
    )
    .unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("VAULT_TOKEN"), "{debug}");
    assert!(!debug.contains("hvs.s3cr3t"), "{debug}");
}

#[tokio::test]
async fn an_escalation_carries_only_the_start_of_the_failure_output() {
    let (hook, addr) = Hook::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let engine = engine(
        &format!(
            r#"
            allowed_commands = ["/bin/sh"]
            audit_log = "{audit}"

            [[rule]]
            name = "cpu"
            group_wait = "0s"
            receivers = ["fix"]

            [[receiver]]
            name = "fix"
            type = "command"
            circuit_breaker = {{ failures = 1 }}
            escalate_to = "person"
            [receiver.command]
            argv = ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x >&2; exit 3"]
            mode = "auto"
            allow_interpreter = true

            [[receiver]]
            name = "person"
            type = "webhook"
            url = "http://{addr}/person"
            "#,
            audit = audit.display()
        ),
        Arc::new(ManualClock::at(T0)),
    );
    engine
        .execute(&input(&[("web-1", "api", 0, true)]))
        .await
        .unwrap();
    let bodies = hook.bodies("/person");
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(bodies[0]["kind"]["type"], "escalation");
    let reason = bodies[0]["kind"]["reason"].as_str().unwrap();
    assert!(reason.len() < 4 * 1024 + 64, "{} bytes", reason.len());
    assert!(reason.starts_with("command failed"), "{}", &reason[..40]);
    assert!(
        reason.ends_with("bytes cut)"),
        "{}",
        &reason[reason.len() - 40..]
    );
    // The audit log keeps the whole failure.
    let failed = engine
        .audit()
        .recent()
        .into_iter()
        .find(|r| r.outcome == "failed")
        .unwrap();
    assert!(failed.reason.len() > 64 * 1024, "{}", failed.reason.len());
    assert!(Path::new(&audit).exists());
}
