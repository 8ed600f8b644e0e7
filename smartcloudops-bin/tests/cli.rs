//! The `smartcloudops` binary, end to end.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smartcloudops"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run_quickstart(out: &Path) -> Output {
    bin()
        .args(["--quiet", "run"])
        .arg(repo().join("examples/quickstart.toml"))
        .env("SMARTCLOUDOPS_OUT", out)
        .output()
        .unwrap()
}

#[test]
fn quickstart_raises_alerts_for_the_incident_only() {
    let out = tempfile::tempdir().unwrap();
    let output = run_quickstart(out.path());
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let alerts: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ALERT ")).collect();
    assert!(!alerts.is_empty(), "the incident is found: {stdout}");
    assert!(
        alerts
            .iter()
            .all(|l| l.contains("host=\"web-2\"") && l.contains("T02:")),
        "alerts only for web-2 during the 02:30 incident: {alerts:#?}"
    );
    assert!(alerts.iter().any(|l| l.contains("cpu_utilization")));
    assert!(
        alerts
            .iter()
            .any(|l| l.contains("http_request_duration_seconds"))
    );

    // The JSON copy holds the same alerts.
    let jsonl = std::fs::read_to_string(out.path().join("alerts.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), alerts.len());
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(first["labels"]["host"], "web-2");
    assert!(first["expected"].as_f64().unwrap() < first["value"].as_f64().unwrap());

    // The malformed record went to the dead-letter file, with its line and reason.
    let dead = std::fs::read_to_string(out.path().join("dead-letters.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    let letter: serde_json::Value = serde_json::from_str(dead.trim()).unwrap();
    assert!(
        letter["origin"]
            .as_str()
            .unwrap()
            .ends_with("web-fleet.jsonl:367"),
        "{letter}"
    );
    assert!(letter["reason"].as_str().unwrap().contains("not a number"));

    assert!(stderr.contains("1440 rows"), "{stderr}");
    assert!(stderr.contains("1 dead-lettered"), "{stderr}");
    assert!(stderr.contains("0 not"), "{stderr}");
}

#[test]
fn validate_accepts_the_quickstart() {
    let output = bin()
        .arg("validate")
        .arg(repo().join("examples/quickstart.toml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("ok — source: file"));
}

#[test]
fn validate_reports_every_error_with_its_path_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[source]\ntype = \"file\"\npath = \"missing.jsonl\"\nbatchsize = 10\n\n[detector]\ntype = \"ewma\"\nthreshold = -1\n",
    )
    .unwrap();
    let output = bin().arg("validate").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("source.batchsize: unknown field (hint: did you mean `batch_size`?)"),
        "{stderr}"
    );
    // A parse error in one section does not hide semantic errors in the others.
    assert!(
        stderr.contains("detector.threshold: must be positive"),
        "{stderr}"
    );
    // Serde errors stop their own section, so its semantic checks wait for the fix.
    let output = {
        std::fs::write(
            &path,
            "[source]\ntype = \"file\"\npath = \"missing.jsonl\"\n\n[detector]\ntype = \"ewma\"\nthreshold = -1\n",
        )
        .unwrap();
        bin().arg("validate").arg(&path).output().unwrap()
    };
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains("source.path: no such file"), "{stderr}");
    assert!(
        stderr.contains("detector.threshold: must be positive"),
        "{stderr}"
    );
}

#[test]
fn run_reads_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stdin.toml");
    std::fs::write(
        &config,
        "[source]\ntype = \"file\"\npath = \"-\"\nformat = \"csv\"\n[detector]\ntype = \"ewma\"\nwarmup = 10\n[[action]]\ntype = \"log\"\nformat = \"json\"\n",
    )
    .unwrap();
    let mut child = bin()
        .args(["--quiet", "run"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = String::from("ts,metric,value,host\n");
    for i in 0..60 {
        let value = if i == 50 {
            500.0
        } else {
            10.0 + (i % 5) as f64
        };
        input.push_str(&format!("{},disk_io,{value},db-1\n", i * 1000));
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let alerts: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["ts_ms"], 50_000);
    assert_eq!(alerts[0]["labels"]["host"], "db-1");
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("endless.toml");
    std::fs::write(
        &config,
        "[source]\ntype = \"generator\"\nseries = 50\npoints = 0\nbatch_size = 500\n\
         [detector]\ntype = \"ewma\"\n[[action]]\ntype = \"jsonl\"\npath = \"alerts.jsonl\"\n",
    )
    .unwrap();
    let child = bin()
        .args(["run", "--report", "json"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    let metrics = &report["metrics"];
    assert!(
        metrics["rows_acked"].as_u64().unwrap() >= 10_000,
        "{report}"
    );
    assert_eq!(metrics["batches_nacked"], 0);
    assert_eq!(report["timed_out"], false);
    assert!(stderr.contains("shutting down"), "{stderr}");
}

fn mini_corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nab-mini")
}

/// `smartcloudops eval --corpus <the bundled two-file corpus> ARGS…`, without the
/// generated fleets (unless ARGS ask for them).
fn eval_mini<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    bin()
        .args(["eval", "--fleet-series", "0", "--corpus"])
        .arg(mini_corpus())
        .args(args)
        .output()
        .unwrap()
}

/// Asserts that `output` is a success, and returns its stdout.
fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
}

/// Asserts that `output` is a failure whose stderr says `expected`.
fn assert_fails_with(output: &Output, expected: &str) {
    assert!(
        !output.status.success(),
        "not a failure: {}",
        text(&output.stdout)
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains(expected), "`{expected}` not in: {stderr}");
}

#[test]
fn eval_cross_validates_by_file_and_reports_the_held_out_folds() {
    // Two files, one category: fold 0 holds `quiet` (no window), fold 1 `spike`.
    let result = eval_mini(["--cv", "2"]);
    let stdout = text(&result.stdout);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let cv = stdout
        .split("cross-validation: 2 folds by file, stratified by category")
        .nth(1)
        .unwrap_or_else(|| panic!("a cross-validation section: {stdout}"));
    let standard: Vec<&str> = cv
        .lines()
        .find(|l| l.starts_with("standard"))
        .expect("a standard line")
        .split_whitespace()
        .collect();
    // pooled, fold mean, fold sd, in-sample, gap: the one fold with a window is the mean.
    let (pooled, mean, in_sample): (f64, f64, f64) = (
        standard[1].parse().unwrap(),
        standard[2].parse().unwrap(),
        standard[4].parse().unwrap(),
    );
    assert!(pooled <= in_sample + 1e-9, "{cv}");
    assert!(mean.is_finite(), "{cv}");
    assert!(cv.contains("no window"), "fold 0 has no window: {cv}");
    // Leave-one-category-out needs two categories; three folds need three files.
    assert_fails_with(&eval_mini(["--cv", "loco"]), "at least two categories");
    assert_fails_with(&eval_mini(["--cv", "3"]), "3 folds for 2 files");
    assert_fails_with(&eval_mini(["--cv", "1"]), "2 or more");
}

#[test]
fn eval_chooses_grid_candidates_inside_the_folds() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(&grid, "rest = [5, 40]\n\"context.length\" = [4, 6]\n").unwrap();
    let result = eval_mini([
        OsStr::new("--cv"),
        OsStr::new("2"),
        OsStr::new("--grid"),
        grid.as_os_str(),
    ]);
    let stdout = text(&result.stdout);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(stdout.contains("grid: 4 candidates"), "{stdout}");
    for candidate in ["context.length=4 rest=5", "context.length=6 rest=40"] {
        assert!(stdout.contains(candidate), "{candidate}: {stdout}");
    }
    assert!(stdout.contains("parameters and threshold chosen on the other folds"));
    assert_eq!(
        stdout.matches("      chosen: ").count(),
        2,
        "one per fold: {stdout}"
    );
    // The threshold is the evaluation's to choose; values must be lists.
    for (bad, expected) in [
        ("threshold = [0.4, 0.5]", "not gridded"),
        ("rest = 5", "must be a list"),
        ("rest = []", "lists no values"),
        ("nonsense = [1]", "unknown field `nonsense`"),
    ] {
        std::fs::write(&grid, bad).unwrap();
        let result = eval_mini([OsStr::new("--grid"), grid.as_os_str()]);
        assert_fails_with(&result, expected);
    }
}

#[test]
fn eval_counts_false_alarms_on_healthy_data() {
    let result = bin()
        .args([
            "eval",
            "--fleet-series",
            "20",
            "--fleet-days",
            "2",
            "--corpus",
        ])
        .arg(mini_corpus())
        .output()
        .unwrap();
    let stdout = succeeded(&result);
    let section = stdout
        .split("false alarms on healthy data (threshold 0.5000; after each series' first 24 h)")
        .nth(1)
        .unwrap_or_else(|| panic!("a false-alarm section: {stdout}"));
    let row = |name: &str| -> Vec<String> {
        let line = section
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}: {section}"));
        line[name.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // The bundled files span under two days; each fleet runs 20 series for two days, one
    // of them counted.
    for fleet in [
        "generated fleet, 1-minute samples, noise 3 %",
        "generated fleet, 5-minute samples, noise 10 %",
    ] {
        let fields = row(fleet);
        assert_eq!(fields[0], "20", "{fleet}: {section}");
        let days: f64 = fields[1].parse().unwrap();
        assert!((19.0..=20.0).contains(&days), "{fleet}: {section}");
        let alerts: f64 = fields[2].parse().unwrap();
        let rate: f64 = fields[3].parse().unwrap();
        // `days` is rounded to a tenth.
        assert!(
            (rate - 1000.0 * alerts / days).abs() <= rate * 0.01,
            "{fleet}: {section}"
        );
    }
    let all = row("all");
    assert_eq!(all[0], "42", "two corpus files and two fleets: {section}");
}

#[test]
fn eval_scores_a_corpus_and_writes_scores_and_plots() {
    let out = tempfile::tempdir().unwrap();
    let scores = out.path().join("scores");
    let plots = out.path().join("plots");
    let result = eval_mini([
        OsStr::new("--preset"),
        OsStr::new("precise"),
        OsStr::new("--write-scores"),
        scores.as_os_str(),
        OsStr::new("--plot"),
        plots.as_os_str(),
    ]);
    let stdout = text(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        text(&result.stderr)
    );
    // The one labelled spike is found, with at most a couple of false positives (range
    // novelty flags a new record of the noise now and then): the standard profile's
    // normalized score is far above the null detector's 0.
    let standard = stdout
        .lines()
        .find(|l| l.starts_with("standard"))
        .expect("a standard line");
    let fields: Vec<&str> = standard.split_whitespace().collect();
    let score: f64 = fields[2].parse().unwrap();
    assert!(score > 80.0, "{standard}");
    assert_eq!(&fields[3..5], ["1", "0"], "TP FN: {standard}");
    let false_positives: u32 = fields[5].parse().unwrap();
    assert!(false_positives <= 2, "{standard}");
    assert!(stdout.contains("reward_low_FP_rate") && stdout.contains("reward_low_FN_rate"));
    assert!(stdout.contains("synthetic"), "per-category line: {stdout}");

    let csv = std::fs::read_to_string(scores.join("synthetic/spike.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("timestamp,value,anomaly_score"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2000);
    assert!(rows[0].starts_with("2026-01-01 00:00:00,"));
    let svg = std::fs::read_to_string(plots.join("synthetic/spike.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<circle"),
        "alerts drawn"
    );
    assert!(plots.join("synthetic/quiet.svg").exists());
}

#[test]
fn eval_with_a_fixed_threshold_says_so_and_uses_it() {
    let stdout = succeeded(&eval_mini(["--preset", "fast", "--threshold", "0.99"]));
    assert!(stdout.contains("fixed threshold"), "{stdout}");
    assert!(stdout.contains(" 0.9900 "), "{stdout}");
    let bad = eval_mini(["--threshold", "1.5"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--threshold"));
}

#[test]
fn eval_scores_the_detector_of_a_pipeline_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        "[source]\ntype = \"generator\"\n[detector]\ntype = \"ensemble\"\n\
         [detector.context]\nenabled = false\n",
    )
    .unwrap();
    let result = eval_mini([OsStr::new("--config"), config.as_os_str()]);
    let stdout = text(&result.stdout);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(stdout.starts_with("detector ensemble from "), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("standard")));
    // A pipeline without a detector has nothing to evaluate.
    std::fs::write(&config, "[source]\ntype = \"generator\"\n").unwrap();
    let none = eval_mini([OsStr::new("--config"), config.as_os_str()]);
    assert!(!none.status.success());
    assert!(text(&none.stderr).contains("no [detector]"));
}

#[test]
fn eval_refuses_a_data_file_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data/c")).unwrap();
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    std::fs::write(dir.path().join("data/c/x.csv"), "timestamp,value\n").unwrap();
    std::fs::write(dir.path().join("labels/combined_windows.json"), "{}").unwrap();
    let result = bin()
        .args(["eval", "--corpus"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_fails_with(&result, "no labels for c/x.csv");
}

#[test]
fn detector_state_survives_a_restart_through_the_snapshot_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut lines = String::new();
    for i in 0..400 {
        lines.push_str(&format!(
            "{{\"ts\":{},\"metric\":\"cpu\",\"labels\":{{\"host\":\"a\"}},\"value\":{}}}\n",
            1_764_000_000_000i64 + i * 60_000,
            40 + i % 5
        ));
    }
    std::fs::write(&input, lines).unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n\n[detector]\ntype = \"precise\"\n\
         snapshot = \"state/detector.snapshot\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let first = bin().arg("run").arg(&config).output().unwrap();
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stderr).contains("no detector snapshot yet"));
    let snapshot = dir.path().join("state/detector.snapshot");
    assert!(std::fs::metadata(&snapshot).unwrap().len() > 100);
    let second = bin().arg("run").arg(&config).output().unwrap();
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(
        text(&second.stderr).contains("detector state restored"),
        "{}",
        text(&second.stderr)
    );
    // Another detector type cannot take this state: it starts fresh, and says so.
    std::fs::write(
        &config,
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n\n[detector]\ntype = \"fast\"\n\
         snapshot = \"state/detector.snapshot\"\n",
    )
    .unwrap();
    let third = bin().arg("run").arg(&config).output().unwrap();
    assert!(third.status.success());
    assert!(text(&third.stderr).contains("starting with fresh detector state"));
}

#[test]
fn the_fleet_example_alerts_on_its_incidents_without_a_cold_start_storm() {
    let example = std::fs::read_to_string(repo().join("examples/fleet-precise.toml")).unwrap();
    for preset in ["precise", "fast"] {
        let state = tempfile::tempdir().unwrap();
        let config = state.path().join("fleet.toml");
        let text = example.replace("type = \"precise\"", &format!("type = \"{preset}\""));
        std::fs::write(&config, text).unwrap();
        fleet_alerts_as_expected(preset, &config, state.path());
    }
}

fn fleet_alerts_as_expected(preset: &str, config: &Path, state: &Path) {
    let result = bin()
        .arg("run")
        .arg(config)
        .env("SMARTCLOUDOPS_STATE", state)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", text(&result.stderr));
    let stdout = text(&result.stdout);
    let alerts: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ALERT ")).collect();
    // The first day is the cold start of every series: learning, no alert at all.
    assert!(
        alerts.iter().all(|a| !a.starts_with("ALERT 2026-01-01")),
        "{preset}: first-day alerts: {:?}",
        alerts
            .iter()
            .filter(|a| a.starts_with("ALERT 2026-01-01"))
            .take(3)
            .collect::<Vec<_>>()
    );
    // The injected spike (step 1700 = day 2, 04:20) on series 3 and 17, and the drop (step
    // 2400 = 16:00) on series 99, are flagged when they happen, explained.
    for (host, at) in [
        ("host-00003", "2026-01-02T04:20:00.000Z"),
        ("host-00017", "2026-01-02T04:20:00.000Z"),
        ("host-00099", "2026-01-02T16:00:00.000Z"),
    ] {
        let alert = alerts
            .iter()
            .find(|a| a.contains(host) && a.contains(at))
            .unwrap_or_else(|| panic!("{preset}: no alert for {host} at {at}"));
        assert!(
            alert.contains("expected") && alert.contains(" by "),
            "{alert}"
        );
    }
    // New records of the noise on day 2 are flagged too (range novelty), but 200 series give
    // well under one alert each.
    assert!(alerts.len() < 150, "{preset}: {} alerts", alerts.len());
    assert!(state.join("detector.snapshot").exists());
}

#[test]
fn the_decision_example_notifies_plans_a_dry_run_restart_and_audits_every_step() {
    let out = tempfile::tempdir().unwrap();
    let output = bin()
        .args(["--quiet", "run"])
        .arg(repo().join("examples/decision.toml"))
        .env("SMARTCLOUDOPS_OUT", out.path())
        .output()
        .unwrap();
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let notify: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("NOTIFY "))
        .collect();
    assert_eq!(notify.len(), 2, "{stdout}");
    assert!(
        notify[0].starts_with(
            "NOTIFY console FIRING web-anomaly [alertname=web-anomaly,service=checkout]"
        )
    );
    assert!(notify[0].contains("host=\"web-2\""));
    assert!(
        notify[1].starts_with("NOTIFY console RESOLVED"),
        "sent at shutdown: {}",
        notify[1]
    );

    let audit: Vec<serde_json::Value> = std::fs::read_to_string(out.path().join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |kind: &str, outcome: &str| {
        audit
            .iter()
            .filter(|r| r["kind"] == kind && r["outcome"] == outcome)
            .count()
    };
    assert_eq!(of("trigger", "fired"), 2);
    assert_eq!(of("trigger", "resolved"), 2);
    assert_eq!(of("result", "delivered"), 2);
    // Each fired trigger says where its rows came from: the source and the file read.
    let fired = audit
        .iter()
        .find(|r| r["kind"] == "trigger" && r["outcome"] == "fired")
        .unwrap();
    let origin = &fired["details"]["origin"];
    assert_eq!(origin["source"], "file", "{fired}");
    assert!(
        origin["from"][0]
            .as_str()
            .is_some_and(|f| f.ends_with("data/web-fleet.jsonl")),
        "{fired}"
    );
    let dry = audit
        .iter()
        .find(|r| r["outcome"] == "dry_run")
        .expect("a planned restart");
    assert_eq!(
        dry["details"]["plan"]["argv"],
        serde_json::json!(["/usr/bin/systemctl", "restart", "checkout.service"])
    );
    // The idempotency store was written next to the audit log (file backend).
    assert!(out.path().join("idempotency.jsonl").exists());
}

#[test]
fn validate_reports_decision_mistakes_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        r#"
[source]
type = "generator"

[detector]
type = "ewma"

[decision]
allowed_commands = ["/usr/bin/systemctl"]

[[decision.rule]]
name = "cpu"
min_score = 2.0
receivers = ["pager"]

[[decision.receiver]]
name = "shell"
type = "command"
[decision.receiver.command]
argv = ["/bin/sh", "-c", "reboot"]
"#,
    )
    .unwrap();
    let output = bin().arg("validate").arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("decision.rule[0].min_score"), "{stderr}");
    assert!(stderr.contains("decision.rule[0].receivers"), "{stderr}");
    assert!(stderr.contains("decision.receiver[0]"), "{stderr}");
    assert!(stderr.contains("allowed_commands"), "{stderr}");
}

#[test]
fn the_sql_example_enriches_series_with_the_reference_table() {
    let out = tempfile::tempdir().unwrap();
    let output = bin()
        .args(["--quiet", "run"])
        .arg(repo().join("examples/sql-enrich.toml"))
        .env("SMARTCLOUDOPS_OUT", out.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let jsonl = std::fs::read_to_string(out.path().join("alerts.jsonl")).unwrap();
    let alerts: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!alerts.is_empty(), "the incident on web-2 is found");
    for alert in &alerts {
        // web-2 belongs to the payments team, tier 1 (examples/data/hosts.csv).
        assert_eq!(alert["labels"]["host"], "web-2", "{alert}");
        assert_eq!(alert["labels"]["team"], "payments", "{alert}");
        assert_eq!(alert["labels"]["tier"], "1", "{alert}");
    }
    // Latencies were turned into milliseconds by the query.
    let latency = alerts
        .iter()
        .find(|a| a["metric"] == "http_request_duration_seconds")
        .expect("a latency alert");
    assert!(latency["value"].as_f64().unwrap() > 100.0, "{latency}");
}

#[test]
fn validate_points_at_the_sql_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let text_of = std::fs::read_to_string(repo().join("examples/sql-enrich.toml")).unwrap();
    let broken = text_of
        .replace("data/", &format!("{}/examples/data/", repo().display()))
        .replace("h.team,", "h.teem,");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, broken).unwrap();
    let output = bin().arg("validate").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("prep[0].query: line 5, column 8:"),
        "{stderr}"
    );
    assert!(stderr.contains("       h.teem,\n           ^"), "{stderr}");

    let output = bin()
        .arg("validate")
        .arg(repo().join("examples/sql-enrich.toml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// An audit log of `n` records at `path`, rotated at `max_bytes` (0: never).
fn audit_log(path: &Path, n: usize, max_bytes: u64) {
    use smartcloudops_core::decision::audit::{AuditLog, AuditRecord, Rotation};
    let log = AuditLog::open_with(path, Rotation { max_bytes, keep: 5 }).unwrap();
    for i in 0..n {
        let mut r = AuditRecord::new("decision", "notify");
        r.reason = format!("record {i}");
        log.write(&[r]).unwrap();
    }
}

#[test]
fn audit_verify_passes_a_fresh_log_and_names_the_line_of_an_edit_or_a_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    audit_log(&path, 5, 0);
    let verify = || bin().args(["audit", "verify"]).arg(&path).output().unwrap();
    let ok = verify();
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("5 records, seq 0..=4, the chain is intact"));

    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let edited = original.replacen("record 1", "record 9", 1);
    std::fs::write(&path, edited).unwrap();
    let broken = verify();
    assert_eq!(broken.status.code(), Some(4));
    let stdout = text(&broken.stdout);
    assert!(
        stdout.contains(&format!("{}:2: seq 1: record edited", path.display())),
        "{stdout}"
    );

    let mut deleted = lines.clone();
    deleted.remove(3);
    std::fs::write(&path, deleted.join("\n") + "\n").unwrap();
    let broken = verify();
    assert_eq!(broken.status.code(), Some(4));
    let stdout = text(&broken.stdout);
    assert!(stdout.contains(":4: seq 4: seq 3 is missing"), "{stdout}");
}

#[test]
fn audit_verify_follows_the_chain_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    audit_log(&path, 12, 700);
    let rotated = |n: u32| dir.path().join(format!("audit.jsonl.{n}"));
    assert!(rotated(2).exists());
    // The live file alone: its rotated files are found.
    let out = bin().args(["audit", "verify"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("12 records, seq 0..=11"),
        "{}",
        text(&out.stdout)
    );
    // Or every file, oldest first.
    let mut files: Vec<PathBuf> = (1..=5).rev().map(rotated).filter(|p| p.exists()).collect();
    files.push(path.clone());
    let out = bin()
        .args(["audit", "verify"])
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    // Given in the wrong order, the chain breaks.
    files.reverse();
    let out = bin()
        .args(["audit", "verify"])
        .args(&files)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stdout));
}
