//! Sources: where batches come from.
//!
//! A [`Source`] is opened into a [`SourceStream`] of [`SourceBatch`]es: a canonical metrics
//! batch paired with the [`Ack`] the pipeline resolves once every stage and action finished
//! with it. Dropping the stream cancels the source. Records a source cannot decode go to the
//! dead-letter queue in its [`SourceContext`].

pub mod file;
pub mod generator;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "redis")]
pub mod redis_pubsub;
#[cfg(feature = "redis")]
pub mod redis_stream;
pub mod remote_write;
pub mod scrape;
pub mod timestamps;

use std::fmt;

use arrow::record_batch::RecordBatch;
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ack::Ack;
use crate::component::{BuildContext, ComponentConfig};
use crate::dead_letter::DeadLetterQueue;
use crate::error::{Problems, Result};

pub use self::file::{FileSource, FileSourceConfig};
pub use self::generator::{GeneratorConfig, GeneratorSource};
#[cfg(feature = "kafka")]
pub use self::kafka::{KafkaSource, KafkaSourceConfig};
#[cfg(feature = "redis")]
pub use self::redis_pubsub::{RedisPubSubSource, RedisPubSubSourceConfig};
#[cfg(feature = "redis")]
pub use self::redis_stream::{RedisStreamSource, RedisStreamSourceConfig, StreamStart};
pub use self::remote_write::{RemoteWriteConfig, RemoteWriteSource};
pub use self::scrape::{ScrapeConfig, ScrapeSource};
pub use self::timestamps::TimestampPolicy;

/// A batch from a source and the acknowledgement that tells the source its fate.
#[derive(Debug)]
pub struct SourceBatch {
    /// Rows in the canonical metrics schema.
    pub batch: RecordBatch,
    /// Resolved by the pipeline after the last stage finished with `batch`.
    pub ack: Ack,
    /// Where the rows came from, as far as the source knows; the decision layer writes it
    /// on the audit records an alert of these rows triggers.
    pub origin: Origin,
}

impl SourceBatch {
    /// Pairs a batch with its acknowledgement (the pipeline fills in the source's name as
    /// its origin).
    pub fn new(batch: RecordBatch, ack: Ack) -> Self {
        Self {
            batch,
            ack,
            origin: Origin::default(),
        }
    }

    /// The same batch, with where it came from.
    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }
}

/// Where a batch's rows came from: the source, and what the source knows of the sender —
/// a client address, Kafka partitions, stream or channel names, a file, a scrape target.
/// Untrusted data is only ever *reported* with it: an audit record shows which client or
/// partition fed the rows that triggered an alert.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    /// The source's name (`remote_write`, `kafka` …); set by the pipeline when empty.
    pub source: String,
    /// The client that sent the rows (a peer address), when the source has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Partitions, streams, channels, files or targets the rows were read from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    /// How the rows reached the actions when not straight from the source, e.g. released
    /// by a window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

impl Origin {
    /// An origin read from `from` (partitions, keys, files …).
    pub fn from_parts<I, S>(from: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            from: from.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// An origin sent by `client` (a peer address).
    pub fn client(client: impl Into<String>) -> Self {
        Self {
            client: Some(client.into()),
            ..Self::default()
        }
    }
}

/// The stream a source is opened into. An `Err` item is fatal: the pipeline stops taking new
/// batches, drains what is in flight and reports the error.
pub type SourceStream = BoxStream<'static, Result<SourceBatch>>;

/// What the pipeline hands a source when it opens it.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Where undecodable records go (counted in the source's stage metrics).
    pub dead_letters: DeadLetterQueue,
    /// Cancelled when the pipeline shuts down; the pipeline also stops polling the stream.
    pub shutdown: CancellationToken,
    /// Where a source spawns background work (a consumer loop, say). After the pipeline has
    /// drained, it waits for these tasks (up to `shutdown_timeout`), so a source can commit
    /// what was acknowledged before the process exits.
    pub tasks: TaskTracker,
}

impl SourceContext {
    /// A context for using a source outside a pipeline (tests, benchmarks): dead letters are
    /// logged.
    pub fn detached() -> Self {
        Self {
            dead_letters: DeadLetterQueue::detached("source"),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }
}

/// A `[source]` kind's configuration: a serde struct that checks itself
/// ([`ComponentConfig`]) and builds its source. Listed in the
/// registry (`config::Registry`) under its `type` name.
pub trait SourceConfig: ComponentConfig {
    /// Builds the source (binding sockets, opening files; connecting happens on `open`).
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Source>>;

    /// The schema of the source's batches: the canonical metrics schema unless the source
    /// adds columns (Kafka metadata, say).
    fn output_schema(&self) -> arrow::datatypes::SchemaRef {
        crate::schema::metrics_schema()
    }

    /// Which event timestamps the pipeline accepts from this source when its table has no
    /// `timestamps`: checked against the wall clock (7 days back, 10 minutes ahead) unless
    /// the kind replays history, as the `file` source and the `generator` do
    /// ([`TimestampPolicy::unchecked`]). See [`timestamps`].
    fn default_timestamps(&self) -> TimestampPolicy {
        TimestampPolicy::default()
    }
}

/// Largest batch a source may be configured to build, in rows or messages.
pub const MAX_BATCH_SIZE: usize = 1_000_000;

/// Checks a source's `batch_size` against `1..=MAX_BATCH_SIZE`.
pub(crate) fn check_batch_size(problems: &mut Problems, size: usize, hint: &str) {
    problems.check(
        (1..=MAX_BATCH_SIZE).contains(&size),
        "batch_size",
        format!("must be between 1 and {MAX_BATCH_SIZE}, got {size}"),
        hint,
    );
}

/// Produces batches of canonical metrics.
pub trait Source: Send + fmt::Debug {
    /// A short name for metrics and logs, e.g. `file`.
    fn name(&self) -> &str;

    /// Whether the source delivers again, after a restart or a rebalance, what it did not
    /// get an acknowledgement for (Kafka's committed offsets, Redis Streams' pending
    /// entries). The pipeline then holds the acknowledgements of rows waiting in open
    /// windows until those windows are emitted (`Prep::retains_rows`). By default it does
    /// not: to a push source an acknowledgement only says its rows were taken.
    fn replays_unacknowledged(&self) -> bool {
        false
    }

    /// Starts the source. Called once, from inside the pipeline's tokio runtime.
    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream>;

    /// Registers who is told when this source gives up part of its input to another
    /// replica (a Kafka rebalance revoking partitions). Called before
    /// [`open`](Source::open); sources without such hand-overs ignore it (the default).
    fn set_revoke_listener(&mut self, listener: std::sync::Arc<dyn RevokeListener>) {
        let _ = listener;
    }
}

/// Told when a source hands part of its input over to another replica, so that state kept
/// per series (a detector's) is saved before the new owner loads it.
///
/// A source calls it once the in-flight batches of the revoked input were drained (the state
/// then covers every row acknowledged) and before it commits their offsets.
pub trait RevokeListener: Send + Sync + fmt::Debug {
    /// Saves what must outlive the hand-over; returns once it is saved or `timeout` passed
    /// (a timeout is logged: the new owner then loads older state, nothing is lost from the
    /// input). Blocking: called on the source's own thread, never from a pipeline task.
    fn on_revoke(&self, timeout: std::time::Duration);
}

/// Runs `task` in `tasks`; if it panics, the pipeline gets an error on `tx` instead of a
/// stream that silently ends (which would look like the end of the input).
#[cfg(any(feature = "kafka", feature = "redis"))]
pub(crate) fn spawn_watched(
    tasks: &TaskTracker,
    connector: &'static str,
    name: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
    tx: tokio::sync::mpsc::Sender<Result<SourceBatch>>,
) {
    tasks.spawn(async move {
        if let Err(e) = tokio::spawn(task).await {
            let _ = tx
                .send(Err(crate::error::Error::Connector {
                    connector: connector.into(),
                    message: format!("the {name} task failed: {e}"),
                }))
                .await;
        }
    });
}

/// The stream of a source whose batches come from a background task.
#[cfg(any(feature = "kafka", feature = "redis"))]
pub(crate) fn stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<SourceBatch>>,
) -> SourceStream {
    use futures::StreamExt;
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
