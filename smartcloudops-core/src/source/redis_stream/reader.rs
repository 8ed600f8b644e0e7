//! The reader task: creates the groups, reads new entries, takes over stale ones, delivers
//! nacked ones again, and decodes entries into batches (dead-lettering what it cannot use).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::acker::{Held, History, Retry, Shared};
use super::config::{RedisStreamSourceConfig, StateKeys, StreamStart};
use super::reply::{Entry, compare_ids, parse_autoclaim, parse_entries, parse_pending, parse_read};
use super::state::{self, Failures};
use super::{MAX_RECONNECT_BACKOFF, MAX_RETRY_BACKOFF, lock};
use crate::ack::Ack;
use crate::dead_letter::DeadLetterQueue;
use crate::decode::Decoder;
use crate::error::{Error, Result};
use crate::redis::{RedisConnection, error};
use crate::schema::MetricsBatchBuilder;
use crate::source::SourceBatch;

/// How entries were obtained, which decides where their earlier failures come from.
#[derive(Debug)]
enum Delivery {
    /// New to the group (`>`): no failures yet.
    New,
    /// Delivered before, by an earlier run or another consumer (this consumer's own pending
    /// entries at start, or taken over): their failures are read from Redis.
    Again,
    /// A nacked batch's entries, delivered again by this run: their failures are known here
    /// (and read from Redis too, in case another account is ahead).
    Retry {
        history: History,
        failures: HashMap<String, Failures>,
    },
}

/// The reader's state; runs on its own task (see [`Reader::run`]).
pub(super) struct Reader {
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
    /// Per stream, the keys of the state kept beside the group.
    keys: Vec<StateKeys>,
}

impl Reader {
    /// A reader for `config` as `consumer`, connecting through `connection`; batches go to
    /// `tx`, undecodable records to `dead_letters`.
    pub(super) fn new(
        config: RedisStreamSourceConfig,
        consumer: String,
        connection: RedisConnection,
        shared: Arc<Shared>,
        dead_letters: DeadLetterQueue,
        shutdown: CancellationToken,
        tx: mpsc::Sender<Result<SourceBatch>>,
    ) -> Self {
        Self {
            decoder: config
                .format
                .decoder_with_limits(config.csv.clone(), config.limits),
            consumer,
            connection,
            con: None,
            shared,
            dead_letters,
            shutdown,
            tx,
            claim_cursors: vec!["0-0".to_owned(); config.streams.len()],
            keys: config
                .streams
                .iter()
                .map(|s| config.state_keys(s))
                .collect(),
            config,
        }
    }

    /// Reads until shutdown or until the pipeline stops taking batches, reconnecting with a
    /// backoff after failures.
    pub(super) async fn run(mut self) {
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
                    self.ensure_groups().await?;
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

    /// Creates the groups that do not exist yet. A group missing although its stream has an
    /// acknowledged-through mark was lost while no consumer ran: it starts at the mark, not
    /// at `start`.
    async fn ensure_groups(&mut self) -> Result<()> {
        for stream in 0..self.config.streams.len() {
            let key = self.keys[stream].acked.clone();
            let con = self.con().await?;
            let mark: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(con)
                .await
                .map_err(|e| error(format!("reading {key}"), e))?;
            match mark {
                Some(mark) => {
                    let why = "at the acknowledged-through mark kept in Redis";
                    self.create_group(stream, &mark, Some(why)).await?;
                }
                None => {
                    let start = match self.config.start {
                        StreamStart::Earliest => "0",
                        StreamStart::Latest => "$",
                    };
                    self.create_group(stream, start, None).await?;
                }
            }
        }
        Ok(())
    }

    /// Creates the group of a stream that reported it missing (NOGROUP): Redis lost it, or
    /// someone deleted it. Never at `$`, which would skip what producers wrote meanwhile; see
    /// [`state::recreation_start`].
    async fn recreate_group(&mut self, stream: usize) -> Result<()> {
        let name = self.config.streams[stream].clone();
        let mark_key = self.keys[stream].acked.clone();
        let con = self.con().await?;
        let (durable, first): (Option<String>, Value) = redis::pipe()
            .cmd("GET")
            .arg(&mark_key)
            .cmd("XRANGE")
            .arg(&name)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(con)
            .await
            .map_err(|e| error(format!("reading where group of {name} was"), e))?;
        let first = parse_entries(&first, &self.config.field)
            .into_iter()
            .next()
            .map(|e| e.id);
        let in_memory = lock(&self.shared.acked_through)[stream].clone();
        let start =
            state::recreation_start(durable.as_deref(), in_memory.as_deref(), first.as_deref());
        self.create_group(stream, &start.at, Some(start.why)).await
    }

    /// `XGROUP CREATE` (with the stream, if missing) after `at`. `recreation` says why, when
    /// the group existed before: then its creation is logged as an error and counted.
    async fn create_group(
        &mut self,
        stream: usize,
        at: &str,
        recreation: Option<&str>,
    ) -> Result<()> {
        let name = self.config.streams[stream].clone();
        let group = self.config.group.clone();
        let con = self.con().await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&name)
            .arg(&group)
            .arg(at)
            .arg("MKSTREAM")
            .query_async(con)
            .await;
        match created {
            Ok(()) => {}
            // Another consumer created it first (or it was there all along).
            Err(e) if e.code() == Some("BUSYGROUP") => return Ok(()),
            Err(e) => return Err(error(format!("creating group {group} on {name}"), e)),
        }
        self.claim_cursors[stream] = "0-0".to_owned();
        match recreation {
            None => {
                tracing::info!(stream = %name, %group, start = at, "redis streams: group created")
            }
            Some(why) => {
                self.shared.recreated.fetch_add(1, Ordering::Relaxed);
                self.shared.publish();
                tracing::error!(
                    stream = %name,
                    %group,
                    start = at,
                    "redis streams: the consumer group was lost (NOGROUP); created again {why}"
                );
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
                self.deliver(stream, entries, Delivery::Again).await?;
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
        let mut failures: HashMap<(usize, &str), &Failures> = HashMap::new();
        for held in &item.entries {
            let (stream, id) = &held.entry;
            by_stream.entry(*stream).or_default().push(id.clone());
            failures.insert((*stream, id.as_str()), &held.failures);
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
                        // Lost with the group: not pending any more, and delivered again by
                        // the group created anew if the stream still has them.
                        self.recreate_group(stream).await?;
                        let mut owned = lock(&self.shared.owned);
                        for id in chunk {
                            owned.remove(&(stream, id.clone()));
                        }
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
                    let known = failures
                        .get(&(stream, entry.id.as_str()))
                        .map(|f| (*f).clone())
                        .unwrap_or_default();
                    let how = Delivery::Retry {
                        history: History {
                            attempt: item.attempt,
                            successes: item.successes_at_nack,
                        },
                        failures: HashMap::from([(entry.id.clone(), known)]),
                    };
                    self.deliver(stream, vec![entry], how).await?;
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
                    self.recreate_group(stream).await?;
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
                self.deliver(stream, entries, Delivery::Again).await?;
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
            self.deliver(stream, entries, Delivery::New).await?;
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
                // The stream or group was lost under us: create them again (a group that
                // still exists answers BUSYGROUP and stays as it is).
                for &s in streams {
                    self.recreate_group(s).await?;
                }
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

    /// What Redis knows of earlier attempts at `ids`: how often each was delivered to this
    /// consumer (one `XPENDING` per id; an id missing from the answer is not pending with
    /// this consumer), and the failures counted against each (one `HMGET`), in one round trip.
    async fn earlier_attempts(
        &mut self,
        stream: usize,
        ids: &[&str],
    ) -> Result<(HashMap<String, u64>, HashMap<String, Failures>)> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let key = self.config.streams[stream].clone();
        let group = self.config.group.clone();
        let consumer = self.consumer.clone();
        let mut pipe = redis::pipe();
        pipe.add_command(state::read_failures(&self.keys[stream], ids));
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
            .map_err(|e| error(format!("reading earlier attempts at entries of {key}"), e))?;
        let Some((failures, pending)) = replies.split_first() else {
            return Ok(Default::default());
        };
        Ok((
            pending.iter().flat_map(parse_pending).collect(),
            state::parse_failures(failures, ids),
        ))
    }

    /// Decodes `entries` into one batch for the pipeline; dead-letters the undecodable ones,
    /// and the poison ones: those that failed `max_deliveries` times.
    async fn deliver(&mut self, stream: usize, entries: Vec<Entry>, how: Delivery) -> Result<()> {
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
        let is_new = matches!(how, Delivery::New);
        let (deliveries, mut failures, history) = match how {
            Delivery::New => (HashMap::new(), HashMap::new(), None),
            Delivery::Again | Delivery::Retry { .. } => {
                let mut ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
                ids.sort_by(|a, b| compare_ids(a, b));
                let (deliveries, mut durable) = self.earlier_attempts(stream, &ids).await?;
                let history = match how {
                    Delivery::Retry { history, failures } => {
                        for (id, known) in failures {
                            let merged = durable.remove(&id).unwrap_or_default().max(known);
                            durable.insert(id, merged);
                        }
                        Some(history)
                    }
                    _ => None,
                };
                (deliveries, durable, history)
            }
        };
        let key = self.config.streams[stream].clone();
        let mut builder = MetricsBatchBuilder::with_capacity(entries.len());
        let mut rejects = Vec::new();
        let mut in_batch: Vec<Held> = Vec::new();
        let mut done = Vec::new(); // dead-lettered whole: acknowledged once stored
        let mut letters: Vec<Letter> = Vec::new();
        for (entry, busy) in entries.into_iter().zip(in_flight) {
            if busy {
                continue; // this consumer holds it (a batch, a retry, an XACK): no second copy
            }
            let delivered = if is_new {
                1
            } else {
                match deliveries.get(&entry.id) {
                    Some(&n) => n,
                    None => continue, // not pending with this consumer any more
                }
            };
            let failed = failures.remove(&entry.id).unwrap_or_default();
            if entry.deleted {
                // Trimmed from the stream while pending: nothing left to read.
                self.shared.trimmed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(id = %entry.id, "redis streams: a pending entry was trimmed before being processed; it is lost");
                done.push((stream, entry.id));
                continue;
            }
            let Some(payload) = entry.payload else {
                letters.push(Letter {
                    id: entry.id.clone(),
                    reason: format!("entry has no `{}` field", self.config.field),
                    record: String::new(),
                    deliveries: delivered,
                    failures: failed.count,
                });
                done.push((stream, entry.id));
                continue;
            };
            if failed.count >= self.config.max_deliveries {
                let last = failed
                    .last_error
                    .as_deref()
                    .unwrap_or("reason not recorded");
                letters.push(Letter {
                    id: entry.id.clone(),
                    reason: format!(
                        "failed {} times (max_deliveries = {}); last failure: {last}",
                        failed.count, self.config.max_deliveries
                    ),
                    record: String::from_utf8_lossy(&payload).into_owned(),
                    deliveries: delivered,
                    failures: failed.count,
                });
                self.shared.poison.fetch_add(1, Ordering::Relaxed);
                done.push((stream, entry.id));
                continue;
            }
            let rows_before = builder.len();
            rejects.clear();
            self.decoder.decode(&payload, &mut builder, &mut rejects);
            for r in rejects.drain(..) {
                letters.push(Letter {
                    id: format!("{}#{}", entry.id, r.record),
                    reason: r.reason,
                    record: r.raw,
                    deliveries: delivered,
                    failures: failed.count,
                });
            }
            if builder.len() > rows_before {
                in_batch.push(Held {
                    entry: (stream, entry.id),
                    failures: failed,
                });
            } else {
                done.push((stream, entry.id));
            }
        }
        if let Err(e) = self.dead_letter(&key, &letters).await {
            // Not stored: nothing of this read may be acknowledged. Deliver it again later.
            tracing::error!("redis streams: dead letters not stored, redelivering: {e}");
            let mut all = in_batch;
            all.extend(done.into_iter().map(|entry| Held {
                entry,
                failures: Failures::default(),
            }));
            lock(&self.shared.retry).push(Retry {
                due: Instant::now() + self.config.retry_backoff,
                entries: all,
                attempt: 1,
                successes_at_nack: self.shared.successes.load(Ordering::Relaxed),
            });
            return Ok(());
        }
        {
            let mut owned = lock(&self.shared.owned);
            owned.extend(done.iter().cloned());
            owned.extend(in_batch.iter().map(|h| h.entry.clone()));
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
        let previous = history.unwrap_or(History {
            attempt: 0,
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
    async fn dead_letter(&mut self, stream: &str, letters: &[Letter]) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let stage = self.dead_letters.stage().name().to_owned();
        let Some(dlq) = self.config.dead_letter_stream.clone() else {
            for l in letters {
                self.dead_letters.send(
                    format!("{stream}/{}", l.id),
                    l.reason.clone(),
                    l.record.clone(),
                )?;
            }
            return Ok(());
        };
        let mut pipe = redis::pipe();
        for l in letters {
            pipe.cmd("XADD")
                .arg(&dlq)
                .arg("*")
                .arg("dlq_reason")
                .arg(&l.reason)
                .arg("dlq_stage")
                .arg(&stage)
                .arg("dlq_stream")
                .arg(stream)
                .arg("dlq_id")
                .arg(&l.id)
                .arg("dlq_deliveries")
                .arg(l.deliveries)
                .arg("dlq_failures")
                .arg(l.failures)
                .arg("data")
                .arg(&l.record)
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

/// A record to dead-letter, whole, with why.
#[derive(Debug)]
struct Letter {
    /// The entry id (`id#record` for one record of a multi-record entry).
    id: String,
    reason: String,
    /// The record as received (lossy UTF-8).
    record: String,
    /// Deliveries by Redis's count (informative: restarts and retries raise it).
    deliveries: u64,
    /// Failures counted against the entry.
    failures: u32,
}
