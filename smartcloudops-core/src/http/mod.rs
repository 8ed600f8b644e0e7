//! One hardened HTTP server for every inbound endpoint: give it an [`axum::Router`], get back
//! a served listener with every protection on.
//!
//! - **Authentication**: a bearer token or basic auth ([`auth`]), the secret from a file or
//!   the environment, compared in constant time; 401 with `WWW-Authenticate` otherwise. A
//!   non-loopback address without auth is a configuration error unless
//!   `allow_unauthenticated = true` says it is meant.
//! - **TLS** with rustls ([`tls`]), optional.
//! - **Timeouts**: `header_read_timeout` closes a connection whose request head (or TLS
//!   handshake) does not arrive in time — a slowloris client — and, between requests, a
//!   kept-alive connection that stays idle that long; `body_read_timeout` bounds reading a
//!   request body.
//! - **Caps**: at most `max_connections` open connections (more are answered 503 and closed
//!   at once), at most `max_concurrent_requests` handled at once (503 with `Retry-After`).
//! - **Per-client rate limits** ([`rate`]): 429 with `Retry-After`, bounded memory.
//! - The client address is given to handlers as [`ConnectInfo<SocketAddr>`], for dead letters
//!   and audit records.
//!
//! ```no_run
//! # async fn demo() -> smartcloudops_core::Result<()> {
//! use smartcloudops_core::http::{HttpServer, ServerConfig};
//! let server = HttpServer::bind(
//!     "127.0.0.1:0".parse().unwrap(),
//!     &ServerConfig::default(),
//!     std::path::Path::new("."),
//! )?;
//! let router = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! server.serve(router, shutdown, None)?.await;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod rate;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Problems, Result};
use crate::metrics::StageMetrics;

pub use self::auth::{AuthConfig, Credentials};
use self::rate::ClientRateLimiter;
pub use self::rate::RateLimitConfig;
pub use self::tls::TlsConfig;

/// The protections of an HTTP endpoint (`server = { … }` in a component that listens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the shared secret comes from; none: no authentication.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Allows listening on a non-loopback address without `auth`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Serve HTTPS with this certificate and key.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Longest wait for a request head (and for the TLS handshake); also how long a
    /// kept-alive connection may sit idle between requests.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest time reading one request body may take.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Most connections open at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most requests handled at once.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Requests per second per client IP.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    256
}
fn default_max_concurrent_requests() -> usize {
    64
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            auth: None,
            allow_unauthenticated: false,
            tls: None,
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            max_connections: default_max_connections(),
            max_concurrent_requests: default_max_concurrent_requests(),
            rate_limit: RateLimitConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Every problem of this table for a server on `listen`, paths relative to the table.
    pub fn problems_for(&self, listen: SocketAddr) -> Problems {
        let mut p = Problems::new();
        p.check(
            self.auth.is_some() || self.allow_unauthenticated || listen.ip().is_loopback(),
            "auth",
            format!(
                "{listen} is not a loopback address, and anyone who can reach it could send \
                 data without `auth`"
            ),
            "set auth = { token_file = \"…\" }, or allow_unauthenticated = true if a proxy \
             in front authenticates",
        );
        if let Some(auth) = &self.auth {
            p.extend_at("auth", auth.problems());
        }
        if let Some(tls) = &self.tls {
            p.extend_at("tls", tls.problems());
        }
        for (field, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
        ] {
            p.check(
                !d.is_zero() && d <= Duration::from_secs(3600),
                field,
                format!(
                    "must be above 0 and at most 1h, got {}",
                    humantime::format_duration(d)
                ),
                "",
            );
        }
        for (field, n) in [
            ("max_connections", self.max_connections),
            ("max_concurrent_requests", self.max_concurrent_requests),
        ] {
            p.check(
                (1..=Semaphore::MAX_PERMITS).contains(&n),
                field,
                format!("must be at least 1, got {n}"),
                "",
            );
        }
        p.extend_at("rate_limit", self.rate_limit.problems());
        p
    }
}

/// A bound listener with its protections loaded; [`serve`](Self::serve) runs it.
pub struct HttpServer {
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("listener", &self.listener)
            .field("shared", &self.shared)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

#[derive(Debug)]
struct Shared {
    credentials: Option<Credentials>,
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    connections: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    rate: ClientRateLimiter,
    counters: Counters,
}

/// What the server refused, published as gauges of the owner's stage.
#[derive(Debug, Default)]
struct Counters {
    stage: Option<Arc<StageMetrics>>,
    refused_connections: AtomicU64,
    unauthorized: AtomicU64,
    rate_limited: AtomicU64,
    overloaded: AtomicU64,
}

impl Counters {
    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.publish();
    }

    fn publish(&self) {
        let Some(stage) = &self.stage else { return };
        for (name, c) in [
            ("http_refused_connections_total", &self.refused_connections),
            ("http_unauthorized_total", &self.unauthorized),
            ("http_rate_limited_total", &self.rate_limited),
            ("http_overloaded_total", &self.overloaded),
        ] {
            stage.set_gauge(name, &[], c.load(Ordering::Relaxed) as f64);
        }
    }
}

impl HttpServer {
    /// Binds `listen` and loads the secret and the certificate now, so a port in use, a
    /// missing token or a bad key is a start-up error. `base_dir` resolves relative paths.
    pub fn bind(listen: SocketAddr, config: &ServerConfig, base_dir: &Path) -> Result<Self> {
        let problems = config.problems_for(listen);
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let credentials = config.auth.as_ref().map(|a| a.load(base_dir)).transpose()?;
        let tls = config
            .tls
            .as_ref()
            .map(|t| t.acceptor(base_dir))
            .transpose()?;
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|e| Error::io(format!("listening on {listen}"), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring the listener", e))?;
        Ok(Self {
            listener,
            tls,
            shared: Arc::new(Shared {
                credentials,
                header_read_timeout: config.header_read_timeout,
                body_read_timeout: config.body_read_timeout,
                connections: Arc::new(Semaphore::new(config.max_connections)),
                requests: Arc::new(Semaphore::new(config.max_concurrent_requests)),
                rate: ClientRateLimiter::new(config.rate_limit),
                counters: Counters::default(),
            }),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("reading the listener's address", e))
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The future that serves `router` until `shutdown` is cancelled; call from inside a
    /// tokio runtime, then spawn or await it. On shutdown it stops accepting, lets requests
    /// in flight finish (up to `header_read_timeout`), then drops every connection — and
    /// with them the router. Refusals are counted as gauges of `stage`, when given.
    pub fn serve(
        self,
        router: axum::Router,
        shutdown: CancellationToken,
        stage: Option<Arc<StageMetrics>>,
    ) -> Result<impl Future<Output = ()> + Send + 'static> {
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .map_err(|e| Error::io("registering the listener", e))?;
        let mut shared = self.shared;
        if let Some(s) = Arc::get_mut(&mut shared) {
            s.counters.stage = stage;
            s.counters.publish();
        }
        Ok(accept_loop(listener, router, shared, self.tls, shutdown))
    }
}

/// Written to a connection over `max_connections` before closing it.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            shared.counters.bump(&shared.counters.refused_connections);
            // Best effort and never blocking: the answer fits the socket's send buffer.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let (router, shared, tls) = (router.clone(), shared.clone(), tls.clone());
        connections.spawn(async move {
            let _permit = permit;
            let timeout = shared.header_read_timeout;
            let service = {
                let shared = shared.clone();
                hyper::service::service_fn(move |request| {
                    guard(request, remote, router.clone(), shared.clone())
                })
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .keep_alive(true);
            let served = match tls {
                None => {
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    else {
                        return; // no handshake in time, or a failed one
                    };
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(client = %remote, "connection closed: {e}");
            }
        });
    }
    drop(listener);
    let grace = shared.header_read_timeout;
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
    connections.shutdown().await;
}

/// Rate limit, authentication, concurrency limit and body deadline around one request.
async fn guard(
    mut request: Request<hyper::body::Incoming>,
    remote: SocketAddr,
    router: axum::Router,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let counters = &shared.counters;
    if let Err(wait) = shared.rate.check(remote.ip(), Instant::now()) {
        counters.bump(&counters.rate_limited);
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Ok(refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded",
            &[(header::RETRY_AFTER, seconds.to_string())],
        ));
    }
    if let Some(credentials) = &shared.credentials
        && !credentials.allows(request.headers())
    {
        counters.bump(&counters.unauthorized);
        let challenges: Vec<_> = credentials
            .challenges()
            .iter()
            .map(|c| (header::WWW_AUTHENTICATE, (*c).to_owned()))
            .collect();
        return Ok(refusal(
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials",
            &challenges,
        ));
    }
    let Ok(_permit) = shared.requests.clone().try_acquire_owned() else {
        counters.bump(&counters.overloaded);
        return Ok(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in progress",
            &[(header::RETRY_AFTER, "1".into())],
        ));
    };
    request.extensions_mut().insert(ConnectInfo(remote));
    let request = request.map(|body| Body::new(DeadlineBody::new(body, shared.body_read_timeout)));
    let mut router = router;
    tower_service::Service::call(&mut router, request).await
}

fn refusal(
    status: StatusCode,
    message: &'static str,
    headers: &[(header::HeaderName, String)],
) -> Response<Body> {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            response.headers_mut().append(name.clone(), v);
        }
    }
    response
}

/// A request body that fails once its deadline passes: a client sending its body slowly
/// cannot hold a request (and its permit) open.
struct DeadlineBody {
    inner: hyper::body::Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: hyper::body::Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within body_read_timeout")]
struct BodyTimeout;

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_without_auth_is_refused_unless_allowed() {
        let open: SocketAddr = "0.0.0.0:9201".parse().unwrap();
        let problems = ServerConfig::default().problems_for(open);
        assert_eq!(problems.0.len(), 1);
        assert_eq!(problems.0[0].path, "auth");
        assert!(
            ServerConfig::default()
                .problems_for("127.0.0.1:9201".parse().unwrap())
                .is_empty()
        );
        assert!(
            ServerConfig::default()
                .problems_for("[::1]:9201".parse().unwrap())
                .is_empty()
        );
        let allowed = ServerConfig {
            allow_unauthenticated: true,
            ..ServerConfig::default()
        };
        assert!(allowed.problems_for(open).is_empty());
        let authed = ServerConfig {
            auth: Some(AuthConfig {
                token_env: Some("T".into()),
                token_file: None,
                username: None,
            }),
            ..ServerConfig::default()
        };
        assert!(authed.problems_for(open).is_empty());
        assert!(HttpServer::bind(open, &ServerConfig::default(), Path::new(".")).is_err());
    }

    #[test]
    fn the_table_parses_with_defaults_and_checks_its_values() {
        let config: ServerConfig = toml::from_str(
            "header_read_timeout = \"2s\"\nrate_limit = { requests_per_second = 5.0 }\n\
             auth = { token_env = \"RW_TOKEN\", username = \"prom\" }",
        )
        .unwrap();
        assert_eq!(config.header_read_timeout, Duration::from_secs(2));
        assert_eq!(config.rate_limit.burst, RateLimitConfig::default().burst);
        assert_eq!(config.max_connections, 256);
        assert!(toml::from_str::<ServerConfig>("max_conections = 1").is_err());
        let zero = ServerConfig {
            max_connections: 0,
            body_read_timeout: Duration::ZERO,
            ..ServerConfig::default()
        };
        let paths: Vec<_> = zero
            .problems_for("127.0.0.1:1".parse().unwrap())
            .0
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(paths, ["body_read_timeout", "max_connections"]);
    }
}
