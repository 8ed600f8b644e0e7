//! Prometheus scrape source: fetch `/metrics` endpoints on an interval
//! (`[source] type = "prometheus_scrape"`).
//!
//! Every `interval`, each target is fetched with a `GET` (at most `timeout`, all targets at
//! once) and its text exposition decoded ([`PrometheusDecoder`]). As Prometheus does:
//!
//! - samples get `job` and `instance` labels (a label the target already sets wins, as with
//!   `honor_labels`), and samples without a timestamp get the scrape's start time;
//! - each scrape adds `up` (1 when the fetch and the page succeeded, 0 otherwise) and
//!   `scrape_duration_seconds` and `scrape_samples_scraped` for the target, so a target that
//!   goes down is itself a series a detector watches.
//!
//! Lines that do not parse are dead-lettered with `url#line` as origin; the rest of the page
//! is kept. A failed fetch is logged and counted as an error of the source (and `up` is 0).
//! A scrape cannot be redelivered: a nacked batch's rows are counted in
//! `smartcloudops_scrape_lost_rows_total`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Source, SourceBatch, SourceConfig, SourceContext, SourceStream};
use crate::ack::{Ack, AckOutcome};
use crate::component::{BuildContext, ComponentConfig};
use crate::decode::{Decoder, PrometheusDecoder, Reject};
use crate::error::{Error, Problems, Result};
use crate::schema::{MetricsBatchBuilder, sort_labels};

/// Configuration of a [`ScrapeSource`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeConfig {
    /// URLs to scrape, e.g. `http://127.0.0.1:9100/metrics`.
    pub targets: Vec<String>,
    /// The `job` label.
    #[serde(default = "default_job")]
    pub job: String,
    /// Time between scrapes.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Longest a scrape may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Labels added to every sample (the target's own win).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Stop after this many scrape rounds (for tests and replays); forever when absent.
    #[serde(default)]
    pub rounds: Option<u64>,
}

fn default_job() -> String {
    "scrape".to_owned()
}
fn default_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl ScrapeConfig {
    /// Scrapes `targets` every 15 s.
    pub fn new(targets: Vec<String>) -> Self {
        Self {
            targets,
            job: default_job(),
            interval: default_interval(),
            timeout: default_timeout(),
            labels: BTreeMap::new(),
            rounds: None,
        }
    }
}

/// Scrapes Prometheus endpoints. See the [module docs](self).
#[derive(Debug)]
pub struct ScrapeSource {
    config: ScrapeConfig,
}

impl ScrapeSource {
    /// A source for `config`.
    pub fn new(config: ScrapeConfig) -> Self {
        Self { config }
    }
}

/// `host:port` of a URL, Prometheus's `instance`.
fn instance(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            let host = u.host_str()?.to_owned();
            Some(match u.port_or_known_default() {
                Some(port) => format!("{host}:{port}"),
                None => host,
            })
        })
        .unwrap_or_else(|| url.to_owned())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Source for ScrapeSource {
    fn name(&self) -> &str {
        "prometheus_scrape"
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        let client = reqwest::Client::builder()
            .timeout(self.config.timeout)
            .user_agent(concat!("smartcloudops/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Connector {
                connector: "scrape".into(),
                message: format!("creating the HTTP client: {e}"),
            })?;
        let (tx, rx) = mpsc::channel(1);
        let lost = Arc::new(AtomicU64::new(0));
        let config = self.config;
        let tasks = ctx.tasks.clone();
        let task = async move {
            let mut ticker = tokio::time::interval(config.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut round = 0u64;
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                if config.rounds.is_some_and(|r| round >= r) {
                    return; // the stream ends: the pipeline drains and stops
                }
                round += 1;
                let scrapes = config
                    .targets
                    .iter()
                    .map(|t| scrape(&client, t, &config, &ctx));
                for batch in futures::future::join_all(scrapes).await {
                    let rows = batch.num_rows() as u64;
                    let stage = ctx.dead_letters.stage().clone();
                    let lost = lost.clone();
                    let ack = Ack::new(move |outcome| {
                        if let AckOutcome::Nacked(reason) = outcome {
                            let total = lost.fetch_add(rows, Ordering::Relaxed) + rows;
                            stage.set_gauge("scrape_lost_rows_total", &[], total as f64);
                            tracing::error!(
                                rows,
                                "scrape batch failed ({reason}); a scrape cannot be redelivered"
                            );
                        }
                    });
                    if tx.send(Ok(SourceBatch::new(batch, ack))).await.is_err() {
                        return;
                    }
                }
            }
        };
        tasks.spawn(task);
        use futures::StreamExt;
        let mut rx = rx;
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }
}

/// One scrape of one target: its samples plus `up`, `scrape_duration_seconds` and
/// `scrape_samples_scraped`.
async fn scrape(
    client: &reqwest::Client,
    url: &str,
    config: &ScrapeConfig,
    ctx: &SourceContext,
) -> arrow::record_batch::RecordBatch {
    let started = Instant::now();
    let ts = now_ms();
    let mut extra: Vec<(String, String)> = config.labels.clone().into_iter().collect();
    extra.push(("instance".into(), instance(url)));
    extra.push(("job".into(), config.job.clone()));
    let page = async {
        let response = client
            .get(url)
            .header("Accept", "text/plain;version=0.0.4")
            .send()
            .await?;
        response.error_for_status()?.bytes().await
    }
    .await;
    let mut decoded = MetricsBatchBuilder::default();
    let mut rejects: Vec<Reject> = Vec::new();
    let up = match &page {
        Ok(body) => {
            PrometheusDecoder::with_default_ts(ts).decode(body, &mut decoded, &mut rejects);
            true
        }
        Err(e) => {
            ctx.dead_letters.stage().record_error();
            let mut message = e.to_string();
            if let Some(i) = message.find(" for url (") {
                message.truncate(i);
            }
            tracing::warn!(target = %crate::util::url::mask_url(url), "scrape failed: {message}");
            false
        }
    };
    for r in rejects {
        if let Err(e) = ctx
            .dead_letters
            .send(format!("{url}#{}", r.record + 1), r.reason, r.raw)
        {
            tracing::error!("a scraped line was neither decoded nor dead-lettered: {e}");
        }
    }
    // Relabel: the target's labels win over `job`, `instance` and the configured ones.
    let page_batch = decoded.finish();
    let mut out = MetricsBatchBuilder::with_capacity(page_batch.num_rows() + 3);
    let scraped = page_batch.num_rows();
    if let Ok(cols) =
        crate::schema::MetricsColumns::try_new(&page_batch, "source:prometheus_scrape")
    {
        for row in 0..scraped {
            let mut labels = cols.labels(row);
            for (k, v) in &extra {
                if !labels.iter().any(|(key, _)| key == k) {
                    labels.push((k.clone(), v.clone()));
                }
            }
            sort_labels(&mut labels);
            out.push(
                cols.ts.value(row),
                cols.metric(row),
                &labels,
                cols.value.value(row),
            );
        }
    }
    let mut labels = extra;
    sort_labels(&mut labels);
    out.push(ts, "up", &labels, if up { 1.0 } else { 0.0 });
    out.push(
        ts,
        "scrape_duration_seconds",
        &labels,
        started.elapsed().as_secs_f64(),
    );
    out.push(ts, "scrape_samples_scraped", &labels, scraped as f64);
    out.finish()
}

impl ComponentConfig for ScrapeConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.check(
            !self.targets.is_empty(),
            "targets",
            "list at least one URL",
            "",
        );
        for t in &self.targets {
            p.check(
                reqwest::Url::parse(t).is_ok()
                    && (t.starts_with("http://") || t.starts_with("https://")),
                "targets",
                format!("`{}` is not an http(s) URL", crate::util::url::mask_url(t)),
                "",
            );
        }
        p.check(
            !self.interval.is_zero(),
            "interval",
            "must be longer than 0",
            "",
        );
        p.check(
            !self.timeout.is_zero() && self.timeout <= self.interval,
            "timeout",
            "must be longer than 0 and at most `interval`",
            "",
        );
        p
    }

    fn summary(&self, _ctx: &BuildContext) -> String {
        format!(
            "prometheus scrape of {} targets every {:?}",
            self.targets.len(),
            self.interval
        )
    }
}

impl SourceConfig for ScrapeConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(ScrapeSource::new(self.clone())))
    }
}
