//! Prometheus remote-write 1.0 payloads: a snappy-compressed (block format) protobuf
//! `prometheus.WriteRequest`.
//!
//! Each sample of each time series becomes one row: the metric from the `__name__` label, the
//! other labels as labels, the value and the timestamp (milliseconds). **Stale markers** (the
//! NaN `0x7ff0000000000002` Prometheus writes when a series disappears) are not values: they
//! are skipped and counted. Exemplars, histograms and metadata are not part of 1.0 and are
//! ignored.
//!
//! [`RemoteWriteDecoder`] decodes one whole request; the receiver
//! (`source::remote_write`) answers 400 to a request that does not decode, so
//! Prometheus does not retry it.

use prost::Message;

use super::DecodeLimits;
use crate::schema::{MetricsBatchBuilder, series_id_with, sort_labels};

/// The bit pattern of Prometheus's stale marker.
pub const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

/// `prometheus.WriteRequest` (fields 1 and 3 of remote-write 1.0).
#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    /// The series.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`.
#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    /// Labels, `__name__` among them, sorted by name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Samples, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, Message)]
pub struct Label {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

impl WriteRequest {
    /// This request as a remote-write body: protobuf, then snappy (block format).
    pub fn to_body(&self) -> Vec<u8> {
        snap::raw::Encoder::new()
            .compress_vec(&self.encode_to_vec())
            .unwrap_or_default()
    }
}

/// What one request held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decoded {
    /// Rows appended.
    pub samples: usize,
    /// Stale markers skipped.
    pub stale: usize,
    /// Series skipped for having no `__name__`.
    pub unnamed: usize,
}

/// Why a request body was refused. Nothing of it was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The body, or what it decompresses to, is over a size limit (HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// The body is not a remote-write request, or holds more than a limit allows (HTTP 400).
    #[error("{0}")]
    Invalid(String),
}

impl RequestError {
    /// Whether the HTTP answer is 413 (else 400).
    pub fn is_too_large(&self) -> bool {
        matches!(self, RequestError::TooLarge(_))
    }

    /// Whether the reason contains `text` (for tests and log filters).
    pub fn contains(&self, text: &str) -> bool {
        match self {
            RequestError::TooLarge(r) | RequestError::Invalid(r) => r.contains(text),
        }
    }
}

fn invalid(reason: impl Into<String>) -> RequestError {
    RequestError::Invalid(reason.into())
}

/// Decodes remote-write request bodies within [`DecodeLimits`]. See the
/// [module docs](self).
///
/// The protobuf is walked by hand rather than decoded into [`WriteRequest`]: labels and
/// samples are borrowed from the decompressed body and counted as they are read, so a request
/// over a limit is refused after reading at most one series' worth past it, and nothing is
/// allocated per label.
#[derive(Debug, Default)]
pub struct RemoteWriteDecoder {
    limits: DecodeLimits,
    raw: Vec<u8>,
}

impl RemoteWriteDecoder {
    /// A decoder refusing requests over `limits`.
    pub fn with_limits(limits: DecodeLimits) -> Self {
        Self {
            limits,
            raw: Vec::new(),
        }
    }

    /// Appends the samples of one request body to `out`. An error means nothing was
    /// appended.
    ///
    /// Two passes over the decompressed protobuf: the first checks the whole request
    /// against the limits (so a refused request appends nothing), the second appends.
    pub fn decode(
        &mut self,
        body: &[u8],
        out: &mut MetricsBatchBuilder,
    ) -> Result<Decoded, RequestError> {
        let limits = self.limits;
        // Checked before allocating: the claimed length is the first varint of the block.
        let claimed = snap::raw::decompress_len(body)
            .map_err(|e| invalid(format!("not a snappy block: {e}")))?;
        if claimed > limits.max_decompressed_bytes {
            return Err(RequestError::TooLarge(format!(
                "the snappy block claims {claimed} bytes decompressed, over the limit of {} \
                 (max_decompressed_bytes)",
                limits.max_decompressed_bytes
            )));
        }
        self.raw.clear();
        self.raw.resize(claimed, 0);
        let n = snap::raw::Decoder::new()
            .decompress(body, &mut self.raw)
            .map_err(|e| invalid(format!("not a snappy block: {e}")))?;
        self.raw.truncate(n);
        let raw = self.raw.as_slice();
        let mut labels: Vec<(&str, &str)> = Vec::new();
        let mut samples: Vec<(f64, i64)> = Vec::new();
        // Pass 1: every limit and every field, without appending.
        let mut totals = Totals::default();
        for_each_series(
            raw,
            &limits,
            &mut labels,
            &mut samples,
            |name, labels, samples| {
                totals.series += 1;
                if totals.series > limits.max_series {
                    return Err(invalid(format!(
                        "more than {} series in one request (max_series)",
                        limits.max_series
                    )));
                }
                totals.samples += samples.len();
                if totals.samples > limits.max_samples {
                    return Err(invalid(format!(
                        "more than {} samples in one request (max_samples)",
                        limits.max_samples
                    )));
                }
                if let Some(name) = name {
                    limits.check_metric(name).map_err(invalid)?;
                }
                limits.check_labels(labels).map_err(invalid)?;
                let label_bytes: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
                totals.label_bytes = totals
                    .label_bytes
                    .saturating_add(label_bytes.saturating_mul(samples.len()));
                if totals.label_bytes > limits.max_batch_label_bytes {
                    return Err(RequestError::TooLarge(format!(
                        "the request's samples carry more than {} bytes of labels \
                     (max_batch_label_bytes)",
                        limits.max_batch_label_bytes
                    )));
                }
                Ok(())
            },
        )?;
        // Pass 2: append. The walk is the same, so it cannot fail now.
        let mut decoded = Decoded::default();
        let mut scratch = Vec::with_capacity(256);
        for_each_series(
            raw,
            &limits,
            &mut labels,
            &mut samples,
            |name, labels, samples| {
                let Some(name) = name.filter(|n| !n.is_empty()) else {
                    decoded.unnamed += 1;
                    return Ok(());
                };
                sort_labels(labels);
                // One hash per series, not per sample: the samples share its labels.
                let id = series_id_with(&mut scratch, name, labels.iter().copied());
                for &(value, timestamp) in samples.iter() {
                    if value.to_bits() == STALE_NAN {
                        decoded.stale += 1;
                        continue;
                    }
                    out.push_with_id(timestamp, name, labels, value, id);
                    decoded.samples += 1;
                }
                Ok(())
            },
        )?;
        Ok(decoded)
    }
}

#[derive(Default)]
struct Totals {
    series: usize,
    samples: usize,
    label_bytes: usize,
}

/// Calls `f` with each series of a `WriteRequest`: its `__name__` (if any), its other
/// labels (unsorted) and its samples. Stops at the first error, of the wire format or of `f`.
/// A series with more than `max_labels` labels is refused while it is being read.
fn for_each_series<'a>(
    raw: &'a [u8],
    limits: &DecodeLimits,
    labels: &mut Vec<(&'a str, &'a str)>,
    samples: &mut Vec<(f64, i64)>,
    mut f: impl FnMut(
        Option<&'a str>,
        &mut Vec<(&'a str, &'a str)>,
        &Vec<(f64, i64)>,
    ) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let mut request = Wire::new(raw);
    while let Some((field, kind)) = request.key()? {
        if field != 1 || kind != LEN {
            request.skip(kind)?;
            continue;
        }
        let mut series = Wire::new(request.bytes()?);
        labels.clear();
        samples.clear();
        let mut name = None;
        while let Some((field, kind)) = series.key()? {
            match (field, kind) {
                (1, LEN) => {
                    let (label_name, value) = label(series.bytes()?)?;
                    if label_name == "__name__" {
                        name = Some(value);
                    } else {
                        if labels.len() == limits.max_labels {
                            return Err(invalid(format!(
                                "a series has more than {} labels (max_labels)",
                                limits.max_labels
                            )));
                        }
                        labels.push((label_name, value));
                    }
                }
                (2, LEN) => {
                    if samples.len() == limits.max_samples {
                        return Err(invalid(format!(
                            "a series has more than {} samples (max_samples)",
                            limits.max_samples
                        )));
                    }
                    samples.push(sample(series.bytes()?)?);
                }
                _ => series.skip(kind)?,
            }
        }
        f(name, labels, samples)?;
    }
    Ok(())
}

/// `prometheus.Label`: name (1) and value (2), UTF-8.
fn label(bytes: &[u8]) -> Result<(&str, &str), RequestError> {
    let mut wire = Wire::new(bytes);
    let (mut name, mut value) = ("", "");
    while let Some((field, kind)) = wire.key()? {
        match (field, kind) {
            (1, LEN) => name = utf8(wire.bytes()?)?,
            (2, LEN) => value = utf8(wire.bytes()?)?,
            _ => wire.skip(kind)?,
        }
    }
    Ok((name, value))
}

/// `prometheus.Sample`: value (1, double) and timestamp (2, int64 milliseconds).
fn sample(bytes: &[u8]) -> Result<(f64, i64), RequestError> {
    let mut wire = Wire::new(bytes);
    let (mut value, mut timestamp) = (0.0, 0);
    while let Some((field, kind)) = wire.key()? {
        match (field, kind) {
            (1, FIXED64) => value = f64::from_bits(wire.fixed64()?),
            // int64 is sent as its two's-complement varint.
            (2, VARINT) => timestamp = wire.varint()? as i64,
            _ => wire.skip(kind)?,
        }
    }
    Ok((value, timestamp))
}

fn utf8(bytes: &[u8]) -> Result<&str, RequestError> {
    std::str::from_utf8(bytes)
        .map_err(|_| invalid("not a remote-write WriteRequest: a label is not valid UTF-8"))
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A cursor over protobuf wire format.
struct Wire<'a> {
    rest: &'a [u8],
}

impl<'a> Wire<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn malformed(what: &str) -> RequestError {
        invalid(format!("not a remote-write WriteRequest: {what}"))
    }

    fn varint(&mut self) -> Result<u64, RequestError> {
        let mut value = 0u64;
        for (i, &b) in self.rest.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.rest = &self.rest[i + 1..];
                return Ok(value);
            }
        }
        Err(Self::malformed("a truncated or overlong varint"))
    }

    /// The next field number and wire type, or `None` at the end.
    fn key(&mut self) -> Result<Option<(u32, u8)>, RequestError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| Self::malformed("a field number"))?;
        if field == 0 {
            return Err(Self::malformed("field number 0"));
        }
        Ok(Some((field, (key & 7) as u8)))
    }

    fn bytes(&mut self) -> Result<&'a [u8], RequestError> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.rest.len())
            .ok_or_else(|| Self::malformed("a length past the end of the body"))?;
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(head)
    }

    fn fixed64(&mut self) -> Result<u64, RequestError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<8>()
            .ok_or_else(|| Self::malformed("a truncated 64-bit field"))?;
        self.rest = rest;
        Ok(u64::from_le_bytes(*head))
    }

    fn skip(&mut self, kind: u8) -> Result<(), RequestError> {
        match kind {
            VARINT => self.varint().map(drop),
            FIXED64 => self.fixed64().map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => {
                let (_, rest) = self
                    .rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| Self::malformed("a truncated 32-bit field"))?;
                self.rest = rest;
                Ok(())
            }
            _ => Err(Self::malformed(&format!("wire type {kind}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MetricsColumns;

    fn series(name: &str, labels: &[(&str, &str)], samples: &[(f64, i64)]) -> TimeSeries {
        let mut l = vec![Label {
            name: "__name__".into(),
            value: name.into(),
        }];
        l.extend(labels.iter().map(|(k, v)| Label {
            name: (*k).into(),
            value: (*v).into(),
        }));
        TimeSeries {
            labels: l,
            samples: samples
                .iter()
                .map(|&(value, timestamp)| Sample { value, timestamp })
                .collect(),
        }
    }

    #[test]
    fn a_request_round_trips_and_stale_markers_are_skipped() {
        let request = WriteRequest {
            timeseries: vec![
                series(
                    "up",
                    &[("job", "node"), ("instance", "a:9100")],
                    &[(1.0, 1000), (1.0, 2000)],
                ),
                series(
                    "load",
                    &[],
                    &[(0.5, 1000), (f64::from_bits(STALE_NAN), 2000)],
                ),
                TimeSeries {
                    labels: vec![],
                    samples: vec![Sample {
                        value: 1.0,
                        timestamp: 1,
                    }],
                },
            ],
        };
        let mut out = MetricsBatchBuilder::default();
        let decoded = RemoteWriteDecoder::default()
            .decode(&request.to_body(), &mut out)
            .unwrap();
        assert_eq!(
            decoded,
            Decoded {
                samples: 3,
                stale: 1,
                unnamed: 1
            }
        );
        let batch = out.finish();
        let cols = MetricsColumns::try_new(&batch, "t").unwrap();
        assert_eq!(cols.metric(0), "up");
        assert_eq!(
            cols.labels(0),
            vec![
                ("instance".into(), "a:9100".into()),
                ("job".into(), "node".into())
            ]
        );
        assert_eq!(cols.ts.value(1), 2000);
        assert_eq!(cols.metric(2), "load");
        // An ordinary NaN is a value, not a stale marker.
        let nan = WriteRequest {
            timeseries: vec![series("x", &[], &[(f64::NAN, 1)])],
        };
        let mut out = MetricsBatchBuilder::default();
        assert_eq!(
            RemoteWriteDecoder::default()
                .decode(&nan.to_body(), &mut out)
                .unwrap()
                .samples,
            1
        );
    }

    #[test]
    fn bodies_that_are_not_remote_write_are_errors() {
        let mut out = MetricsBatchBuilder::default();
        let mut d = RemoteWriteDecoder::default();
        assert!(
            d.decode(b"plain text", &mut out)
                .unwrap_err()
                .contains("snappy")
        );
        let not_proto = snap::raw::Encoder::new()
            .compress_vec(b"\xff\xff\xff")
            .unwrap();
        assert!(
            d.decode(&not_proto, &mut out)
                .unwrap_err()
                .contains("WriteRequest")
        );
        assert!(out.is_empty());
    }

    #[test]
    fn a_claimed_length_over_the_limit_is_refused_before_decompressing() {
        // The claimed length (just under 4 GiB) is all there is: no data follows. Refused
        // as too large, not as a broken block, so the claim was read before anything else.
        let mut body = Vec::new();
        let mut claimed: u64 = (4 << 30) - 16;
        while claimed >= 0x80 {
            body.push((claimed as u8) | 0x80);
            claimed >>= 7;
        }
        body.push(claimed as u8);
        let mut out = MetricsBatchBuilder::default();
        let e = RemoteWriteDecoder::default()
            .decode(&body, &mut out)
            .unwrap_err();
        assert!(e.is_too_large(), "{e}");
        assert!(e.contains("max_decompressed_bytes"), "{e}");
    }

    #[test]
    fn limits_refuse_a_request_and_append_nothing() {
        let limits = DecodeLimits {
            max_labels: 2,
            max_series: 2,
            max_samples: 3,
            max_batch_label_bytes: 1000,
            ..DecodeLimits::default()
        };
        let refused = |request: WriteRequest| {
            let mut out = MetricsBatchBuilder::default();
            let e = RemoteWriteDecoder::with_limits(limits)
                .decode(&request.to_body(), &mut out)
                .unwrap_err();
            assert!(out.is_empty(), "a refused request appends nothing");
            e
        };
        let ok = series("a", &[("x", "1")], &[(1.0, 1)]);
        let e = refused(WriteRequest {
            timeseries: vec![
                ok.clone(),
                series("b", &[("x", "1"), ("y", "2"), ("z", "3")], &[]),
            ],
        });
        assert!(e.contains("max_labels") && !e.is_too_large(), "{e}");
        let e = refused(WriteRequest {
            timeseries: vec![ok.clone(), ok.clone(), ok.clone()],
        });
        assert!(e.contains("max_series"), "{e}");
        let e = refused(WriteRequest {
            timeseries: vec![series("a", &[], &[(1.0, 1); 4])],
        });
        assert!(e.contains("max_samples"), "{e}");
        // 3 samples of a series with ~400 bytes of labels: 1 200 bytes copied into the batch.
        let fat = "v".repeat(400);
        let e = refused(WriteRequest {
            timeseries: vec![series("a", &[("k", &fat)], &[(1.0, 1); 3])],
        });
        assert!(
            e.contains("max_batch_label_bytes") && e.is_too_large(),
            "{e}"
        );
    }

    #[test]
    fn the_hand_walk_reads_what_prost_writes_and_skips_unknown_fields() {
        // Unknown fields of every wire type, as a newer Prometheus might add them.
        let mut raw = WriteRequest {
            timeseries: vec![series("up", &[("job", "a")], &[(2.5, -7)])],
        }
        .encode_to_vec();
        raw.extend_from_slice(&[0x18, 0x05]); // field 3, varint
        raw.extend_from_slice(&[0x21, 0, 0, 0, 0, 0, 0, 0, 0]); // field 4, fixed64
        raw.extend_from_slice(&[0x2a, 0x01, 0xff]); // field 5, bytes
        raw.extend_from_slice(&[0x35, 0, 0, 0, 0]); // field 6, fixed32
        let body = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        let mut out = MetricsBatchBuilder::default();
        let decoded = RemoteWriteDecoder::default()
            .decode(&body, &mut out)
            .unwrap();
        assert_eq!(decoded.samples, 1);
        let batch = out.finish();
        let cols = MetricsColumns::try_new(&batch, "t").unwrap();
        assert_eq!((cols.ts.value(0), cols.value.value(0)), (-7, 2.5));
        assert_eq!(cols.labels(0), vec![("job".into(), "a".into())]);
    }

    proptest::proptest! {
        /// The hand walk agrees with prost on every request prost can encode.
        #[test]
        fn agrees_with_prost(
            spec in proptest::collection::vec(
                (
                    "[a-c]{0,2}",
                    proptest::collection::vec(("[a-c]{1,2}", "[a-z]{0,3}"), 0..4),
                    proptest::collection::vec((proptest::prelude::any::<f64>(), proptest::prelude::any::<i64>()), 0..3),
                ),
                0..4,
            )
        ) {
            let request = WriteRequest {
                timeseries: spec
                    .iter()
                    .map(|(name, labels, samples)| {
                        let labels: Vec<(&str, &str)> =
                            labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        series(name, &labels, samples)
                    })
                    .collect(),
            };
            let mut out = MetricsBatchBuilder::default();
            let decoded = RemoteWriteDecoder::default().decode(&request.to_body(), &mut out).unwrap();
            let expected: usize = request
                .timeseries
                .iter()
                .filter(|s| s.labels.iter().any(|l| l.name == "__name__" && !l.value.is_empty()))
                .map(|s| s.samples.iter().filter(|x| x.value.to_bits() != STALE_NAN).count())
                .sum();
            proptest::prop_assert_eq!(decoded.samples, expected);
            let back = WriteRequest::decode(request.encode_to_vec().as_slice()).unwrap();
            proptest::prop_assert_eq!(back.timeseries.len(), request.timeseries.len());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut out = MetricsBatchBuilder::default();
            let _ = RemoteWriteDecoder::default().decode(&bytes, &mut out);
            // Also as a snappy block around arbitrary protobuf bytes.
            let body = snap::raw::Encoder::new().compress_vec(&bytes).unwrap();
            let _ = RemoteWriteDecoder::default().decode(&body, &mut out);
            let _ = out.finish();
        }
    }
}
