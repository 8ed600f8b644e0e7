//! Redis sinks: publish alerts (or every scored row) to a pub/sub channel or append them to a
//! stream.
//!
//! - **`redis_publish`** sends each event as one `PUBLISH`, the CloudEvents attributes in the
//!   JSON body (structured mode). Pub/sub is fire-and-forget: a message published while no
//!   one subscribes is gone; the number of such messages is kept by
//!   [`RedisPublish::unheard`]. Use `redis_stream` when receivers must not miss events.
//! - **`redis_stream`** appends each event with `XADD … MAXLEN ~ N`, the attributes as `ce_*`
//!   fields and the body in `data` (binary mode, like the Kafka sink's headers), so the
//!   stream stays about `maxlen` entries long.
//!
//! Both pipeline every event of a batch in one round trip (in chunks) on a connection that
//! reconnects by itself, and complete only when Redis answered every command: a failure fails
//! the action, which nacks the batch.
//!
//! The result cache, the third Redis action, is [`super::redis_cache::ResultCache`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Action, ActionConfig, ActionInput, Event, SinkPayload};
use crate::component::{BuildContext, ComponentConfig};
use crate::error::{Error, Problems, Result};
use crate::redis::{LazyConnection, RedisConnection};

/// Events per pipelined round trip.
const CHUNK: usize = 1000;

fn default_ce_source() -> String {
    "smartcloudops".to_owned()
}

/// `[[action]] type = "redis_publish"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisPublishConfig {
    /// The connection; without it, the pipeline's `[redis]` section (or the default).
    #[serde(default)]
    pub redis: Option<RedisConnection>,
    /// Channel to publish to.
    pub channel: String,
    /// Alerts only, or every scored row.
    #[serde(default)]
    pub payload: SinkPayload,
    /// The CloudEvents `source` attribute.
    #[serde(default = "default_ce_source")]
    pub event_source: String,
}

impl RedisPublishConfig {
    /// A sink of alerts to `channel` with defaults.
    pub fn new(channel: impl Into<String>) -> Self {
        Self {
            redis: None,
            channel: channel.into(),
            payload: SinkPayload::Alerts,
            event_source: default_ce_source(),
        }
    }
}

/// Publishes to a Redis pub/sub channel. See the [module docs](self).
#[derive(Debug)]
pub struct RedisPublish {
    config: RedisPublishConfig,
    connection: LazyConnection,
    unheard: AtomicU64,
}

impl RedisPublish {
    /// A sink for `config`, connecting through `connection` unless the config has its own.
    pub fn new(config: RedisPublishConfig, connection: RedisConnection) -> Self {
        let connection = LazyConnection::new(config.redis.clone().unwrap_or(connection));
        Self {
            config,
            connection,
            unheard: AtomicU64::new(0),
        }
    }

    /// Messages published while no client subscribed to the channel (Redis dropped them).
    pub fn unheard(&self) -> u64 {
        self.unheard.load(Ordering::Relaxed)
    }
}

impl Action for RedisPublish {
    fn name(&self) -> &str {
        "redis_publish"
    }

    fn wants_every_batch(&self) -> bool {
        self.config.payload == SinkPayload::Scored
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        let config = &self.config;
        Box::pin(send(
            &self.connection,
            input,
            config.payload,
            self.name(),
            &config.channel,
            |pipe, event, ce_type| {
                pipe.cmd("PUBLISH")
                    .arg(&config.channel)
                    .arg(event.structured(ce_type, &config.event_source));
            },
            |receivers: Vec<u64>| {
                let unheard = receivers.iter().filter(|&&n| n == 0).count() as u64;
                if unheard > 0 {
                    self.unheard.fetch_add(unheard, Ordering::Relaxed);
                    tracing::debug!(
                        channel = %config.channel,
                        unheard,
                        "published with no subscriber listening"
                    );
                }
            },
        ))
    }
}

/// `[[action]] type = "redis_stream"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamSinkConfig {
    /// The connection; without it, the pipeline's `[redis]` section (or the default).
    #[serde(default)]
    pub redis: Option<RedisConnection>,
    /// Stream to append to (created by the first append).
    pub stream: String,
    /// Approximate length the stream is trimmed to (`MAXLEN ~`); 0 never trims.
    #[serde(default = "default_maxlen")]
    pub maxlen: usize,
    /// Alerts only, or every scored row.
    #[serde(default)]
    pub payload: SinkPayload,
    /// The CloudEvents `source` attribute.
    #[serde(default = "default_ce_source")]
    pub event_source: String,
}

fn default_maxlen() -> usize {
    100_000
}

impl RedisStreamSinkConfig {
    /// A sink of alerts to `stream` with defaults.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            redis: None,
            stream: stream.into(),
            maxlen: default_maxlen(),
            payload: SinkPayload::Alerts,
            event_source: default_ce_source(),
        }
    }
}

/// Appends to a Redis stream. See the [module docs](self).
#[derive(Debug)]
pub struct RedisStreamSink {
    config: RedisStreamSinkConfig,
    connection: LazyConnection,
}

impl RedisStreamSink {
    /// A sink for `config`, connecting through `connection` unless the config has its own.
    pub fn new(config: RedisStreamSinkConfig, connection: RedisConnection) -> Self {
        let connection = LazyConnection::new(config.redis.clone().unwrap_or(connection));
        Self { config, connection }
    }
}

impl Action for RedisStreamSink {
    fn name(&self) -> &str {
        "redis_stream"
    }

    fn wants_every_batch(&self) -> bool {
        self.config.payload == SinkPayload::Scored
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        let config = &self.config;
        Box::pin(send(
            &self.connection,
            input,
            config.payload,
            self.name(),
            &config.stream,
            |pipe, event, ce_type| {
                let cmd = pipe.cmd("XADD").arg(&config.stream);
                if config.maxlen > 0 {
                    cmd.arg("MAXLEN").arg("~").arg(config.maxlen);
                }
                cmd.arg("*")
                    .arg("ce_specversion")
                    .arg("1.0")
                    .arg("ce_id")
                    .arg(&event.id)
                    .arg("ce_source")
                    .arg(&config.event_source)
                    .arg("ce_type")
                    .arg(ce_type)
                    .arg("ce_time")
                    .arg(&event.time)
                    .arg("content-type")
                    .arg("application/json")
                    .arg("key")
                    .arg(&event.key)
                    .arg("data")
                    .arg(event.body.as_slice())
                    .ignore();
            },
            |()| {},
        ))
    }
}

/// The body both sinks share: the batch's events as `payload`, one command each (added by
/// `command`, given the CloudEvents type), pipelined in chunks on the shared connection;
/// `answered` sees each chunk's replies. Fails on the first chunk Redis did not take.
async fn send<T: redis::FromRedisValue>(
    connection: &LazyConnection,
    input: &ActionInput,
    payload: SinkPayload,
    action: &str,
    target: &str,
    command: impl Fn(&mut redis::Pipeline, &Event, &'static str),
    mut answered: impl FnMut(T),
) -> Result<()> {
    let events = Event::from_input(input, payload, action)?;
    if events.is_empty() {
        return Ok(());
    }
    let ce_type = payload.ce_type();
    let mut con = connection.get().await?;
    for chunk in events.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for event in chunk {
            command(&mut pipe, event, ce_type);
        }
        let replies: T = pipe
            .query_async(&mut con)
            .await
            .map_err(|e| sink_error(action, target, e))?;
        answered(replies);
    }
    Ok(())
}

fn sink_error(action: &str, target: &str, e: redis::RedisError) -> Error {
    // Retryable, whatever Redis answered: the commands' shape never depends on the batch, so
    // a refusal (a key of the wrong type, OOM, a read-only replica) is the destination's
    // state, not the batch's fault. The input must wait for an operator, not be poisoned:
    // a permanent error would dead-letter every good batch behind it.
    Error::Action {
        action: action.into(),
        message: format!("sending to {target}: {e}"),
        retryable: true,
    }
}

/// The checks both Redis sinks make: their own connection, if they have one, and a target.
fn sink_problems(redis: Option<&RedisConnection>, field: &str, target: &str) -> Problems {
    let mut p = Problems::new();
    if let Some(redis) = redis {
        p.extend_at("redis", redis.problems());
    }
    p.check(!target.trim().is_empty(), field, "must not be empty", "");
    p
}

/// Both sinks are built the same way: checked by [`sink_problems`], given the shared
/// `[redis]` connection unless they name their own.
macro_rules! redis_sink_kind {
    ($config:ty, $sink:ident, $target:ident) => {
        impl ComponentConfig for $config {
            fn problems(&self) -> Problems {
                sink_problems(self.redis.as_ref(), stringify!($target), &self.$target)
            }
        }

        impl ActionConfig for $config {
            fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn Action>> {
                Ok(Arc::new($sink::new(self.clone(), ctx.redis_connection())))
            }
        }
    };
}

redis_sink_kind!(RedisPublishConfig, RedisPublish, channel);
redis_sink_kind!(RedisStreamSinkConfig, RedisStreamSink, stream);
