//! The crate's error type.

use std::fmt;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside `smartcloudops-core`.
///
/// Bad *records* are not errors of this kind: they are dead-lettered and counted
/// (see [`crate::dead_letter`]). An `Error` means a stage or a connector failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A batch did not have the columns or types a stage requires.
    #[error("schema mismatch in {stage}: {message}")]
    Schema {
        /// The stage that rejected the batch.
        stage: String,
        /// What was expected and what was found.
        message: String,
    },
    /// An Arrow kernel or builder failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Reading or writing a file, socket or stream failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `opening /var/data/x.jsonl`.
        context: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The pipeline configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigErrors),
    /// An action failed to deliver its effect.
    #[error("action `{action}` failed: {message}")]
    Action {
        /// The action's name.
        action: String,
        /// Why it failed.
        message: String,
        /// Whether a later attempt may succeed (timeouts, 5xx, 429).
        retryable: bool,
    },
    /// A connector (Kafka, Redis …) failed.
    #[error("{connector}: {message}")]
    Connector {
        /// Which connector.
        connector: String,
        /// What failed.
        message: String,
    },
    /// A `sql` prep stage's query failed on a batch (a failed cast, say).
    #[error("sql: {0}")]
    Sql(String),
    /// The dead-letter output could not take a record; the pipeline must not pretend it did.
    #[error("dead-letter output failed: {0}")]
    DeadLetter(String),
    /// A pipeline task panicked or was aborted.
    #[error("pipeline task failed: {0}")]
    Task(String),
    /// A detector snapshot could not be written or restored.
    #[error("detector snapshot: {0}")]
    Snapshot(String),
}

impl Error {
    /// Builds an [`Error::Io`] with a short description of what was being done.
    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }

    /// Builds an [`Error::Schema`].
    pub fn schema(stage: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Schema {
            stage: stage.into(),
            message: message.into(),
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            Error::Action { retryable, .. } => *retryable,
            _ => false,
        }
    }
}
