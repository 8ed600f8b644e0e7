//! Prometheus remote-write 1.0 receiver (`[source] type = "remote_write"`): an existing
//! Prometheus sends its samples here with
//!
//! ```yaml
//! remote_write:
//!   - url: http://127.0.0.1:9201/api/v1/write
//!     authorization: { credentials_file: /etc/prometheus/remote-write.token }
//! ```
//!
//! - `POST` bodies are snappy-compressed protobuf `WriteRequest`s
//!   ([`RemoteWriteDecoder`]), checked against `limits` ([`DecodeLimits`]); each request
//!   becomes one batch.
//! - **Served by the shared hardened server** (`server = { … }`, [`crate::http`]): auth,
//!   TLS, header/body timeouts, a connection cap, a request limit and per-client rate limits.
//! - **Decoding runs off the async workers** (`spawn_blocking`), at most
//!   `max_concurrent_decodes` at once; a request that waits longer than
//!   `decode_queue_timeout` for its turn gets 503 (Prometheus retries it).
//! - **Status codes as the spec says.** `204` only after the pipeline acknowledged the batch
//!   (at-least-once: a Prometheus that got a 2xx may forget the samples).
//!   - `400` when the body does not decode, holds more than a limit allows or uses another
//!     content encoding; `413` when the body or what it decompresses to is too large.
//!     Prometheus drops such a request, and it is dead-lettered with the reason and the
//!     client's address.
//!   - `500` when the pipeline failed the batch, `503` when it is shutting down, overloaded
//!     or did not answer within `ack_timeout`: Prometheus retries these.
//!   - `405` for methods other than `POST`, `401` without the right credentials, `429` over
//!     the client's rate.
//! - Stale markers are skipped and counted; series without `__name__` are skipped and
//!   counted.
//!
//! Gauges of the source stage: `remote_write_requests_total`, `…_samples_total`,
//! `…_stale_markers_total`, `…_rejected_requests_total`, `…_overloaded_requests_total`, and
//! the server's `http_*` refusals.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Origin, Source, SourceBatch, SourceConfig, SourceContext, SourceStream};
use crate::ack::{Ack, AckOutcome};
use crate::component::{BuildContext, ComponentConfig};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::DecodeLimits;
use crate::decode::remote_write::{Decoded, RemoteWriteDecoder, RequestError};
use crate::error::{Error, Problems, Result};
use crate::http::{HttpServer, ServerConfig};
use crate::metrics::StageMetrics;
use crate::schema::MetricsBatchBuilder;

/// Configuration of a [`RemoteWriteSource`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// Address to listen on; loopback by default. Any other address needs `server.auth`
    /// (or `server.allow_unauthenticated = true`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Path Prometheus posts to.
    #[serde(default = "default_path")]
    pub path: String,
    /// Largest request body accepted (compressed).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Longest a request waits for the pipeline to acknowledge its batch.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Most requests decoded at once (each on a blocking thread).
    #[serde(default = "default_max_concurrent_decodes")]
    pub max_concurrent_decodes: usize,
    /// Longest a request waits for a decode slot before it gets 503.
    #[serde(default = "default_decode_queue_timeout", with = "humantime_serde")]
    pub decode_queue_timeout: Duration,
    /// What one request may hold.
    #[serde(default)]
    pub limits: DecodeLimits,
    /// Auth, TLS, timeouts and caps of the HTTP server.
    #[serde(default)]
    pub server: ServerConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9201))
}
fn default_path() -> String {
    "/api/v1/write".to_owned()
}
fn default_max_body() -> usize {
    32 << 20
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_concurrent_decodes() -> usize {
    2
}
fn default_decode_queue_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            path: default_path(),
            max_body_bytes: default_max_body(),
            ack_timeout: default_ack_timeout(),
            max_concurrent_decodes: default_max_concurrent_decodes(),
            decode_queue_timeout: default_decode_queue_timeout(),
            limits: DecodeLimits::default(),
            server: ServerConfig::default(),
        }
    }
}

/// Receives Prometheus remote-write. See the [module docs](self).
#[derive(Debug)]
pub struct RemoteWriteSource {
    config: RemoteWriteConfig,
    server: HttpServer,
}

impl RemoteWriteSource {
    /// Binds `config.listen` now (so a port in use is a start-up error, and port 0 gets a
    /// free port, see [`local_addr`](Self::local_addr)); serves when the pipeline starts.
    /// Relative token and certificate paths are taken from the working directory.
    pub fn bind(config: RemoteWriteConfig) -> Result<Self> {
        Self::bind_in(config, Path::new("."))
    }

    /// [`bind`](Self::bind), with relative paths resolved against `base_dir`.
    pub fn bind_in(config: RemoteWriteConfig, base_dir: &Path) -> Result<Self> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let server = HttpServer::bind(config.listen, &config.server, base_dir)?;
        Ok(Self { config, server })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.server.local_addr()
    }
}

#[derive(Clone)]
struct Receiver {
    tx: mpsc::Sender<Result<SourceBatch>>,
    dead_letters: DeadLetterQueue,
    counters: Arc<Counters>,
    ack_timeout: Duration,
    decodes: Arc<Semaphore>,
    decode_queue_timeout: Duration,
    limits: DecodeLimits,
}

struct Counters {
    stage: Arc<StageMetrics>,
    requests: AtomicU64,
    samples: AtomicU64,
    stale: AtomicU64,
    rejected: AtomicU64,
    overloaded: AtomicU64,
}

impl Counters {
    fn publish(&self) {
        for (name, c) in [
            ("remote_write_requests_total", &self.requests),
            ("remote_write_samples_total", &self.samples),
            ("remote_write_stale_markers_total", &self.stale),
            ("remote_write_rejected_requests_total", &self.rejected),
            ("remote_write_overloaded_requests_total", &self.overloaded),
        ] {
            self.stage
                .set_gauge(name, &[], c.load(Ordering::Relaxed) as f64);
        }
    }
}

impl Source for RemoteWriteSource {
    fn name(&self) -> &str {
        "remote_write"
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        let (tx, mut rx) = mpsc::channel(1);
        let stage = ctx.dead_letters.stage().clone();
        let counters = Arc::new(Counters {
            stage: stage.clone(),
            requests: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
        });
        counters.publish();
        let state = Receiver {
            tx,
            dead_letters: ctx.dead_letters.clone(),
            counters,
            ack_timeout: self.config.ack_timeout,
            decodes: Arc::new(Semaphore::new(self.config.max_concurrent_decodes)),
            decode_queue_timeout: self.config.decode_queue_timeout,
            limits: self.config.limits,
        };
        let app = axum::Router::new()
            .route(&self.config.path, axum::routing::post(receive))
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .with_state(state);
        let address = self.server.local_addr()?;
        let scheme = if self.server.is_tls() {
            "https"
        } else {
            "http"
        };
        // When the server stops, the router (and its sender) is dropped: the stream ends.
        let serve = self.server.serve(app, ctx.shutdown.clone(), Some(stage))?;
        tracing::info!(%address, %scheme, path = %self.config.path, "remote-write receiver listening");
        ctx.tasks.spawn(serve);
        use futures::StreamExt;
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }
}

/// Why a request is refused before it reaches the pipeline, and its status.
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl From<RequestError> for Refusal {
    fn from(e: RequestError) -> Self {
        let status = if e.is_too_large() {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        Refusal {
            status,
            reason: e.to_string(),
        }
    }
}

async fn receive(
    State(r): State<Receiver>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (StatusCode, String) {
    r.counters.requests.fetch_add(1, Ordering::Relaxed);
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let refusal = Refusal {
                status: rejection.status(),
                reason: format!("the request body was not read: {}", rejection.body_text()),
            };
            return reject(&r, client, refusal, &[]);
        }
    };
    let encoding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("snappy");
    if !encoding.eq_ignore_ascii_case("snappy") {
        let refusal = Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: format!("content encoding `{encoding}` is not snappy"),
        };
        return reject(&r, client, refusal, &body);
    }
    let (decoded, mut out) = match decode(&r, body.clone()).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return reject(&r, client, e.into(), &body),
        Err(busy) => {
            r.counters.overloaded.fetch_add(1, Ordering::Relaxed);
            r.counters.publish();
            return (StatusCode::SERVICE_UNAVAILABLE, busy);
        }
    };
    r.counters
        .samples
        .fetch_add(decoded.samples as u64, Ordering::Relaxed);
    r.counters
        .stale
        .fetch_add(decoded.stale as u64, Ordering::Relaxed);
    r.counters.publish();
    if decoded.samples == 0 {
        return (StatusCode::NO_CONTENT, String::new());
    }
    let (done, outcome) = oneshot::channel();
    let ack = Ack::new(move |o| {
        let _ = done.send(o);
    });
    let batch = SourceBatch::new(out.finish(), ack).with_origin(Origin::client(client.to_string()));
    let send = r.tx.send(Ok(batch));
    let answered = tokio::time::timeout(r.ack_timeout, async {
        if send.await.is_err() {
            return None; // the pipeline stopped
        }
        outcome.await.ok()
    })
    .await;
    match answered {
        Ok(Some(AckOutcome::Acked)) => (StatusCode::NO_CONTENT, String::new()),
        Ok(Some(AckOutcome::Nacked(nack))) => (StatusCode::INTERNAL_SERVER_ERROR, nack.reason),
        Ok(None) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline did not answer in time".into(),
        ),
    }
}

/// Decodes on a blocking thread once a decode slot is free; `Err` when none freed up within
/// `decode_queue_timeout` (or the runtime is shutting down).
async fn decode(
    r: &Receiver,
    body: Bytes,
) -> Result<Result<(Decoded, MetricsBatchBuilder), RequestError>, String> {
    let busy = || "too many requests being decoded; retry later".to_owned();
    let permit = tokio::time::timeout(r.decode_queue_timeout, r.decodes.clone().acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let limits = r.limits;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut out = MetricsBatchBuilder::default();
        RemoteWriteDecoder::with_limits(limits)
            .decode(&body, &mut out)
            .map(|d| (d, out))
    })
    .await
    .map_err(|e| format!("decoding failed: {e}"))
}

/// Counts and dead-letters a refused request (Prometheus drops a request answered 4xx: keep
/// it, with the reason and the client).
fn reject(r: &Receiver, client: SocketAddr, refusal: Refusal, body: &[u8]) -> (StatusCode, String) {
    r.counters.rejected.fetch_add(1, Ordering::Relaxed);
    r.counters.publish();
    let payload = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
    let origin = format!("remote_write request from {client}");
    if let Err(e) = r.dead_letters.send(origin, refusal.reason.clone(), payload) {
        tracing::error!("a rejected remote-write request could not be dead-lettered: {e}");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "dead-letter output failed".into(),
        );
    }
    (refusal.status, refusal.reason)
}

impl ComponentConfig for RemoteWriteConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.check(
            self.path.starts_with('/'),
            "path",
            "must start with /",
            "e.g. \"/api/v1/write\"",
        );
        p.check(
            self.max_body_bytes > 0 && !self.ack_timeout.is_zero(),
            "max_body_bytes",
            "max_body_bytes and ack_timeout must be above 0",
            "",
        );
        p.check(
            (1..=1024).contains(&self.max_concurrent_decodes),
            "max_concurrent_decodes",
            format!(
                "must be between 1 and 1024, got {}",
                self.max_concurrent_decodes
            ),
            "about the number of cores to spend on decoding",
        );
        p.check(
            !self.decode_queue_timeout.is_zero()
                && self.decode_queue_timeout <= crate::component::MAX_DURATION,
            "decode_queue_timeout",
            "must be above 0 and at most a day",
            "",
        );
        p.extend_at("limits", self.limits.problems());
        p.extend_at("server", self.server.problems_for(self.listen));
        p
    }

    fn summary(&self, _ctx: &BuildContext) -> String {
        let scheme = if self.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let auth = if self.server.auth.is_some() {
            "authenticated"
        } else {
            "unauthenticated"
        };
        format!(
            "prometheus remote-write receiver on {scheme}://{}{} ({auth})",
            self.listen, self.path
        )
    }
}

impl SourceConfig for RemoteWriteConfig {
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(RemoteWriteSource::bind_in(
            self.clone(),
            &ctx.base_dir,
        )?))
    }
}
