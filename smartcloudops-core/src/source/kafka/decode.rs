//! The decode task: turns claimed messages into batches and dead-letters what it cannot
//! decode, on its own task so that polling Kafka and decoding run on different cores.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::consumer::{Claimed, Shared};
use super::metadata::MetadataColumns;
use super::offsets::RangeTicket;
use crate::dead_letter::DeadLetterQueue;
use crate::decode::{Decoder, Reject};
use crate::error::{Error, Result};
use crate::schema::MetricsBatchBuilder;
use crate::source::{Origin, SourceBatch};

/// Decodes claimed messages into batches, on its own task so that polling Kafka and decoding
/// run on different cores.
pub(super) struct DecodeTask {
    shared: Arc<Shared>,
    decoder: Box<dyn Decoder>,
    dead_letters: DeadLetterQueue,
    dead_letter_producer: Option<(FutureProducer, String)>,
    metadata: bool,
}

impl DecodeTask {
    /// A task decoding with `decoder`; undecodable messages go to `dead_letter_producer`'s
    /// topic when set, else to `dead_letters`.
    pub(super) fn new(
        shared: Arc<Shared>,
        decoder: Box<dyn Decoder>,
        dead_letters: DeadLetterQueue,
        dead_letter_producer: Option<(FutureProducer, String)>,
        metadata: bool,
    ) -> Self {
        Self {
            shared,
            decoder,
            dead_letters,
            dead_letter_producer,
            metadata,
        }
    }

    /// Decodes claims from `claims` until either side closes, sending batches to `tx`.
    pub(super) async fn run(
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
        // The partitions the rows came from, for audit records (`topic/partition`).
        let mut partitions: Vec<String> = messages
            .iter()
            .map(|m| format!("{}/{}", m.topic(), m.partition()))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        Some(SourceBatch::new(batch, ack).with_origin(Origin::from_parts(partitions)))
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

fn origin(m: &OwnedMessage) -> String {
    format!("{}/{}@{}", m.topic(), m.partition(), m.offset())
}
