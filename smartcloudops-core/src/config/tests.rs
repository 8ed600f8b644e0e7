use super::*;
use crate::action::JsonlActionConfig;
use crate::detector::cusum::CusumConfig;
use crate::detector::{EwmaConfig, Preset};

fn parse(text: &str) -> Result<PipelineConfig, ConfigErrors> {
    let dir = std::env::temp_dir();
    PipelineConfig::parse(text, &dir, |name| {
        (name == "ALERT_DIR").then(|| "/var/alerts".to_owned())
    })
}

fn error_paths(text: &str) -> Vec<String> {
    parse(text)
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.path)
        .collect()
}

#[test]
fn a_full_config_parses_with_defaults_and_env() {
    let config = parse(
        r#"
        [source]
        type = "generator"
        series = 10
        interval = "1m"

        [[source.anomaly]]
        series = [3]
        at = 100
        kind = "level_shift"

        [[prep]]
        type = "filter"
        include = ["cpu_utilization"]

        [detector]
        type = "ewma"
        threshold = 5.0

        [[action]]
        type = "log"
        format = "json"

        [[action]]
        type = "jsonl"
        path = "${ALERT_DIR}/alerts.jsonl"

        [runtime]
        channel_capacity = 4
        shutdown_timeout = "5s"
        "#,
    )
    .unwrap();
    let Some(g) = config
        .source
        .downcast_ref::<crate::source::GeneratorConfig>()
    else {
        panic!("generator expected")
    };
    assert_eq!(g.series, 10);
    assert_eq!(g.interval, std::time::Duration::from_secs(60));
    assert_eq!(g.anomalies[0].magnitude, 10.0, "default magnitude");
    assert_eq!(
        config
            .detector
            .as_ref()
            .and_then(|d| d.detector.downcast_ref::<EwmaConfig>()),
        Some(&EwmaConfig {
            threshold: 5.0,
            ..EwmaConfig::default()
        })
    );
    assert_eq!(
        config.actions[1].downcast_ref::<JsonlActionConfig>(),
        Some(&JsonlActionConfig {
            path: "/var/alerts/alerts.jsonl".into(),
            fsync: false
        })
    );
    assert_eq!(config.runtime.channel_capacity, 4);
    assert_eq!(
        config.runtime.shutdown_timeout,
        std::time::Duration::from_secs(5)
    );
    assert!(config.build().is_ok());
}

#[test]
fn every_error_is_reported_with_its_field_path() {
    let errors = parse(
        r#"
        [source]
        type = "generator"
        seriess = 10

        [detector]
        type = "ewma"
        alpha = "fast"

        [[action]]
        type = "jsonl"

        [[action]]
        type = "webhok"

        [runtim]
        channel_capacity = 0
        "#,
    )
    .unwrap_err()
    .0;
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        vec![
            "runtim",
            "source.seriess",
            "detector.alpha",
            "action[0].path",
            "action[1].type"
        ],
        "{rendered:#?}"
    );
    assert!(
        rendered[0].contains("did you mean `runtime`?"),
        "{}",
        rendered[0]
    );
    assert!(
        rendered[1].contains("did you mean `series`?"),
        "{}",
        rendered[1]
    );
    assert!(rendered[2].contains("invalid type"), "{}", rendered[2]);
    assert_eq!(rendered[3], "action[0].path: missing field");
    assert!(
        rendered[4].contains("did you mean \"jsonl\"?") || rendered[4].contains("valid types"),
        "{}",
        rendered[4]
    );
}

#[test]
fn semantic_errors_name_the_field() {
    let paths = error_paths(
        r#"
        [source]
        type = "file"
        path = "does-not-exist.jsonl"
        batch_size = 0

        [detector]
        type = "ewma"
        alpha = 1.5
        "#,
    );
    assert_eq!(
        paths,
        vec!["source.batch_size", "source.path", "detector.alpha"]
    );
}

#[test]
fn unset_environment_variables_are_errors_with_a_hint() {
    let errors = parse(
        r#"
        [source]
        type = "generator"
        [[action]]
        type = "jsonl"
        path = "${SECRET_DIR}/a.jsonl"
        "#,
    )
    .unwrap_err()
    .0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].path, "action[0].path");
    assert!(errors[0].to_string().contains("`SECRET_DIR` is not set"));
    assert!(
        errors[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("${SECRET_DIR:-default}")
    );
}

#[test]
fn missing_source_and_bad_toml_are_reported() {
    assert_eq!(error_paths("[detector]\ntype = \"ewma\"\n"), vec!["source"]);
    let err = parse("[source\ntype = 1").unwrap_err();
    assert!(err.to_string().contains("invalid TOML"), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.jsonl"), "").unwrap();
    let config = PipelineConfig::parse(
        "[source]\ntype = \"file\"\npath = \"data.jsonl\"\n[dead_letter]\ntype = \"file\"\npath = \"dlq/x.jsonl\"\n",
        dir.path(),
        |_| None,
    )
    .unwrap();
    let Some(f) = config
        .source
        .downcast_ref::<crate::source::FileSourceConfig>()
    else {
        panic!()
    };
    assert_eq!(f.path, dir.path().join("data.jsonl"));
    assert_eq!(
        config.dead_letter,
        DeadLetterConfig::File {
            path: dir.path().join("dlq/x.jsonl")
        }
    );
}

const GENERATOR: &str = "[source]\ntype = \"generator\"\n";

#[test]
fn every_detector_type_parses_and_builds() {
    for (kind, extra) in [
        ("ewma", ""),
        ("mad", "rate = 0.02"),
        ("seasonal", "period = \"7d\"\nslots = 168"),
        ("cusum", "drift = 0.5"),
        ("hst", "trees = 5"),
        (
            "threshold",
            "[[detector.rule]]\nmetric = \"cpu\"\nabove = 90.0",
        ),
        ("fast", "sensitivity = 0.8"),
        ("precise", "threshold = 0.9"),
        (
            "ensemble",
            "rest = 10\n[detector.likelihood]\nmode = \"exponential\"",
        ),
    ] {
        let config = parse(&format!(
            "{GENERATOR}[detector]\ntype = \"{kind}\"\n{extra}\n"
        ))
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let section = config.detector.as_ref().unwrap();
        assert_eq!(section.detector.kind, kind);
        let detector = section
            .detector
            .config
            .build(&config.context, section.max_series)
            .unwrap();
        assert_eq!(detector.name(), kind);
        assert!(config.summary().contains(&format!("detector: {kind}")));
    }
}

#[test]
fn a_custom_ensemble_adds_adjusts_and_removes_parts_of_precise() {
    let config = parse(&format!(
        "{GENERATOR}[detector]\ntype = \"ensemble\"\nrest = 5\n[detector.cusum]\n\
         [detector.range_novelty]\nenabled = false\n[detector.seasonal]\nslots = 24\n"
    ))
    .unwrap();
    let c = config
        .detector
        .unwrap()
        .detector
        .config
        .ensemble_config()
        .unwrap();
    let precise = Preset::Precise.config();
    assert_eq!(c.rest, 5);
    assert_eq!(
        c.cusum,
        Some(CusumConfig::default()),
        "added with its defaults"
    );
    assert_eq!(c.range_novelty, None, "removed");
    let seasonal = c.seasonal.unwrap();
    assert_eq!(seasonal.slots, 24, "adjusted");
    assert_eq!(
        seasonal.weekly,
        precise.seasonal.unwrap().weekly,
        "the rest kept"
    );
    assert_eq!(c.context, precise.context);
    assert_eq!(c.ewma, None, "parts precise leaves out stay out");
    assert_eq!(
        error_paths(&format!(
            "{GENERATOR}[detector]\ntype = \"ensemble\"\n[detector.nope]\nenabled = false\n"
        )),
        ["detector.nope.enabled"]
    );
}

#[test]
fn preset_sensitivity_moves_the_threshold_and_an_explicit_threshold_wins() {
    let threshold = |extra: &str| {
        let config = parse(&format!(
            "{GENERATOR}[detector]\ntype = \"precise\"\n{extra}"
        ))
        .unwrap();
        config
            .detector
            .unwrap()
            .detector
            .config
            .ensemble_config()
            .unwrap()
            .threshold
    };
    let tuned = Preset::Precise.config().threshold;
    assert_eq!(threshold(""), tuned);
    assert_eq!(threshold("sensitivity = 0.5"), tuned);
    assert!(threshold("sensitivity = 0.9") < tuned);
    assert!(threshold("sensitivity = 0.1") > tuned);
    assert_eq!(threshold("sensitivity = 0.9\nthreshold = 0.3"), 0.3);
}

#[test]
fn detector_state_fields_are_validated_and_paths_resolved() {
    let config = parse(&format!(
        "{GENERATOR}[detector]\ntype = \"fast\"\nmax_series = 5000\nsnapshot = \"s/d.snap\"\n\
         snapshot_interval = \"5m\"\n"
    ))
    .unwrap();
    let section = config.detector.unwrap();
    assert_eq!(section.max_series, 5000);
    assert_eq!(
        section.snapshot,
        Some(std::env::temp_dir().join("s/d.snap"))
    );
    assert_eq!(section.snapshot_interval, Duration::from_secs(300));
    assert_eq!(
        error_paths(&format!(
            "{GENERATOR}[detector]\ntype = \"precise\"\nmax_series = 0\nsensitivity = 2.0\n\
             snapshot_interval = \"1ms\"\n"
        )),
        [
            "detector.sensitivity",
            "detector.max_series",
            "detector.snapshot_interval"
        ]
    );
    assert_eq!(
        error_paths(&format!(
            "{GENERATOR}[detector]\ntype = \"ensemble\"\nz_high = 0.5\n[detector.seasonal]\nslots = 0\n"
        )),
        ["detector.seasonal.slots", "detector.z_high"]
    );
    assert_eq!(
        error_paths(&format!(
            "{GENERATOR}[detector]\ntype = \"threshold\"\n[[detector.rule]]\nmetric = \"cpu\"\n"
        )),
        ["detector.rule[0]"]
    );
    assert_eq!(
        error_paths(&format!(
            "{GENERATOR}[detector]\ntype = \"ensemble\"\n[detector.context]\nlevels = 1000\n\
             [detector.range_novelty]\nmargin = -1.0\nmin_raw = 2.0\n"
        )),
        [
            "detector.context.levels",
            "detector.range_novelty.margin",
            "detector.range_novelty.min_raw"
        ]
    );
}

#[test]
fn an_unknown_detector_type_gets_a_suggestion() {
    let errors = parse(&format!("{GENERATOR}[detector]\ntype = \"presice\"\n")).unwrap_err();
    let e = &errors.0[0];
    assert_eq!(e.path, "detector.type");
    assert!(e.to_string().contains("did you mean \"precise\""), "{e}");
}

#[cfg(feature = "redis")]
#[test]
fn redis_sections_parse_share_one_connection_and_never_print_the_password() {
    let config = parse(
        r#"
        [redis]
        url = "redis://app:s3cret@cache.internal:6380/2"
        response_timeout = "2s"

        [source]
        type = "redis_stream"
        streams = ["metrics"]
        group = "detect"
        start = "earliest"
        max_deliveries = 3
        dead_letter_stream = "metrics:dead"

        [detector]
        type = "ewma"

        [detector.redis_state]
        ttl = "1h"

        [[action]]
        type = "redis_stream"
        stream = "anomalies"
        maxlen = 1000

        [[action]]
        type = "redis_publish"
        channel = "anomalies"
        redis = { url = "redis://other:6379" }

        [[action]]
        type = "redis_cache"
        "#,
    )
    .unwrap();
    let Some(s) = config
        .source
        .downcast_ref::<crate::source::RedisStreamSourceConfig>()
    else {
        panic!("redis_stream expected")
    };
    assert_eq!(s.max_deliveries, 3);
    assert_eq!(s.start, crate::source::StreamStart::Earliest);
    assert_eq!(s.claim_idle, Duration::from_secs(60), "default");
    let state = config
        .detector
        .as_ref()
        .unwrap()
        .redis_state
        .as_ref()
        .unwrap();
    assert_eq!(state.ttl, Duration::from_secs(3600));
    assert_eq!(state.interval, Duration::from_secs(10), "default");
    assert_eq!(
        config.redis_connection().response_timeout,
        Duration::from_secs(2)
    );
    let Some(p) = config.actions[1].downcast_ref::<crate::action::RedisPublishConfig>() else {
        panic!("redis_publish expected")
    };
    assert_eq!(p.redis.as_ref().unwrap().url, "redis://other:6379");

    let summary = config.summary();
    assert!(
        summary.contains("redis streams redis://app:***@cache.internal:6380/2"),
        "{summary}"
    );
    assert!(!summary.contains("s3cret"), "{summary}");
    assert!(!format!("{config:?}").contains("s3cret"));
    config.build().unwrap();
}

#[cfg(feature = "redis")]
#[test]
fn redis_mistakes_are_reported_with_their_paths() {
    let paths = error_paths(
        r#"
        [redis]
        url = "http://nope"
        password_env = "A"
        password_file = "/run/secret"

        [source]
        type = "redis_stream"
        streams = []
        group = " "
        max_deliveries = 0
        block = "2s"
        claim_idle = "1s"

        [detector]
        type = "ewma"

        [detector.redis_state]
        ttl = "0s"

        [[action]]
        type = "redis_publish"
        channel = ""

        [[action]]
        type = "redis_stream"
        stream = "x"
        maxlenn = 5
        "#,
    );
    for expected in [
        "redis.url",
        "redis.password_env",
        "source.streams",
        "source.group",
        "source.max_deliveries",
        "source.claim_idle",
        "detector.redis_state.ttl",
        "action[0].channel",
        "action[1].maxlenn",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} missing from {paths:?}"
        );
    }
    let paths = error_paths(
        r#"
        [source]
        type = "redis_pubsub"
        "#,
    );
    assert_eq!(paths, vec!["source.channels"]);
}

#[test]
fn window_and_resample_options_parse_and_are_checked() {
    let config = parse(
        r#"
[source]
type = "generator"

[[prep]]
type = "window"
size = "1m"
late = "dead_letter"
idle_timeout = "30s"

[[prep]]
type = "resample"
step = "1m"
fill = "previous"
max_fill = 3
"#,
    )
    .unwrap();
    let Some(w) = config.prep[0].downcast_ref::<crate::prep::WindowConfig>() else {
        panic!("{:?}", config.prep[0]);
    };
    assert_eq!(w.late, crate::prep::window::LatePolicy::DeadLetter);
    assert_eq!(w.idle_timeout, Some(Duration::from_secs(30)));
    let Some(r) = config.prep[1].downcast_ref::<crate::prep::ResampleConfig>() else {
        panic!("{:?}", config.prep[1]);
    };
    assert_eq!((r.fill, r.max_fill), (crate::prep::FillPolicy::Previous, 3));
    config.build().unwrap();

    let paths = error_paths(
        "[source]\ntype = \"generator\"\n[[prep]]\ntype = \"resample\"\nstep = \"0s\"\nidle_timeout = \"1ms\"\n",
    );
    assert_eq!(paths, ["prep[0].step", "prep[0].idle_timeout"]);
}

#[cfg(not(feature = "sql"))]
#[test]
fn a_sql_stage_without_the_feature_says_how_to_get_it() {
    let paths = error_paths(
        "[source]\ntype = \"generator\"\n[[prep]]\ntype = \"sql\"\nquery = \"SELECT 1\"\n",
    );
    assert_eq!(paths, ["prep[0].type"]);
}

#[test]
fn a_receiver_kind_reports_its_nested_fields_by_full_path() {
    let config = |command: &str| {
        format!(
            "{GENERATOR}[decision]\n[[decision.receiver]]\nname = \"restart\"\ntype = \"command\"\n\
             [decision.receiver.command]\n{command}\n"
        )
    };
    let errors = parse(&config("argv = [\"true\"]\nmode = \"sometimes\"")).unwrap_err();
    assert_eq!(
        errors.0[0].path, "decision.receiver[0].command.mode",
        "{errors}"
    );
    assert!(
        errors.0[0].message.starts_with("unknown variant"),
        "{errors}"
    );
    let errors = parse(&config("argvv = [\"true\"]")).unwrap_err();
    assert_eq!(
        errors.0[0].path, "decision.receiver[0].command.argvv",
        "{errors}"
    );
    assert_eq!(errors.0[0].hint.as_deref(), Some("did you mean `argv`?"));
}

#[test]
fn durable_state_defaults_to_one_state_directory_next_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let decision = "[detector]\ntype = \"ewma\"\n[decision]\n[[decision.rule]]\nname = \"r\"\nreceivers = [\"log\"]\n[[decision.receiver]]\nname = \"log\"\ntype = \"log\"\n";
    let live = format!(
        "[source]\ntype = \"remote_write\"\nlisten = \"127.0.0.1:0\"\nserver = {{ allow_unauthenticated = true }}\n{decision}"
    );
    let config = PipelineConfig::parse(&live, dir.path(), |_| None).unwrap();
    let state = dir.path().join(crate::pipeline::DEFAULT_STATE_DIR);
    assert_eq!(config.runtime.state_dir, state);
    assert_eq!(config.dead_letter, DeadLetterConfig::StateDir);
    let d = config.decision.as_ref().unwrap();
    assert_eq!(d.state_dir.as_deref(), Some(state.as_path()));
    assert_eq!(
        d.audit_log.as_deref(),
        Some(state.join("audit.jsonl").as_path())
    );
    assert_eq!(d.idempotency.path, state.join("idempotency.jsonl"));
    let detector = config.detector.as_ref().unwrap();
    assert_eq!(detector.snapshot, Some(state.join("detector.snapshot")));

    // Building creates the directory (owner only) and the dead-letter file in it.
    let _pipeline = config.build().unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(state.join("dead-letters.jsonl").exists());

    // `[runtime] state_dir` moves every default; a replayed source keeps no detector state.
    let moved = format!(
        "[source]\ntype = \"generator\"\n{decision}[runtime]\nstate_dir = \"/var/lib/sco\"\n"
    );
    let config = PipelineConfig::parse(&moved, dir.path(), |_| None).unwrap();
    let d = config.decision.as_ref().unwrap();
    assert_eq!(
        d.idempotency.path,
        Path::new("/var/lib/sco/idempotency.jsonl")
    );
    assert_eq!(
        d.audit_log.as_deref(),
        Some(Path::new("/var/lib/sco/audit.jsonl"))
    );
    assert_eq!(config.detector.as_ref().unwrap().snapshot, None);
}
