//! What leaves the engine cannot be bent by the data or hijacked on the way (issue 14):
//! label values cannot change a JSON webhook body's fields, ping a Slack channel or forge a
//! log line; a receiver carrying secrets follows no redirect and refuses plain http to
//! another machine. The far end is an axum server on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde_json::Value;
use smartcloudops_core::action::{LogAction, LogActionConfig};
use smartcloudops_core::decision::guard::MemoryIdempotency;
use smartcloudops_core::decision::{DecisionConfig, DecisionEngine, EngineOptions, ManualClock};
use smartcloudops_core::detector::{ScoreColumnsBuilder, Verdict};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::{Action, ActionInput, Alert};

const T0: i64 = 1_764_072_000_000; // 2025-11-25T12:00:00Z

/// One request a server saw: path, headers, body.
type Request = (String, HeaderMap, String);

/// Serves on 127.0.0.1: records every request; `/redirect` answers 307 to `location`,
/// `/refuse` 400 with a body holding a newline and an escape sequence.
async fn recorder(location: Option<String>) -> (Arc<Mutex<Vec<Request>>>, SocketAddr) {
    let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
            let log = log.clone();
            let location = location.clone();
            async move {
                log.lock()
                    .unwrap()
                    .push((uri.path().to_owned(), headers, body));
                match location {
                    Some(to) if uri.path() == "/redirect" => {
                        axum::response::Redirect::temporary(&to).into_response()
                    }
                    _ if uri.path() == "/refuse" => (
                        axum::http::StatusCode::BAD_REQUEST,
                        "no\nresult delivered\u{1b}[2K",
                    )
                        .into_response(),
                    _ => "ok".into_response(),
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (seen, addr)
}

fn bodies(seen: &Mutex<Vec<Request>>, path: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(p, _, _)| p == path)
        .map(|(_, _, b)| b.clone())
        .collect()
}

/// One anomalous row of `cpu` with `labels`.
fn anomaly(labels: &[(&str, &str)]) -> ActionInput {
    let mut b = MetricsBatchBuilder::default();
    b.push(T0, "cpu", labels, 97.5);
    let mut s = ScoreColumnsBuilder::with_capacity(1);
    s.push(Verdict {
        score: 0.999,
        is_anomaly: true,
        expected: 40.0,
        lower: 30.0,
        upper: 50.0,
        since_ms: Some(T0),
        ..Verdict::NONE
    });
    let batch = s.finish(&b.finish(), "ewma").unwrap();
    let alerts = Alert::from_scored(&batch).unwrap();
    ActionInput::new(batch, alerts)
}

fn engine(toml_text: &str) -> DecisionEngine {
    let config: DecisionConfig = toml::from_str(toml_text).unwrap();
    assert!(config.problems().is_empty(), "{}", config.problems());
    DecisionEngine::with_options(
        config,
        EngineOptions {
            clock: Arc::new(ManualClock::at(T0)),
            ticker: false,
            idempotency: Some(Arc::new(MemoryIdempotency::default())),
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

/// The problems of a `[decision]` holding one rule and `receiver`, by path.
fn receiver_problems(receiver: &str) -> Vec<String> {
    let config: DecisionConfig = toml::from_str(&format!(
        "[[rule]]\nname = \"cpu\"\nreceivers = [\"r\"]\n\n[[receiver]]\nname = \"r\"\n{receiver}"
    ))
    .unwrap();
    config.problems().into_iter().map(|e| e.message).collect()
}

#[tokio::test]
async fn a_quote_in_a_label_cannot_change_a_json_webhook_body() {
    let (seen, addr) = recorder(None).await;
    let engine = engine(&format!(
        r#"
        [[rule]]
        name = "cpu-high"
        group_wait = "0s"
        receivers = ["hook", "labels"]

        [[receiver]]
        name = "hook"
        type = "webhook"
        url = "http://{addr}/hook"
        body = '{{"severity": "critical", "host": {{{{ alerts[0].labels.host }}}}, "text": {{{{ rule ~ " on " ~ alerts[0].labels.host }}}}}}'

        [[receiver]]
        name = "labels"
        type = "webhook"
        url = "http://{addr}/labels"
        body = '{{"labels": {{{{ alerts[0].labels | tojson }}}}, "n": {{{{ alerts | length }}}}}}'
        "#
    ));
    // Closes the `host` string and adds a second `severity` (the last one wins in most
    // parsers): what the body template must not let through.
    let host = r#""x","severity":"none""#;
    engine.execute(&anomaly(&[("host", host)])).await.unwrap();

    let hook = bodies(&seen, "/hook");
    assert_eq!(hook.len(), 1);
    let body: Value = serde_json::from_str(&hook[0]).expect("the body is JSON");
    assert_eq!(body["severity"], "critical", "{}", hook[0]);
    assert_eq!(body["host"], host, "the label arrives as one string");
    assert_eq!(body["text"], format!("cpu-high on {host}"));
    assert_eq!(body.as_object().unwrap().len(), 3, "no field added");

    let labels = bodies(&seen, "/labels");
    let body: Value = serde_json::from_str(&labels[0]).expect("the body is JSON");
    assert_eq!(body["labels"]["host"], host, "tojson writes the whole map");
    assert_eq!(body["n"], 1);
}

#[tokio::test]
async fn a_body_template_that_does_not_render_json_is_refused_with_the_fix() {
    // The old way, a value in quotes, renders `""cpu""`: refused at validate, with the fix.
    let hint = "`{{ rule }}`, not `\"{{ rule }}\"`";
    let problems = receiver_problems(
        "type = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\nbody = '{\"text\": \"{{ rule }}\"}'",
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("did not render JSON"),
        "{}",
        problems[0]
    );
    assert!(problems[0].contains(hint), "{}", problems[0]);

    // A template that breaks only on some data fails that delivery, permanently, and sends
    // nothing.
    let (seen, addr) = recorder(None).await;
    let engine = engine(&format!(
        r#"
        [[rule]]
        name = "cpu"
        group_wait = "0s"
        receivers = ["hook"]

        [[receiver]]
        name = "hook"
        type = "webhook"
        url = "http://{addr}/hook"
        retry = {{ attempts = 3, initial_backoff = "10ms" }}
        body = '{{"host": {{{{ alerts[0].labels.host }}}}{{% if alerts[0].labels.host == "a" %}} oops{{% endif %}}}}'
        "#
    ));
    engine.execute(&anomaly(&[("host", "a")])).await.unwrap();
    assert!(bodies(&seen, "/hook").is_empty(), "nothing sent");
    let failed: Vec<String> = engine
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.kind == "result" && r.outcome == "failed")
        .map(|r| r.reason)
        .collect();
    assert_eq!(failed.len(), 1, "permanent, not retried: {failed:?}");
    assert!(failed[0].contains("did not render JSON"), "{}", failed[0]);
    assert!(failed[0].contains(hint), "{}", failed[0]);
}

#[tokio::test]
async fn a_slack_message_shows_mentions_and_links_in_labels_as_text() {
    let (seen, addr) = recorder(None).await;
    let engine = engine(&format!(
        r#"
        [[rule]]
        name = "cpu"
        group_wait = "0s"
        group_by = ["alertname", "host", "team"]
        receivers = ["slack"]

        [[receiver]]
        name = "slack"
        type = "slack"
        url = "http://{addr}/slack"
        "#
    ));
    engine
        .execute(&anomaly(&[
            ("host", "<!channel>"),
            ("team", "<http://evil.example|click here> & more"),
        ]))
        .await
        .unwrap();
    let sent = bodies(&seen, "/slack");
    assert_eq!(sent.len(), 1);
    let body: Value = serde_json::from_str(&sent[0]).unwrap();
    let texts = [
        body["text"].as_str().unwrap(),
        body["blocks"][0]["text"]["text"].as_str().unwrap(),
        body["blocks"][1]["text"]["text"].as_str().unwrap(),
    ];
    for text in texts {
        assert!(!text.contains("<!channel>"), "a mention: {text}");
        assert!(!text.contains("<http://evil"), "a link: {text}");
    }
    assert!(texts[0].contains("host=&lt;!channel&gt;"), "{}", texts[0]);
    assert!(
        texts[0].contains("team=&lt;http://evil.example|click here&gt; &amp; more"),
        "{}",
        texts[0]
    );
    assert!(
        texts[2].contains("&lt;!channel&gt;"),
        "the series too: {}",
        texts[2]
    );
}

#[test]
fn a_newline_in_a_label_cannot_forge_an_alert_line() {
    let input = anomaly(&[(
        "host",
        "web-1\nALERT 2025-11-25T12:00:00Z forged = 0: ok\r\u{1b}[2K",
    )]);
    let text = LogAction::new(LogActionConfig::default())
        .render(&input)
        .unwrap();
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(
        text.starts_with("ALERT ") && text.ends_with('\n'),
        "{text:?}"
    );
    assert!(!text.contains(['\r', '\u{1b}']), "{text:?}");
    assert!(text.contains("web-1\\nALERT"), "written out: {text:?}");
}

#[tokio::test]
async fn a_receiver_with_a_secret_header_is_not_redirected() {
    let (elsewhere, other) = recorder(None).await;
    let (seen, addr) = recorder(Some(format!("http://localhost:{}/steal", other.port()))).await;
    let engine = engine(&format!(
        r#"
        [[rule]]
        name = "cpu"
        group_wait = "0s"
        receivers = ["hook"]

        [[receiver]]
        name = "hook"
        type = "webhook"
        url = "http://{addr}/redirect"
        headers = {{ Authorization = "Bearer s3cret" }}
        retry = {{ attempts = 3, initial_backoff = "10ms" }}
        "#
    ));
    engine.execute(&anomaly(&[("host", "a")])).await.unwrap();
    assert_eq!(
        bodies(&seen, "/redirect").len(),
        1,
        "tried once: a redirect is final"
    );
    assert!(
        elsewhere.lock().unwrap().is_empty(),
        "the redirect target never sees the request (nor the token)"
    );
    let failed: Vec<String> = engine
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.kind == "result" && r.outcome == "failed")
        .map(|r| r.reason)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].contains("HTTP 307: redirect to http://localhost:")
            && failed[0].contains("not followed"),
        "{}",
        failed[0]
    );
    assert!(
        !failed[0].contains("/steal"),
        "the location is masked: {}",
        failed[0]
    );
}

#[test]
fn plain_http_to_another_machine_needs_allow_insecure_http_when_secrets_ride_along() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "k").unwrap();
    let secret_bearing = [
        "type = \"slack\"\nurl = \"http://hooks.example.com/services/T/B/x\"".to_owned(),
        format!(
            "type = \"pagerduty\"\nurl = \"http://pd.example.com/enqueue\"\nrouting_key_file = {:?}",
            key
        ),
        "type = \"webhook\"\nurl = \"http://hooks.example.com/x\"\nheaders = { Authorization = \"Bearer t\" }".to_owned(),
        "type = \"alertmanager\"\nurl = \"http://am.example.com/x\"\nheaders = { X-Key = \"t\" }".to_owned(),
        "type = \"webhook\"\nurl = \"http://user:pw@hooks.example.com/x\"".to_owned(),
    ];
    for receiver in &secret_bearing {
        let problems = receiver_problems(receiver);
        assert_eq!(problems.len(), 1, "{receiver}: {problems:?}");
        assert!(
            problems[0].contains("plain http") && problems[0].contains("allow_insecure_http"),
            "{}",
            problems[0]
        );
        assert!(!problems[0].contains("pw@"), "{}", problems[0]);
        let allowed = format!("{receiver}\nallow_insecure_http = true");
        assert_eq!(
            receiver_problems(&allowed),
            Vec::<String>::new(),
            "{allowed}"
        );
        let https = receiver.replace("http://", "https://");
        assert_eq!(receiver_problems(&https), Vec::<String>::new(), "{https}");
        for local in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"] {
            let loopback = receiver
                .replace("hooks.example.com", local)
                .replace("pd.example.com", local)
                .replace("am.example.com", local);
            assert_eq!(
                receiver_problems(&loopback),
                Vec::<String>::new(),
                "{loopback}"
            );
        }
    }
    // Nothing secret on the wire: plain http is the operator's call.
    assert_eq!(
        receiver_problems("type = \"webhook\"\nurl = \"http://hooks.example.com/x\""),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_receiver_s_answer_is_quoted_on_one_line() {
    let (_, addr) = recorder(None).await;
    let engine = engine(&format!(
        r#"
        [[rule]]
        name = "cpu"
        group_wait = "0s"
        receivers = ["hook"]

        [[receiver]]
        name = "hook"
        type = "webhook"
        url = "http://{addr}/refuse"
        "#
    ));
    engine.execute(&anomaly(&[("host", "a")])).await.unwrap();
    let failed: Vec<String> = engine
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.kind == "result" && r.outcome == "failed")
        .map(|r| r.reason)
        .collect();
    assert_eq!(failed, ["HTTP 400: no\\nresult delivered\\x1b[2K"]);
}
