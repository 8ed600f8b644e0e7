//! Kafka source: one member of a consumer group, at-least-once.
//!
//! - **Consumer group**: every replica runs with the same `group_id`; Kafka spreads the
//!   partitions of `topics` over them and moves them on rebalance.
//! - **At-least-once**: offsets are committed by this source (`enable.auto.commit = false`,
//!   `enable.auto.offset.store = false`) and only up to the contiguous acknowledged high-water
//!   mark of each partition (see `kafka/offsets.rs`): a failed batch is never skipped by a
//!   later success. A nacked batch is redelivered: the partition is rewound to its first
//!   offset after a backoff that doubles with each consecutive failure.
//! - **Rebalance-safe**: on revoke, batches of the revoked partitions still in the pipeline get
//!   up to `drain_timeout` to finish (keep it below `session.timeout.ms`), the offsets are
//!   committed synchronously, and late acks for those partitions are ignored (the new owner
//!   redelivers them).
//! - **Dead letters**: an undecodable message goes to `dead_letter_topic` with the reason and
//!   its origin in headers (or to the pipeline's dead-letter output when no topic is set),
//!   and is counted; its offset counts as handled once the dead letter is delivered.
//! - **Backpressure**: when the pipeline does not take batches (one is waiting and the next
//!   is full), or `max_unacked` messages are in flight, the source pauses its partitions and
//!   keeps polling, so neither memory nor the poll interval runs away.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, MapBuilder, StringBuilder, StringDictionaryBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{Field, Int32Type, Schema};
use arrow::record_batch::RecordBatch;
use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Source, SourceBatch, SourceContext, SourceStream, spawn_watched, stream_from};
use crate::ack::{Ack, AckOutcome};
use crate::dead_letter::DeadLetterQueue;
use crate::decode::{CsvOptions, Decoder, Format, Reject};
use crate::error::{Error, Result};
use crate::kafka::KafkaClientConfig;
use crate::kafka::offsets::{OffsetTracker, RangeTicket, TopicPartition};
use crate::schema::{MetricsBatchBuilder, TIME_ZONE};
use crate::util::run_blocking;

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoOffsetReset {
    /// From the oldest retained message.
    Earliest,
    /// Only messages produced from now on (Kafka's default).
    #[default]
    Latest,
}

/// Configuration of a [`KafkaSource`] (`[source] type = "kafka"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group; every replica of the pipeline uses the same one.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Payload format of the messages.
    #[serde(default)]
    pub format: Format,
    /// CSV options (`format = "csv"`); set `csv.metric` for headerless feeds.
    #[serde(default)]
    pub csv: CsvOptions,
    /// Where a new group starts.
    #[serde(default)]
    pub auto_offset_reset: AutoOffsetReset,
    /// Messages per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait to fill a batch.
    #[serde(default = "default_batch_timeout", with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// Messages in flight (sent to the pipeline, not yet acknowledged) before the source
    /// pauses its partitions.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
    /// Topic for undecodable messages; without it they go to the pipeline's dead-letter output.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// How long a revoke waits for in-flight batches of the revoked partitions.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How often acknowledged offsets are committed.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// First delay before redelivering a nacked batch (doubles per failure, up to 30 s).
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Append `kafka_topic`, `kafka_partition`, `kafka_offset`, `kafka_key`,
    /// `kafka_timestamp` and `kafka_headers` columns for prep stages.
    #[serde(default)]
    pub metadata: bool,
    /// Any librdkafka consumer property, e.g. `"session.timeout.ms" = "10000"`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_batch_size() -> usize {
    1024
}
fn default_batch_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_max_unacked() -> usize {
    100_000
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(500)
}

impl KafkaSourceConfig {
    /// A config with defaults for everything but the connection.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            format: Format::Json,
            csv: CsvOptions::default(),
            auto_offset_reset: AutoOffsetReset::Latest,
            batch_size: default_batch_size(),
            batch_timeout: default_batch_timeout(),
            max_unacked: default_max_unacked(),
            dead_letter_topic: None,
            drain_timeout: default_drain_timeout(),
            commit_interval: default_commit_interval(),
            retry_backoff: default_retry_backoff(),
            metadata: false,
            options: BTreeMap::new(),
        }
    }

    fn client(&self) -> KafkaClientConfig {
        KafkaClientConfig {
            brokers: self.brokers.clone(),
            options: self.options.clone(),
        }
    }
}

/// Consumes a Kafka consumer group. See the [module docs](self).
#[derive(Debug)]
pub struct KafkaSource {
    config: KafkaSourceConfig,
}

impl KafkaSource {
    /// A source for `config`; it connects when the pipeline starts.
    pub fn new(config: KafkaSourceConfig) -> Self {
        Self { config }
    }
}

/// State shared by the consumer task, the rebalance callbacks and the ack callbacks.
#[derive(Debug, Default)]
struct Shared {
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
    commit_failed: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep going.
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct RebalanceContext {
    shared: Arc<Shared>,
    drain_timeout: Duration,
    /// The source's stage metrics, where consumer lag is published.
    stage: Arc<crate::metrics::StageMetrics>,
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

type KafkaConsumer = StreamConsumer<RebalanceContext>;

impl Source for KafkaSource {
    fn name(&self) -> &str {
        "kafka"
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        let config = self.config;
        let shared = Arc::new(Shared::default());
        let reset = match config.auto_offset_reset {
            AutoOffsetReset::Earliest => "earliest",
            AutoOffsetReset::Latest => "latest",
        };
        let client = config.client();
        let consumer: KafkaConsumer = client
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
                shared: shared.clone(),
                drain_timeout: config.drain_timeout,
                stage: ctx.dead_letters.stage().clone(),
            })
            .map_err(|e| kafka_error("creating the Kafka consumer", e))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| kafka_error("subscribing", e))?;
        let dead_letter_producer = match &config.dead_letter_topic {
            Some(topic) => {
                let producer: FutureProducer = client
                    .client_config(&[("enable.idempotence", "true")])
                    .create()
                    .map_err(|e| kafka_error("creating the dead-letter producer", e))?;
                Some((producer, topic.clone()))
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(1);
        let (claims_tx, claims_rx) = mpsc::channel(1);
        let decode = DecodeTask {
            shared: shared.clone(),
            decoder: config.format.decoder(config.csv.clone()),
            dead_letters: ctx.dead_letters.clone(),
            dead_letter_producer,
            metadata: config.metadata,
        };
        let task = ConsumerTask {
            consumer: Arc::new(consumer),
            shared,
            dead_letters: ctx.dead_letters,
            paused: false,
            seen_assignments: 0,
            seen_revocations: 0,
            backoff: HashMap::new(),
            last_committed: HashMap::new(),
            config,
        };
        spawn_watched(
            &ctx.tasks,
            "kafka",
            "consumer",
            task.run(claims_tx),
            tx.clone(),
        );
        spawn_watched(
            &ctx.tasks,
            "kafka",
            "decode",
            decode.run(claims_rx, tx.clone()),
            tx,
        );
        Ok(stream_from(rx))
    }
}

fn kafka_error(context: &str, e: rdkafka::error::KafkaError) -> Error {
    Error::Connector {
        connector: "kafka".into(),
        message: format!("{context}: {e}"),
    }
}

/// How long a batch may wait for the pipeline before the source pauses its partitions.
const BACKPRESSURE_GRACE: Duration = Duration::from_millis(500);

struct ConsumerTask {
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
    /// The consumer loop: polls Kafka, cuts batches and claims their offsets, hands them to
    /// the decode task through `tx`.
    async fn run(mut self, tx: mpsc::Sender<Claimed>) {
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
            tracing::warn!(%topic, partition, offset, ?delay, "batch failed; redelivering");
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
        let count = messages.len();
        self.shared.unacked.fetch_add(count, Ordering::SeqCst);
        let ack = self.ack_for(tickets.clone(), count);
        Some(Claimed {
            messages,
            tickets,
            ack,
        })
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
                    AckOutcome::Nacked(reason) => {
                        if tracker.nack(ticket).is_some() {
                            tracing::warn!(
                                topic = %ticket.tp.0, partition = ticket.tp.1,
                                offsets = %format!("{}..={}", ticket.first, ticket.last),
                                %reason, "batch nacked"
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
struct Claimed {
    messages: Vec<OwnedMessage>,
    tickets: Vec<RangeTicket>,
    ack: Ack,
}

/// Decodes claimed messages into batches, on its own task so that polling Kafka and decoding
/// run on different cores.
struct DecodeTask {
    shared: Arc<Shared>,
    decoder: Box<dyn Decoder>,
    dead_letters: DeadLetterQueue,
    dead_letter_producer: Option<(FutureProducer, String)>,
    metadata: bool,
}

impl DecodeTask {
    async fn run(
        mut self,
        mut claims: mpsc::Receiver<Claimed>,
        tx: mpsc::Sender<Result<SourceBatch>>,
    ) {
        loop {
            let claimed = tokio::select! {
                claimed = claims.recv() => match claimed {
                    Some(c) => c,
                    None => break,
                },
                () = tx.closed() => break,
            };
            let tickets = claimed.tickets.clone();
            if !self.is_current(&tickets) {
                // Every partition of the claim was revoked (or rewound) meanwhile: its next
                // owner reads it again. Dropping the claim nacks it; the tracker ignores that.
                tracing::debug!("dropped a claim for partitions this consumer no longer owns");
                continue;
            }
            let Some(batch) = self.decode(claimed).await else {
                continue;
            };
            let Ok(permit) = tx.reserve().await else {
                break; // the pipeline is gone; the batch's ack nacks as it drops
            };
            // From here on a revoke waits for this batch's outcome.
            {
                let mut tracker = self.shared.tracker();
                for ticket in &tickets {
                    tracker.mark_handed(ticket);
                }
            }
            permit.send(Ok(batch));
        }
    }

    fn is_current(&self, tickets: &[RangeTicket]) -> bool {
        let tracker = self.shared.tracker();
        tickets.iter().any(|t| tracker.is_current(t))
    }

    /// Decodes one claim into a batch whose ack commits its offsets.
    async fn decode(&mut self, claimed: Claimed) -> Option<SourceBatch> {
        let Claimed { messages, ack, .. } = claimed;
        let count = messages.len();
        let mut builder = MetricsBatchBuilder::with_capacity(count);
        let mut meta = self.metadata.then(|| MetadataColumns::with_capacity(count));
        let mut rejects: Vec<Reject> = Vec::new();
        let mut bad: Vec<(&OwnedMessage, Reject)> = Vec::new();
        for m in &messages {
            let before = builder.len();
            rejects.clear();
            self.decoder
                .decode(m.payload().unwrap_or_default(), &mut builder, &mut rejects);
            if let Some(meta) = &mut meta {
                meta.push(m, builder.len() - before);
            }
            bad.extend(rejects.drain(..).map(|r| (m, r)));
        }
        if let Err(e) = self.dead_letter(&bad).await {
            // Not stored: fail the batch so it is redelivered, never skipped.
            ack.nack(format!("dead-lettering failed: {e}"));
            return None;
        }
        let mut batch = builder.finish();
        if let Some(meta) = meta {
            batch = match meta.append_to(&batch) {
                Ok(b) => b,
                Err(e) => {
                    ack.nack(format!("adding Kafka metadata columns: {e}"));
                    return None;
                }
            };
        }
        if batch.num_rows() == 0 {
            // Every message was dead-lettered: nothing for the pipeline, the offsets are done.
            ack.ack();
            return None;
        }
        Some(SourceBatch::new(batch, ack))
    }

    async fn dead_letter(&self, bad: &[(&OwnedMessage, Reject)]) -> Result<()> {
        if bad.is_empty() {
            return Ok(());
        }
        let Some((producer, topic)) = &self.dead_letter_producer else {
            for (m, r) in bad {
                self.dead_letters
                    .send(origin(m), r.reason.clone(), r.raw.clone())?;
            }
            return Ok(());
        };
        let mut deliveries = Vec::with_capacity(bad.len());
        for (m, r) in bad {
            let partition = m.partition().to_string();
            let offset = m.offset().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "dlq_reason",
                    value: Some(r.reason.as_str()),
                })
                .insert(Header {
                    key: "dlq_stage",
                    value: Some(self.dead_letters.stage().name()),
                })
                .insert(Header {
                    key: "dlq_topic",
                    value: Some(m.topic()),
                })
                .insert(Header {
                    key: "dlq_partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "dlq_offset",
                    value: Some(offset.as_str()),
                })
                .insert(Header {
                    key: "dlq_record",
                    value: Some(r.record.to_string().as_str()),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(r.raw.as_bytes())
                .headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            deliveries.push(producer.send(record, Duration::from_secs(30)));
        }
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(e, _)| Error::DeadLetter(format!("producing to {topic}: {e}")))?;
        }
        self.dead_letters.stage().record_dead_lettered(bad.len());
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => futures::future::pending().await,
    }
}

fn origin(m: &OwnedMessage) -> String {
    format!("{}/{}@{}", m.topic(), m.partition(), m.offset())
}

/// The schema of this source's batches: the canonical columns, then with `metadata = true`
/// `kafka_topic`, `kafka_partition`, `kafka_offset`, `kafka_key`, `kafka_timestamp` and
/// `kafka_headers`.
pub(crate) fn output_schema(metadata: bool) -> arrow::datatypes::SchemaRef {
    let canonical = crate::schema::metrics_schema();
    if !metadata {
        return canonical;
    }
    MetadataColumns::with_capacity(0)
        .append_to(&RecordBatch::new_empty(canonical.clone()))
        .map_or(canonical, |b| b.schema())
}

/// The optional per-row Kafka metadata columns.
struct MetadataColumns {
    topic: StringDictionaryBuilder<Int32Type>,
    partition: Int32Builder,
    offset: Int64Builder,
    key: StringBuilder,
    timestamp: TimestampMillisecondBuilder,
    headers: MapBuilder<StringBuilder, StringBuilder>,
}

impl MetadataColumns {
    fn with_capacity(rows: usize) -> Self {
        Self {
            topic: StringDictionaryBuilder::new(),
            partition: Int32Builder::with_capacity(rows),
            offset: Int64Builder::with_capacity(rows),
            key: StringBuilder::new(),
            timestamp: TimestampMillisecondBuilder::with_capacity(rows).with_timezone(TIME_ZONE),
            headers: MapBuilder::new(None, StringBuilder::new(), StringBuilder::new()),
        }
    }

    /// Repeats `m`'s metadata for the `rows` rows decoded from it.
    fn push(&mut self, m: &OwnedMessage, rows: usize) {
        for _ in 0..rows {
            self.topic.append_value(m.topic());
            self.partition.append_value(m.partition());
            self.offset.append_value(m.offset());
            self.key
                .append_option(m.key().map(|k| String::from_utf8_lossy(k).into_owned()));
            self.timestamp.append_option(m.timestamp().to_millis());
            if let Some(headers) = m.headers() {
                for h in headers.iter() {
                    self.headers.keys().append_value(h.key);
                    self.headers
                        .values()
                        .append_option(h.value.map(|v| String::from_utf8_lossy(v).into_owned()));
                }
            }
            let _ = self.headers.append(true);
        }
    }

    fn append_to(mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let columns: [(&str, ArrayRef); 6] = [
            ("kafka_topic", std::sync::Arc::new(self.topic.finish())),
            (
                "kafka_partition",
                std::sync::Arc::new(self.partition.finish()),
            ),
            ("kafka_offset", std::sync::Arc::new(self.offset.finish())),
            ("kafka_key", std::sync::Arc::new(self.key.finish())),
            (
                "kafka_timestamp",
                std::sync::Arc::new(self.timestamp.finish()),
            ),
            ("kafka_headers", std::sync::Arc::new(self.headers.finish())),
        ];
        let mut fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut arrays = batch.columns().to_vec();
        for (name, array) in columns {
            fields.push(Field::new(name, array.data_type().clone(), true));
            arrays.push(array);
        }
        Ok(RecordBatch::try_new(
            std::sync::Arc::new(Schema::new(fields)),
            arrays,
        )?)
    }
}

impl crate::component::ComponentConfig for KafkaSourceConfig {
    fn problems(&self) -> crate::error::Problems {
        let mut p = crate::error::Problems::new();
        p.check(
            !self.brokers.trim().is_empty(),
            "brokers",
            "must not be empty",
            "e.g. \"127.0.0.1:9092\"",
        );
        p.check(
            !self.group_id.trim().is_empty(),
            "group_id",
            "must not be empty",
            "every replica of the pipeline uses the same group id",
        );
        p.check(
            !self.topics.is_empty(),
            "topics",
            "must list at least one topic",
            "",
        );
        super::check_batch_size(&mut p, self.batch_size, "");
        p.check(
            !self.commit_interval.is_zero()
                && self.commit_interval <= crate::component::MAX_DURATION,
            "commit_interval",
            "must be longer than 0 and at most a day",
            "e.g. \"1s\"",
        );
        for key in ["enable.auto.commit", "enable.auto.offset.store"] {
            p.check(
                !self.options.contains_key(key),
                format!("options.\"{key}\""),
                "is managed by the source (offsets are committed only after the pipeline acknowledged them)",
                "remove it",
            );
        }
        p.check(
            self.max_unacked > 0,
            "max_unacked",
            "must be at least 1",
            "",
        );
        if let Some(session) = self
            .options
            .get("session.timeout.ms")
            .and_then(|s| s.parse::<u128>().ok())
        {
            p.check(
                self.drain_timeout.as_millis() < session,
                "drain_timeout",
                format!("must be shorter than session.timeout.ms ({session} ms)"),
                "a revoke that drains longer than the session gets this member kicked out",
            );
        }
        p
    }

    fn summary(&self, _ctx: &crate::component::BuildContext) -> String {
        format!(
            "kafka {} (group {}, topics {})",
            self.brokers,
            self.group_id,
            self.topics.join(",")
        )
    }
}

impl super::SourceConfig for KafkaSourceConfig {
    fn build(&self, _ctx: &crate::component::BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(KafkaSource::new(self.clone())))
    }

    fn output_schema(&self) -> arrow::datatypes::SchemaRef {
        output_schema(self.metadata)
    }
}
