//! Redis pub/sub source: subscribes to channels and patterns (`[source] type = "redis_pubsub"`).
//!
//! **Pub/sub is fire-and-forget.** Redis delivers a message to whoever subscribes at that
//! moment and keeps nothing: messages published while this source is disconnected, or while
//! Redis disconnects it for falling behind (`client-output-buffer-limit pubsub`), are lost,
//! and an acknowledgement cannot make Redis send anything again. Use the
//! [Streams source](super::redis_stream) when every record matters.
//!
//! What this source does about it:
//!
//! - **Reconnects** after a lost connection (a Redis restart, `CLIENT KILL`, a network
//!   failure) with exponential backoff from `reconnect_backoff` up to 5 s, and subscribes
//!   again to every channel and pattern.
//! - **Counts what may have been missed**, as far as it can be known, as gauges of the source
//!   stage: `redis_reconnects_total` (each a window in which messages may have been lost),
//!   `redis_disconnected_seconds_total` (how long those windows lasted) and
//!   `redis_lost_rows_total` (rows of batches the pipeline nacked: they cannot be
//!   redelivered). Messages published while no one listened are visible to the publisher
//!   (`PUBLISH` answers 0 receivers; the `redis_publish` sink counts them).
//! - **Dead-letters** records it cannot decode, with the channel as their origin, like every
//!   source.
//!
//! Each message is a payload in `format` (JSON lines or CSV, possibly several records).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Source, SourceBatch, SourceConfig, SourceContext, SourceStream, check_batch_size,
    spawn_watched, stream_from,
};
use crate::ack::Ack;
use crate::component::{BuildContext, ComponentConfig};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::{CsvOptions, Decoder, Format, Reject};
use crate::error::{Problems, Result};
use crate::metrics::StageMetrics;
use crate::redis::RedisConnection;
use crate::schema::MetricsBatchBuilder;

/// Configuration of a [`RedisPubSubSource`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisPubSubSourceConfig {
    /// The connection; without it, the pipeline's `[redis]` section (or the default).
    #[serde(default)]
    pub redis: Option<RedisConnection>,
    /// Channels to subscribe to.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Glob-style patterns to subscribe to (`PSUBSCRIBE`), e.g. `metrics.*`.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Payload format of the messages.
    #[serde(default)]
    pub format: Format,
    /// CSV options (`format = "csv"`).
    #[serde(default)]
    pub csv: CsvOptions,
    /// What one record may hold (line length, labels, label sizes): over-limit records are
    /// dead-lettered with the limit's name. See [`DecodeLimits`](crate::decode::DecodeLimits).
    #[serde(default)]
    pub limits: crate::decode::DecodeLimits,
    /// Rows per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait to fill a batch.
    #[serde(default = "default_batch_timeout", with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// First wait before reconnecting; doubles per failed attempt, up to 5 s.
    #[serde(default = "default_reconnect_backoff", with = "humantime_serde")]
    pub reconnect_backoff: Duration,
}

fn default_batch_size() -> usize {
    1024
}
fn default_batch_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_reconnect_backoff() -> Duration {
    Duration::from_millis(100)
}

/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl RedisPubSubSourceConfig {
    /// A source of `channels` with defaults.
    pub fn new(channels: Vec<String>) -> Self {
        Self {
            limits: crate::decode::DecodeLimits::default(),
            redis: None,
            channels,
            patterns: Vec::new(),
            format: Format::Json,
            csv: CsvOptions::default(),
            batch_size: default_batch_size(),
            batch_timeout: default_batch_timeout(),
            reconnect_backoff: default_reconnect_backoff(),
        }
    }
}

/// Subscribes to Redis pub/sub. See the [module docs](self).
#[derive(Debug)]
pub struct RedisPubSubSource {
    config: RedisPubSubSourceConfig,
    connection: RedisConnection,
}

impl RedisPubSubSource {
    /// A source for `config`, connecting through `connection` unless the config has its own.
    pub fn new(config: RedisPubSubSourceConfig, connection: RedisConnection) -> Self {
        let connection = config.redis.clone().unwrap_or(connection);
        Self { config, connection }
    }
}

impl Source for RedisPubSubSource {
    fn name(&self) -> &str {
        "redis_pubsub"
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        let client = self.connection.client()?;
        let (tx, rx) = mpsc::channel(1);
        let task = Subscriber {
            decoder: self
                .config
                .format
                .decoder_with_limits(self.config.csv.clone(), self.config.limits),
            builder: MetricsBatchBuilder::with_capacity(self.config.batch_size),
            rejects: Vec::new(),
            counters: Arc::new(Counters::new(ctx.dead_letters.stage().clone())),
            client,
            url: self.connection.redacted_url(),
            connect_timeout: self.connection.connect_timeout,
            config: self.config,
            dead_letters: ctx.dead_letters,
            shutdown: ctx.shutdown,
            tx: tx.clone(),
        };
        spawn_watched(&ctx.tasks, "redis", "subscriber", task.run(), tx);
        Ok(stream_from(rx))
    }
}

/// The counters behind the source's gauges.
#[derive(Debug)]
struct Counters {
    stage: Arc<StageMetrics>,
    reconnects: AtomicU64,
    disconnected_ms: AtomicU64,
    lost_rows: AtomicU64,
}

impl Counters {
    fn new(stage: Arc<StageMetrics>) -> Self {
        let counters = Self {
            stage,
            reconnects: AtomicU64::new(0),
            disconnected_ms: AtomicU64::new(0),
            lost_rows: AtomicU64::new(0),
        };
        counters.publish();
        counters
    }

    fn publish(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        self.stage
            .set_gauge("redis_reconnects_total", &[], get(&self.reconnects));
        self.stage.set_gauge(
            "redis_disconnected_seconds_total",
            &[],
            get(&self.disconnected_ms) / 1000.0,
        );
        self.stage
            .set_gauge("redis_lost_rows_total", &[], get(&self.lost_rows));
    }
}

/// Why reading from one connection ended.
enum Ended {
    Shutdown,
    ConnectionLost,
}

struct Subscriber {
    config: RedisPubSubSourceConfig,
    client: redis::Client,
    url: String,
    connect_timeout: Duration,
    decoder: Box<dyn Decoder>,
    builder: MetricsBatchBuilder,
    rejects: Vec<Reject>,
    counters: Arc<Counters>,
    dead_letters: DeadLetterQueue,
    shutdown: CancellationToken,
    tx: mpsc::Sender<Result<SourceBatch>>,
}

impl Subscriber {
    async fn run(mut self) {
        let mut backoff = self.config.reconnect_backoff;
        let mut down_since: Option<Instant> = None;
        let mut attempts = 0u32;
        loop {
            let tx = self.tx.clone();
            let connected = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tx.closed() => return, // the pipeline stopped taking batches
                c = tokio::time::timeout(self.connect_timeout * 2, self.subscribe()) => {
                    c.unwrap_or_else(|_| Err(crate::error::Error::Connector {
                        connector: "redis".into(),
                        message: "subscribing timed out".into(),
                    }))
                }
            };
            let pubsub = match connected {
                Ok(p) => p,
                Err(e) => {
                    attempts += 1;
                    self.dead_letters.stage().record_error();
                    // The first failure is news; the rest of an outage is noise.
                    if attempts == 1 {
                        tracing::warn!(url = %self.url, "redis pub/sub: cannot subscribe: {e}");
                    } else {
                        tracing::debug!(url = %self.url, attempts, "redis pub/sub: {e}");
                    }
                    down_since.get_or_insert_with(Instant::now);
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if let Some(since) = down_since.take() {
                let blind = since.elapsed();
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .disconnected_ms
                    .fetch_add(blind.as_millis() as u64, Ordering::Relaxed);
                self.counters.publish();
                tracing::info!(
                    url = %self.url,
                    after_ms = blind.as_millis() as u64,
                    "redis pub/sub: subscribed again; messages published meanwhile are lost"
                );
            }
            attempts = 0;
            backoff = self.config.reconnect_backoff;
            let ended = self.pump(pubsub).await;
            if tx.is_closed() {
                return;
            }
            match ended {
                Ended::Shutdown => return,
                Ended::ConnectionLost => {
                    tracing::warn!(url = %self.url, "redis pub/sub: connection lost, reconnecting");
                    down_since = Some(Instant::now());
                }
            }
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub> {
        let err = |e| crate::redis::error("subscribing", e);
        let mut pubsub = tokio::time::timeout(self.connect_timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| crate::error::Error::Connector {
                connector: "redis".into(),
                message: format!("connecting to {}: timed out", self.url),
            })?
            .map_err(err)?;
        if !self.config.channels.is_empty() {
            pubsub.subscribe(&self.config.channels).await.map_err(err)?;
        }
        if !self.config.patterns.is_empty() {
            pubsub
                .psubscribe(&self.config.patterns)
                .await
                .map_err(err)?;
        }
        Ok(pubsub)
    }

    /// Reads messages into batches until the connection ends or the pipeline shuts down.
    async fn pump(&mut self, pubsub: redis::aio::PubSub) -> Ended {
        let mut messages = pubsub.into_on_message();
        let mut deadline: Option<Instant> = None;
        loop {
            let tx = self.tx.clone();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.flush().await;
                    return Ended::Shutdown;
                }
                _ = tx.closed() => return Ended::Shutdown,
                message = messages.next() => match message {
                    Some(message) => {
                        self.decode(&message);
                        if self.builder.len() >= self.config.batch_size {
                            self.flush().await;
                            deadline = None;
                        } else if deadline.is_none() && !self.builder.is_empty() {
                            deadline = Some(Instant::now() + self.config.batch_timeout);
                        }
                    }
                    None => {
                        self.flush().await;
                        return Ended::ConnectionLost;
                    }
                },
                _ = sleep_until(deadline) => {
                    self.flush().await;
                    deadline = None;
                }
            }
        }
    }

    fn decode(&mut self, message: &redis::Msg) {
        self.rejects.clear();
        self.decoder.decode(
            message.get_payload_bytes(),
            &mut self.builder,
            &mut self.rejects,
        );
        for reject in self.rejects.drain(..) {
            let origin = format!("{}#{}", message.get_channel_name(), reject.record);
            if let Err(e) = self.dead_letters.send(origin, reject.reason, reject.raw) {
                // Nothing can be nacked upstream: pub/sub has no redelivery.
                tracing::error!(
                    "redis pub/sub: a record was neither decoded nor dead-lettered: {e}"
                );
            }
        }
    }

    async fn flush(&mut self) {
        if self.builder.is_empty() {
            return;
        }
        let batch = self.builder.finish();
        let rows = batch.num_rows() as u64;
        let counters = self.counters.clone();
        let ack = Ack::new(move |outcome| {
            if let crate::ack::AckOutcome::Nacked(reason) = outcome {
                counters.lost_rows.fetch_add(rows, Ordering::Relaxed);
                counters.publish();
                tracing::error!(
                    rows,
                    "redis pub/sub: batch failed ({reason}); pub/sub cannot redeliver it"
                );
            }
        });
        // Waiting here is the backpressure: meanwhile messages queue in the client.
        let _ = self.tx.send(Ok(SourceBatch::new(batch, ack))).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => futures::future::pending().await,
    }
}

impl ComponentConfig for RedisPubSubSourceConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.extend_at("limits", self.limits.problems());
        if let Some(redis) = &self.redis {
            p.extend_at("redis", redis.problems());
        }
        p.check(
            !self.channels.is_empty() || !self.patterns.is_empty(),
            "channels",
            "subscribe to at least one channel or pattern",
            "e.g. channels = [\"metrics\"] or patterns = [\"metrics.*\"]",
        );
        check_batch_size(&mut p, self.batch_size, "");
        p
    }

    fn summary(&self, ctx: &BuildContext) -> String {
        let url = self.redis.clone().unwrap_or_else(|| ctx.redis_connection());
        let mut subs = self.channels.clone();
        subs.extend(self.patterns.iter().cloned());
        format!("redis pub/sub {} ({})", url.redacted_url(), subs.join(","))
    }
}

impl SourceConfig for RedisPubSubSourceConfig {
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(RedisPubSubSource::new(
            self.clone(),
            ctx.redis_connection(),
        )))
    }
}
