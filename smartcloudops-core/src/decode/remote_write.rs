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

use crate::schema::{MetricsBatchBuilder, sort_labels};

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

/// Decodes remote-write request bodies. See the [module docs](self).
#[derive(Debug, Default)]
pub struct RemoteWriteDecoder {
    labels: Vec<(String, String)>,
}

impl RemoteWriteDecoder {
    /// Appends the samples of one request body to `out`. An error (not snappy, not a
    /// `WriteRequest`) means nothing was appended.
    pub fn decode(
        &mut self,
        body: &[u8],
        out: &mut MetricsBatchBuilder,
    ) -> Result<Decoded, String> {
        let raw = snap::raw::Decoder::new()
            .decompress_vec(body)
            .map_err(|e| format!("not a snappy block: {e}"))?;
        let request = WriteRequest::decode(raw.as_slice())
            .map_err(|e| format!("not a remote-write WriteRequest: {e}"))?;
        let mut decoded = Decoded::default();
        for series in request.timeseries {
            let mut name = None;
            self.labels.clear();
            for label in series.labels {
                if label.name == "__name__" {
                    name = Some(label.value);
                } else {
                    self.labels.push((label.name, label.value));
                }
            }
            let Some(name) = name.filter(|n| !n.is_empty()) else {
                decoded.unnamed += 1;
                continue;
            };
            sort_labels(&mut self.labels);
            for sample in series.samples {
                if sample.value.to_bits() == STALE_NAN {
                    decoded.stale += 1;
                    continue;
                }
                out.push(sample.timestamp, &name, &self.labels, sample.value);
                decoded.samples += 1;
            }
        }
        Ok(decoded)
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
