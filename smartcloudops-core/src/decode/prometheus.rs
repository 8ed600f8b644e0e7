//! Prometheus text exposition format (version 0.0.4), as `/metrics` endpoints serve it.
//!
//! ```text
//! # HELP http_requests_total Requests served.
//! # TYPE http_requests_total counter
//! http_requests_total{method="get",code="200"} 1027 1764065100000
//! process_cpu_seconds_total 12.47
//! ```
//!
//! - Each sample line becomes one row: the metric name, its labels, the value (`NaN`,
//!   `+Inf`, `-Inf` allowed) and the timestamp in milliseconds. A sample without a timestamp
//!   gets the scrape time.
//! - Histograms and summaries arrive as their series (`_bucket` with `le`, `_sum`, `_count`,
//!   quantiles with `quantile`), as Prometheus stores them.
//! - Label values unescape `\\`, `\"` and `\n`. A label repeated in one sample keeps its
//!   last value.
//! - `# HELP`, `# TYPE` and other comments, and blank lines, are skipped. Any other line that
//!   does not parse is rejected with the reason and its column.

use super::{DecodeLimits, Decoder, Reject, lines, over_limit, parse_value};
use crate::schema::{MetricsBatchBuilder, sort_labels};

/// Decodes the Prometheus text format (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct PrometheusDecoder {
    /// Time of samples without a timestamp; `None`: the wall clock at decode time.
    default_ts_ms: Option<i64>,
    labels: Vec<(String, String)>,
    limits: DecodeLimits,
}

struct ParseError {
    column: usize,
    reason: String,
}

impl PrometheusDecoder {
    /// Samples without a timestamp get `ts_ms` (the scrape's time).
    pub fn with_default_ts(ts_ms: i64) -> Self {
        Self {
            default_ts_ms: Some(ts_ms),
            ..Self::default()
        }
    }

    /// The same decoder, rejecting lines over `limits`.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the time given to samples without a timestamp (a scraper sets it per scrape).
    pub fn set_default_ts(&mut self, ts_ms: i64) {
        self.default_ts_ms = Some(ts_ms);
    }

    fn line(&mut self, text: &str, out: &mut MetricsBatchBuilder) -> Result<(), ParseError> {
        let b = text.as_bytes();
        let fail = |column: usize, reason: String| {
            Err(ParseError {
                column: column + 1,
                reason,
            })
        };
        let name_end = b
            .iter()
            .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b':'))
            .unwrap_or(b.len());
        let name = &text[..name_end];
        if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
            return fail(0, "expected a metric name".into());
        }
        if let Err(reason) = self.limits.check_metric(name) {
            return fail(0, reason);
        }
        let mut i = name_end;
        self.labels.clear();
        if b.get(i) == Some(&b'{') {
            i += 1;
            loop {
                while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
                    i += 1;
                }
                if b.get(i) == Some(&b'}') {
                    i += 1;
                    break;
                }
                let key_end = b[i..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
                    .map_or(b.len(), |p| i + p);
                if key_end == i {
                    return fail(i, "expected a label name".into());
                }
                let key = &text[i..key_end];
                i = key_end;
                if b.get(i) != Some(&b'=') || b.get(i + 1) != Some(&b'"') {
                    return fail(i, format!("label `{key}`: expected =\"value\""));
                }
                i += 2;
                let mut value = String::new();
                let mut run = i;
                loop {
                    match b.get(i) {
                        None => return fail(i, format!("label `{key}`: unterminated value")),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            value.push_str(&text[run..i]);
                            match b.get(i + 1) {
                                Some(b'n') => value.push('\n'),
                                Some(b'\\') => value.push('\\'),
                                Some(b'"') => value.push('"'),
                                _ => return fail(i, format!("label `{key}`: invalid escape")),
                            }
                            i += 2;
                            run = i;
                        }
                        Some(_) => i += 1,
                    }
                }
                value.push_str(&text[run..i]);
                i += 1; // the closing quote
                if self.labels.len() == self.limits.max_labels {
                    let reason =
                        format!("more than {} labels (max_labels)", self.limits.max_labels);
                    return fail(key_end - key.len(), reason);
                }
                if let Err(reason) = self.limits.check_label(key, &value) {
                    return fail(key_end - key.len(), reason);
                }
                self.labels.push((key.to_owned(), value));
                while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
                    i += 1;
                }
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    _ => return fail(i, "expected `,` or `}` after a label".into()),
                }
            }
        }
        let rest = &text[i..];
        if !rest.starts_with([' ', '\t']) {
            return fail(i, "expected a space before the value".into());
        }
        let mut parts = rest.split_ascii_whitespace();
        let raw_value = parts.next().ok_or(ParseError {
            column: i + 1,
            reason: "missing value".into(),
        })?;
        let value = parse_value(raw_value).map_err(|reason| ParseError {
            column: i + 2,
            reason,
        })?;
        let ts = match parts.next() {
            Some(raw) => raw.parse::<i64>().map_err(|_| ParseError {
                column: i + 2,
                reason: format!("timestamp {raw:?} is not integer milliseconds"),
            })?,
            None => self.default_ts_ms.unwrap_or_else(now_ms),
        };
        if parts.next().is_some() {
            return fail(i, "unexpected text after the timestamp".into());
        }
        sort_labels(&mut self.labels);
        out.push(ts, name, &self.labels, value);
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Decoder for PrometheusDecoder {
    fn format(&self) -> &'static str {
        "prometheus"
    }

    fn decode(&mut self, payload: &[u8], out: &mut MetricsBatchBuilder, rejects: &mut Vec<Reject>) {
        for (index, line) in lines(payload) {
            if let Err(reason) = self.limits.check_line(line.len()) {
                rejects.push(over_limit(index, line, reason));
                continue;
            }
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() || trimmed.starts_with(b"#") {
                continue;
            }
            let result = match std::str::from_utf8(trimmed) {
                Ok(text) => self.line(text, out),
                Err(e) => Err(ParseError {
                    column: e.valid_up_to() + 1,
                    reason: "not valid UTF-8".into(),
                }),
            };
            if let Err(e) = result {
                rejects.push(Reject {
                    record: index,
                    raw: String::from_utf8_lossy(line).into_owned(),
                    reason: format!("{} (column {})", e.reason, e.column),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::test_support::{Row, decode_rows, l};

    fn decode(text: &str) -> (Vec<Row>, Vec<Reject>) {
        decode_rows(&mut PrometheusDecoder::with_default_ts(7), text)
    }

    #[test]
    fn an_exposition_page_decodes_to_one_row_per_sample() {
        let page = "\
# HELP http_requests_total Requests served.
# TYPE http_requests_total counter
http_requests_total{method=\"get\",code=\"200\"} 1027 1764065100000
http_requests_total{code=\"500\", method=\"post\",} 3

# TYPE latency histogram
latency_bucket{le=\"0.1\"} 5
latency_bucket{le=\"+Inf\"} 9
latency_sum 1.7e-1
node_load1 NaN
up{} +Inf
";
        let (rows, rejects) = decode(page);
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(rows.len(), 7);
        assert_eq!(
            rows[0],
            (
                1_764_065_100_000,
                "http_requests_total".into(),
                l(&[("code", "200"), ("method", "get")]),
                1027.0
            )
        );
        assert_eq!(rows[1].0, 7, "no timestamp: the scrape time");
        assert_eq!(rows[1].2, l(&[("code", "500"), ("method", "post")]));
        assert_eq!(rows[3].2, l(&[("le", "+Inf")]));
        assert_eq!(rows[4].3, 0.17);
        assert!(rows[5].3.is_nan());
        assert_eq!(rows[6].3, f64::INFINITY);
    }

    #[test]
    fn label_values_unescape() {
        let (rows, rejects) = decode(r#"m{path="C:\\dir",msg="say \"hi\"\nbye"} 1"#);
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(
            rows[0].2,
            l(&[("msg", "say \"hi\"\nbye"), ("path", "C:\\dir")])
        );
    }

    #[test]
    fn malformed_lines_are_rejected_with_a_reason_and_column() {
        for (line, reason) in [
            ("9lives 1", "expected a metric name"),
            ("m{a=b} 1", "expected =\"value\""),
            ("m{a=\"b} 1", "unterminated value"),
            ("m{a=\"\\x\"} 1", "invalid escape"),
            ("m 1 soon", "not integer milliseconds"),
            ("m one", "not a number"),
            ("m", "expected a space"),
            ("m 1 2 3", "unexpected text"),
        ] {
            let (rows, rejects) = decode(line);
            assert!(rows.is_empty(), "{line}");
            assert_eq!(rejects.len(), 1, "{line}");
            assert!(
                rejects[0].reason.contains(reason),
                "{line}: {}",
                rejects[0].reason
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut d = PrometheusDecoder::default();
            let mut b = MetricsBatchBuilder::default();
            let mut r = Vec::new();
            d.decode(&bytes, &mut b, &mut r);
            let _ = b.finish();
        }

        #[test]
        fn lines_near_the_grammar_never_panic(line in r#"[a-z_{}=",\\ .0-9+InfNa]{0,60}"#) {
            let mut d = PrometheusDecoder::default();
            let mut b = MetricsBatchBuilder::default();
            let mut r = Vec::new();
            d.decode(line.as_bytes(), &mut b, &mut r);
            let _ = b.finish();
        }
    }
}
