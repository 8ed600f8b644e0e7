//! The canonical metrics schema every stage speaks, and helpers to build and read it.
//!
//! | column      | Arrow type                    | meaning                                         |
//! |-------------|-------------------------------|-------------------------------------------------|
//! | `ts`        | `Timestamp(ms, "UTC")`        | event time of the sample                        |
//! | `metric`    | `Dictionary(Int32, Utf8)`     | metric name, e.g. `cpu_utilization`             |
//! | `labels`    | `Map(Utf8, Utf8)`, keys sorted| host, service, region …                         |
//! | `value`     | `Float64`                     | the sample                                      |
//! | `series_id` | `UInt64`                      | [`series_id`] of metric + sorted labels         |
//!
//! Detectors append the [score columns](scored_schema): `score`, `is_anomaly`, `expected`,
//! `lower`, `upper`, `detector`, `anomaly_since`.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, BooleanArray, DictionaryArray, Float64Array, Float64Builder,
    MapArray, MapBuilder, StringArray, StringBuilder, StringDictionaryBuilder,
    TimestampMillisecondArray, TimestampMillisecondBuilder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};

/// Column names of the canonical schema.
pub mod col {
    /// Event time, `Timestamp(ms, "UTC")`.
    pub const TS: &str = "ts";
    /// Metric name, `Dictionary(Int32, Utf8)`.
    pub const METRIC: &str = "metric";
    /// Labels, `Map(Utf8, Utf8)` with keys sorted.
    pub const LABELS: &str = "labels";
    /// The sample, `Float64`.
    pub const VALUE: &str = "value";
    /// Stable hash of metric and labels, `UInt64`.
    pub const SERIES_ID: &str = "series_id";
    /// Anomaly score in `[0, 1]`, `Float64`.
    pub const SCORE: &str = "score";
    /// Whether the detector flags the row, `Boolean`.
    pub const IS_ANOMALY: &str = "is_anomaly";
    /// The value the detector expected, `Float64`.
    pub const EXPECTED: &str = "expected";
    /// Lower edge of the normal band, `Float64`.
    pub const LOWER: &str = "lower";
    /// Upper edge of the normal band, `Float64`.
    pub const UPPER: &str = "upper";
    /// Which detector produced the score, `Dictionary(Int32, Utf8)`: the detector's name, or
    /// for an anomalous row the parts that fired, e.g. `seasonal+likelihood`.
    pub const DETECTOR: &str = "detector";
    /// Start of the anomalous episode a flagged row belongs to, `Timestamp(ms, "UTC")`,
    /// null on normal rows.
    pub const ANOMALY_SINCE: &str = "anomaly_since";
}

/// The time zone of the `ts` column.
pub const TIME_ZONE: &str = "UTC";

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some(TIME_ZONE.into()))
}

fn dict_utf8() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn labels_type() -> DataType {
    let entries = Field::new(
        "entries",
        DataType::Struct(
            vec![
                Field::new("keys", DataType::Utf8, false),
                Field::new("values", DataType::Utf8, true),
            ]
            .into(),
        ),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}

static METRICS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(col::TS, ts_type(), false),
        Field::new(col::METRIC, dict_utf8(), false),
        Field::new(col::LABELS, labels_type(), false),
        Field::new(col::VALUE, DataType::Float64, false),
        Field::new(col::SERIES_ID, DataType::UInt64, false),
    ]))
});

/// The fields detectors append to a metrics batch.
fn score_fields() -> Vec<Field> {
    vec![
        Field::new(col::SCORE, DataType::Float64, false),
        Field::new(col::IS_ANOMALY, DataType::Boolean, false),
        Field::new(col::EXPECTED, DataType::Float64, true),
        Field::new(col::LOWER, DataType::Float64, true),
        Field::new(col::UPPER, DataType::Float64, true),
        Field::new(col::DETECTOR, dict_utf8(), false),
        Field::new(col::ANOMALY_SINCE, ts_type(), true),
    ]
}

static SCORED_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| scored_schema_for(&METRICS_SCHEMA));

/// The canonical metrics schema (see the [module docs](self)).
pub fn metrics_schema() -> SchemaRef {
    METRICS_SCHEMA.clone()
}

/// The canonical metrics schema with the score columns appended.
pub fn scored_schema() -> SchemaRef {
    SCORED_SCHEMA.clone()
}

/// `input` with the score columns appended: what a detector emits for a batch of `input`.
pub fn scored_schema_for(input: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(score_fields());
    Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()))
}

/// The stable identity of a series: XXH3-64 of the metric name and its labels sorted by key.
///
/// The byte layout hashed is `metric`, then for each label `0x00 key 0x01 value`. It never
/// changes between versions or machines, so ids can be stored and compared across replicas.
/// `labels` must be sorted by key (decoders sort them).
pub fn series_id<K: AsRef<str>, V: AsRef<str>>(metric: &str, labels: &[(K, V)]) -> u64 {
    let mut scratch = Vec::with_capacity(64);
    series_id_with(
        &mut scratch,
        metric,
        labels.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
    )
}

pub(crate) fn series_id_with<'a>(
    scratch: &mut Vec<u8>,
    metric: &str,
    labels: impl Iterator<Item = (&'a str, &'a str)>,
) -> u64 {
    scratch.clear();
    scratch.extend_from_slice(metric.as_bytes());
    for (k, v) in labels {
        scratch.push(0);
        scratch.extend_from_slice(k.as_bytes());
        scratch.push(1);
        scratch.extend_from_slice(v.as_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(scratch)
}

/// Builds canonical metrics batches one sample at a time; computes `series_id`.
pub struct MetricsBatchBuilder {
    ts: TimestampMillisecondBuilder,
    metric: StringDictionaryBuilder<Int32Type>,
    labels: MapBuilder<StringBuilder, StringBuilder>,
    value: Float64Builder,
    series_id: UInt64Builder,
    scratch: Vec<u8>,
    capacity: usize,
}

impl std::fmt::Debug for MetricsBatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsBatchBuilder")
            .field("rows", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Default for MetricsBatchBuilder {
    fn default() -> Self {
        Self::with_capacity(1024)
    }
}

impl MetricsBatchBuilder {
    /// A builder sized for `capacity` rows (it grows past that if needed).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            ts: TimestampMillisecondBuilder::with_capacity(capacity).with_timezone(TIME_ZONE),
            metric: StringDictionaryBuilder::new(),
            labels: MapBuilder::new(None, StringBuilder::new(), StringBuilder::new()),
            value: Float64Builder::with_capacity(capacity),
            series_id: UInt64Builder::with_capacity(capacity),
            scratch: Vec::with_capacity(128),
            capacity,
        }
    }

    /// Rows appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// Whether no row was appended since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends one sample. `labels` must be sorted by key with no duplicate keys
    /// (see [`sort_labels`]).
    pub fn push<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        ts_ms: i64,
        metric: &str,
        labels: &[(K, V)],
        value: f64,
    ) {
        let id = series_id_with(
            &mut self.scratch,
            metric,
            labels.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
        );
        self.push_with_id(ts_ms, metric, labels, value, id);
    }

    /// Appends one sample whose series id the caller already knows (e.g. a generator that
    /// hashes each series once).
    pub fn push_with_id<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        ts_ms: i64,
        metric: &str,
        labels: &[(K, V)],
        value: f64,
        series_id: u64,
    ) {
        self.ts.append_value(ts_ms);
        self.metric.append_value(metric);
        for (k, v) in labels {
            self.labels.keys().append_value(k.as_ref());
            self.labels.values().append_value(v.as_ref());
        }
        // A map entry is only invalid if keys and values disagree in length, which the loop
        // above rules out.
        let _ = self.labels.append(true);
        self.value.append_value(value);
        self.series_id.append_value(series_id);
    }

    /// Takes the rows appended so far as a batch and resets the builder.
    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.ts.finish()),
            Arc::new(self.metric.finish()),
            Arc::new(self.labels.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.series_id.finish()),
        ];
        self.ts =
            TimestampMillisecondBuilder::with_capacity(self.capacity).with_timezone(TIME_ZONE);
        RecordBatch::try_new(metrics_schema(), columns)
            .expect("builder columns match the canonical schema by construction")
    }
}

/// Sorts labels by key and keeps the last value of a duplicated key, as Prometheus does.
///
/// O(n log n) whatever the input: a request repeating one label name thousands of times
/// costs a sort, not a quadratic cascade of removals.
pub fn sort_labels<K: AsRef<str>, V>(labels: &mut Vec<(K, V)>) {
    labels.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
    // After a stable sort equal keys keep input order. `dedup_by` keeps the first of a run
    // and hands each later duplicate next to it: swapping moves the later value into the
    // kept slot, so the last one wins, in one pass.
    labels.dedup_by(|later, kept| {
        let same = later.0.as_ref() == kept.0.as_ref();
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
}

/// Typed, borrowed access to the canonical columns of a batch.
#[derive(Debug, Clone, Copy)]
pub struct MetricsColumns<'a> {
    /// `ts`.
    pub ts: &'a TimestampMillisecondArray,
    /// `metric`.
    pub metric: &'a DictionaryArray<Int32Type>,
    /// `metric` dictionary values.
    pub metric_names: &'a StringArray,
    /// `labels`.
    pub labels: &'a MapArray,
    /// `value`.
    pub value: &'a Float64Array,
    /// `series_id`.
    pub series_id: &'a UInt64Array,
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, stage: &str, name: &str) -> Result<&'a T> {
    let array = batch
        .column_by_name(name)
        .ok_or_else(|| Error::schema(stage, format!("missing column `{name}`")))?;
    array.as_any().downcast_ref::<T>().ok_or_else(|| {
        Error::schema(
            stage,
            format!("column `{name}` has type {}", array.data_type()),
        )
    })
}

impl<'a> MetricsColumns<'a> {
    /// Reads the canonical columns of `batch`, or names the first one missing or mistyped.
    /// `stage` names the caller in the error.
    pub fn try_new(batch: &'a RecordBatch, stage: &str) -> Result<Self> {
        let metric: &DictionaryArray<Int32Type> = column(batch, stage, col::METRIC)?;
        let metric_names = metric
            .values()
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::schema(stage, "column `metric` is not a Utf8 dictionary"))?;
        Ok(Self {
            ts: column(batch, stage, col::TS)?,
            metric,
            metric_names,
            labels: column(batch, stage, col::LABELS)?,
            value: column(batch, stage, col::VALUE)?,
            series_id: column(batch, stage, col::SERIES_ID)?,
        })
    }

    /// The metric name of row `row`.
    pub fn metric(&self, row: usize) -> &'a str {
        let key = self.metric.keys().value(row);
        self.metric_names.value(key as usize)
    }

    /// The labels of row `row`, sorted by key.
    pub fn labels(&self, row: usize) -> Vec<(String, String)> {
        let entries = self.labels.value(row);
        let keys = entries.column(0).as_any().downcast_ref::<StringArray>();
        let values = entries.column(1).as_any().downcast_ref::<StringArray>();
        match (keys, values) {
            (Some(keys), Some(values)) => (0..keys.len())
                .map(|i| {
                    let v = if values.is_null(i) {
                        ""
                    } else {
                        values.value(i)
                    };
                    (keys.value(i).to_owned(), v.to_owned())
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Typed access to the score columns a detector appended.
#[derive(Debug, Clone, Copy)]
pub struct ScoreColumns<'a> {
    /// `score`.
    pub score: &'a Float64Array,
    /// `is_anomaly`.
    pub is_anomaly: &'a BooleanArray,
    /// `expected`.
    pub expected: &'a Float64Array,
    /// `lower`.
    pub lower: &'a Float64Array,
    /// `upper`.
    pub upper: &'a Float64Array,
    /// `detector`.
    pub detector: &'a DictionaryArray<Int32Type>,
    /// `detector` dictionary values.
    pub detector_names: &'a StringArray,
    /// `anomaly_since`.
    pub anomaly_since: &'a TimestampMillisecondArray,
}

impl<'a> ScoreColumns<'a> {
    /// Reads the score columns of `batch`, or names the first one missing or mistyped.
    pub fn try_new(batch: &'a RecordBatch, stage: &str) -> Result<Self> {
        let detector: &DictionaryArray<Int32Type> = column(batch, stage, col::DETECTOR)?;
        let detector_names = detector
            .values()
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::schema(stage, "column `detector` is not a Utf8 dictionary"))?;
        Ok(Self {
            score: column(batch, stage, col::SCORE)?,
            is_anomaly: column(batch, stage, col::IS_ANOMALY)?,
            expected: column(batch, stage, col::EXPECTED)?,
            lower: column(batch, stage, col::LOWER)?,
            upper: column(batch, stage, col::UPPER)?,
            detector,
            detector_names,
            anomaly_since: column(batch, stage, col::ANOMALY_SINCE)?,
        })
    }

    /// The detector name of row `row`.
    pub fn detector(&self, row: usize) -> &'a str {
        let key = self.detector.keys().value(row);
        self.detector_names.value(key as usize)
    }
}

/// Milliseconds since the Unix epoch formatted as RFC 3339 in UTC, e.g.
/// `2026-11-25T10:05:00.000Z`.
pub fn format_ts(ts_ms: i64) -> String {
    // humantime formats years 1970..=9999 only; print anything else as raw milliseconds.
    const MAX_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = ts_ms.div_euclid(1000);
    let millis = ts_ms.rem_euclid(1000) as u32;
    match u64::try_from(secs) {
        Ok(secs) if secs <= MAX_SECS => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs, millis * 1_000_000);
            humantime::format_rfc3339_millis(t).to_string()
        }
        _ => format!("{ts_ms}ms"),
    }
}

/// Parses an RFC 3339 timestamp (`T` or space, `Z` optional, UTC) into milliseconds since the
/// Unix epoch.
pub fn parse_ts(text: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(text.trim()).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_output_matches_the_canonical_schema() {
        let mut b = MetricsBatchBuilder::default();
        b.push(1_000, "cpu", &[("host", "a")], 1.5);
        b.push(2_000, "mem", &[] as &[(&str, &str)], 2.5);
        let batch = b.finish();
        assert_eq!(batch.schema(), metrics_schema());
        assert_eq!(batch.num_rows(), 2);
        let cols = MetricsColumns::try_new(&batch, "test").unwrap();
        assert_eq!(cols.metric(1), "mem");
        assert_eq!(cols.labels(0), vec![("host".to_owned(), "a".to_owned())]);
        assert!(cols.labels(1).is_empty());
        assert_eq!(cols.series_id.value(0), series_id("cpu", &[("host", "a")]));
        // The builder is reusable after finish.
        b.push(3_000, "cpu", &[("host", "a")], 3.5);
        assert_eq!(b.finish().num_rows(), 1);
    }

    #[test]
    fn series_id_is_stable_and_label_sensitive() {
        let a = series_id("cpu", &[("host", "a"), ("region", "eu")]);
        assert_eq!(a, series_id("cpu", &[("host", "a"), ("region", "eu")]));
        assert_ne!(a, series_id("cpu", &[("host", "a"), ("region", "us")]));
        assert_ne!(a, series_id("mem", &[("host", "a"), ("region", "eu")]));
        // Separators keep `ab`+`c` apart from `a`+`bc`.
        assert_ne!(
            series_id("m", &[("ab", "c")]),
            series_id("m", &[("a", "bc")])
        );
        // Pinned value: changing the hash layout would orphan stored state.
        assert_eq!(
            series_id("cpu", &[("host", "a")]),
            0x7a8b_fe7f_f965_1152,
            "{:#x}",
            series_id("cpu", &[("host", "a")])
        );
    }

    #[test]
    fn sort_labels_sorts_and_keeps_last_duplicate() {
        let mut labels = vec![("b", "1"), ("a", "2"), ("b", "3")];
        sort_labels(&mut labels);
        assert_eq!(labels, vec![("a", "2"), ("b", "3")]);
        let mut many: Vec<(String, usize)> = (0..100_000).map(|i| ("x".into(), i)).collect();
        sort_labels(&mut many);
        assert_eq!(many, vec![("x".to_owned(), 99_999)]);
    }

    proptest::proptest! {
        /// The same as inserting every label into a map in order (the last value wins).
        #[test]
        fn sort_labels_matches_a_last_wins_map(
            pairs in proptest::collection::vec(("[a-d]{0,2}", 0u32..1000), 0..64)
        ) {
            let mut labels = pairs.clone();
            sort_labels(&mut labels);
            let expected: Vec<(String, u32)> = pairs
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect();
            proptest::prop_assert_eq!(labels, expected);
        }
    }

    #[test]
    fn out_of_range_timestamps_format_without_panicking() {
        assert_eq!(format_ts(253_402_300_800_000), "253402300800000ms");
        assert_eq!(format_ts(i64::MAX), format!("{}ms", i64::MAX));
        assert_eq!(format_ts(-1), "-1ms");
        assert_eq!(format_ts(253_402_300_799_000), "9999-12-31T23:59:59.000Z");
    }

    #[test]
    fn timestamps_round_trip() {
        let ms = parse_ts("2026-11-25T10:05:00.250Z").unwrap();
        assert_eq!(format_ts(ms), "2026-11-25T10:05:00.250Z");
        assert_eq!(parse_ts("2014-04-01 00:00:00"), Some(1_396_310_400_000));
        assert_eq!(parse_ts("yesterday"), None);
    }

    #[test]
    fn missing_columns_are_named() {
        let batch = RecordBatch::new_empty(Arc::new(Schema::new(vec![Field::new(
            "value",
            DataType::Float64,
            false,
        )])));
        let err = MetricsColumns::try_new(&batch, "detector:ewma").unwrap_err();
        assert!(err.to_string().contains("missing column `metric`"), "{err}");
    }
}
