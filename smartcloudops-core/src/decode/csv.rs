//! CSV with a header line.
//!
//! ```text
//! ts,metric,value,host,region
//! 2026-11-25T10:05:00Z,cpu_utilization,97.2,web-1,eu
//! ```
//!
//! - `ts` (or `timestamp`, `time`): epoch milliseconds or RFC 3339 (a space for `T` and no
//!   zone are accepted, read as UTC — the layout of NAB's files).
//! - `metric` (or `name`): the metric name; without that column every row gets
//!   [`CsvOptions::metric`].
//! - `value`: the sample.
//! - every other column is a label; empty cells mean "no such label", as in Prometheus.
//!
//! The first record the decoder sees is the header. Records are one per line.

use serde::{Deserialize, Serialize};

use super::{DecodeLimits, Decoder, Reject, over_limit, parse_timestamp, parse_value};
use crate::schema::MetricsBatchBuilder;

/// How to read CSV payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CsvOptions {
    /// Metric name for rows when the header has no `metric` column.
    pub metric: Option<String>,
    /// Field delimiter, one ASCII character.
    pub delimiter: char,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            metric: None,
            delimiter: ',',
        }
    }
}

#[derive(Debug)]
struct Header {
    ts: usize,
    value: usize,
    metric: Option<usize>,
    /// Label columns sorted by name, so rows come out with sorted labels.
    labels: Vec<(usize, String)>,
}

#[derive(Debug)]
enum HeaderState {
    Pending,
    Ready(Header),
    Invalid(String),
}

/// Decodes CSV (see the [module docs](self)).
#[derive(Debug)]
pub struct CsvDecoder {
    options: CsvOptions,
    header: HeaderState,
    limits: DecodeLimits,
}

impl CsvDecoder {
    /// A decoder that takes the first record it sees as the header.
    pub fn new(options: CsvOptions) -> Self {
        Self {
            options,
            header: HeaderState::Pending,
            limits: DecodeLimits::default(),
        }
    }

    /// The same decoder, rejecting records over `limits`.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    fn parse_header(&self, names: &csv::StringRecord) -> Result<Header, String> {
        // A UTF-8 byte-order mark (spreadsheet exports) is not part of the first name.
        let clean = |n: &str| n.trim_start_matches('\u{feff}').trim().to_owned();
        let names: Vec<String> = names.iter().map(clean).collect();
        let find = |aliases: &[&str]| {
            names
                .iter()
                .position(|n| aliases.iter().any(|a| n.eq_ignore_ascii_case(a)))
        };
        let ts = find(&["ts", "timestamp", "time"])
            .ok_or_else(|| format!("CSV header {names:?} has no `ts`/`timestamp` column"))?;
        let value = find(&["value"])
            .ok_or_else(|| format!("CSV header {names:?} has no `value` column"))?;
        let metric = find(&["metric", "name"]);
        if metric.is_none() && self.options.metric.is_none() {
            return Err(format!(
                "CSV header {names:?} has no `metric` column and no `metric` option is set"
            ));
        }
        let label_columns = names
            .len()
            .saturating_sub(2 + usize::from(metric.is_some()));
        if label_columns > self.limits.max_labels {
            return Err(format!(
                "CSV header has {label_columns} label columns, over the limit of {} (max_labels)",
                self.limits.max_labels
            ));
        }
        let mut labels: Vec<(usize, String)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != ts && *i != value && Some(*i) != metric)
            .map(|(i, n)| (i, n.clone()))
            .collect();
        // A repeated column keeps its last occurrence, as a repeated JSON label does.
        labels.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        labels.dedup_by(|a, b| a.1 == b.1);
        Ok(Header {
            ts,
            value,
            metric,
            labels,
        })
    }
}

impl Decoder for CsvDecoder {
    fn format(&self) -> &'static str {
        "csv"
    }

    fn decode(&mut self, payload: &[u8], out: &mut MetricsBatchBuilder, rejects: &mut Vec<Reject>) {
        let delimiter = u8::try_from(self.options.delimiter).unwrap_or(b',');
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(delimiter)
            .from_reader(payload);
        let mut record = csv::StringRecord::new();
        loop {
            let before = reader.position().byte() as usize;
            match reader.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    let end = reader.position().byte() as usize;
                    let line = e.position().map_or(0, |p| line_index(payload, p));
                    rejects.push(Reject {
                        record: line,
                        raw: raw_text(payload, before, end),
                        reason: format!("CSV: {e}"),
                    });
                    continue;
                }
            }
            let end = reader.position().byte() as usize;
            if let Err(reason) = self.limits.check_line(end.saturating_sub(before)) {
                let line = record.position().map_or(0, |p| line_index(payload, p));
                let raw = &payload[before.min(payload.len())..end.min(payload.len())];
                rejects.push(over_limit(line, raw, reason));
                continue;
            }
            // The record's own position: blank lines before it are not counted by `before`.
            let start = record
                .position()
                .cloned()
                .unwrap_or_else(csv::Position::new);
            if record.len() == 1 && record[0].trim().is_empty() {
                continue; // blank line
            }
            if let HeaderState::Pending = self.header {
                self.header = match self.parse_header(&record) {
                    Ok(h) => HeaderState::Ready(h),
                    Err(reason) => {
                        rejects.push(Reject {
                            record: line_index(payload, &start),
                            raw: record.iter().collect::<Vec<_>>().join(","),
                            reason: reason.clone(),
                        });
                        HeaderState::Invalid(reason)
                    }
                };
                continue;
            }
            let header = match &self.header {
                HeaderState::Pending => continue,
                HeaderState::Ready(h) => h,
                HeaderState::Invalid(reason) => {
                    rejects.push(Reject {
                        record: line_index(payload, &start),
                        raw: record.iter().collect::<Vec<_>>().join(","),
                        reason: format!("no usable CSV header: {reason}"),
                    });
                    continue;
                }
            };
            let field = |i: usize| record.get(i).unwrap_or("");
            let parsed = parse_timestamp(field(header.ts)).and_then(|ts| {
                let value = parse_value(field(header.value))?;
                let metric = match header.metric {
                    Some(i) if !field(i).trim().is_empty() => field(i).trim(),
                    Some(_) => return Err("empty `metric` cell".to_owned()),
                    None => self.options.metric.as_deref().unwrap_or_default(),
                };
                Ok((ts, metric, value))
            });
            match parsed {
                Ok((ts, metric, value)) => {
                    let mut labels: Vec<(&str, &str)> = Vec::with_capacity(header.labels.len());
                    labels.extend(
                        header
                            .labels
                            .iter()
                            .map(|(i, name)| (name.as_str(), field(*i).trim()))
                            .filter(|(_, v)| !v.is_empty()),
                    );
                    let checked = self
                        .limits
                        .check_metric(metric)
                        .and_then(|()| self.limits.check_labels(&labels));
                    if let Err(reason) = checked {
                        let raw = record.iter().collect::<Vec<_>>().join(",");
                        rejects.push(over_limit(
                            line_index(payload, &start),
                            raw.as_bytes(),
                            reason,
                        ));
                        continue;
                    }
                    out.push(ts, metric, &labels, value);
                }
                Err(reason) => rejects.push(Reject {
                    record: line_index(payload, &start),
                    raw: record.iter().collect::<Vec<_>>().join(","),
                    reason,
                }),
            }
        }
    }
}

/// 0-based line of a record in the payload. The csv crate's positions do not account for
/// blank lines before a record, so skip those and count newlines (only done for rejects).
fn line_index(payload: &[u8], position: &csv::Position) -> usize {
    let mut start = (position.byte() as usize).min(payload.len());
    while start < payload.len() && matches!(payload[start], b'\n' | b'\r') {
        start += 1;
    }
    payload[..start].iter().filter(|&&b| b == b'\n').count()
}

fn raw_text(payload: &[u8], start: usize, end: usize) -> String {
    let end = end.clamp(start, payload.len());
    let start = start.min(end);
    String::from_utf8_lossy(&payload[start..end])
        .trim_end()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MetricsColumns;

    fn decode(
        decoder: &mut CsvDecoder,
        input: &str,
    ) -> (arrow::record_batch::RecordBatch, Vec<Reject>) {
        let mut out = MetricsBatchBuilder::default();
        let mut rejects = Vec::new();
        decoder.decode(input.as_bytes(), &mut out, &mut rejects);
        (out.finish(), rejects)
    }

    #[test]
    fn header_then_rows_with_label_columns() {
        let mut d = CsvDecoder::new(CsvOptions::default());
        let (batch, rejects) = decode(
            &mut d,
            "ts,region,metric,value,host\n1000,eu,cpu,1.5,a\n2000,,cpu,2.5,b\n",
        );
        assert!(rejects.is_empty(), "{rejects:?}");
        let c = MetricsColumns::try_new(&batch, "t").unwrap();
        assert_eq!(
            c.labels(0),
            vec![("host".into(), "a".into()), ("region".into(), "eu".into())]
        );
        // Empty cells are absent labels.
        assert_eq!(c.labels(1), vec![("host".into(), "b".into())]);
        // The header is remembered across payloads.
        let (batch, _) = decode(&mut d, "3000,us,mem,4,c\n");
        assert_eq!(
            MetricsColumns::try_new(&batch, "t").unwrap().metric(0),
            "mem"
        );
    }

    #[test]
    fn nab_layout_with_a_configured_metric() {
        let mut d = CsvDecoder::new(CsvOptions {
            metric: Some("nab".into()),
            ..CsvOptions::default()
        });
        let (batch, rejects) = decode(
            &mut d,
            "timestamp,value\n2014-04-01 00:00:00,20.5\n2014-04-01 00:05:00,x\n",
        );
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].record, 2);
        assert!(rejects[0].reason.contains("not a number"));
        let c = MetricsColumns::try_new(&batch, "t").unwrap();
        assert_eq!(c.ts.value(0), 1_396_310_400_000);
        assert_eq!(c.metric(0), "nab");
    }

    #[test]
    fn bom_blank_lines_and_repeated_columns() {
        let mut d = CsvDecoder::new(CsvOptions::default());
        let (batch, rejects) = decode(
            &mut d,
            "\u{feff}ts,metric,value,host,host\n\n1000,cpu,1,a,b\n\n\n2000,cpu,x,a,b\n",
        );
        assert_eq!(batch.num_rows(), 1);
        let c = MetricsColumns::try_new(&batch, "t").unwrap();
        assert_eq!(
            c.labels(0),
            vec![("host".into(), "b".into())],
            "last column wins"
        );
        assert_eq!(rejects.len(), 1);
        assert_eq!(
            rejects[0].record, 5,
            "0-based line of the bad row, blank lines included"
        );
    }

    #[test]
    fn a_bad_header_rejects_every_row_with_the_reason() {
        let mut d = CsvDecoder::new(CsvOptions::default());
        let (batch, rejects) = decode(&mut d, "when,what\n1,2\n");
        assert_eq!(batch.num_rows(), 0);
        assert_eq!(rejects.len(), 2);
        assert!(rejects[1].reason.contains("no usable CSV header"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut d = CsvDecoder::new(CsvOptions::default());
            let mut out = MetricsBatchBuilder::default();
            let mut rejects = Vec::new();
            d.decode(&bytes, &mut out, &mut rejects);
            d.decode(&bytes, &mut out, &mut rejects);
        }
    }
}
