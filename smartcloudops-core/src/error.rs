//! The crate's error type, and the problems a configuration check reports.

use std::fmt;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside `smartcloudops-core`.
///
/// Bad *records* are not errors of this kind: they are dead-lettered and counted
/// (see the `dead_letter` module). An `Error` means a stage or a connector failed.
///
/// **Retryable or permanent** ([`Error::is_retryable`]). A batch that failed with a
/// retryable error is delivered again until it succeeds; one that failed with a permanent
/// error may be dead-lettered after a few attempts. The rule:
///
/// - `Action`: as the action says (`retryable`: timeouts, 5xx, 429 are; a 4xx is not).
/// - `Io`, `Connector`, `DeadLetter`, `Task`, `Snapshot`: retryable. They come from the
///   world around the batch (a service, a disk, a task), which may recover.
/// - `Schema`, `Arrow`, `Sql`, `Config`: permanent. They come from the batch or the
///   configuration: a bad batch stays bad.
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
    Config(#[from] Problems),
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

    /// Whether retrying the same operation later may succeed: the failure lies outside the
    /// data (a service down or slow, a full disk, a task that died) rather than in it. See
    /// the rule on [`Error`]; a batch nacked with a non-retryable error may be dead-lettered
    /// by its source after a few attempts, so only what a bad batch causes is permanent.
    pub fn is_retryable(&self) -> bool {
        // No wildcard: a new variant must be classified here.
        match self {
            Error::Action { retryable, .. } => *retryable,
            Error::Io { .. }
            | Error::Connector { .. }
            | Error::DeadLetter(_)
            | Error::Task(_)
            | Error::Snapshot(_) => true,
            Error::Schema { .. } | Error::Arrow(_) | Error::Sql(_) | Error::Config(_) => false,
        }
    }
}

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `source.batch_size` or `action[1].path`; empty for
    /// errors about the file as a whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub hint: Option<String>,
}

impl ConfigError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            hint: None,
        }
    }

    /// The same problem with a hint on how to fix it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        match &self.hint {
            // A quoted source line with a caret under the fault reads best as it is.
            Some(hint) if hint.contains('\n') => write!(f, "\n{hint}")?,
            Some(hint) => write!(f, " (hint: {hint})")?,
            None => {}
        }
        Ok(())
    }
}

/// Every problem a configuration check found, each with its field path and, where one
/// helps, a hint. Checks collect problems rather than stopping at the first, so a user
/// fixes a file in one pass.
///
/// A component reports paths relative to its own table (`batch_size`); whoever holds the
/// component prefixes them ([`Problems::extend_at`]) into `source.batch_size`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<ConfigError>);

/// [`Problems`] returned as an error: the name the configuration API has always used.
pub type ConfigErrors = Problems;

impl Problems {
    /// No problems yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(path, message));
    }

    /// Records a problem at `path` with a hint on how to fix it.
    pub fn push_hint(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.0.push(ConfigError::new(path, message).hint(hint));
    }

    /// Records `error`.
    pub fn add(&mut self, error: ConfigError) {
        self.0.push(error);
    }

    /// Records a problem at `path` unless `ok`; an empty `hint` adds none.
    pub fn check(
        &mut self,
        ok: bool,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: &str,
    ) {
        if !ok {
            let mut e = ConfigError::new(path, message);
            if !hint.is_empty() {
                e = e.hint(hint);
            }
            self.0.push(e);
        }
    }

    /// Records `message` at `field` unless `ok`, and hands the list on (for chains of checks).
    pub fn require(mut self, ok: bool, field: &str, message: impl Into<String>) -> Self {
        self.check(ok, field, message, "");
        self
    }

    /// A weight: in `(0, 1]`.
    pub fn weight(self, field: &str, value: f64) -> Self {
        let ok = value > 0.0 && value <= 1.0;
        self.require(ok, field, format!("must be in (0, 1], got {value}"))
    }

    /// A positive, finite number.
    pub fn positive(self, field: &str, value: f64) -> Self {
        let ok = value > 0.0 && value.is_finite();
        self.require(ok, field, format!("must be positive, got {value}"))
    }

    /// Zero or a positive, finite number.
    pub fn non_negative(self, field: &str, value: f64) -> Self {
        let ok = value >= 0.0 && value.is_finite();
        self.require(ok, field, format!("must be 0 or positive, got {value}"))
    }

    /// A count within `range`.
    pub fn within(self, field: &str, value: u32, range: std::ops::RangeInclusive<u32>) -> Self {
        let message = format!(
            "must be between {} and {}, got {value}",
            range.start(),
            range.end()
        );
        self.require(range.contains(&value), field, message)
    }

    /// Records every problem of `other` with `prefix.` before its path (`prefix` alone for
    /// a problem about the whole table).
    pub fn extend_at(&mut self, prefix: &str, other: Problems) {
        for mut e in other.0 {
            e.path = join_path(prefix, &e.path);
            self.0.push(e);
        }
    }

    /// Whether no problem was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many problems were found.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The problems, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// `Ok(value)` when there are no problems, the problems otherwise.
    pub fn into_result<T>(self, value: T) -> Result<T, Problems> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// `prefix.path`, or either alone when the other is empty. An index (`[2]`) joins without a dot.
pub(crate) fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (_, true) => prefix.to_owned(),
        (true, false) => path.to_owned(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

impl From<ConfigError> for Problems {
    fn from(e: ConfigError) -> Self {
        Problems(vec![e])
    }
}

impl IntoIterator for Problems {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Problems {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl From<Problems> for Vec<ConfigError> {
    fn from(e: Problems) -> Self {
        e.0
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(Problems(vec![e]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_of_the_world_are_retryable_failures_of_the_data_are_not() {
        let action = |retryable| Error::Action {
            action: "webhook".into(),
            message: "status".into(),
            retryable,
        };
        let connector = Error::Connector {
            connector: "redis".into(),
            message: "connection refused".into(),
        };
        let refused = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let retryable = [
            action(true),
            Error::io("opening /var/data/x.jsonl", refused),
            connector,
            Error::DeadLetter("disk full".into()),
            Error::Task("panicked".into()),
            Error::Snapshot("rename failed".into()),
        ];
        for e in &retryable {
            assert!(e.is_retryable(), "{e}");
        }
        let arrow = arrow::error::ArrowError::CastError("not a number".into());
        let permanent = [
            action(false),
            Error::schema("zscore", "no column `value`"),
            Error::Arrow(arrow),
            Error::Sql("cast failed".into()),
            Error::Config(Problems::from(ConfigError::new("source", "bad"))),
        ];
        for e in &permanent {
            assert!(!e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn problems_are_prefixed_with_their_table() {
        let mut inner = Problems::new();
        inner.push("batch_size", "too big");
        inner.push("", "bad table");
        inner.push("[2]", "bad item");
        let mut all = Problems::new();
        all.extend_at("source", inner);
        let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["source.batch_size", "source", "source[2]"]);
        assert_eq!(
            all.to_string(),
            "3 configuration errors:\n  - source.batch_size: too big\n  - source: bad table\n  - source[2]: bad item\n"
        );
    }
}
