//! Receivers: where notifications go — HTTP (generic webhook, Alertmanager, Slack,
//! PagerDuty), Redis, Kafka, standard output and guarded commands ([`command`]), one module
//! per kind, each with its settings (`[[decision.receiver]]`, see [`ReceiverConfig`]) and the
//! checks of those settings.
//!
//! A receiver only delivers; retries, timeouts, rate limits, the circuit breaker and
//! idempotency are the engine's ([`super::guard`]), the same for every receiver. A receiver
//! classifies its failures ([`DeliveryError`]) so the engine knows whether to try again.

pub mod alertmanager;
pub mod command;
mod config;
pub mod http;
pub mod kafka;
pub mod log;
pub mod pagerduty;
pub mod redis;
pub mod slack;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use self::config::{GuardConfig, ReceiverConfig, ReceiverKind, ReceiverSettings};
pub use self::http::HttpReceiver;
#[cfg(feature = "kafka")]
pub use self::kafka::KafkaReceiver;
pub use self::log::LogReceiver;
#[cfg(feature = "redis")]
pub use self::redis::RedisReceiver;
use super::Notification;

/// How a delivery failed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryError {
    /// What happened.
    pub message: String,
    /// Whether trying again may succeed (timeouts, 5xx, 429, a dropped connection).
    pub retryable: bool,
    /// How long the receiver asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl DeliveryError {
    /// A failure that will fail again.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }

    /// A failure worth another try.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            retry_after: None,
        }
    }
}

/// How a receiver's executions are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionMode {
    /// Only record what would be done.
    DryRun,
    /// Record it as a suggestion a person confirms (through the API or chat, later).
    Suggest,
    /// Do it.
    #[default]
    Auto,
}

/// Delivers notifications somewhere. See the [module docs](self).
pub trait Receiver: Send + Sync + fmt::Debug {
    /// The kind, e.g. `slack`.
    fn kind(&self) -> &'static str;

    /// Where it delivers, with any secret masked, for the audit log.
    fn target(&self) -> String;

    /// Whether executions change the world (a remediation): then one runs at most once per
    /// firing episode of a group, and never for resolved alerts or notices.
    fn is_remediation(&self) -> bool {
        false
    }

    /// Dry run, suggestion or execution.
    fn mode(&self) -> ExecutionMode {
        ExecutionMode::Auto
    }

    /// What an execution of `n` would do (a command's argv, say), or why it must not run
    /// (a parameter that fails validation). Called before every execution and for dry runs.
    fn prepare(&self, n: &Notification) -> Result<Value, String> {
        let _ = n;
        Ok(Value::Null)
    }

    /// Delivers `n`; on success, a short description of what happened (e.g. `HTTP 202`).
    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>>;
}

/// The pipeline's Redis connection, where the build has Redis.
#[cfg(feature = "redis")]
pub(crate) type PipelineRedis = crate::redis::RedisConnection;
/// The pipeline's Redis connection, where the build has Redis.
#[cfg(not(feature = "redis"))]
pub(crate) type PipelineRedis = ();

/// What building a receiver needs besides its own settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BuildContext<'a> {
    /// The receiver's `timeout` (clients and commands enforce it too).
    pub(crate) timeout: Duration,
    /// `[decision] external_url`.
    pub(crate) external_url: &'a str,
    /// `[decision] allowed_commands`.
    pub(crate) allowed_commands: &'a [PathBuf],
    /// The pipeline's `[redis]` connection, if any.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) redis: Option<&'a PipelineRedis>,
}

/// A built receiver, or why its settings cannot work.
pub(crate) type Built = Result<Box<dyn Receiver>, String>;
