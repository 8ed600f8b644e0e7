//! Prometheus remote-write 1.0 receiver (`[source] type = "remote_write"`): an existing
//! Prometheus sends its samples here with
//!
//! ```yaml
//! remote_write:
//!   - url: http://127.0.0.1:9201/api/v1/write
//! ```
//!
//! - `POST` bodies are snappy-compressed protobuf `WriteRequest`s
//!   ([`RemoteWriteDecoder`]); each request becomes one batch.
//! - **Status codes as the spec says.** `204` only after the pipeline acknowledged the batch
//!   (at-least-once: a Prometheus that got a 2xx may forget the samples).
//!   - `400` when the body does not decode or uses another content encoding: Prometheus drops
//!     such a request, and the body is dead-lettered with the reason.
//!   - `500` when the pipeline failed the batch, `503` when it is shutting down or did not
//!     answer within `ack_timeout`: Prometheus retries these.
//!   - `405` for methods other than `POST`, `413` for a body over `max_body_bytes`.
//! - Stale markers are skipped and counted; series without `__name__` are skipped and
//!   counted.
//!
//! Gauges of the source stage: `remote_write_requests_total`, `…_samples_total`,
//! `…_stale_markers_total`, `…_rejected_requests_total`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Source, SourceBatch, SourceConfig, SourceContext, SourceStream};
use crate::ack::{Ack, AckOutcome};
use crate::component::{BuildContext, ComponentConfig};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::remote_write::RemoteWriteDecoder;
use crate::error::{Error, Problems, Result};
use crate::metrics::StageMetrics;
use crate::schema::MetricsBatchBuilder;

/// Configuration of a [`RemoteWriteSource`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// Address to listen on; loopback by default (put a TLS-terminating proxy in front to
    /// expose it).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Path Prometheus posts to.
    #[serde(default = "default_path")]
    pub path: String,
    /// Largest request body accepted.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Longest a request waits for the pipeline to acknowledge its batch.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
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

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            path: default_path(),
            max_body_bytes: default_max_body(),
            ack_timeout: default_ack_timeout(),
        }
    }
}

/// Receives Prometheus remote-write. See the [module docs](self).
#[derive(Debug)]
pub struct RemoteWriteSource {
    config: RemoteWriteConfig,
    listener: std::net::TcpListener,
}

impl RemoteWriteSource {
    /// Binds `config.listen` now (so a port in use is a start-up error, and port 0 gets a
    /// free port, see [`local_addr`](Self::local_addr)); serves when the pipeline starts.
    pub fn bind(config: RemoteWriteConfig) -> Result<Self> {
        let listener = std::net::TcpListener::bind(config.listen)
            .map_err(|e| Error::io(format!("listening on {}", config.listen), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring the listener", e))?;
        Ok(Self { config, listener })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("reading the listener's address", e))
    }
}

#[derive(Clone)]
struct Receiver {
    tx: mpsc::Sender<Result<SourceBatch>>,
    dead_letters: DeadLetterQueue,
    counters: Arc<Counters>,
    ack_timeout: Duration,
}

struct Counters {
    stage: Arc<StageMetrics>,
    requests: AtomicU64,
    samples: AtomicU64,
    stale: AtomicU64,
    rejected: AtomicU64,
}

impl Counters {
    fn publish(&self) {
        for (name, c) in [
            ("remote_write_requests_total", &self.requests),
            ("remote_write_samples_total", &self.samples),
            ("remote_write_stale_markers_total", &self.stale),
            ("remote_write_rejected_requests_total", &self.rejected),
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
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .map_err(|e| Error::io("registering the listener", e))?;
        let (tx, mut rx) = mpsc::channel(1);
        let counters = Arc::new(Counters {
            stage: ctx.dead_letters.stage().clone(),
            requests: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        counters.publish();
        let state = Receiver {
            tx,
            dead_letters: ctx.dead_letters.clone(),
            counters,
            ack_timeout: self.config.ack_timeout,
        };
        let app = axum::Router::new()
            .route(&self.config.path, axum::routing::post(receive))
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .with_state(state);
        let shutdown = ctx.shutdown.clone();
        tracing::info!(address = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), path = %self.config.path, "remote-write receiver listening");
        ctx.tasks.spawn(async move {
            // When the server stops, the router (and its sender) is dropped: the stream ends.
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!("remote-write receiver stopped: {e}");
            }
        });
        use futures::StreamExt;
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    r.counters.requests.fetch_add(1, Ordering::Relaxed);
    let encoding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("snappy");
    let mut out = MetricsBatchBuilder::default();
    let decoded = if encoding.eq_ignore_ascii_case("snappy") {
        RemoteWriteDecoder::default().decode(&body, &mut out)
    } else {
        Err(format!("content encoding `{encoding}` is not snappy"))
    };
    let decoded = match decoded {
        Ok(d) => d,
        Err(reason) => {
            r.counters.rejected.fetch_add(1, Ordering::Relaxed);
            r.counters.publish();
            // Prometheus drops a request answered 4xx: keep it, with the reason.
            let payload = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
            if let Err(e) = r
                .dead_letters
                .send("remote_write request", reason.clone(), payload)
            {
                tracing::error!("a rejected remote-write request could not be dead-lettered: {e}");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "dead-letter output failed".into(),
                );
            }
            return (StatusCode::BAD_REQUEST, reason);
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
    let send = r.tx.send(Ok(SourceBatch::new(out.finish(), ack)));
    let answered = tokio::time::timeout(r.ack_timeout, async {
        if send.await.is_err() {
            return None; // the pipeline stopped
        }
        outcome.await.ok()
    })
    .await;
    match answered {
        Ok(Some(AckOutcome::Acked)) => (StatusCode::NO_CONTENT, String::new()),
        Ok(Some(AckOutcome::Nacked(reason))) => (StatusCode::INTERNAL_SERVER_ERROR, reason),
        Ok(None) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline did not answer in time".into(),
        ),
    }
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
        p
    }

    fn summary(&self, _ctx: &BuildContext) -> String {
        format!(
            "prometheus remote-write receiver on {}{}",
            self.listen, self.path
        )
    }
}

impl SourceConfig for RemoteWriteConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(RemoteWriteSource::bind(self.clone())?))
    }
}
