//! The decode task: turns claimed messages into batches and dead-letters what it cannot
//! decode (and the messages of ranges that failed permanently `max_attempts` times), on its
//! own task so that polling Kafka and decoding run on different cores.
//!
//! Dead letters produced to `dead_letter_topic` carry the message's key and, in headers,
//! `dlq_reason`, `dlq_stage`, `dlq_topic`, `dlq_partition`, `dlq_offset`, and `dlq_record`
//! (the record's index within the message, for an undecodable record) or `dlq_attempts`
//! (deliveries that failed with a permanent error, for a poisoned message, whose payload is
//! kept whole). A batch's dead letters must be delivered within `dead_letter_timeout`, or
//! the batch is nacked (retryable: the topic may come back).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::consumer::{Claimed, Shared};
use super::metadata::MetadataColumns;
use super::offsets::{Poison, RangeTicket};
use crate::ack::NackKind;
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
    /// Longest wait for the dead-letter topic to take one batch's dead letters.
    dead_letter_timeout: Duration,
    metadata: bool,
}

/// One message (or one record of it) on its way to the dead-letter output.
struct Letter<'a> {
    message: &'a OwnedMessage,
    reason: String,
    payload: &'a [u8],
    /// The record's index within the message, for an undecodable record.
    record: Option<usize>,
    /// Failed deliveries, for the messages of a poisoned range.
    attempts: Option<u32>,
}

impl<'a> Letter<'a> {
    fn rejected(message: &'a OwnedMessage, reject: &'a Reject) -> Self {
        Self {
            message,
            reason: reject.reason.clone(),
            payload: reject.raw.as_bytes(),
            record: Some(reject.record),
            attempts: None,
        }
    }

    fn poisoned(message: &'a OwnedMessage, poison: &Poison) -> Self {
        Self {
            message,
            reason: format!(
                "failed {} deliveries with a permanent error (max_attempts): {}",
                poison.attempts, poison.reason
            ),
            payload: message.payload().unwrap_or_default(),
            record: None,
            attempts: Some(poison.attempts),
        }
    }
}

impl DecodeTask {
    /// A task decoding with `decoder`; undecodable messages go to `dead_letter_producer`'s
    /// topic when set, else to `dead_letters`.
    pub(super) fn new(
        shared: Arc<Shared>,
        decoder: Box<dyn Decoder>,
        dead_letters: DeadLetterQueue,
        dead_letter_producer: Option<(FutureProducer, String)>,
        dead_letter_timeout: Duration,
        metadata: bool,
    ) -> Self {
        Self {
            shared,
            decoder,
            dead_letters,
            dead_letter_producer,
            dead_letter_timeout,
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
        let Claimed {
            messages,
            poisoned,
            ack,
            ..
        } = claimed;
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
        let letters: Vec<Letter<'_>> = poisoned
            .iter()
            .map(|(m, p)| Letter::poisoned(m, p))
            .chain(bad.iter().map(|(m, r)| Letter::rejected(m, r)))
            .collect();
        if let Err(e) = self.dead_letter(&letters).await {
            // Not stored: fail the batch so it is redelivered, never skipped.
            ack.nack(format!("dead-lettering failed: {e}"));
            return None;
        }
        let mut batch = builder.finish();
        if let Some(meta) = meta {
            batch = match meta.append_to(&batch) {
                Ok(b) => b,
                Err(e) => {
                    ack.nack_as(
                        NackKind::of(&e),
                        format!("adding Kafka metadata columns: {e}"),
                    );
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

    /// Sends `letters` to the dead-letter topic (within `dead_letter_timeout`) or, without
    /// one, to the pipeline's dead-letter output. An error means some were not stored.
    async fn dead_letter(&self, letters: &[Letter<'_>]) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let Some((producer, topic)) = &self.dead_letter_producer else {
            for l in letters {
                self.dead_letters.send(
                    origin(l.message),
                    l.reason.clone(),
                    String::from_utf8_lossy(l.payload),
                )?;
            }
            return Ok(());
        };
        let stage = self.dead_letters.stage().name();
        let deliveries = letters.iter().map(|l| {
            let m = l.message;
            let partition = m.partition().to_string();
            let offset = m.offset().to_string();
            let mut headers = OwnedHeaders::new_with_capacity(7)
                .insert(Header {
                    key: "dlq_reason",
                    value: Some(l.reason.as_str()),
                })
                .insert(Header {
                    key: "dlq_stage",
                    value: Some(stage),
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
                });
            if let Some(record) = l.record {
                headers = headers.insert(Header {
                    key: "dlq_record",
                    value: Some(record.to_string().as_str()),
                });
            }
            if let Some(attempts) = l.attempts {
                headers = headers.insert(Header {
                    key: "dlq_attempts",
                    value: Some(attempts.to_string().as_str()),
                });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(l.payload)
                .headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            // Waits for room in librdkafka's queue for at most the same bound.
            producer.send(record, self.dead_letter_timeout)
        });
        let delivered = tokio::time::timeout(
            self.dead_letter_timeout,
            futures::future::join_all(deliveries),
        )
        .await
        .map_err(|_| {
            Error::DeadLetter(format!(
                "producing to {topic}: not delivered within dead_letter_timeout ({:?})",
                self.dead_letter_timeout
            ))
        })?;
        for delivery in delivered {
            delivery.map_err(|(e, _)| Error::DeadLetter(format!("producing to {topic}: {e}")))?;
        }
        self.dead_letters
            .stage()
            .record_dead_lettered(letters.len());
        Ok(())
    }
}

fn origin(m: &OwnedMessage) -> String {
    format!("{}/{}@{}", m.topic(), m.partition(), m.offset())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rdkafka::Timestamp;

    use super::*;
    use crate::ack::{Ack, AckOutcome};
    use crate::dead_letter::MemoryDeadLetters;
    use crate::metrics::StageMetrics;

    fn message(offset: i64, payload: &str) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.as_bytes().to_vec()),
            Some(b"key".to_vec()),
            "metrics".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    fn poison(first: i64, last: i64) -> Poison {
        Poison {
            first,
            last,
            attempts: 5,
            reason: "action `webhook`: 400 Bad Request".into(),
        }
    }

    fn recorded_ack() -> (Ack, Arc<Mutex<Option<AckOutcome>>>) {
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        let ack = Ack::new(move |o| *sink.lock().unwrap() = Some(o));
        (ack, seen)
    }

    fn task(
        producer: Option<(FutureProducer, String)>,
        timeout: Duration,
    ) -> (DecodeTask, Arc<MemoryDeadLetters>) {
        let memory = Arc::new(MemoryDeadLetters::default());
        let queue = DeadLetterQueue::new(memory.clone(), Arc::new(StageMetrics::new("kafka")));
        let decoder =
            crate::decode::Format::Json.decoder_with_limits(Default::default(), Default::default());
        let task = DecodeTask::new(
            Arc::new(Shared::default()),
            decoder,
            queue,
            producer,
            timeout,
            false,
        );
        (task, memory)
    }

    const GOOD: &str = r#"{"metric":"cpu","labels":{"host":"a"},"ts":1000,"value":1.0}"#;

    #[tokio::test]
    async fn poisoned_messages_are_dead_lettered_whole_and_the_rest_is_decoded() {
        let (mut task, memory) = task(None, Duration::from_secs(1));
        let (ack, seen) = recorded_ack();
        let poisoned = vec![(message(7, "not json at all"), poison(7, 7))];
        let batch = task
            .decode(Claimed {
                messages: vec![message(8, GOOD)],
                poisoned,
                tickets: Vec::new(),
                ack,
            })
            .await
            .expect("the good message is a batch");
        assert_eq!(batch.batch.num_rows(), 1);
        let letters = memory.letters();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].origin, "metrics/0@7");
        assert_eq!(letters[0].payload, "not json at all", "kept whole");
        assert!(
            letters[0].reason.contains("failed 5 deliveries")
                && letters[0].reason.contains("400 Bad Request"),
            "{}",
            letters[0].reason
        );
        assert_eq!(
            *seen.lock().unwrap(),
            None,
            "the batch's ack is the pipeline's"
        );
        batch.ack.ack();
        assert_eq!(*seen.lock().unwrap(), Some(AckOutcome::Acked));
    }

    #[tokio::test]
    async fn a_claim_of_only_poisoned_messages_is_acked_once_dead_lettered() {
        let (mut task, memory) = task(None, Duration::from_secs(1));
        let (ack, seen) = recorded_ack();
        let batch = task
            .decode(Claimed {
                messages: Vec::new(),
                poisoned: vec![
                    (message(3, GOOD), poison(3, 4)),
                    (message(4, GOOD), poison(3, 4)),
                ],
                tickets: Vec::new(),
                ack,
            })
            .await;
        assert!(batch.is_none(), "nothing for the pipeline");
        assert_eq!(memory.letters().len(), 2);
        assert_eq!(*seen.lock().unwrap(), Some(AckOutcome::Acked));
    }

    #[tokio::test]
    async fn an_unreachable_dead_letter_topic_nacks_within_the_timeout() {
        // Nothing listens on port 1: librdkafka would retry the message for 300 s by default.
        let producer: FutureProducer = crate::kafka::KafkaClientConfig::new("127.0.0.1:1")
            .client_config(&[("message.timeout.ms", "300")])
            .create()
            .unwrap();
        let (mut task, memory) = task(
            Some((producer, "dead-letters".into())),
            Duration::from_millis(300),
        );
        let (ack, seen) = recorded_ack();
        let started = std::time::Instant::now();
        let batch = task
            .decode(Claimed {
                messages: vec![message(2, GOOD)],
                poisoned: vec![(message(1, "{}"), poison(1, 1))],
                tickets: Vec::new(),
                ack,
            })
            .await;
        let waited = started.elapsed();
        assert!(batch.is_none(), "no batch without its dead letters");
        match seen.lock().unwrap().clone() {
            Some(AckOutcome::Nacked(nack)) => {
                assert!(nack.reason.contains("dead-lettering failed"), "{nack}");
                assert_eq!(nack.kind, NackKind::Retryable, "the topic may come back");
            }
            other => panic!("expected a nack, got {other:?}"),
        }
        assert!(
            waited < Duration::from_secs(30),
            "bounded by dead_letter_timeout, waited {waited:?}"
        );
        assert!(memory.letters().is_empty());
    }
}
