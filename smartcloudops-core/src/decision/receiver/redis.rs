//! `type = "redis"`: publish to a channel or append to a stream, as JSON.

#[cfg(feature = "redis")]
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{BuildContext, Built};
#[cfg(feature = "redis")]
use super::{DeliveryError, Receiver};
#[cfg(feature = "redis")]
use crate::decision::Notification;

/// `type = "redis"` settings: exactly one of `channel` and `stream`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// The channel to publish to.
    pub channel: Option<String>,
    /// The stream to append to.
    pub stream: Option<String>,
    /// A connection of its own (else the pipeline's `[redis]`).
    #[cfg(feature = "redis")]
    pub redis: Option<crate::redis::RedisConnection>,
}

impl RedisConfig {
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        #[cfg(feature = "redis")]
        {
            if self.channel.is_some() == self.stream.is_some() {
                return Err("set exactly one of `channel` and `stream`".into());
            }
            let connection = self
                .redis
                .clone()
                .or_else(|| ctx.redis.cloned())
                .unwrap_or_default();
            Ok(Box::new(RedisReceiver::new(
                connection,
                self.channel.clone(),
                self.stream.clone(),
            )))
        }
        #[cfg(not(feature = "redis"))]
        Err("this build has no Redis support".into())
    }
}

/// Publishes notifications to Redis (a channel or a stream), as JSON.
#[cfg(feature = "redis")]
#[derive(Debug)]
pub struct RedisReceiver {
    connection: crate::redis::LazyConnection,
    channel: Option<String>,
    stream: Option<String>,
    target: String,
}

#[cfg(feature = "redis")]
impl RedisReceiver {
    pub(crate) fn new(
        connection: crate::redis::RedisConnection,
        channel: Option<String>,
        stream: Option<String>,
    ) -> Self {
        let target = format!(
            "{} {}",
            connection.redacted_url(),
            channel.as_deref().or(stream.as_deref()).unwrap_or_default()
        );
        Self {
            connection: crate::redis::LazyConnection::new(connection),
            channel,
            stream,
            target,
        }
    }
}

#[cfg(feature = "redis")]
impl Receiver for RedisReceiver {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let body =
                serde_json::to_string(n).map_err(|e| DeliveryError::permanent(e.to_string()))?;
            let mut con = self
                .connection
                .get()
                .await
                .map_err(|e| DeliveryError::transient(e.to_string()))?;
            let transient = |e: redis::RedisError| DeliveryError {
                retryable: e.is_io_error() || e.is_timeout() || e.is_connection_dropped(),
                message: e.to_string(),
                retry_after: None,
            };
            if let Some(channel) = &self.channel {
                let n: i64 = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(&body)
                    .query_async(&mut con)
                    .await
                    .map_err(transient)?;
                return Ok(format!("published to {n} subscribers"));
            }
            let stream = self.stream.as_deref().unwrap_or_default();
            let id: String = redis::cmd("XADD")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("data")
                .arg(&body)
                .query_async(&mut con)
                .await
                .map_err(transient)?;
            Ok(format!("appended {id}"))
        })
    }
}
