//! Prometheus scrape source: fetch `/metrics` endpoints on an interval
//! (`[source] type = "prometheus_scrape"`).
//!
//! Every `interval`, each target is fetched with a `GET` (at most `timeout`, all targets at
//! once) and its text exposition decoded ([`PrometheusDecoder`]). As Prometheus does:
//!
//! - samples get `job` and `instance` labels and the configured `labels`; a scraped label of
//!   the same name is kept as `exported_<name>` (`honor_labels = false`, the default) or wins
//!   (`honor_labels = true`); samples without a timestamp get the scrape's start time;
//! - each scrape adds `up` (1 when the fetch and the page succeeded, 0 otherwise) and
//!   `scrape_duration_seconds` and `scrape_samples_scraped` for the target, so a target that
//!   goes down is itself a series a detector watches.
//!
//! Lines that do not parse are dead-lettered with `url#line` as origin; the rest of the page
//! is kept. A failed fetch is logged and counted as an error of the source (and `up` is 0).
//! A scrape cannot be redelivered: a nacked batch's rows are counted in
//! `smartcloudops_scrape_lost_rows_total`.
//!
//! A target is not trusted:
//!
//! - its body is read up to `max_response_bytes` (the `Content-Length` is checked first, then
//!   every chunk as it arrives); a larger one fails the scrape;
//! - a redirect is followed only within the same scheme, host and port, so credentials never
//!   go to another host nor from https to http;
//! - credentials (`bearer_token_file`, `basic_auth.password_file`) are read from their files at
//!   every scrape, so a rotated token is picked up, and never printed; URLs are printed with
//!   their password hidden ([`redact_url`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Origin, Source, SourceBatch, SourceConfig, SourceContext, SourceStream};
use crate::ack::{Ack, AckOutcome};
use crate::component::{BuildContext, ComponentConfig, resolve_path};
use crate::decode::{Decoder, PrometheusDecoder, Reject};
use crate::error::{Error, Problems, Result};
use crate::schema::{MetricsBatchBuilder, sort_labels};
use crate::util::url::{Redact, mask_url, redact_url};

/// Configuration of a [`ScrapeSource`]. The `Debug` output hides URL passwords and header
/// values.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
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
    /// Labels added to every sample.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether a scraped label wins over `job`, `instance` and `labels` (else it is kept as
    /// `exported_<name>`, as Prometheus does).
    #[serde(default)]
    pub honor_labels: bool,
    /// Largest response body read; a larger one fails the scrape.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// What one record may hold (line length, labels, label sizes): over-limit records are
    /// dead-lettered with the limit's name. See [`DecodeLimits`](crate::decode::DecodeLimits).
    #[serde(default)]
    pub limits: crate::decode::DecodeLimits,
    /// File holding a bearer token sent as `Authorization: Bearer …` (read at every scrape).
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Basic authentication (the password read from its file at every scrape).
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Stop after this many scrape rounds (for tests and replays); forever when absent.
    #[serde(default)]
    pub rounds: Option<u64>,
}

/// `basic_auth = { username = "…", password_file = "…" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// The user name.
    pub username: String,
    /// File holding the password (without it, the password is empty).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl fmt::Debug for ScrapeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets: Vec<String> = self.targets.iter().map(|t| shown_url(t)).collect();
        f.debug_struct("ScrapeConfig")
            .field("targets", &targets)
            .field("job", &self.job)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("labels", &self.labels)
            .field("honor_labels", &self.honor_labels)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("bearer_token_file", &self.bearer_token_file)
            .field("basic_auth", &self.basic_auth)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("rounds", &self.rounds)
            .finish()
    }
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
fn default_max_response_bytes() -> u64 {
    16 * 1024 * 1024
}

impl ScrapeConfig {
    /// Scrapes `targets` every 15 s.
    pub fn new(targets: Vec<String>) -> Self {
        Self {
            limits: crate::decode::DecodeLimits::default(),
            targets,
            job: default_job(),
            interval: default_interval(),
            timeout: default_timeout(),
            labels: BTreeMap::new(),
            honor_labels: false,
            max_response_bytes: default_max_response_bytes(),
            bearer_token_file: None,
            basic_auth: None,
            headers: BTreeMap::new(),
            rounds: None,
        }
    }
}

/// A target URL as printed: the password hidden, the path kept (it tells targets apart).
fn shown_url(url: &str) -> String {
    redact_url(url, Redact::Credentials)
}

/// A secret file's content, without surrounding whitespace (a line end, say).
fn read_secret(path: &std::path::Path) -> std::result::Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("reading {}: {e}", path.display()))
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
            .redirect(same_origin_redirects())
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
                let scraped = futures::future::join_all(scrapes).await;
                for (batch, target) in scraped.into_iter().zip(&config.targets) {
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
                    let origin = Origin::from_parts([shown_url(target)]);
                    let batch = SourceBatch::new(batch, ack).with_origin(origin);
                    if tx.send(Ok(batch)).await.is_err() {
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
    let page = fetch(client, url, config).await;
    let mut decoded = MetricsBatchBuilder::default();
    let mut rejects: Vec<Reject> = Vec::new();
    let up = match &page {
        Ok(body) => {
            PrometheusDecoder::with_default_ts(ts)
                .with_limits(config.limits)
                .decode(body, &mut decoded, &mut rejects);
            true
        }
        Err(message) => {
            ctx.dead_letters.stage().record_error();
            tracing::warn!(target = %shown_url(url), "scrape failed: {message}");
            false
        }
    };
    for r in rejects {
        if let Err(e) = ctx.dead_letters.send(
            format!("{}#{}", shown_url(url), r.record + 1),
            r.reason,
            r.raw,
        ) {
            tracing::error!("a scraped line was neither decoded nor dead-lettered: {e}");
        }
    }
    let page_batch = decoded.finish();
    let mut out = MetricsBatchBuilder::with_capacity(page_batch.num_rows() + 3);
    let scraped = page_batch.num_rows();
    if let Ok(cols) =
        crate::schema::MetricsColumns::try_new(&page_batch, "source:prometheus_scrape")
    {
        for row in 0..scraped {
            let mut labels = cols.labels(row);
            attach_target_labels(&mut labels, &extra, config.honor_labels);
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

/// Redirects are followed (at most 10) only to the same scheme, host and port: the request
/// carries credentials, which must go nowhere else, and never from https to http.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt.previous().last().is_some_and(|from| {
            let to = attempt.url();
            from.scheme() == to.scheme()
                && from.host_str() == to.host_str()
                && from.port_or_known_default() == to.port_or_known_default()
        });
        if attempt.previous().len() > 10 || !same_origin {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

/// The body of `url`, at most `max_response_bytes` of it, or why the scrape failed (without
/// the URL's secrets).
async fn fetch(
    client: &reqwest::Client,
    url: &str,
    config: &ScrapeConfig,
) -> std::result::Result<Vec<u8>, String> {
    let mut request = client.get(url).header("Accept", "text/plain;version=0.0.4");
    if let Some(path) = &config.bearer_token_file {
        request = request.bearer_auth(read_secret(path)?);
    }
    if let Some(auth) = &config.basic_auth {
        let password = auth.password_file.as_deref().map(read_secret).transpose()?;
        request = request.basic_auth(&auth.username, password);
    }
    for (k, v) in &config.headers {
        request = request.header(k, v);
    }
    let mut response = request.send().await.map_err(|e| without_url(&e))?;
    let status = response.status();
    if status.is_redirection() {
        let to = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "nowhere".to_owned(), mask_url);
        return Err(format!(
            "HTTP {}: redirect to {to} not followed (only the same scheme, host and port are)",
            status.as_u16()
        ));
    }
    if !status.is_success() {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    let max = config.max_response_bytes;
    let too_large = || format!("the response is larger than `max_response_bytes` ({max} bytes)");
    if response.content_length().is_some_and(|len| len > max) {
        return Err(too_large());
    }
    // The length header may be absent or lie: count what arrives.
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| without_url(&e))? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error without the URL it names (the URL may hold a password).
fn without_url(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    if let Some(i) = message.find(" for url (") {
        message.truncate(i);
    }
    message
}

/// Adds the target's labels (`extra`: `job`, `instance` and the configured ones) to a scraped
/// sample's `labels`, and sorts them. On a clash the scraped label wins with `honor_labels`;
/// without, it is kept as `exported_<name>` (`exported_exported_<name>` if that is taken too),
/// as Prometheus does, so a target cannot pass itself off as another job or instance.
fn attach_target_labels(
    labels: &mut Vec<(String, String)>,
    extra: &[(String, String)],
    honor_labels: bool,
) {
    for (k, v) in extra {
        match labels.iter().position(|(key, _)| key == k) {
            Some(_) if honor_labels => {}
            Some(i) => {
                let mut name = format!("exported_{k}");
                while labels.iter().any(|(key, _)| *key == name)
                    || extra.iter().any(|(key, _)| *key == name)
                {
                    name.insert_str(0, "exported_");
                }
                labels[i].0 = name;
                labels.push((k.clone(), v.clone()));
            }
            None => labels.push((k.clone(), v.clone())),
        }
    }
    sort_labels(labels);
}

impl ComponentConfig for ScrapeConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.extend_at("limits", self.limits.problems());
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
                format!("`{}` is not an http(s) URL", shown_url(t)),
                "",
            );
        }
        p.check(
            self.max_response_bytes > 0,
            "max_response_bytes",
            "must be more than 0",
            "the default is 16 MiB",
        );
        if let Some(path) = &self.bearer_token_file
            && let Err(e) = read_secret(path)
        {
            p.push_hint(
                "bearer_token_file",
                e,
                "the file is read at every scrape and must be readable now",
            );
        }
        if let Some(BasicAuth {
            password_file: Some(path),
            ..
        }) = &self.basic_auth
            && let Err(e) = read_secret(path)
        {
            p.push_hint(
                "basic_auth.password_file",
                e,
                "the file is read at every scrape and must be readable now",
            );
        }
        p.check(
            self.bearer_token_file.is_none() || self.basic_auth.is_none(),
            "basic_auth",
            "set `bearer_token_file` or `basic_auth`, not both",
            "",
        );
        for (k, v) in &self.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes());
            p.check(
                name.is_ok(),
                format!("headers.{k}"),
                "is not a valid header name",
                "",
            );
            p.check(
                reqwest::header::HeaderValue::from_str(v).is_ok(),
                format!("headers.{k}"),
                "the value is not a valid header value",
                "",
            );
            p.check(
                !(k.eq_ignore_ascii_case("authorization")
                    && (self.bearer_token_file.is_some() || self.basic_auth.is_some())),
                format!("headers.{k}"),
                "clashes with `bearer_token_file` / `basic_auth`",
                "set the credentials one way",
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
        let targets: Vec<String> = self.targets.iter().map(|t| shown_url(t)).collect();
        format!(
            "prometheus scrape of {} every {:?}",
            targets.join(", "),
            self.interval
        )
    }

    fn resolve_paths(&mut self, base_dir: &std::path::Path) {
        if let Some(path) = &mut self.bearer_token_file {
            *path = resolve_path(base_dir, path);
        }
        if let Some(BasicAuth {
            password_file: Some(path),
            ..
        }) = &mut self.basic_auth
        {
            *path = resolve_path(base_dir, path);
        }
    }
}

impl SourceConfig for ScrapeConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(ScrapeSource::new(self.clone())))
    }
}
