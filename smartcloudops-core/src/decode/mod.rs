//! Decoders: bytes from a source into canonical metrics batches.
//!
//! A decoder turns one *payload* (a chunk of a file, a Kafka message, a Redis message) into
//! rows of a [`MetricsBatchBuilder`]. Records it cannot decode come back as [`Reject`]s with a
//! reason; the source dead-letters them. A decoder never panics on input.

pub mod csv;
pub mod influx;
pub mod json;
pub mod limits;
pub mod prometheus;
pub mod remote_write;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::schema::MetricsBatchBuilder;

pub use self::csv::{CsvDecoder, CsvOptions};
pub use self::influx::{InfluxDecoder, Precision};
pub use self::json::JsonDecoder;
pub use self::limits::DecodeLimits;
pub use self::prometheus::PrometheusDecoder;
pub use self::remote_write::RemoteWriteDecoder;

/// A record a decoder could not turn into a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// 0-based index of the record (line) within the payload.
    pub record: usize,
    /// The record as received, lossy UTF-8.
    pub raw: String,
    /// Why it was rejected.
    pub reason: String,
}

/// Turns payloads into canonical metrics rows.
pub trait Decoder: Send + Sync + fmt::Debug {
    /// The format's name, e.g. `json`.
    fn format(&self) -> &'static str;

    /// Decodes every record of `payload`, appending good samples to `out` and pushing the bad
    /// ones to `rejects`.
    fn decode(&mut self, payload: &[u8], out: &mut MetricsBatchBuilder, rejects: &mut Vec<Reject>);
}

/// The payload formats sources accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line (see [`JsonDecoder`]).
    #[default]
    Json,
    /// Comma-separated values with a header line (see [`CsvDecoder`]).
    Csv,
    /// Influx line protocol, nanosecond timestamps (see [`InfluxDecoder`]).
    Influx,
    /// Prometheus text exposition (see [`PrometheusDecoder`]).
    Prometheus,
}

impl Format {
    /// A fresh decoder for this format, with the default [`DecodeLimits`].
    pub fn decoder(self, csv: CsvOptions) -> Box<dyn Decoder> {
        self.decoder_with_limits(csv, DecodeLimits::default())
    }

    /// A fresh decoder for this format that rejects records over `limits`.
    pub fn decoder_with_limits(self, csv: CsvOptions, limits: DecodeLimits) -> Box<dyn Decoder> {
        match self {
            Format::Json => Box::new(JsonDecoder::with_limits(limits)),
            Format::Csv => Box::new(CsvDecoder::new(csv).with_limits(limits)),
            Format::Influx => Box::new(InfluxDecoder::default().with_limits(limits)),
            Format::Prometheus => Box::new(PrometheusDecoder::default().with_limits(limits)),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Influx => "influx",
            Format::Prometheus => "prometheus",
        })
    }
}

/// Parses a sample value: a number, or a string such as `"12.5"`, `"NaN"`, `"+Inf"`.
pub(crate) fn parse_value(text: &str) -> Result<f64, String> {
    let t = text.trim();
    match t {
        "+Inf" | "Inf" | "inf" | "+inf" => return Ok(f64::INFINITY),
        "-Inf" | "-inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    t.parse::<f64>()
        .map_err(|_| format!("value {t:?} is not a number"))
}

/// Parses a timestamp: integer milliseconds since the epoch, or RFC 3339 (UTC).
pub(crate) fn parse_timestamp(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    crate::schema::parse_ts(t)
        .ok_or_else(|| format!("timestamp {t:?} is neither epoch milliseconds nor RFC 3339"))
}

/// Splits a payload into lines, dropping a trailing `\r`; yields `(index, line)`.
pub(crate) fn lines(payload: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    payload
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| (i, line.strip_suffix(b"\r").unwrap_or(line)))
}

/// A reject for a record refused by a limit: its raw text is cut to a short prefix, so a
/// hostile record is not copied whole into the dead-letter output.
pub(crate) fn over_limit(record: usize, raw: &[u8], reason: String) -> Reject {
    const KEEP: usize = 256;
    let mut text = String::from_utf8_lossy(&raw[..raw.len().min(KEEP)]).into_owned();
    if raw.len() > KEEP {
        text.push('…');
    }
    Reject {
        record,
        raw: text,
        reason,
    }
}

/// What the decoders' unit tests share: decode a text and read the rows back.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{Decoder, Reject};
    use crate::schema::{MetricsBatchBuilder, MetricsColumns};

    /// Timestamp, metric, labels, value.
    pub(crate) type Row = (i64, String, Vec<(String, String)>, f64);

    pub(crate) fn decode_rows(decoder: &mut dyn Decoder, text: &str) -> (Vec<Row>, Vec<Reject>) {
        let mut b = MetricsBatchBuilder::default();
        let mut rejects = Vec::new();
        decoder.decode(text.as_bytes(), &mut b, &mut rejects);
        let batch = b.finish();
        let cols = MetricsColumns::try_new(&batch, "t").unwrap();
        let rows = (0..batch.num_rows())
            .map(|r| {
                (
                    cols.ts.value(r),
                    cols.metric(r).to_owned(),
                    cols.labels(r),
                    cols.value.value(r),
                )
            })
            .collect();
        (rows, rejects)
    }

    /// Labels from pairs.
    pub(crate) fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_timestamps_parse() {
        assert_eq!(parse_value(" 1.5 "), Ok(1.5));
        assert!(parse_value("NaN").unwrap().is_nan());
        assert_eq!(parse_value("+Inf"), Ok(f64::INFINITY));
        assert!(parse_value("abc").is_err());
        assert_eq!(parse_timestamp("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_timestamp("1970-01-01T00:00:01Z"), Ok(1000));
        assert!(parse_timestamp("soon").is_err());
    }
}
