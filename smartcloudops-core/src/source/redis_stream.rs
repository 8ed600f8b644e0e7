//! Redis Streams source: one consumer of a consumer group, at-least-once
//! (`[source] type = "redis_stream"`).
//!
//! - **Consumer group**: every replica reads with the same `group` and its own `consumer`
//!   name; Redis hands each entry to one of them (`XREADGROUP … >`). The group is created
//!   (with the stream, `MKSTREAM`) if missing, at the stream's end or beginning (`start`).
//! - **At-least-once**: an entry is acknowledged (`XACK`) only after the pipeline
//!   acknowledged the batch holding it. Until then it stays in the group's pending entries
//!   list (PEL). The entries of a nacked batch are claimed again (`XCLAIM`) after
//!   `retry_backoff` (doubling per consecutive failure, up to 30 s) and redelivered one per
//!   batch, so one bad entry cannot keep failing the entries that shared its batch.
//! - **Dead consumers**: entries pending for longer than `claim_idle` with any consumer (one
//!   that crashed, or this one's previous run) are taken over with `XAUTOCLAIM` every
//!   `claim_interval`. At start, the consumer first re-reads its own pending entries (they
//!   belong to a run that stopped before acknowledging them).
//! - **Poison entries**: an entry delivered more than `max_deliveries` times (it keeps
//!   failing, or keeps killing its consumer) goes to the dead-letter output with the reason,
//!   then is acknowledged. Undecodable records are dead-lettered at once. With
//!   `dead_letter_stream`, dead letters are appended to that stream (fields `dlq_reason`,
//!   `dlq_stage`, `dlq_stream`, `dlq_id`, `dlq_deliveries`, `data`) instead of the
//!   pipeline's dead-letter output.
//! - **Trimmed entries**: an entry trimmed from the stream (`MAXLEN`) while pending can no
//!   longer be read; Redis reports it to `XAUTOCLAIM`, and it is counted as lost.
//! - **Backpressure**: at most `max_unacked` entries are in flight; the consumer stops
//!   reading until acknowledgements come back.
//!
//! Each entry carries one payload in `format` (JSON lines or CSV, possibly several records)
//! in the field `field` (`data` by default, as the Redis Streams sink writes it).
//!
//! Gauges of the source stage: `redis_stream_acked_total`, `redis_stream_claimed_total`,
//! `redis_stream_poison_total`, `redis_stream_trimmed_total`, `redis_stream_in_flight`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use redis::aio::MultiplexedConnection;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Source, SourceBatch, SourceContext, SourceStream, spawn_watched, stream_from};
use crate::ack::{Ack, AckOutcome};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::{CsvOptions, Decoder, Format};
use crate::error::{Error, Result};
use crate::metrics::StageMetrics;
use crate::redis::{RedisConnection, error};
use crate::schema::MetricsBatchBuilder;

/// Where a group this source creates starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStart {
    /// From the stream's first entry (`0`).
    Earliest,
    /// Only entries added from now on (`$`).
    #[default]
    Latest,
}

/// Configuration of a [`RedisStreamSource`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamSourceConfig {
    /// The connection; without it, the pipeline's `[redis]` section (or the default).
    #[serde(default)]
    pub redis: Option<RedisConnection>,
    /// Streams to read.
    pub streams: Vec<String>,
    /// The consumer group; every replica uses the same one.
    pub group: String,
    /// This replica's name within the group; unique per replica, and stable across restarts
    /// if it can be (a pod name), so a restart finds its own pending entries at once.
    /// Default: `{hostname}-{pid}`.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Where a group created by this source starts.
    #[serde(default)]
    pub start: StreamStart,
    /// The entry field holding the payload.
    #[serde(default = "default_field")]
    pub field: String,
    /// Payload format.
    #[serde(default)]
    pub format: Format,
    /// CSV options (`format = "csv"`).
    #[serde(default)]
    pub csv: CsvOptions,
    /// Entries per read (`COUNT`), and so per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait of a read for new entries (`BLOCK`).
    #[serde(default = "default_block", with = "humantime_serde")]
    pub block: Duration,
    /// How long an entry must have been pending with another consumer before it is claimed.
    /// Keep it well above the pipeline's usual batch latency.
    #[serde(default = "default_claim_idle", with = "humantime_serde")]
    pub claim_idle: Duration,
    /// How often stale pending entries are looked for.
    #[serde(default = "default_claim_interval", with = "humantime_serde")]
    pub claim_interval: Duration,
    /// Deliveries after which an entry that was never acknowledged is dead-lettered.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// First wait before a nacked batch is delivered again.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Stream for dead letters; without it they go to the pipeline's dead-letter output.
    #[serde(default)]
    pub dead_letter_stream: Option<String>,
    /// Entries in flight (read, not yet acknowledged) before reading pauses.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
}

fn default_field() -> String {
    "data".to_owned()
}
fn default_batch_size() -> usize {
    1024
}
fn default_block() -> Duration {
    Duration::from_millis(500)
}
fn default_claim_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_claim_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_max_deliveries() -> u32 {
    5
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_unacked() -> usize {
    100_000
}

/// The longest wait before redelivering a batch that keeps failing.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// The longest wait between reconnection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(5);

impl RedisStreamSourceConfig {
    /// A source of `streams` for `group` with defaults.
    pub fn new(streams: Vec<String>, group: impl Into<String>) -> Self {
        Self {
            redis: None,
            streams,
            group: group.into(),
            consumer: None,
            start: StreamStart::Latest,
            field: default_field(),
            format: Format::Json,
            csv: CsvOptions::default(),
            batch_size: default_batch_size(),
            block: default_block(),
            claim_idle: default_claim_idle(),
            claim_interval: default_claim_interval(),
            max_deliveries: default_max_deliveries(),
            retry_backoff: default_retry_backoff(),
            dead_letter_stream: None,
            max_unacked: default_max_unacked(),
        }
    }

    /// The consumer name: configured, or `{hostname}-{pid}`.
    pub fn consumer_name(&self) -> String {
        self.consumer.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "smartcloudops".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

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

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        // Fail fast on a bad URL or a missing password; connecting is retried in the tasks.
        self.connection.client()?;
        let shared = Arc::new(Shared::new(ctx.dead_letters.stage().clone()));
        let (tx, rx) = mpsc::channel(1);
        let consumer = self.config.consumer_name();
        tracing::info!(
            streams = ?self.config.streams,
            group = %self.config.group,
            consumer = %consumer,
            "redis streams: consuming"
        );
        let acker = Acker {
            streams: self.config.streams.clone(),
            group: self.config.group.clone(),
            connection: self.connection.clone(),
            shared: shared.clone(),
            shutdown: ctx.shutdown.clone(),
        };
        let reader = Reader {
            decoder: self.config.format.decoder(self.config.csv.clone()),
            consumer,
            connection: self.connection,
            con: None,
            shared,
            dead_letters: ctx.dead_letters,
            shutdown: ctx.shutdown,
            tx: tx.clone(),
            claim_cursors: vec!["0-0".to_owned(); self.config.streams.len()],
            config: self.config,
        };
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

/// A nacked batch's entries, waiting to be delivered again.
#[derive(Debug)]
struct Retry {
    due: Instant,
    entries: Vec<EntryRef>,
    /// How many times these entries failed in a row: the next wait doubles with it.
    attempt: u32,
    /// Failures that count against the entries: those after which other batches had
    /// succeeded since the previous failure. When every batch fails (the pipeline's outage,
    /// not the entries' fault), nothing counts. At `max_deliveries` strikes an entry is
    /// dead-lettered as poison.
    strikes: u32,
    /// Acked batches at the time of the nack.
    successes_at_nack: u64,
}

/// What a batch's entries carry from their earlier failures into its outcome.
#[derive(Debug, Clone, Copy)]
struct Strikes {
    attempt: u32,
    strikes: u32,
    /// Acked batches when the entries last failed (or were delivered the first time).
    successes: u64,
}

/// State shared by the reader, the acker and the ack callbacks.
#[derive(Debug)]
struct Shared {
    /// Entries whose batch was acknowledged, waiting for `XACK`.
    to_ack: Mutex<Vec<EntryRef>>,
    /// Entries of nacked batches and when to deliver them again.
    retry: Mutex<Vec<Retry>>,
    /// Entries this consumer holds: in a batch, waiting for a retry, or waiting for `XACK`.
    /// They are never delivered again while held; the set is the backpressure measure.
    owned: Mutex<FxHashSet<EntryRef>>,
    /// Batches sent to the pipeline and not resolved yet.
    batches_out: AtomicUsize,
    /// Batches acknowledged since start.
    successes: AtomicU64,
    /// Consecutive nacked batches, for the retry backoff.
    failures: AtomicU64,
    wake_acker: Notify,
    wake_reader: Notify,
    /// Cancelled when the reader stopped: nothing new will be read or dead-lettered.
    reader_done: CancellationToken,
    stage: Arc<StageMetrics>,
    acked: AtomicU64,
    claimed: AtomicU64,
    poison: AtomicU64,
    trimmed: AtomicU64,
}

impl Shared {
    fn new(stage: Arc<StageMetrics>) -> Self {
        let shared = Self {
            to_ack: Mutex::default(),
            retry: Mutex::default(),
            owned: Mutex::default(),
            batches_out: AtomicUsize::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            wake_acker: Notify::new(),
            wake_reader: Notify::new(),
            reader_done: CancellationToken::new(),
            stage,
            acked: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            poison: AtomicU64::new(0),
            trimmed: AtomicU64::new(0),
        };
        shared.publish();
        shared
    }

    fn publish(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        self.stage
            .set_gauge("redis_stream_acked_total", &[], get(&self.acked));
        self.stage
            .set_gauge("redis_stream_claimed_total", &[], get(&self.claimed));
        self.stage
            .set_gauge("redis_stream_poison_total", &[], get(&self.poison));
        self.stage
            .set_gauge("redis_stream_trimmed_total", &[], get(&self.trimmed));
        let owned = lock(&self.owned).len();
        self.stage
            .set_gauge("redis_stream_in_flight", &[], owned as f64);
    }

    /// The outcome of a batch holding `entries`. The entries are queued (for `XACK` or a
    /// retry) before the batch stops counting as out, so the acker, which exits when no batch
    /// is out, never misses them.
    fn resolve(
        &self,
        entries: Vec<EntryRef>,
        outcome: AckOutcome,
        retry_backoff: Duration,
        max_wait: Duration,
        previous: Strikes,
    ) {
        match outcome {
            AckOutcome::Acked => {
                self.failures.store(0, Ordering::Relaxed);
                self.successes.fetch_add(1, Ordering::Relaxed);
                lock(&self.to_ack).extend(entries);
                self.wake_acker.notify_one();
            }
            AckOutcome::Nacked(reason) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                // Per entry, not per batch: a nacked batch redelivered as many one-entry
                // batches must not push every retry to the maximum wait.
                let wait = retry_backoff
                    .saturating_mul(1 << previous.attempt.min(16))
                    .min(max_wait);
                let successes = self.successes.load(Ordering::Relaxed);
                let strike = u32::from(successes > previous.successes);
                tracing::warn!(
                    entries = entries.len(),
                    retry_in_ms = wait.as_millis() as u64,
                    "redis streams: batch failed ({reason}); it will be delivered again"
                );
                lock(&self.retry).push(Retry {
                    due: Instant::now() + wait,
                    entries,
                    attempt: previous.attempt + 1,
                    strikes: previous.strikes + strike,
                    successes_at_nack: successes,
                });
            }
        }
        self.batches_out.fetch_sub(1, Ordering::Release);
        self.wake_reader.notify_one();
        self.wake_acker.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Acknowledges entries of acknowledged batches (`XACK`), on its own connection: the reader's
/// connection spends most of its time in a blocking read.
struct Acker {
    streams: Vec<String>,
    group: String,
    connection: RedisConnection,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Acker {
    async fn run(self) {
        let mut con: Option<MultiplexedConnection> = None;
        let mut backoff = Duration::from_millis(100);
        let mut attempts_while_stopping = 0u32;
        loop {
            let stopping = self.shutdown.is_cancelled() || self.shared.reader_done.is_cancelled();
            let batch = std::mem::take(&mut *lock(&self.shared.to_ack));
            if !batch.is_empty() {
                match self.ack(&mut con, &batch).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        self.shared
                            .acked
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        {
                            let mut owned = lock(&self.shared.owned);
                            for e in &batch {
                                owned.remove(e);
                            }
                        }
                        self.shared.publish();
                    }
                    Err(e) if stopping && attempts_while_stopping >= 5 => {
                        // Redis stays away at shutdown: the entries stay pending and are
                        // delivered again after a restart (at-least-once), rather than
                        // holding the process forever.
                        tracing::error!(
                            entries = batch.len(),
                            "redis streams: XACK still failing at shutdown, giving up: {e}"
                        );
                        return;
                    }
                    Err(e) => {
                        if stopping {
                            attempts_while_stopping += 1;
                        }
                        // Kept for the next attempt; the entries stay pending meanwhile.
                        tracing::warn!("redis streams: XACK failed, retrying: {e}");
                        self.shared.stage.record_error();
                        con = None;
                        lock(&self.shared.to_ack).extend(batch);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                        continue;
                    }
                }
            }
            if stopping
                && self.shared.reader_done.is_cancelled()
                && self.shared.batches_out.load(Ordering::Acquire) == 0
            {
                // Every batch is resolved and everything acked is acknowledged.
                if lock(&self.shared.to_ack).is_empty() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = self.shared.wake_acker.notified() => {}
                _ = self.shutdown.cancelled(), if !stopping => {}
                _ = self.shared.reader_done.cancelled(), if !stopping => {}
                // While stopping, look again now and then for the last outcomes.
                _ = tokio::time::sleep(Duration::from_millis(50)), if stopping => {}
            }
        }
    }

    async fn ack(
        &self,
        con: &mut Option<MultiplexedConnection>,
        entries: &[EntryRef],
    ) -> Result<()> {
        if con.is_none() {
            *con = Some(self.connection.connect().await?);
        }
        let Some(c) = con.as_mut() else {
            return Ok(());
        };
        let mut by_stream: HashMap<usize, Vec<&str>> = HashMap::new();
        for (stream, id) in entries {
            by_stream.entry(*stream).or_default().push(id);
        }
        let mut pipe = redis::pipe();
        for (stream, ids) in by_stream {
            for chunk in ids.chunks(1000) {
                pipe.cmd("XACK")
                    .arg(&self.streams[stream])
                    .arg(&self.group)
                    .arg(chunk)
                    .ignore();
            }
        }
        pipe.query_async::<()>(c)
            .await
            .map_err(|e| error("acknowledging entries", e))
    }
}

/// One entry as read: its id and payload (`None` if the entry lacks the field, or was
/// deleted while pending).
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    id: String,
    payload: Option<Vec<u8>>,
    /// Deleted from the stream while pending (`[id, nil]`).
    deleted: bool,
}

/// How an entry was obtained, which decides whether its delivery count must be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// New to the group (`>`): delivered once.
    New,
    /// Delivered before (claimed, or this consumer's own pending entries).
    Again,
}

struct Reader {
    config: RedisStreamSourceConfig,
    consumer: String,
    connection: RedisConnection,
    con: Option<MultiplexedConnection>,
    decoder: Box<dyn Decoder>,
    shared: Arc<Shared>,
    dead_letters: DeadLetterQueue,
    shutdown: CancellationToken,
    tx: mpsc::Sender<Result<SourceBatch>>,
    /// Per stream, where the next `XAUTOCLAIM` scan continues.
    claim_cursors: Vec<String>,
}

impl Reader {
    async fn run(mut self) {
        // However the reader ends (shutdown, the pipeline gone, a panic), the acker learns it.
        let _done = self.shared.reader_done.clone().drop_guard();
        let mut backoff = Duration::from_millis(100);
        let mut recovered = false;
        let mut next_claim = Instant::now();
        let shutdown = self.shutdown.clone();
        let tx = self.tx.clone();
        while !shutdown.is_cancelled() && !tx.is_closed() {
            let step = async {
                if !recovered {
                    self.create_groups().await?;
                    self.recover_own_pending().await?;
                    recovered = true;
                }
                self.redeliver_nacked().await?;
                if Instant::now() >= next_claim {
                    // Moved first: a failing claim must not starve the reads.
                    next_claim = Instant::now() + self.config.claim_interval;
                    self.claim_stale().await?;
                }
                if lock(&self.shared.owned).len() >= self.config.max_unacked {
                    tokio::select! {
                        _ = self.shared.wake_reader.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    return Ok(());
                }
                self.read_new().await
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break, // the pipeline stopped taking batches
                r = step => r,
            };
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    self.shared.stage.record_error();
                    tracing::warn!("redis streams: {e}; retrying in {backoff:?}");
                    self.con = None;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tx.closed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                }
            }
        }
    }

    async fn con(&mut self) -> Result<&mut MultiplexedConnection> {
        if self.con.is_none() {
            self.con = Some(self.connection.connect_with(self.config.block).await?);
        }
        Ok(self.con.as_mut().expect("connected just above"))
    }

    async fn create_groups(&mut self) -> Result<()> {
        let start = match self.config.start {
            StreamStart::Earliest => "0",
            StreamStart::Latest => "$",
        };
        let streams = self.config.streams.clone();
        let group = self.config.group.clone();
        let con = self.con().await?;
        for stream in &streams {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&group)
                .arg(start)
                .arg("MKSTREAM")
                .query_async(con)
                .await;
            match created {
                Ok(()) => tracing::info!(%stream, %group, start, "redis streams: group created"),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(error(format!("creating group {group} on {stream}"), e)),
            }
        }
        Ok(())
    }

    /// Re-reads this consumer's own pending entries, left by a run that stopped first.
    async fn recover_own_pending(&mut self) -> Result<()> {
        for stream in 0..self.config.streams.len() {
            let mut cursor = "0-0".to_owned();
            loop {
                let reply = self.xreadgroup(&[stream], &cursor, None).await?;
                let entries: Vec<Entry> = reply.into_iter().flat_map(|(_, e)| e).collect();
                let Some(last) = entries.last() else { break };
                cursor = last.id.clone();
                tracing::info!(
                    stream = %self.config.streams[stream],
                    entries = entries.len(),
                    "redis streams: delivering this consumer's pending entries again"
                );
                self.deliver(stream, entries, Delivery::Again, None).await?;
            }
        }
        Ok(())
    }

    /// Claims the entries of nacked batches whose retry time has come.
    async fn redeliver_nacked(&mut self) -> Result<()> {
        let due: Vec<Retry> = {
            let mut retry = lock(&self.shared.retry);
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = retry.drain(..).partition(|r| r.due <= now);
            *retry = later;
            due
        };
        let mut due = due.into_iter();
        while let Some(item) = due.next() {
            if let Err(e) = self.redeliver(&item).await {
                // Not lost: back in the queue, with the rest, for the next round.
                let mut retry = lock(&self.shared.retry);
                retry.push(item);
                retry.extend(due);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Claims one nacked batch's entries back and delivers them one per batch, so a poison
    /// entry fails alone.
    async fn redeliver(&mut self, item: &Retry) -> Result<()> {
        let mut by_stream: HashMap<usize, Vec<String>> = HashMap::new();
        for (stream, id) in &item.entries {
            by_stream.entry(*stream).or_default().push(id.clone());
        }
        for (stream, ids) in by_stream {
            for chunk in ids.chunks(self.config.batch_size.max(1)) {
                let key = self.config.streams[stream].clone();
                let group = self.config.group.clone();
                let consumer = self.consumer.clone();
                // Retries come before `claim_idle`, so these entries are still this consumer's;
                // whatever does not come back was trimmed or taken over after all.
                let min_idle = 0;
                let con = self.con().await?;
                let reply: redis::RedisResult<Value> = redis::cmd("XCLAIM")
                    .arg(&key)
                    .arg(&group)
                    .arg(&consumer)
                    .arg(min_idle)
                    .arg(chunk)
                    .query_async(con)
                    .await;
                let reply = match reply {
                    Ok(v) => v,
                    Err(e) if e.code() == Some("NOGROUP") => {
                        self.create_groups().await?;
                        continue;
                    }
                    Err(e) => return Err(error(format!("claiming entries of {key} again"), e)),
                };
                let entries = parse_entries(&reply, &self.config.field);
                {
                    // Whatever did not come back is not ours any more: claimed by another
                    // consumer, or trimmed from the stream (Redis drops it from the list).
                    let mut owned = lock(&self.shared.owned);
                    for id in chunk {
                        owned.remove(&(stream, id.clone()));
                    }
                }
                for entry in entries {
                    let history = Strikes {
                        attempt: item.attempt,
                        strikes: item.strikes,
                        successes: item.successes_at_nack,
                    };
                    self.deliver(stream, vec![entry], Delivery::Again, Some(history))
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Takes over entries pending too long with any consumer (`XAUTOCLAIM`).
    async fn claim_stale(&mut self) -> Result<()> {
        for stream in 0..self.config.streams.len() {
            let key = self.config.streams[stream].clone();
            let group = self.config.group.clone();
            let consumer = self.consumer.clone();
            let idle = self.config.claim_idle.as_millis() as u64;
            let count = self.config.batch_size;
            let cursor = self.claim_cursors[stream].clone();
            let con = self.con().await?;
            let reply: redis::RedisResult<Value> = redis::cmd("XAUTOCLAIM")
                .arg(&key)
                .arg(&group)
                .arg(&consumer)
                .arg(idle)
                .arg(&cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(con)
                .await;
            let reply: Value = match reply {
                Ok(v) => v,
                Err(e) if e.code() == Some("NOGROUP") => {
                    self.create_groups().await?;
                    continue;
                }
                Err(e) => return Err(error(format!("claiming stale entries of {key}"), e)),
            };
            let (next, entries, deleted) = parse_autoclaim(&reply, &self.config.field);
            self.claim_cursors[stream] = next;
            if !deleted.is_empty() {
                self.shared
                    .trimmed
                    .fetch_add(deleted.len() as u64, Ordering::Relaxed);
                tracing::error!(
                    stream = %key,
                    entries = deleted.len(),
                    "redis streams: pending entries were trimmed from the stream before \
                     being processed; they are lost"
                );
            }
            if !entries.is_empty() {
                self.shared
                    .claimed
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    stream = %key,
                    entries = entries.len(),
                    "redis streams: claimed stale pending entries"
                );
                self.deliver(stream, entries, Delivery::Again, None).await?;
            }
            self.shared.publish();
        }
        Ok(())
    }

    /// Reads entries new to the group, waiting up to `block` (less if a retry is due).
    async fn read_new(&mut self) -> Result<()> {
        let mut block = self.config.block;
        if let Some(due) = lock(&self.shared.retry).iter().map(|r| r.due).min() {
            block = block.min(due.saturating_duration_since(Instant::now()));
        }
        let all: Vec<usize> = (0..self.config.streams.len()).collect();
        let block_ms = block.as_millis().max(1) as u64;
        // Not cancelled when a batch resolves: entries Redis sent meanwhile would be left
        // pending until claimed. A due retry waits at most `block`.
        let reply = self.xreadgroup(&all, ">", Some(block_ms)).await?;
        for (stream, entries) in reply {
            self.deliver(stream, entries, Delivery::New, None).await?;
        }
        Ok(())
    }

    async fn xreadgroup(
        &mut self,
        streams: &[usize],
        id: &str,
        block_ms: Option<u64>,
    ) -> Result<Vec<(usize, Vec<Entry>)>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.config.batch_size);
        if let Some(ms) = block_ms {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS");
        for &s in streams {
            cmd.arg(&self.config.streams[s]);
        }
        for _ in streams {
            cmd.arg(id);
        }
        let field = self.config.field.clone();
        let con = self.con().await?;
        let reply: Value = match cmd.query_async(con).await {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream or group was deleted under us: create them again.
                self.create_groups().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(error("reading entries", e)),
        };
        let by_key = parse_read(&reply, &field);
        Ok(by_key
            .into_iter()
            .filter_map(|(key, entries)| {
                let i = self.config.streams.iter().position(|s| s == &key)?;
                Some((i, entries))
            })
            .collect())
    }

    /// How often each of `ids` has been delivered to this consumer (one `XPENDING` per id,
    /// pipelined). An id missing from the answer is not pending with this consumer.
    async fn delivery_counts(
        &mut self,
        stream: usize,
        ids: &[&str],
    ) -> Result<HashMap<String, u64>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let key = self.config.streams[stream].clone();
        let group = self.config.group.clone();
        let consumer = self.consumer.clone();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING")
                .arg(&key)
                .arg(&group)
                .arg(*id)
                .arg(*id)
                .arg(1)
                .arg(&consumer);
        }
        let con = self.con().await?;
        let replies: Vec<Value> = pipe
            .query_async(con)
            .await
            .map_err(|e| error(format!("reading delivery counts of {key}"), e))?;
        Ok(replies.iter().flat_map(parse_pending).collect())
    }

    /// Decodes `entries` into one batch for the pipeline; dead-letters the undecodable and
    /// the poison ones.
    async fn deliver(
        &mut self,
        stream: usize,
        entries: Vec<Entry>,
        how: Delivery,
        history: Option<Strikes>,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let in_flight: Vec<bool> = {
            let set = lock(&self.shared.owned);
            entries
                .iter()
                .map(|e| set.contains(&(stream, e.id.clone())))
                .collect()
        };
        let counts = if how == Delivery::Again {
            let mut ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            ids.sort_by(|a, b| compare_ids(a, b));
            self.delivery_counts(stream, &ids).await?
        } else {
            HashMap::new()
        };
        let key = self.config.streams[stream].clone();
        let mut builder = MetricsBatchBuilder::with_capacity(entries.len());
        let mut rejects = Vec::new();
        let mut in_batch = Vec::new();
        let mut done = Vec::new(); // dead-lettered whole: acknowledged once stored
        let mut letters: Vec<(String, String, String, u64)> = Vec::new(); // id, reason, raw, deliveries
        for (entry, busy) in entries.into_iter().zip(in_flight) {
            if busy {
                continue; // this consumer holds it (a batch, a retry, an XACK): no second copy
            }
            let deliveries = match how {
                Delivery::New => 1,
                Delivery::Again => match counts.get(&entry.id) {
                    Some(&n) => n,
                    None => continue, // not pending with this consumer any more
                },
            };
            if entry.deleted {
                // Trimmed from the stream while pending: nothing left to read.
                self.shared.trimmed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(id = %entry.id, "redis streams: a pending entry was trimmed before being processed; it is lost");
                done.push((stream, entry.id));
                continue;
            }
            let Some(payload) = entry.payload else {
                letters.push((
                    entry.id.clone(),
                    format!("entry has no `{}` field", self.config.field),
                    String::new(),
                    deliveries,
                ));
                done.push((stream, entry.id));
                continue;
            };
            // Retried here: poison after `max_deliveries` strikes. Taken over from a consumer
            // that stopped (a crash loop, say): poison after `max_deliveries` deliveries.
            let poison = match history {
                Some(h) => h.strikes >= self.config.max_deliveries,
                None => deliveries > u64::from(self.config.max_deliveries),
            };
            if poison {
                letters.push((
                    entry.id.clone(),
                    format!(
                        "delivered {deliveries} times without being acknowledged \
                         (max_deliveries = {})",
                        self.config.max_deliveries
                    ),
                    String::from_utf8_lossy(&payload).into_owned(),
                    deliveries,
                ));
                self.shared.poison.fetch_add(1, Ordering::Relaxed);
                done.push((stream, entry.id));
                continue;
            }
            let rows_before = builder.len();
            rejects.clear();
            self.decoder.decode(&payload, &mut builder, &mut rejects);
            for r in rejects.drain(..) {
                letters.push((
                    format!("{}#{}", entry.id, r.record),
                    r.reason,
                    r.raw,
                    deliveries,
                ));
            }
            if builder.len() > rows_before {
                in_batch.push((stream, entry.id));
            } else {
                done.push((stream, entry.id));
            }
        }
        if let Err(e) = self.dead_letter(&key, &letters).await {
            // Not stored: nothing of this read may be acknowledged. Deliver it again later.
            tracing::error!("redis streams: dead letters not stored, redelivering: {e}");
            let mut all = in_batch;
            all.extend(done);
            lock(&self.shared.retry).push(Retry {
                due: Instant::now() + self.config.retry_backoff,
                entries: all,
                attempt: 1,
                strikes: 0,
                successes_at_nack: self.shared.successes.load(Ordering::Relaxed),
            });
            return Ok(());
        }
        {
            let mut owned = lock(&self.shared.owned);
            owned.extend(done.iter().cloned());
            owned.extend(in_batch.iter().cloned());
        }
        if !done.is_empty() {
            lock(&self.shared.to_ack).extend(done);
            self.shared.wake_acker.notify_one();
        }
        if in_batch.is_empty() {
            return Ok(());
        }
        self.shared.batches_out.fetch_add(1, Ordering::Release);
        let shared = self.shared.clone();
        let backoff = self.config.retry_backoff;
        // A retry comes well before `claim_idle`, so no other consumer (nor this one's
        // XAUTOCLAIM) takes the entries while they wait.
        let max_wait = (self.config.claim_idle / 2).min(MAX_RETRY_BACKOFF);
        let previous = history.unwrap_or(Strikes {
            attempt: 0,
            strikes: 0,
            successes: self.shared.successes.load(Ordering::Relaxed),
        });
        let ack = Ack::new(move |outcome| {
            shared.resolve(in_batch, outcome, backoff, max_wait, previous);
        });
        let batch = builder.finish();
        if self
            .tx
            .send(Ok(SourceBatch::new(batch, ack)))
            .await
            .is_err()
        {
            // The pipeline is gone; the ack dropped with the batch nacks it.
        }
        self.shared.publish();
        Ok(())
    }

    /// Stores dead letters: in `dead_letter_stream`, or the pipeline's dead-letter output.
    async fn dead_letter(
        &mut self,
        stream: &str,
        letters: &[(String, String, String, u64)],
    ) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let stage = self.dead_letters.stage().name().to_owned();
        let Some(dlq) = self.config.dead_letter_stream.clone() else {
            for (id, reason, raw, _) in letters {
                self.dead_letters
                    .send(format!("{stream}/{id}"), reason.clone(), raw.clone())?;
            }
            return Ok(());
        };
        let mut pipe = redis::pipe();
        for (id, reason, raw, deliveries) in letters {
            pipe.cmd("XADD")
                .arg(&dlq)
                .arg("*")
                .arg("dlq_reason")
                .arg(reason)
                .arg("dlq_stage")
                .arg(&stage)
                .arg("dlq_stream")
                .arg(stream)
                .arg("dlq_id")
                .arg(id)
                .arg("dlq_deliveries")
                .arg(*deliveries)
                .arg("data")
                .arg(raw)
                .ignore();
        }
        let con = self.con().await?;
        pipe.query_async::<()>(con)
            .await
            .map_err(|e| Error::DeadLetter(format!("appending to {dlq}: {e}")))?;
        self.dead_letters
            .stage()
            .record_dead_lettered(letters.len());
        Ok(())
    }
}

/// Orders stream ids (`ms-seq`) numerically.
fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a).cmp(&parse(b))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// `[id, [field, value, …]]`, or `[id, nil]` for an entry deleted while pending.
fn parse_entry(v: &Value, field: &str) -> Option<Entry> {
    let parts = items(v);
    let id = text(parts.first()?)?;
    let deleted = matches!(parts.get(1), None | Some(Value::Nil));
    let payload = match parts.get(1) {
        Some(Value::Array(fields)) => fields.chunks(2).find_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(v)] if k == field.as_bytes() => {
                Some(v.clone())
            }
            _ => None,
        }),
        Some(Value::Map(pairs)) => pairs.iter().find_map(|(k, v)| match (k, v) {
            (Value::BulkString(k), Value::BulkString(v)) if k == field.as_bytes() => {
                Some(v.clone())
            }
            _ => None,
        }),
        _ => None,
    };
    Some(Entry {
        id,
        payload,
        deleted,
    })
}

fn parse_entries(v: &Value, field: &str) -> Vec<Entry> {
    items(v)
        .iter()
        .filter_map(|e| parse_entry(e, field))
        .collect()
}

/// An `XREADGROUP` reply: `[[key, [entry, …]], …]` (RESP2) or a map (RESP3); nil on timeout.
fn parse_read(v: &Value, field: &str) -> Vec<(String, Vec<Entry>)> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, e)| Some((text(k)?, parse_entries(e, field))))
            .collect(),
        _ => items(v)
            .iter()
            .filter_map(|s| {
                let parts = items(s);
                Some((text(parts.first()?)?, parse_entries(parts.get(1)?, field)))
            })
            .collect(),
    }
}

/// An `XAUTOCLAIM` reply: `[next cursor, [entry, …], [deleted id, …]]`.
fn parse_autoclaim(v: &Value, field: &str) -> (String, Vec<Entry>, Vec<String>) {
    let parts = items(v);
    let next = parts
        .first()
        .and_then(text)
        .unwrap_or_else(|| "0-0".to_owned());
    let entries = parts
        .get(1)
        .map(|e| parse_entries(e, field))
        .unwrap_or_default();
    let deleted = parts
        .get(2)
        .map(|d| items(d).iter().filter_map(text).collect())
        .unwrap_or_default();
    (next, entries, deleted)
}

/// An extended `XPENDING` reply: `[[id, consumer, idle ms, deliveries], …]`.
fn parse_pending(v: &Value) -> HashMap<String, u64> {
    items(v)
        .iter()
        .filter_map(|p| {
            let parts = items(p);
            let id = text(parts.first()?)?;
            let count = match parts.get(3)? {
                Value::Int(n) => u64::try_from(*n).ok()?,
                other => text(other)?.parse().ok()?,
            };
            Some((id, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_parse_including_deleted_entries_and_missing_fields() {
        let entry = |id: &str, fields: &[(&str, &str)]| {
            Value::Array(vec![
                bulk(id),
                Value::Array(
                    fields
                        .iter()
                        .flat_map(|(k, v)| [bulk(k), bulk(v)])
                        .collect(),
                ),
            ])
        };
        let read = Value::Array(vec![Value::Array(vec![
            bulk("metrics"),
            Value::Array(vec![
                entry("1-0", &[("key", "7"), ("data", "{\"v\":1}")]),
                entry("1-1", &[("other", "x")]),
                Value::Array(vec![bulk("1-2"), Value::Nil]),
            ]),
        ])]);
        let parsed = parse_read(&read, "data");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, "metrics");
        let e = &parsed[0].1;
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].payload.as_deref(), Some(&b"{\"v\":1}"[..]));
        assert_eq!(e[1].payload, None);
        assert_eq!((e[2].id.as_str(), e[2].payload.as_ref()), ("1-2", None));
        assert!(parse_read(&Value::Nil, "data").is_empty());

        let claim = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![entry("2-0", &[("data", "x")])]),
            Value::Array(vec![bulk("1-9")]),
        ]);
        let (next, entries, deleted) = parse_autoclaim(&claim, "data");
        assert_eq!(next, "5-0");
        assert_eq!(entries.len(), 1);
        assert_eq!(deleted, vec!["1-9".to_owned()]);

        let pending = Value::Array(vec![Value::Array(vec![
            bulk("2-0"),
            bulk("c1"),
            Value::Int(1200),
            Value::Int(3),
        ])]);
        assert_eq!(parse_pending(&pending).get("2-0"), Some(&3));
    }

    #[test]
    fn ids_order_numerically() {
        let mut ids = vec!["10-0", "9-1", "9-0", "100-0"];
        ids.sort_by(|a, b| compare_ids(a, b));
        assert_eq!(ids, vec!["9-0", "9-1", "10-0", "100-0"]);
    }
}

impl crate::component::ComponentConfig for RedisStreamSourceConfig {
    fn problems(&self) -> crate::error::Problems {
        let mut p = crate::error::Problems::new();
        if let Some(redis) = &self.redis {
            p.extend_at("redis", redis.problems().into_iter().collect());
        }
        p.check(
            !self.streams.is_empty(),
            "streams",
            "must list at least one stream",
            "",
        );
        p.check(
            !self.group.trim().is_empty(),
            "group",
            "must not be empty",
            "every replica of the pipeline uses the same group",
        );
        p.check(
            self.consumer.as_ref().is_none_or(|c| !c.trim().is_empty()),
            "consumer",
            "must not be empty",
            "leave it out for {hostname}-{pid}",
        );
        super::check_batch_size(&mut p, self.batch_size, "");
        p.check(
            self.max_deliveries >= 1,
            "max_deliveries",
            "must be at least 1",
            "",
        );
        p.check(
            self.max_unacked >= 1,
            "max_unacked",
            "must be at least 1",
            "",
        );
        p.check(
            !self.block.is_zero() && self.block <= crate::component::MAX_DURATION,
            "block",
            "must be longer than 0 and at most a day",
            "e.g. \"500ms\"",
        );
        p.check(
            !self.claim_interval.is_zero(),
            "claim_interval",
            "must be longer than 0",
            "e.g. \"5s\"",
        );
        p.check(
            self.claim_idle >= self.block,
            "claim_idle",
            "must be at least `block`",
            "an entry is claimed from a consumer that kept it this long without acknowledging it",
        );
        p
    }

    fn summary(&self, ctx: &crate::component::BuildContext) -> String {
        let url = self.redis.clone().unwrap_or_else(|| ctx.redis_connection());
        format!(
            "redis streams {} (group {}, streams {})",
            url.redacted_url(),
            self.group,
            self.streams.join(",")
        )
    }
}

impl super::SourceConfig for RedisStreamSourceConfig {
    fn build(&self, ctx: &crate::component::BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(RedisStreamSource::new(
            self.clone(),
            ctx.redis_connection(),
        )))
    }
}
