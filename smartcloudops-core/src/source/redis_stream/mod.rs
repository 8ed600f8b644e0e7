//! Redis Streams source: one consumer of a consumer group, at-least-once
//! (`[source] type = "redis_stream"`).
//!
//! - **Consumer group**: every replica reads with the same `group` and its own `consumer`
//!   name; Redis hands each entry to one of them (`XREADGROUP … >`). The group is created
//!   (with the stream, `MKSTREAM`) if missing, at the stream's end or beginning (`start`) the
//!   first time.
//! - **At-least-once**: an entry is acknowledged (`XACK`) only after the pipeline
//!   acknowledged the batch holding it. Until then it stays in the group's pending entries
//!   list (PEL). The entries of a nacked batch are claimed again (`XCLAIM`) after
//!   `retry_backoff` (doubling per consecutive failure, up to 30 s) and redelivered one per
//!   batch, so one bad entry cannot keep failing the entries that shared its batch.
//! - **Dead consumers**: entries pending for longer than `claim_idle` with any consumer (one
//!   that crashed, or this one's previous run) are taken over with `XAUTOCLAIM` every
//!   `claim_interval`. At start, the consumer first re-reads its own pending entries (they
//!   belong to a run that stopped before acknowledging them).
//! - **Poison entries**: what counts is failed processing attempts, not deliveries, and a
//!   nack counts by its [kind](crate::ack::NackKind). A *permanent* failure (the batch was
//!   refused as it is: an action's non-retryable error) always counts. A *retryable* one (a
//!   service down, a timeout) counts only if other batches were acknowledged since the
//!   entries' previous attempt, so an outage of the whole pipeline counts nothing. A batch
//!   *abandoned* at shutdown (its rows waited in open windows) counts nothing and is no
//!   attempt. Restarts, takeovers (`XCLAIM`, `XAUTOCLAIM`, which raise Redis's own delivery count)
//!   and reconnections count nothing either. Counted failures are written to Redis
//!   (`<key_prefix>:<stream>:<group>:attempts`, deleted with the entry's `XACK`, expiring
//!   `attempts_ttl` after the last write), so they survive restarts and follow an entry to
//!   the consumer that takes it over. After `max_deliveries` failures the entry goes, whole
//!   and with the last failure's reason, to the dead-letter output, then is acknowledged.
//!   An entry that crashes its consumer every time is therefore not caught: a crash is not
//!   a failure the source can tell from a restart. Undecodable records are dead-lettered at
//!   once. With `dead_letter_stream`, dead letters are appended to that stream (fields
//!   `dlq_reason`, `dlq_stage`, `dlq_stream`, `dlq_id`, `dlq_deliveries` (Redis's count),
//!   `dlq_failures`, `data`) instead of the pipeline's dead-letter output.
//! - **A lost group** (`NOGROUP`: Redis restarted without persistence, a failover to a
//!   replica that lagged, `XGROUP DESTROY`) is created again, never at `$`, which would skip
//!   what producers wrote meanwhile. Each `XACK` also moves
//!   `<key_prefix>:<stream>:<group>:acked` forward (a Lua script): an id through which every
//!   entry is acknowledged, which never passes an entry still pending with any consumer. The
//!   group is created again there, so acknowledged entries are skipped and nothing else is;
//!   if Redis lost that key too (and with it the stream), from `0`: everything then in the
//!   stream was written after the loss. A group missing at start while the key exists is
//!   treated the same way. Each recreation is logged as an error and counted.
//! - **Trimmed entries**: an entry trimmed from the stream (`MAXLEN`) while pending can no
//!   longer be read; Redis reports it to `XAUTOCLAIM`, and it is counted as lost.
//! - **Backpressure**: at most `max_unacked` entries are in flight; the consumer stops
//!   reading until acknowledgements come back.
//!
//! Each entry carries one payload in `format` (JSON lines or CSV, possibly several records)
//! in the field `field` (`data` by default, as the Redis Streams sink writes it).
//!
//! Gauges of the source stage: `redis_stream_acked_total`, `redis_stream_claimed_total`,
//! `redis_stream_poison_total`, `redis_stream_trimmed_total`,
//! `redis_stream_group_recreated_total`, `redis_stream_in_flight`.

mod acker;
mod config;
mod reader;
mod reply;
mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use self::acker::{Acker, Shared};
use self::reader::Reader;
use super::{Source, SourceContext, SourceStream, spawn_watched, stream_from};
use crate::error::Result;
use crate::redis::RedisConnection;

pub use self::config::{RedisStreamSourceConfig, StreamStart};

/// The longest wait before redelivering a batch that keeps failing.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// The longest wait between reconnection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// Consumes Redis streams with a consumer group. See the [module docs](self).
#[derive(Debug)]
pub struct RedisStreamSource {
    config: RedisStreamSourceConfig,
    connection: RedisConnection,
}

impl RedisStreamSource {
    /// A source for `config`, connecting through `connection` unless the config has its own.
    pub fn new(config: RedisStreamSourceConfig, connection: RedisConnection) -> Self {
        let connection = config.redis.clone().unwrap_or(connection);
        Self { config, connection }
    }
}

impl Source for RedisStreamSource {
    fn name(&self) -> &str {
        "redis_stream"
    }

    fn replays_unacknowledged(&self) -> bool {
        true
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        // Fail fast on a bad URL or a missing password; connecting is retried in the tasks.
        self.connection.client()?;
        let shared = Arc::new(Shared::new(
            ctx.dead_letters.stage().clone(),
            self.config.streams.len(),
        ));
        let (tx, rx) = mpsc::channel(1);
        let consumer = self.config.consumer_name();
        tracing::info!(
            streams = ?self.config.streams,
            group = %self.config.group,
            consumer = %consumer,
            "redis streams: consuming"
        );
        let acker = Acker::new(
            &self.config,
            self.connection.clone(),
            shared.clone(),
            ctx.shutdown.clone(),
        );
        let reader = Reader::new(
            self.config,
            consumer,
            self.connection,
            shared,
            ctx.dead_letters,
            ctx.shutdown,
            tx.clone(),
        );
        spawn_watched(
            &ctx.tasks,
            "redis",
            "stream reader",
            reader.run(),
            tx.clone(),
        );
        spawn_watched(&ctx.tasks, "redis", "stream acker", acker.run(), tx);
        Ok(stream_from(rx))
    }
}

/// An entry of one of the source's streams: the stream's index and the entry id.
type EntryRef = (usize, String);

/// Locks `m`, going on after a panic elsewhere: the data is plain bookkeeping.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
