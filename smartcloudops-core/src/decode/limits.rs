//! Ingestion limits: how much one payload, line or series may hold before a decoder refuses
//! it.
//!
//! Every decoder checks these while it reads, so hostile input costs at most the work of
//! reading up to a limit: a line over `max_line_bytes` is rejected before it is parsed, a
//! record with more than `max_labels` labels before they are sorted, and a remote-write body
//! whose snappy header claims more than `max_decompressed_bytes` before anything is
//! allocated. Over-limit records come back as [`Reject`](super::Reject)s (or, for
//! remote-write, as [`RequestError`](super::remote_write::RequestError)s) naming the limit,
//! so they are dead-lettered with the reason.

use serde::{Deserialize, Serialize};

use crate::error::Problems;

/// Limits on what one payload may hold. Sources that take a config carry them as a
/// `limits = { … }` table; every field has a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Longest line of a line-based payload (JSON, CSV, Influx, Prometheus text), in bytes.
    pub max_line_bytes: usize,
    /// Most labels one record or series may carry (`__name__` not counted).
    pub max_labels: usize,
    /// Longest label name, in bytes.
    pub max_label_name_bytes: usize,
    /// Longest label value (and metric name), in bytes.
    pub max_label_value_bytes: usize,
    /// Most series in one remote-write request.
    pub max_series: usize,
    /// Most samples in one remote-write request.
    pub max_samples: usize,
    /// Largest decompressed remote-write body, in bytes; checked against the length the
    /// snappy header claims, before decompressing.
    pub max_decompressed_bytes: usize,
    /// Most label bytes one remote-write request may copy into its batch: every sample
    /// carries its series' labels, so a request of few bytes (many samples of a series with
    /// long labels) can fan out into a large batch.
    pub max_batch_label_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // Well above what Prometheus sends (2 000 samples per request by default, a few
        // dozen labels per series) and what the line formats carry; small enough that one
        // request's label fan-out into Arrow stays in the tens of MiB.
        Self {
            max_line_bytes: 1 << 20,
            max_labels: 128,
            max_label_name_bytes: 1024,
            max_label_value_bytes: 16 << 10,
            max_series: 100_000,
            max_samples: 1_000_000,
            max_decompressed_bytes: 64 << 20,
            max_batch_label_bytes: 256 << 20,
        }
    }
}

impl DecodeLimits {
    /// Every problem of these limits (each must be above 0), paths relative to the table.
    pub fn problems(&self) -> Problems {
        let mut p = Problems::new();
        for (field, value) in [
            ("max_line_bytes", self.max_line_bytes),
            ("max_labels", self.max_labels),
            ("max_label_name_bytes", self.max_label_name_bytes),
            ("max_label_value_bytes", self.max_label_value_bytes),
            ("max_series", self.max_series),
            ("max_samples", self.max_samples),
            ("max_decompressed_bytes", self.max_decompressed_bytes),
            ("max_batch_label_bytes", self.max_batch_label_bytes),
        ] {
            p.check(
                value > 0,
                field,
                "must be above 0",
                "leave the field out for its default",
            );
        }
        p
    }

    /// Why a line of `len` bytes is refused, if it is.
    #[inline]
    pub(crate) fn check_line(&self, len: usize) -> Result<(), String> {
        if len > self.max_line_bytes {
            return Err(line_too_long(len, self.max_line_bytes));
        }
        Ok(())
    }

    /// Why a record's labels are refused, if they are: too many, or a name or value too
    /// long. Counted before sorting, so an oversized label set costs one pass.
    #[inline]
    pub(crate) fn check_labels<K: AsRef<str>, V: AsRef<str>>(
        &self,
        labels: &[(K, V)],
    ) -> Result<(), String> {
        if labels.len() > self.max_labels {
            return Err(too_many_labels(labels.len(), self.max_labels));
        }
        for (name, value) in labels {
            self.check_label(name.as_ref(), value.as_ref())?;
        }
        Ok(())
    }

    /// Why one label is refused, if it is.
    #[inline]
    pub(crate) fn check_label(&self, name: &str, value: &str) -> Result<(), String> {
        if name.len() > self.max_label_name_bytes || value.len() > self.max_label_value_bytes {
            return Err(self.label_too_long(name, value));
        }
        Ok(())
    }

    /// The reason for a label [`check_label`](Self::check_label) refused: out of line, so
    /// the check that passes stays a pair of compares.
    #[cold]
    #[inline(never)]
    fn label_too_long(&self, name: &str, value: &str) -> String {
        if name.len() > self.max_label_name_bytes {
            format!(
                "label name `{}…` of {} bytes is over the limit of {} (max_label_name_bytes)",
                prefix(name),
                name.len(),
                self.max_label_name_bytes
            )
        } else {
            format!(
                "value of label `{}` is {} bytes, over the limit of {} (max_label_value_bytes)",
                prefix(name),
                value.len(),
                self.max_label_value_bytes
            )
        }
    }

    /// Why a metric name is refused, if it is (held to the label-value limit).
    #[inline]
    pub(crate) fn check_metric(&self, metric: &str) -> Result<(), String> {
        if metric.len() > self.max_label_value_bytes {
            return Err(metric_too_long(metric, self.max_label_value_bytes));
        }
        Ok(())
    }
}

#[cold]
#[inline(never)]
fn line_too_long(len: usize, max: usize) -> String {
    format!("line of {len} bytes is over the limit of {max} (max_line_bytes)")
}

#[cold]
#[inline(never)]
fn too_many_labels(count: usize, max: usize) -> String {
    format!("{count} labels, over the limit of {max} (max_labels)")
}

#[cold]
#[inline(never)]
fn metric_too_long(metric: &str, max: usize) -> String {
    format!(
        "metric name `{}…` of {} bytes is over the limit of {max} (max_label_value_bytes)",
        prefix(metric),
        metric.len(),
    )
}

/// The first few characters of `s`, for a reason that must not echo a huge name.
fn prefix(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_zero_is_a_problem() {
        assert!(DecodeLimits::default().problems().is_empty());
        let zero = DecodeLimits {
            max_labels: 0,
            ..DecodeLimits::default()
        };
        let problems = zero.problems();
        assert_eq!(problems.0.len(), 1);
        assert_eq!(problems.0[0].path, "max_labels");
    }

    #[test]
    fn a_partial_table_keeps_the_other_defaults() {
        let limits: DecodeLimits = toml::from_str("max_labels = 8").unwrap();
        assert_eq!(limits.max_labels, 8);
        assert_eq!(
            limits.max_line_bytes,
            DecodeLimits::default().max_line_bytes
        );
        assert!(toml::from_str::<DecodeLimits>("max_lables = 8").is_err());
    }

    /// Each line-based format, each limit: the record is rejected with the limit's name, a
    /// short raw prefix, and the good record beside it still decodes.
    #[test]
    fn every_line_decoder_rejects_over_limit_records_with_the_reason() {
        use crate::decode::{CsvOptions, Format};
        use crate::schema::MetricsBatchBuilder;
        let limits = DecodeLimits {
            max_line_bytes: 200,
            max_labels: 2,
            max_label_name_bytes: 8,
            max_label_value_bytes: 16,
            ..DecodeLimits::default()
        };
        let long = "x".repeat(300);
        let cases: [(Format, String, [&str; 4]); 4] = [
            (
                Format::Json,
                format!(
                    "{{\"ts\":1,\"metric\":\"m\",\"value\":1}}\n\
                     {{\"ts\":1,\"metric\":\"m\",\"value\":1,\"x\":\"{long}\"}}\n\
                     {{\"ts\":1,\"metric\":\"m\",\"labels\":{{\"a\":1,\"b\":2,\"c\":3}},\"value\":1}}\n\
                     {{\"ts\":1,\"metric\":\"m\",\"labels\":{{\"abcdefghi\":1}},\"value\":1}}\n\
                     {{\"ts\":1,\"metric\":\"m\",\"labels\":{{\"a\":\"{}\"}},\"value\":1}}\n",
                    "v".repeat(17)
                ),
                [
                    "max_line_bytes",
                    "max_labels",
                    "max_label_name_bytes",
                    "max_label_value_bytes",
                ],
            ),
            (
                Format::Influx,
                format!(
                    "m value=1 1000000\nm,x={long} value=1 1000000\nm,a=1,b=2,c=3 value=1 1\n\
                     m,abcdefghi=1 value=1 1\nm,a={} value=1 1\n",
                    "v".repeat(17)
                ),
                [
                    "max_line_bytes",
                    "max_labels",
                    "max_label_name_bytes",
                    "max_label_value_bytes",
                ],
            ),
            (
                Format::Prometheus,
                format!(
                    "m 1 1\nm{{x=\"{long}\"}} 1 1\nm{{a=\"1\",b=\"2\",c=\"3\"}} 1 1\n\
                     m{{abcdefghi=\"1\"}} 1 1\nm{{a=\"{}\"}} 1 1\n",
                    "v".repeat(17)
                ),
                [
                    "max_line_bytes",
                    "max_labels",
                    "max_label_name_bytes",
                    "max_label_value_bytes",
                ],
            ),
            (
                Format::Csv,
                format!(
                    "ts,metric,value,a,abcdefghi\n1,m,1,,\n1,m,1,{long},\n1,m,1,,1\n1,m,1,{},\n",
                    "v".repeat(17)
                ),
                [
                    "max_line_bytes",
                    "max_label_name_bytes",
                    "max_label_value_bytes",
                    "",
                ],
            ),
        ];
        for (format, text, reasons) in cases {
            let mut decoder = format.decoder_with_limits(CsvOptions::default(), limits);
            let mut out = MetricsBatchBuilder::default();
            let mut rejects = Vec::new();
            decoder.decode(text.as_bytes(), &mut out, &mut rejects);
            assert_eq!(
                out.finish().num_rows(),
                1,
                "{format}: the good record decodes"
            );
            let expected: Vec<&str> = reasons.into_iter().filter(|r| !r.is_empty()).collect();
            assert_eq!(rejects.len(), expected.len(), "{format}: {rejects:?}");
            for (reject, limit) in rejects.iter().zip(expected) {
                assert!(
                    reject.reason.contains(limit),
                    "{format}: {reject:?} should name {limit}"
                );
                assert!(
                    reject.raw.len() < 300,
                    "{format}: the raw text is cut short"
                );
            }
        }
        // A CSV header with more label columns than allowed is refused as a header.
        let mut csv = Format::Csv.decoder_with_limits(CsvOptions::default(), limits);
        let mut rejects = Vec::new();
        csv.decode(
            b"ts,metric,value,a,b,c\n1,m,1,x,y,z\n",
            &mut MetricsBatchBuilder::default(),
            &mut rejects,
        );
        assert!(rejects[0].reason.contains("max_labels"), "{rejects:?}");
    }

    #[test]
    fn reasons_name_the_limit_and_cut_long_names() {
        let limits = DecodeLimits {
            max_labels: 1,
            max_label_name_bytes: 4,
            max_label_value_bytes: 4,
            max_line_bytes: 10,
            ..DecodeLimits::default()
        };
        assert!(
            limits
                .check_line(11)
                .unwrap_err()
                .contains("max_line_bytes")
        );
        assert!(limits.check_line(10).is_ok());
        let two = [("a", "1"), ("b", "2")];
        assert!(
            limits
                .check_labels(&two)
                .unwrap_err()
                .contains("max_labels")
        );
        let long_name = "é".repeat(100);
        let reason = limits.check_label(&long_name, "1").unwrap_err();
        assert!(reason.contains("max_label_name_bytes"));
        assert!(reason.len() < 120, "{reason}");
        assert!(
            limits
                .check_label("a", "12345")
                .unwrap_err()
                .contains("max_label_value_bytes")
        );
        assert!(limits.check_metric("12345").is_err());
    }
}
