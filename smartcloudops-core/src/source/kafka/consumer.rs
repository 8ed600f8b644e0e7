//! The consumer side: the group member (rebalance and commit callbacks, lag gauges) and the
//! consumer loop that polls Kafka, applies backpressure and redelivery, cuts batches and
//! claims their offsets.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::config::{AutoOffsetReset, KafkaSourceConfig};
use super::kafka_error;
use super::offsets::{OffsetTracker, Poison, RangeTicket, TopicPartition};
use crate::ack::{Ack, AckOutcome};
use crate::dead_letter::DeadLetterQueue;
use crate::error::Result;
use crate::metrics::StageMetrics;
use crate::source::RevokeListener;
use crate::util::run_blocking;

/// State shared by the consumer task, the rebalance callbacks and the ack callbacks.
#[derive(Debug, Default)]
pub(super) struct Shared {
    tracker: Mutex<OffsetTracker>,
    /// Signalled whenever a batch's outcome arrives.
    resolved: Condvar,
    /// Messages in batches sent to the pipeline and not yet resolved.
    unacked: AtomicUsize,
    /// Bumped on every assignment so the consumer task re-applies its pause state.
    assignments: AtomicUsize,
    /// Wakes the consumer loop when outcomes arrive, so it can resume paused partitions.
    wake: tokio::sync::Notify,
    /// Partitions revoked since the consumer loop last looked: messages of theirs it still
    /// buffers predate the revoke and must not be claimed under a later assignment.
    revoked: Mutex<Vec<TopicPartition>>,
    /// Bumped with every revoke, so the loop checks `revoked` without a lock per message.
    revocations: AtomicUsize,
    /// Set by the commit callback when an asynchronous commit failed.
    commit_failed: AtomicBool,
}

impl Shared {
    /// Bookkeeping that poisons a range after `max_attempts` permanently failed deliveries
    /// (0 = never).
    pub(super) fn new(max_attempts: u32) -> Self {
        Self {
            tracker: Mutex::new(OffsetTracker::with_max_attempts(max_attempts)),
            ..Self::default()
        }
    }

    pub(super) fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep going.
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The consumer's callbacks: rebalances, commit results and statistics.
pub(super) struct RebalanceContext {
    shared: Arc<Shared>,
    drain_timeout: Duration,
    /// The source's stage metrics, where consumer lag is published.
    stage: Arc<StageMetrics>,
    /// Saves the detector state of the revoked partitions' series before their commit.
    revoke_listener: Option<Arc<dyn RevokeListener>>,
}

/// Gauge name of the per-partition consumer lag.
const LAG_GAUGE: &str = "kafka_consumer_lag";

impl ClientContext for RebalanceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): publish the lag of each
    /// assigned partition (messages between the committed offset and the log end).
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.stage.clear_gauges(LAG_GAUGE);
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // librdkafka reports -1 for partitions this member does not consume.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    let partition = partition.to_string();
                    self.stage.set_gauge(
                        LAG_GAUGE,
                        &[("topic", topic), ("partition", &partition)],
                        p.consumer_lag as f64,
                    );
                }
            }
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        // Runs on the thread polling the consumer; the pipeline acks on other threads. Only
        // batches already handed to the pipeline are waited for: claims still queued here
        // are dropped (their next owner reads them again).
        let deadline = std::time::Instant::now() + self.drain_timeout;
        self.shared
            .revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(revoked.iter().cloned());
        self.shared.revocations.fetch_add(1, Ordering::SeqCst);
        let drain = || {
            let mut tracker = self.shared.tracker();
            while revoked.iter().any(|tp| tracker.in_flight(tp) > 0) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    tracing::warn!(
                        partitions = ?revoked,
                        "revoke: in-flight batches did not finish within drain_timeout; \
                         the new owner will redeliver them"
                    );
                    break;
                }
                tracker = self
                    .shared
                    .resolved
                    .wait_timeout(tracker, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let mut commit = TopicPartitionList::new();
            for tp in &revoked {
                if let Some(offset) = tracker.revoke(tp) {
                    let _ = commit.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset));
                }
            }
            commit
        };
        let commit = run_blocking(drain);
        // The drained batches are scored: save the state they built before the commit lets
        // the new owner read on (and load that state).
        if let Some(listener) = &self.revoke_listener {
            run_blocking(|| listener.on_revoke(self.drain_timeout));
        }
        if commit.count() > 0 {
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => tracing::info!(partitions = ?revoked, "revoke: offsets committed"),
                Err(e) => {
                    tracing::warn!(error = %e, "revoke: commit failed; the new owner may redeliver")
                }
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            // The same offsets are committed again on the next tick.
            tracing::warn!(error = %e, "offset commit failed");
            self.shared.commit_failed.store(true, Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut tracker = self.shared.tracker();
            for e in tpl.elements() {
                tracker.assign((e.topic().to_owned(), e.partition()));
            }
            drop(tracker);
            self.shared.assignments.fetch_add(1, Ordering::SeqCst);
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// The group member, with this source's callbacks.
pub(super) type KafkaConsumer = StreamConsumer<RebalanceContext>;

/// The consumer of `config`, subscribed to its topics, with `shared` bookkeeping and
/// consumer-lag gauges in `stage`.
pub(super) fn subscribe(
    config: &KafkaSourceConfig,
    shared: Arc<Shared>,
    stage: Arc<StageMetrics>,
    revoke_listener: Option<Arc<dyn RevokeListener>>,
) -> Result<KafkaConsumer> {
    let reset = match config.auto_offset_reset {
        AutoOffsetReset::Earliest => "earliest",
        AutoOffsetReset::Latest => "latest",
    };
    let consumer: KafkaConsumer = config
        .client()
        .client_config(&[
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            // Statistics feed the consumer-lag gauges.
            ("statistics.interval.ms", "5000"),
            // librdkafka waits 1 s before fetching again once its prefetch queue was full;
            // a consumer that pauses between batches (decoding) then stalls for a second
            // at a time. Re-check soon instead.
            ("fetch.queue.backoff.ms", "10"),
        ])
        .set("group.id", &config.group_id)
        .set("auto.offset.reset", reset)
        // At-least-once rests on these; user options cannot switch them off.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create_with_context(RebalanceContext {
            shared,
            drain_timeout: config.drain_timeout,
            stage,
            revoke_listener,
        })
        .map_err(|e| kafka_error("creating the Kafka consumer", e))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| kafka_error("subscribing", e))?;
    Ok(consumer)
}

/// How long a batch may wait for the pipeline before the source pauses its partitions.
const BACKPRESSURE_GRACE: Duration = Duration::from_millis(500);

/// The consumer loop's state; runs on its own task (see [`ConsumerTask::run`]).
pub(super) struct ConsumerTask {
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    config: KafkaSourceConfig,
    /// The source's stage metrics (consumer errors are counted there).
    dead_letters: DeadLetterQueue,
    paused: bool,
    seen_assignments: usize,
    seen_revocations: usize,
    /// Partitions held paused until a redelivery backoff expires.
    backoff: HashMap<TopicPartition, Instant>,
    last_committed: HashMap<TopicPartition, i64>,
}

impl ConsumerTask {
    /// The loop of `consumer`; consumer errors are counted in `dead_letters`' stage.
    pub(super) fn new(
        consumer: KafkaConsumer,
        shared: Arc<Shared>,
        dead_letters: DeadLetterQueue,
        config: KafkaSourceConfig,
    ) -> Self {
        Self {
            consumer: Arc::new(consumer),
            shared,
            config,
            dead_letters,
            paused: false,
            seen_assignments: 0,
            seen_revocations: 0,
            backoff: HashMap::new(),
            last_committed: HashMap::new(),
        }
    }

    /// The consumer loop: polls Kafka, cuts batches and claims their offsets, hands them to
    /// the decode task through `tx`.
    pub(super) async fn run(mut self, tx: mpsc::Sender<Claimed>) {
        let batch_size = self.config.batch_size.max(1);
        let mut buffer: Vec<OwnedMessage> = Vec::with_capacity(batch_size);
        let mut ready: Option<Claimed> = None;
        let mut ready_since = Instant::now();
        let mut deadline: Option<Instant> = None;
        let mut commit_tick = tokio::time::interval(self.config.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consumer = self.consumer.clone();
        loop {
            self.apply_rewinds(&mut buffer);
            // While a batch waits for the pipeline, messages stay in librdkafka's bounded queue
            // (recv is not polled). Only when the wait lasts does the source pause its
            // partitions and poll again, so rebalances and the poll interval are served.
            // Pausing on every short wait would make librdkafka drop and refetch its
            // prefetched messages over and over.
            let stalled = ready.is_some() && ready_since.elapsed() >= BACKPRESSURE_GRACE;
            self.update_pause(stalled);
            tokio::select! {
                biased;
                permit = tx.reserve(), if ready.is_some() => match permit {
                    Ok(permit) => {
                        tracing::trace!(waited = ?ready_since.elapsed(), "batch handed to the pipeline");
                        permit.send(ready.take().expect("guarded by is_some"));
                    }
                    Err(_) => break,
                },
                () = tx.closed() => break,
                message = consumer.recv(), if ready.is_none() || self.paused => match message {
                    Ok(m) => {
                        // The poll may have run a rebalance: drop what predates a revoke
                        // before taking messages fetched after it.
                        self.forget_revoked(&mut buffer);
                        buffer.push(m.detach());
                        deadline.get_or_insert_with(|| Instant::now() + self.config.batch_timeout);
                        // Take whatever else librdkafka already has without another trip
                        // through the select: the per-message cost of the loop adds up.
                        while buffer.len() < batch_size {
                            match consumer.recv().now_or_never() {
                                Some(Ok(m)) => {
                                    self.forget_revoked(&mut buffer);
                                    buffer.push(m.detach());
                                }
                                Some(Err(e)) => {
                                    self.dead_letters.stage().record_error();
                                    tracing::warn!(error = %e, "kafka consumer error");
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    Err(e) => {
                        self.dead_letters.stage().record_error();
                        tracing::warn!(error = %e, "kafka consumer error");
                    }
                },
                () = sleep_until(deadline), if deadline.is_some() => {}
                _ = commit_tick.tick() => self.commit(CommitMode::Async),
                () = sleep_until(self.backoff.values().min().copied()), if !self.backoff.is_empty() => {}
                () = self.shared.wake.notified(), if self.paused => {}
                () = tokio::time::sleep_until(ready_since + BACKPRESSURE_GRACE), if ready.is_some() && !self.paused => {}
            }
            let due = deadline.is_some_and(|d| d <= Instant::now());
            if ready.is_none() && !buffer.is_empty() && (buffer.len() >= batch_size || due) {
                let messages = std::mem::take(&mut buffer);
                deadline = None;
                ready = self.claim(messages);
                ready_since = Instant::now();
            }
        }
        // The pipeline dropped the stream: it drains and resolves every batch it took before
        // waiting for this task. A claim never handed over is released (nacked: its offsets
        // stay uncommitted); then commit what was acknowledged and leave the group.
        drop(ready.take());
        drop(buffer);
        run_blocking(|| self.wait_for_acks(Duration::from_secs(10)));
        self.commit(CommitMode::Sync);
    }

    /// Seeks partitions whose batches were nacked back to the failed offset, after a backoff.
    fn apply_rewinds(&mut self, buffer: &mut Vec<OwnedMessage>) {
        let rewinds = self.shared.tracker().take_rewinds();
        for ((topic, partition), offset, failures) in rewinds {
            // Everything buffered for the partition comes after the failed batch: drop it.
            buffer.retain(|m| !(m.topic() == topic && m.partition() == partition));
            let delay = self
                .config
                .retry_backoff
                .saturating_mul(1 << failures.saturating_sub(1).min(6))
                .min(Duration::from_secs(30));
            let poisoned = self
                .shared
                .tracker()
                .poison(&(topic.clone(), partition))
                .map(|p| (p.first, p.last, p.attempts));
            match poisoned {
                Some((first, last, attempts)) => tracing::warn!(
                    %topic, partition, offsets = %format!("{first}..={last}"), attempts, ?delay,
                    "batch failed permanently max_attempts times; its messages go to the dead-letter output"
                ),
                None => {
                    tracing::warn!(%topic, partition, offset, ?delay, "batch failed; redelivering")
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            if let Err(e) = self.consumer.pause(&tpl) {
                tracing::warn!(error = %e, "pausing for redelivery failed");
            }
            if let Err(e) = self.consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            ) {
                // Keep the rewind pending (and the partition paused): resuming without the
                // seek would skip the failed batch.
                tracing::warn!(error = %e, %topic, partition, offset, "seek for redelivery failed; retrying");
                self.shared
                    .tracker()
                    .retry_rewind(&(topic.clone(), partition), offset);
            }
            self.backoff
                .insert((topic, partition), Instant::now() + delay);
        }
    }

    /// Pauses every partition while the pipeline is backed up, resumes when it catches up;
    /// partitions in redelivery backoff stay paused until it expires.
    fn update_pause(&mut self, blocked: bool) {
        let assignments = self.shared.assignments.load(Ordering::SeqCst);
        let reassigned = assignments != self.seen_assignments;
        self.seen_assignments = assignments;
        let want = blocked || self.shared.unacked.load(Ordering::SeqCst) > self.config.max_unacked;
        let now = Instant::now();
        let expired: Vec<TopicPartition> = self
            .backoff
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        if want == self.paused && !reassigned && expired.is_empty() {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        for tp in &expired {
            self.backoff.remove(tp);
        }
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for e in assignment.elements() {
            let tp = (e.topic().to_owned(), e.partition());
            if want || self.backoff.contains_key(&tp) {
                pause.add_partition(&tp.0, tp.1);
            } else {
                resume.add_partition(&tp.0, tp.1);
            }
        }
        tracing::debug!(
            pause = pause.count(),
            resume = resume.count(),
            want,
            reassigned,
            "partition flow control"
        );
        if pause.count() > 0
            && let Err(e) = self.consumer.pause(&pause)
        {
            tracing::warn!(error = %e, "pausing partitions failed");
        }
        if resume.count() > 0
            && let Err(e) = self.consumer.resume(&resume)
        {
            tracing::warn!(error = %e, "resuming partitions failed");
        }
        if want != self.paused {
            tracing::debug!(paused = want, "backpressure");
        }
        self.paused = want;
    }

    /// Claims the offsets of `messages` for one batch: messages of partitions revoked (or
    /// rewound) since they were fetched are dropped here, never sent.
    fn claim(&mut self, messages: Vec<OwnedMessage>) -> Option<Claimed> {
        let mut spans: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
        for m in &messages {
            let span = spans
                .entry((m.topic(), m.partition()))
                .or_insert((m.offset(), m.offset()));
            span.0 = span.0.min(m.offset());
            span.1 = span.1.max(m.offset());
        }
        let mut tickets = Vec::new();
        {
            let mut tracker = self.shared.tracker();
            for ((topic, partition), (first, last)) in spans {
                if let Some(ticket) = tracker.register(&(topic.to_owned(), partition), first, last)
                {
                    tickets.push(ticket);
                }
            }
        }
        let owned = |m: &OwnedMessage| {
            tickets
                .iter()
                .any(|t| t.tp.0 == m.topic() && t.tp.1 == m.partition())
        };
        let fetched = messages.len();
        let messages: Vec<OwnedMessage> = messages.into_iter().filter(|m| owned(m)).collect();
        if messages.len() < fetched {
            tracing::debug!(
                dropped = fetched - messages.len(),
                "dropped messages of partitions no longer owned (they are redelivered)"
            );
        }
        if messages.is_empty() {
            return None;
        }
        let (messages, poisoned) = self.split_poisoned(&tickets, messages);
        let count = messages.len() + poisoned.len();
        self.shared.unacked.fetch_add(count, Ordering::SeqCst);
        let ack = self.ack_for(tickets.clone(), count);
        Some(Claimed {
            messages,
            poisoned,
            tickets,
            ack,
        })
    }

    /// Separates the messages of ranges that failed `max_attempts` times: they go to the
    /// dead-letter output instead of the pipeline (see [`Poison`]).
    fn split_poisoned(
        &self,
        tickets: &[RangeTicket],
        messages: Vec<OwnedMessage>,
    ) -> (Vec<OwnedMessage>, Vec<(OwnedMessage, Poison)>) {
        let poisons: Vec<(&RangeTicket, Poison)> = {
            let tracker = self.shared.tracker();
            tickets
                .iter()
                .filter_map(|t| tracker.poison(&t.tp).map(|p| (t, p.clone())))
                .collect()
        };
        if poisons.is_empty() {
            return (messages, Vec::new());
        }
        let mut poisoned = Vec::new();
        let messages = messages
            .into_iter()
            .filter_map(|m| {
                let poison = poisons.iter().find_map(|(t, p)| {
                    (t.tp.0 == m.topic() && t.tp.1 == m.partition() && p.covers(m.offset()))
                        .then_some(p)
                });
                match poison {
                    Some(p) => {
                        poisoned.push((m, p.clone()));
                        None
                    }
                    None => Some(m),
                }
            })
            .collect();
        (messages, poisoned)
    }

    fn ack_for(&self, tickets: Vec<RangeTicket>, messages: usize) -> Ack {
        let shared = self.shared.clone();
        Ack::new(move |outcome| {
            let mut tracker = shared.tracker();
            for ticket in &tickets {
                match &outcome {
                    AckOutcome::Acked => {
                        tracker.ack(ticket);
                    }
                    AckOutcome::Nacked(nack) => {
                        if tracker.nack(ticket, nack).is_some() {
                            tracing::warn!(
                                topic = %ticket.tp.0, partition = ticket.tp.1,
                                offsets = %format!("{}..={}", ticket.first, ticket.last),
                                kind = %nack.kind, reason = %nack.reason, "batch nacked"
                            );
                        }
                    }
                }
            }
            drop(tracker);
            shared.unacked.fetch_sub(messages, Ordering::SeqCst);
            shared.resolved.notify_all();
            shared.wake.notify_one();
        })
    }

    /// Commits the acknowledged high-water mark of every owned partition that moved.
    fn commit(&mut self, mode: CommitMode) {
        if self.shared.commit_failed.swap(false, Ordering::SeqCst) {
            self.last_committed.clear(); // resend everything
        }
        let points = self.shared.tracker().commit_points();
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in points {
            if self.last_committed.get(&tp) != Some(&offset) {
                let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset));
                self.last_committed.insert(tp, offset);
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            // The same offsets are retried on the next tick (or redelivered after a restart).
            self.last_committed.clear();
            tracing::warn!(error = %e, "offset commit failed");
        }
    }

    /// Drops buffered messages of partitions revoked since the last look (see
    /// [`Shared::revoked`]); the next owner, possibly this consumer again, refetches them from
    /// the committed offset.
    fn forget_revoked(&mut self, buffer: &mut Vec<OwnedMessage>) {
        let revocations = self.shared.revocations.load(Ordering::SeqCst);
        if revocations == self.seen_revocations {
            return;
        }
        self.seen_revocations = revocations;
        let revoked = std::mem::take(
            &mut *self
                .shared
                .revoked
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if revoked.is_empty() {
            return;
        }
        let before = buffer.len();
        buffer.retain(|m| {
            !revoked
                .iter()
                .any(|(t, p)| t == m.topic() && *p == m.partition())
        });
        if buffer.len() < before {
            tracing::debug!(
                dropped = before - buffer.len(),
                "dropped messages fetched before a revoke"
            );
        }
    }

    fn wait_for_acks(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut tracker = self.shared.tracker();
        while self.shared.unacked.load(Ordering::SeqCst) > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            tracker = self
                .shared
                .resolved
                .wait_timeout(tracker, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Offsets claimed by the consumer task, on their way to being decoded.
pub(super) struct Claimed {
    /// Messages for the pipeline.
    pub(super) messages: Vec<OwnedMessage>,
    /// Messages of ranges that failed `max_attempts` times, for the dead-letter output.
    pub(super) poisoned: Vec<(OwnedMessage, Poison)>,
    pub(super) tickets: Vec<RangeTicket>,
    pub(super) ack: Ack,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => futures::future::pending().await,
    }
}
