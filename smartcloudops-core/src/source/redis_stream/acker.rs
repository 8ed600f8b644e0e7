//! Ack bookkeeping: what the reader, the ack callbacks and the acker share (entries held,
//! to acknowledge, to retry; counters and gauges), and the acker task that sends `XACK`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use redis::aio::MultiplexedConnection;
use rustc_hash::FxHashSet;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{RedisStreamSourceConfig, StateKeys};
use super::state::{self, Failures};
use super::{EntryRef, MAX_RECONNECT_BACKOFF, lock};
use crate::ack::{AckOutcome, NackKind};
use crate::error::Result;
use crate::metrics::StageMetrics;
use crate::redis::{RedisConnection, error};

/// An entry this consumer holds in a batch or a retry, with its failures so far.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) entry: EntryRef,
    pub(super) failures: Failures,
}

/// A nacked batch's entries, waiting to be delivered again.
#[derive(Debug)]
pub(super) struct Retry {
    pub(super) due: Instant,
    pub(super) entries: Vec<Held>,
    /// How many times these entries failed in a row: the next wait doubles with it.
    pub(super) attempt: u32,
    /// Acked batches at the time of the nack.
    pub(super) successes_at_nack: u64,
}

/// What a batch carries from its entries' earlier attempts into its outcome.
#[derive(Debug, Clone, Copy)]
pub(super) struct History {
    /// Consecutive failures of these entries, for the backoff.
    pub(super) attempt: u32,
    /// Acked batches when the entries last failed (or were delivered the first time).
    pub(super) successes: u64,
}

/// State shared by the reader, the acker and the ack callbacks.
#[derive(Debug)]
pub(super) struct Shared {
    /// Entries whose batch was acknowledged, waiting for `XACK`.
    pub(super) to_ack: Mutex<Vec<EntryRef>>,
    /// Failures that counted against entries, with their reason, waiting to be written to
    /// the attempts hash. Always written before any later `XACK` of the same entry.
    pub(super) to_count: Mutex<Vec<(EntryRef, Arc<str>)>>,
    /// Per stream, the acknowledged-through mark the last `XACK` moved to (the durable one
    /// is in Redis).
    pub(super) acked_through: Mutex<Vec<Option<String>>>,
    /// Entries of nacked batches and when to deliver them again.
    pub(super) retry: Mutex<Vec<Retry>>,
    /// Entries this consumer holds: in a batch, waiting for a retry, or waiting for `XACK`.
    /// They are never delivered again while held; the set is the backpressure measure.
    pub(super) owned: Mutex<FxHashSet<EntryRef>>,
    /// Batches sent to the pipeline and not resolved yet.
    pub(super) batches_out: AtomicUsize,
    /// Batches acknowledged since start.
    pub(super) successes: AtomicU64,
    /// Consecutive nacked batches, for the retry backoff.
    pub(super) failures: AtomicU64,
    pub(super) wake_acker: Notify,
    pub(super) wake_reader: Notify,
    /// Cancelled when the reader stopped: nothing new will be read or dead-lettered.
    pub(super) reader_done: CancellationToken,
    pub(super) stage: Arc<StageMetrics>,
    pub(super) acked: AtomicU64,
    pub(super) claimed: AtomicU64,
    pub(super) poison: AtomicU64,
    pub(super) trimmed: AtomicU64,
    /// Consumer groups found lost (NOGROUP) and created again.
    pub(super) recreated: AtomicU64,
}

impl Shared {
    pub(super) fn new(stage: Arc<StageMetrics>, streams: usize) -> Self {
        let shared = Self {
            to_ack: Mutex::default(),
            to_count: Mutex::default(),
            acked_through: Mutex::new(vec![None; streams]),
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
            recreated: AtomicU64::new(0),
        };
        shared.publish();
        shared
    }

    /// Publishes the counters as the stage's gauges.
    pub(super) fn publish(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        self.stage
            .set_gauge("redis_stream_acked_total", &[], get(&self.acked));
        self.stage
            .set_gauge("redis_stream_claimed_total", &[], get(&self.claimed));
        self.stage
            .set_gauge("redis_stream_poison_total", &[], get(&self.poison));
        self.stage
            .set_gauge("redis_stream_trimmed_total", &[], get(&self.trimmed));
        self.stage.set_gauge(
            "redis_stream_group_recreated_total",
            &[],
            get(&self.recreated),
        );
        let owned = lock(&self.owned).len();
        self.stage
            .set_gauge("redis_stream_in_flight", &[], owned as f64);
    }

    /// The outcome of a batch holding `held`. The entries are queued (for `XACK` or a
    /// retry) before the batch stops counting as out, so the acker, which exits when no batch
    /// is out, never misses them.
    ///
    /// Whether a nack counts as a failure of the entries depends on its kind:
    /// - [`Permanent`](NackKind::Permanent) (the batch itself is refused): always.
    /// - [`Retryable`](NackKind::Retryable): only if other batches were acknowledged since the
    ///   entries' previous attempt. When every batch fails (an outage downstream, not the
    ///   entries' fault), nothing counts.
    /// - [`Abandoned`](NackKind::Abandoned) (the pipeline stopped first): never, and it is not
    ///   an attempt either: the backoff does not grow and the entries' previous attempt stays
    ///   the one the heuristic looks back to.
    pub(super) fn resolve(
        &self,
        mut held: Vec<Held>,
        outcome: AckOutcome,
        retry_backoff: Duration,
        max_wait: Duration,
        history: History,
    ) {
        match outcome {
            AckOutcome::Acked => {
                self.failures.store(0, Ordering::Relaxed);
                self.successes.fetch_add(1, Ordering::Relaxed);
                lock(&self.to_ack).extend(held.into_iter().map(|h| h.entry));
                self.wake_acker.notify_one();
            }
            AckOutcome::Nacked(nack) => {
                let abandoned = nack.kind == NackKind::Abandoned;
                if !abandoned {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
                // Per entry, not per batch: a nacked batch redelivered as many one-entry
                // batches must not push every retry to the maximum wait.
                let wait = retry_backoff
                    .saturating_mul(1 << history.attempt.min(16))
                    .min(max_wait);
                let successes = self.successes.load(Ordering::Relaxed);
                let counts = match nack.kind {
                    NackKind::Permanent => true,
                    NackKind::Retryable => successes > history.successes,
                    NackKind::Abandoned => false,
                };
                tracing::warn!(
                    entries = held.len(),
                    retry_in_ms = wait.as_millis() as u64,
                    kind = %nack.kind,
                    counts_as_failure = counts,
                    "redis streams: batch failed ({nack}); it will be delivered again"
                );
                if counts {
                    let reason: Arc<str> = Arc::from(nack.reason);
                    let mut to_count = lock(&self.to_count);
                    for h in &mut held {
                        h.failures.count += 1;
                        h.failures.last_error = Some(reason.clone());
                        to_count.push((h.entry.clone(), reason.clone()));
                    }
                }
                let (attempt, successes_at_nack) = if abandoned {
                    (history.attempt, history.successes)
                } else {
                    (history.attempt + 1, successes)
                };
                lock(&self.retry).push(Retry {
                    due: Instant::now() + wait,
                    entries: held,
                    attempt,
                    successes_at_nack,
                });
            }
        }
        self.batches_out.fetch_sub(1, Ordering::Release);
        self.wake_reader.notify_one();
        self.wake_acker.notify_one();
    }
}

/// Acknowledges entries of acknowledged batches (`XACK`, with their failure counts deleted
/// and the acknowledged-through mark moved) and writes the failures that counted, on its own
/// connection: the reader's connection spends most of its time in a blocking read.
pub(super) struct Acker {
    streams: Vec<String>,
    keys: Vec<StateKeys>,
    group: String,
    attempts_ttl: Duration,
    connection: RedisConnection,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Acker {
    /// An acker for the streams and group of `config`, connecting on its own through
    /// `connection`.
    pub(super) fn new(
        config: &RedisStreamSourceConfig,
        connection: RedisConnection,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            streams: config.streams.clone(),
            keys: config
                .streams
                .iter()
                .map(|s| config.state_keys(s))
                .collect(),
            group: config.group.clone(),
            attempts_ttl: config.attempts_ttl,
            connection,
            shared,
            shutdown,
        }
    }

    /// Acknowledges entries until the reader stopped and every batch is resolved (or Redis
    /// stays away while stopping).
    pub(super) async fn run(self) {
        let mut con: Option<MultiplexedConnection> = None;
        let mut backoff = Duration::from_millis(100);
        let mut attempts_while_stopping = 0u32;
        loop {
            let stopping = self.shutdown.is_cancelled() || self.shared.reader_done.is_cancelled();
            // Acks first, then counts: an entry's failure is queued before its later ack, so
            // every count an ack taken here could follow is taken too, and written first.
            let acks = std::mem::take(&mut *lock(&self.shared.to_ack));
            let counts = std::mem::take(&mut *lock(&self.shared.to_count));
            if !acks.is_empty() || !counts.is_empty() {
                match self.write(&mut con, &counts, &acks).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        self.shared
                            .acked
                            .fetch_add(acks.len() as u64, Ordering::Relaxed);
                        {
                            let mut owned = lock(&self.shared.owned);
                            for e in &acks {
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
                            entries = acks.len(),
                            failures = counts.len(),
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
                        lock(&self.shared.to_ack).extend(acks);
                        lock(&self.shared.to_count).extend(counts);
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
                if lock(&self.shared.to_ack).is_empty() && lock(&self.shared.to_count).is_empty() {
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

    /// Writes `counts`, then acknowledges `acks`, in one transaction.
    async fn write(
        &self,
        con: &mut Option<MultiplexedConnection>,
        counts: &[(EntryRef, Arc<str>)],
        acks: &[EntryRef],
    ) -> Result<()> {
        if con.is_none() {
            *con = Some(self.connection.connect().await?);
        }
        let Some(c) = con.as_mut() else {
            return Ok(());
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut failed: BTreeMap<usize, Vec<(&str, &str)>> = BTreeMap::new();
        for ((stream, id), reason) in counts {
            failed
                .entry(*stream)
                .or_default()
                .push((id.as_str(), reason));
        }
        for (stream, failed) in &failed {
            state::add_failures(&mut pipe, &self.keys[*stream], self.attempts_ttl, failed);
        }
        let mut by_stream: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for (stream, id) in acks {
            by_stream.entry(*stream).or_default().push(id);
        }
        // Which stream each script reply belongs to, in order.
        let mut replies_of = Vec::new();
        for (stream, ids) in &by_stream {
            let calls = state::add_ack(
                &mut pipe,
                &self.streams[*stream],
                &self.group,
                &self.keys[*stream],
                ids,
            );
            replies_of.extend(std::iter::repeat_n(*stream, calls));
        }
        let replies: Vec<Value> = pipe
            .query_async(c)
            .await
            .map_err(|e| error("acknowledging entries", e))?;
        let mut marks = lock(&self.shared.acked_through);
        for (stream, reply) in replies_of.into_iter().zip(&replies) {
            if let Some(mark) = state::parse_ack_mark(reply) {
                marks[stream] = Some(mark);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::Nack;

    fn held(id: &str, count: u32) -> Held {
        Held {
            entry: (0, id.to_owned()),
            failures: Failures {
                count,
                last_error: None,
            },
        }
    }

    fn shared() -> Shared {
        Shared::new(Arc::new(StageMetrics::new("source:redis_stream")), 1)
    }

    fn resolve(shared: &Shared, held: Vec<Held>, outcome: AckOutcome, successes: u64) {
        shared.batches_out.fetch_add(1, Ordering::Relaxed);
        let history = History {
            attempt: 0,
            successes,
        };
        let wait = Duration::from_millis(10);
        shared.resolve(held, outcome, wait, wait, history);
    }

    #[tokio::test]
    async fn only_failures_after_other_batches_succeeded_count_and_are_queued_for_redis() {
        let shared = shared();
        let nack = || AckOutcome::Nacked(Nack::retryable("sink down"));

        // Every batch failing (an outage): nothing counts, nothing is written.
        resolve(&shared, vec![held("1-0", 1)], nack(), 0);
        assert!(lock(&shared.to_count).is_empty());
        let retry = lock(&shared.retry).pop().unwrap();
        assert_eq!(retry.entries[0].failures.count, 1, "unchanged");
        assert_eq!(retry.attempt, 1, "the backoff still grows");

        // Another batch succeeded since: this failure is the entry's own.
        resolve(&shared, vec![held("2-0", 0)], AckOutcome::Acked, 0);
        assert_eq!(*lock(&shared.to_ack), vec![(0, "2-0".to_owned())]);
        resolve(&shared, vec![held("1-0", 1)], nack(), 0);
        let retry = lock(&shared.retry).pop().unwrap();
        assert_eq!(retry.entries[0].failures.count, 2);
        assert_eq!(
            retry.entries[0].failures.last_error.as_deref(),
            Some("sink down")
        );
        let counted = lock(&shared.to_count).clone();
        assert_eq!(counted.len(), 1);
        assert_eq!(counted[0].0, (0, "1-0".to_owned()));
        assert_eq!(&*counted[0].1, "sink down");
        assert_eq!(shared.batches_out.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_abandoned_batch_counts_nothing_and_is_no_attempt() {
        let shared = shared();
        // Other batches succeeded since: a retryable failure would count here.
        resolve(&shared, vec![held("2-0", 0)], AckOutcome::Acked, 0);
        let abandoned = AckOutcome::Nacked(Nack::abandoned("its rows were in open windows"));
        resolve(&shared, vec![held("1-0", 1)], abandoned, 0);
        assert!(
            lock(&shared.to_count).is_empty(),
            "nothing written to Redis"
        );
        let retry = lock(&shared.retry).pop().unwrap();
        assert_eq!(retry.entries[0].failures.count, 1, "unchanged");
        assert_eq!(retry.attempt, 0, "the backoff does not grow");
        assert_eq!(
            retry.successes_at_nack, 0,
            "the previous real attempt is still the one to look back to"
        );
        assert_eq!(shared.failures.load(Ordering::Relaxed), 0);
        assert_eq!(shared.batches_out.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_permanent_failure_counts_even_when_every_batch_fails() {
        let shared = shared();
        let refused = AckOutcome::Nacked(Nack::permanent("action `webhook` failed: 400"));
        resolve(&shared, vec![held("1-0", 0)], refused, 0);
        let retry = lock(&shared.retry).pop().unwrap();
        assert_eq!(retry.entries[0].failures.count, 1);
        let counted = lock(&shared.to_count).clone();
        assert_eq!(counted.len(), 1);
        assert_eq!(&*counted[0].1, "action `webhook` failed: 400");
    }
}
