//! The Prometheus scrape source against a local HTTP server serving exposition text: samples
//! with `job` and `instance`, `up` and the scrape's own series, dead-lettered bad lines, and
//! `up = 0` while the target fails. Then the target as an adversary: an oversized body, a
//! redirect to another host, labels posing as `job` / `instance`, and credentials that must
//! reach it and never be printed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use smartcloudops_core::Pipeline;
use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::source::{ScrapeConfig, ScrapeSource};

/// Metric, labels, value.
type Row = (String, Vec<(String, String)>, f64);

const PAGE: &str = "# TYPE node_load1 gauge
node_load1 0.42
http_requests_total{code=\"200\",instance=\"override:1\"} 7
bad line here
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_add_job_instance_and_up_and_dead_letter_bad_lines() {
    // The target serves the page twice, then fails with 500.
    let hits = Arc::new(AtomicUsize::new(0));
    let served = hits.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let n = served.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    (StatusCode::OK, PAGE)
                } else {
                    (StatusCode::INTERNAL_SERVER_ERROR, "down")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut config = ScrapeConfig::new(vec![format!("http://{addr}/metrics")]);
    config.job = "node".into();
    config.interval = Duration::from_millis(50);
    config.timeout = Duration::from_millis(50);
    config.rounds = Some(3);
    let rows = Arc::new(MemoryAction::new().every_batch());
    let letters = Arc::new(MemoryDeadLetters::default());
    let report = Pipeline::builder(ScrapeSource::new(config))
        .shared_action(rows.clone())
        .dead_letters(letters.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let rows: Vec<Row> = common::rows(&rows.batches())
        .into_iter()
        .map(|r| (r.metric, r.labels, r.value))
        .collect();
    let instance = addr.to_string();
    let value_of = |metric: &str| -> Vec<f64> {
        rows.iter()
            .filter(|(m, _, _)| m == metric)
            .map(|(_, _, v)| *v)
            .collect()
    };
    assert_eq!(value_of("up"), vec![1.0, 1.0, 0.0], "up follows the target");
    assert_eq!(value_of("node_load1"), vec![0.42, 0.42]);
    assert_eq!(value_of("scrape_samples_scraped"), vec![2.0, 2.0, 0.0]);
    let load = rows.iter().find(|(m, _, _)| m == "node_load1").unwrap();
    assert_eq!(
        load.1,
        vec![
            ("instance".to_owned(), instance.clone()),
            ("job".to_owned(), "node".to_owned())
        ]
    );
    let requests = rows
        .iter()
        .find(|(m, _, _)| m == "http_requests_total")
        .unwrap();
    assert!(
        requests
            .1
            .contains(&("exported_instance".to_owned(), "override:1".to_owned()))
            && requests
                .1
                .contains(&("instance".to_owned(), instance.clone())),
        "the target cannot set its own instance (honor_labels = false): {:?}",
        requests.1
    );
    let letters = letters.letters();
    assert_eq!(letters.len(), 2, "the bad line, once per good scrape");
    assert!(
        letters[0].origin.ends_with("/metrics#4"),
        "{}",
        letters[0].origin
    );
    assert_eq!(letters[0].payload, "bad line here");
    let source = report.metrics.stage("source:prometheus_scrape").unwrap();
    assert_eq!(source.dead_lettered, 2);
    assert_eq!(source.errors, 1, "the failed scrape is counted");
}

// ---------------------------------------------------------------------------------------------
// The target is not trusted (issue 14): size cap, redirects, label conflicts, credentials.
// ---------------------------------------------------------------------------------------------

/// Serves `app` on 127.0.0.1; its address.
async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// What one scrape round of `config` gave: rows, dead letters, errors of the source.
async fn scrape_once(
    mut config: ScrapeConfig,
) -> (
    Vec<Row>,
    Vec<smartcloudops_core::dead_letter::DeadLetter>,
    u64,
) {
    config.interval = Duration::from_millis(500);
    config.timeout = Duration::from_millis(500);
    config.rounds = Some(1);
    let rows = Arc::new(MemoryAction::new().every_batch());
    let letters = Arc::new(MemoryDeadLetters::default());
    let report = Pipeline::builder(ScrapeSource::new(config))
        .shared_action(rows.clone())
        .dead_letters(letters.clone())
        .build()
        .spawn()
        .wait()
        .await
        .unwrap();
    let rows = common::rows(&rows.batches())
        .into_iter()
        .map(|r| (r.metric, r.labels, r.value))
        .collect();
    let errors = report
        .metrics
        .stage("source:prometheus_scrape")
        .unwrap()
        .errors;
    (rows, letters.letters(), errors)
}

fn value_of(rows: &[Row], metric: &str) -> Vec<f64> {
    rows.iter()
        .filter(|(m, _, _)| m == metric)
        .map(|(_, _, v)| *v)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_max_response_bytes_fails_the_scrape_with_or_without_a_length() {
    let page: String = (0..100).map(|i| format!("m{{i=\"{i}\"}} 1\n")).collect();
    assert!(page.len() > 1024);
    let streamed = page.clone();
    let app = axum::Router::new()
        .route("/sized", axum::routing::get(move || async move { page }))
        .route(
            "/streamed",
            axum::routing::get(move || async move {
                // No Content-Length: the body arrives in chunks and must be counted.
                let chunks: Vec<Result<String, std::io::Error>> =
                    streamed.lines().map(|l| Ok(format!("{l}\n"))).collect();
                axum::body::Body::from_stream(futures::stream::iter(chunks))
            }),
        )
        .route("/small", axum::routing::get(|| async { "m 1\n" }));
    let addr = serve(app).await;
    for path in ["/sized", "/streamed"] {
        let mut config = ScrapeConfig::new(vec![format!("http://{addr}{path}")]);
        config.max_response_bytes = 1024;
        let (rows, _, errors) = scrape_once(config).await;
        assert_eq!(value_of(&rows, "up"), vec![0.0], "{path}");
        assert_eq!(
            value_of(&rows, "m"),
            Vec::<f64>::new(),
            "{path}: nothing kept"
        );
        assert_eq!(errors, 1, "{path}");
    }
    let mut config = ScrapeConfig::new(vec![format!("http://{addr}/small")]);
    config.max_response_bytes = 1024;
    let (rows, _, _) = scrape_once(config).await;
    assert_eq!(
        value_of(&rows, "up"),
        vec![1.0],
        "a page under the cap is read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_followed_only_to_the_same_scheme_host_and_port() {
    // The other host (same machine, another name and port) counts what reaches it.
    let stolen = Arc::new(AtomicUsize::new(0));
    let counter = stolen.clone();
    let other = serve(axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "m 1\n" }
    }))
    .await;
    let away = format!("http://localhost:{}/metrics", other.port());
    let app = axum::Router::new()
        .route(
            "/away",
            axum::routing::get(move || async move { axum::response::Redirect::temporary(&away) }),
        )
        .route(
            "/moved",
            axum::routing::get(|| async { axum::response::Redirect::permanent("/metrics") }),
        )
        .route("/metrics", axum::routing::get(|| async { "m 2\n" }));
    let addr = serve(app).await;

    let mut config = ScrapeConfig::new(vec![format!("http://{addr}/away")]);
    config.headers.insert("X-Token".into(), "s3cret".into());
    let (rows, _, errors) = scrape_once(config).await;
    assert_eq!(
        stolen.load(Ordering::SeqCst),
        0,
        "never sent to the other host"
    );
    assert_eq!(value_of(&rows, "up"), vec![0.0]);
    assert_eq!(errors, 1);

    let (rows, _, _) = scrape_once(ScrapeConfig::new(vec![format!("http://{addr}/moved")])).await;
    assert_eq!(
        value_of(&rows, "m"),
        vec![2.0],
        "a same-origin redirect is followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_labels_cannot_pose_as_job_instance_or_configured_labels() {
    let addr = serve(axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            "m{job=\"billing\",instance=\"db:5432\",env=\"dev\",exported_env=\"x\",zone=\"a\"} 1\n"
        }),
    ))
    .await;
    let url = format!("http://{addr}/metrics");
    let labels_of = |rows: &[Row]| {
        rows.iter()
            .find(|(m, _, _)| m == "m")
            .map(|(_, l, _)| l.clone())
            .unwrap()
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let mut config = ScrapeConfig::new(vec![url.clone()]);
    config.job = "node".into();
    config.labels.insert("env".into(), "prod".into());
    let (rows, _, _) = scrape_once(config.clone()).await;
    let instance = addr.to_string();
    assert_eq!(
        labels_of(&rows),
        pairs(&[
            ("env", "prod"),
            ("exported_env", "x"),
            ("exported_exported_env", "dev"),
            ("exported_instance", "db:5432"),
            ("exported_job", "billing"),
            ("instance", &instance),
            ("job", "node"),
            ("zone", "a"),
        ])
    );
    config.honor_labels = true;
    let (rows, _, _) = scrape_once(config).await;
    assert_eq!(
        labels_of(&rows),
        pairs(&[
            ("env", "dev"),
            ("exported_env", "x"),
            ("instance", "db:5432"),
            ("job", "billing"),
            ("zone", "a"),
        ]),
        "honor_labels keeps the target's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_files_reach_the_target_and_urls_are_printed_without_passwords() {
    use smartcloudops_core::component::{BuildContext, ComponentConfig};
    use smartcloudops_core::source::scrape::BasicAuth;

    let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // `Basic dTpwdw==` is u:pw; `Basic dXNlcjpzM2NyZXQ=` is user:s3cret (from the URL).
        let known = ["Bearer t0ken", "Basic dTpwdw==", "Basic dXNlcjpzM2NyZXQ="];
        if known.contains(&auth.as_str()) {
            (StatusCode::OK, "m 1\nbad line\n")
        } else {
            (StatusCode::UNAUTHORIZED, "")
        }
    });
    let addr = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t0ken\n").unwrap();
    std::fs::write(dir.path().join("password"), "pw\n").unwrap();

    let (rows, _, _) = scrape_once(ScrapeConfig::new(vec![format!("http://{addr}/m")])).await;
    assert_eq!(value_of(&rows, "up"), vec![0.0], "no credentials, 401");

    let mut bearer = ScrapeConfig::new(vec![format!("http://{addr}/m")]);
    bearer.bearer_token_file = Some(dir.path().join("token"));
    assert!(bearer.problems().is_empty(), "{}", bearer.problems());
    let (rows, _, _) = scrape_once(bearer).await;
    assert_eq!(
        value_of(&rows, "up"),
        vec![1.0],
        "the bearer token reached the target"
    );

    let mut basic = ScrapeConfig::new(vec![format!("http://{addr}/m")]);
    basic.basic_auth = Some(BasicAuth {
        username: "u".into(),
        password_file: Some(dir.path().join("password")),
    });
    let (rows, _, _) = scrape_once(basic).await;
    assert_eq!(
        value_of(&rows, "up"),
        vec![1.0],
        "basic auth reached the target"
    );

    // A password in the URL is sent, and appears nowhere we print.
    let secret_url = format!("http://user:s3cret@{addr}/m");
    let config = ScrapeConfig::new(vec![secret_url]);
    let summary = config.summary(&BuildContext::new("."));
    let debug = format!("{config:?}");
    let (rows, letters, _) = scrape_once(config).await;
    assert_eq!(value_of(&rows, "up"), vec![1.0]);
    assert_eq!(letters.len(), 1, "the bad line");
    let bad = ScrapeConfig::new(vec!["ftp://user:s3cret@example.com/m".into()]);
    let problems = bad.problems().to_string();
    for printed in [&summary, &debug, &letters[0].origin, &problems] {
        assert!(!printed.contains("s3cret"), "{printed}");
    }
    assert!(
        summary.contains(&format!("http://user:***@{addr}/m")),
        "{summary}"
    );

    let mut missing = ScrapeConfig::new(vec![format!("http://{addr}/m")]);
    missing.bearer_token_file = Some(dir.path().join("nope"));
    assert_eq!(
        missing
            .problems()
            .iter()
            .map(|p| p.path.as_str())
            .collect::<Vec<_>>(),
        ["bearer_token_file"]
    );
}
