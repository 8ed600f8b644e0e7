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
//! - **Dead letters**: an undecodable message goes to `dead_letter_topic` with the reason and
//!   its origin in headers (or to the pipeline's dead-letter output when no topic is set),
//!   and is counted; its offset counts as handled once the dead letter is delivered.
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
use super::{Source, SourceContext, SourceStream, spawn_watched, stream_from};
use crate::error::{Error, Result};

pub use self::config::{AutoOffsetReset, KafkaSourceConfig};

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

impl Source for KafkaSource {
    fn name(&self) -> &str {
        "kafka"
    }

    fn open(self: Box<Self>, ctx: SourceContext) -> Result<SourceStream> {
        let config = self.config;
        let shared = Arc::new(Shared::default());
        let consumer =
            consumer::subscribe(&config, shared.clone(), ctx.dead_letters.stage().clone())?;
        let dead_letter_producer = match &config.dead_letter_topic {
            Some(topic) => {
                let producer: FutureProducer = config
                    .client()
                    .client_config(&[("enable.idempotence", "true")])
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
