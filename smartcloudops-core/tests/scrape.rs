//! The Prometheus scrape source against a local HTTP server serving exposition text: samples
//! with `job` and `instance`, `up` and the scrape's own series, dead-lettered bad lines, and
//! `up = 0` while the target fails.

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
            .contains(&("instance".to_owned(), "override:1".to_owned())),
        "the target's own label wins: {:?}",
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
