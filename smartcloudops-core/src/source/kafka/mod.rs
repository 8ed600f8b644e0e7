//! Kafka source: one member of a consumer group, at-least-once.
//!
//! - **Consumer group**: every replica runs with the same `group_id`; Kafka spreads the
//!   partitions of `topics` over them and moves them on rebalance.
//! - **At-least-once**: offsets are committed by this source (`enable.auto.commit = false`,
//!   `enable.auto.offset.store = false`) and only up to the contiguous acknowledged high-water
//!   mark of each partition (see `source/kafka/offsets.rs`): a failed batch is never skipped by a
//!   later success. A nacked batch is redelivered: the partition is rewound to its first
//!   offset after a backoff that doubles with each consecutive failure.
//! - **Rebalance-safe**: on revoke, batches of the revoked partitions still in the pipeline get
//!   up to `drain_timeout` to finish (keep it below `session.timeout.ms`), the offsets are
//!   committed synchronously, and late acks for those partitions are ignored (the new owner
//!   redelivers them).
//! - **Poison limit**: only a batch that keeps failing with a *permanent* error (a nack of
//!   kind [`NackKind::Permanent`](crate::ack::NackKind::Permanent): an action's
//!   non-retryable error, say a 4xx) counts. After `max_attempts` such failures (default 5,
//!   each redelivery after the backoff) it is not redelivered to the pipeline again: its
//!   messages go to the dead-letter output whole, with the last failure and the attempts,
//!   and their offsets are committed once the dead letters are delivered. A *retryable*
//!   failure (a downstream outage, a timeout) is redelivered with the backoff for as long as
//!   it lasts and never dead-letters good messages; a batch *abandoned* at shutdown counts
//!   nothing. `max_attempts = 0` retries permanent failures forever too. A batch mixes
//!   partitions, so a poison message takes the messages of the other partitions in its
//!   batch along.
//! - **Dead letters**: an undecodable message goes to `dead_letter_topic` with the reason and
//!   its origin in headers (or to the pipeline's dead-letter output when no topic is set),
//!   and is counted; its offset counts as handled once the dead letter is delivered. The
//!   producer gives up after `dead_letter_timeout` (its `message.timeout.ms`, and the bound
//!   of the wait); the batch is then nacked and redelivered, never committed without them.
//! - **State hand-over**: on revoke, after the drain and before the commit, the source tells
//!   its [`RevokeListener`] (the pipeline saves the detector states that changed), waiting
//!   at most `drain_timeout` more.
//! - **Backpressure**: when the pipeline does not take batches (one is waiting and the next
//!   is full), or `max_unacked` messages are in flight, the source pauses its partitions and
//!   keeps polling, so neither memory nor the poll interval runs away.

mod config;
mod consumer;
mod decode;
mod metadata;
mod offsets;

use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;

use self::consumer::{ConsumerTask, Shared};
use self::decode::DecodeTask;
use super::{RevokeListener, Source, SourceContext, SourceStream, spawn_watched, stream_from};
use crate::error::{Error, Result};

pub use self::config::{AutoOffsetReset, KafkaSourceConfig};

/// Consumes a Kafka consumer group. See the [module docs](self).
#[derive(Debug)]
pub struct KafkaSource {
    config: KafkaSourceConfig,
    revoke_listener: Option<Arc<dyn RevokeListener>>,
}

impl KafkaSource {
    /// A source for `config`; it connects when the pipeline starts.
    pub fn new(config: KafkaSourceConfig) -> Self {
        Self {
            config,
            revoke_listener: None,
        }
    }
}

impl Source for KafkaSource {
    fn name(&self) -> &str {
        "kafka"
    }

    fn replays_unacknowledged(&self) -> bool {
        true
    }

    fn set_revoke_listener(&mut self, listener: Arc<dyn RevokeListener>) {
        self.revoke_listener = Some(listener);
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        let KafkaSource {
            config,
            revoke_listener,
        } = *self;
        let shared = Arc::new(Shared::new(config.max_attempts));
        let consumer = consumer::subscribe(
            &config,
            shared.clone(),
            ctx.dead_letters.stage().clone(),
            revoke_listener,
        )?;
        let dead_letter_producer = match &config.dead_letter_topic {
            Some(topic) => {
                // librdkafka would otherwise retry a message for 300 s.
                let timeout = config.dead_letter_timeout.as_millis().max(1).to_string();
                let producer: FutureProducer = config
                    .client()
                    .client_config(&[
                        ("enable.idempotence", "true"),
                        ("message.timeout.ms", timeout.as_str()),
                    ])
                    .create()
                    .map_err(|e| kafka_error("creating the dead-letter producer", e))?;
                Some((producer, topic.clone()))
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(1);
        let (claims_tx, claims_rx) = mpsc::channel(1);
        let decode = DecodeTask::new(
            shared.clone(),
            config
                .format
                .decoder_with_limits(config.csv.clone(), config.limits),
            ctx.dead_letters.clone(),
            dead_letter_producer,
            config.dead_letter_timeout,
            config.metadata,
        );
        let task = ConsumerTask::new(consumer, shared, ctx.dead_letters, config);
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

/// A Kafka client failure as this crate's error, with what was being done.
fn kafka_error(context: &str, e: rdkafka::error::KafkaError) -> Error {
    Error::Connector {
        connector: "kafka".into(),
        message: format!("{context}: {e}"),
    }
}
