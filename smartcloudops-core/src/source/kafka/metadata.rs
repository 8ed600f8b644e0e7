//! The optional per-row Kafka metadata columns (`metadata = true`).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, MapBuilder, StringBuilder, StringDictionaryBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{Field, Int32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use rdkafka::message::{Headers, Message, OwnedMessage};

use crate::error::Result;
use crate::schema::{TIME_ZONE, metrics_schema};

/// The schema of this source's batches: the canonical columns, then with `metadata = true`
/// `kafka_topic`, `kafka_partition`, `kafka_offset`, `kafka_key`, `kafka_timestamp` and
/// `kafka_headers`.
pub(crate) fn output_schema(metadata: bool) -> SchemaRef {
    let canonical = metrics_schema();
    if !metadata {
        return canonical;
    }
    MetadataColumns::with_capacity(0)
        .append_to(&RecordBatch::new_empty(canonical.clone()))
        .map_or(canonical, |b| b.schema())
}

/// The optional per-row Kafka metadata columns.
pub(super) struct MetadataColumns {
    topic: StringDictionaryBuilder<Int32Type>,
    partition: Int32Builder,
    offset: Int64Builder,
    key: StringBuilder,
    timestamp: TimestampMillisecondBuilder,
    headers: MapBuilder<StringBuilder, StringBuilder>,
}

impl MetadataColumns {
    pub(super) fn with_capacity(rows: usize) -> Self {
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
    pub(super) fn push(&mut self, m: &OwnedMessage, rows: usize) {
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

    pub(super) fn append_to(mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let columns: [(&str, ArrayRef); 6] = [
            ("kafka_topic", Arc::new(self.topic.finish())),
            ("kafka_partition", Arc::new(self.partition.finish())),
            ("kafka_offset", Arc::new(self.offset.finish())),
            ("kafka_key", Arc::new(self.key.finish())),
            ("kafka_timestamp", Arc::new(self.timestamp.finish())),
            ("kafka_headers", Arc::new(self.headers.finish())),
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
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
    }
}
