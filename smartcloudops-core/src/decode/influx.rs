//! Influx line protocol: one point per line, one sample per numeric field.
//!
//! ```text
//! cpu,host=web-1,region=eu-west-1 usage_user=12.5,usage_system=3i 1764065100000000000
//! ```
//!
//! - **Measurement and fields → metric**: each numeric field becomes one sample named
//!   `{measurement}_{field}`, or just `{measurement}` for a field called `value` (the usual
//!   single-value convention). Tags become labels.
//! - **Values**: floats (`1.5`, `1e3`), integers (`3i`), unsigned integers (`3u`) and
//!   booleans (`t`, `true`, `F`, …; as 1 / 0). A string field (`msg="hi"`) cannot be a metric
//!   value: it is rejected, with the field named, while the point's numeric fields are kept.
//! - **Timestamp**: an integer in the configured precision (nanoseconds by default, as
//!   Influx writes it). A line without one gets the time the payload was decoded.
//! - **Escapes** as the protocol defines them: `\,` `\ ` `\=` in tag keys, tag values and
//!   field keys; `\,` `\ ` in the measurement; `\"` `\\` inside string fields.
//! - Blank lines and `#` comments are skipped; anything else that does not parse is rejected
//!   with the reason and its column.

use serde::{Deserialize, Serialize};

use super::{DecodeLimits, Decoder, Reject, lines, over_limit};
use crate::schema::{MetricsBatchBuilder, sort_labels};

/// The unit of line-protocol timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Nanoseconds (Influx's default).
    #[default]
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Seconds.
    S,
}

impl Precision {
    fn to_ms(self, t: i64) -> i64 {
        match self {
            Precision::Ns => t.div_euclid(1_000_000),
            Precision::Us => t.div_euclid(1_000),
            Precision::Ms => t,
            Precision::S => t.saturating_mul(1000),
        }
    }
}

/// Decodes Influx line protocol (see the [module docs](self)).
#[derive(Debug)]
pub struct InfluxDecoder {
    precision: Precision,
    /// Time given to points without a timestamp; `None`: the wall clock at decode time.
    default_ts_ms: Option<i64>,
    labels: Vec<(String, String)>,
    limits: DecodeLimits,
}

impl Default for InfluxDecoder {
    fn default() -> Self {
        Self::new(Precision::Ns)
    }
}

/// A parse failure at a byte column of the line.
struct ParseError {
    column: usize,
    reason: String,
}

fn err<T>(column: usize, reason: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        column,
        reason: reason.into(),
    })
}

/// A field value.
enum FieldValue {
    Number(f64),
    Text,
}

impl InfluxDecoder {
    /// A decoder reading timestamps in `precision`.
    pub fn new(precision: Precision) -> Self {
        Self {
            precision,
            default_ts_ms: None,
            labels: Vec::new(),
            limits: DecodeLimits::default(),
        }
    }

    /// The same decoder, rejecting lines over `limits`.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Points without a timestamp get `ts_ms` instead of the wall clock (tests, replays).
    pub fn with_default_ts(mut self, ts_ms: i64) -> Self {
        self.default_ts_ms = Some(ts_ms);
        self
    }

    fn now_ms(&self) -> i64 {
        self.default_ts_ms.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        })
    }

    /// Parses one line, appending its samples; returns the rejected fields (if any).
    fn line(
        &mut self,
        line: &[u8],
        out: &mut MetricsBatchBuilder,
        field_rejects: &mut Vec<String>,
    ) -> Result<(), ParseError> {
        let text = std::str::from_utf8(line).map_err(|e| ParseError {
            column: e.valid_up_to() + 1,
            reason: "not valid UTF-8".into(),
        })?;
        let b = text.as_bytes();
        // measurement[,tags] fields [timestamp], split on unescaped spaces outside quotes.
        let mut i = 0;
        let (measurement, next) = scan(text, i, b", ", false);
        if measurement.is_empty() {
            return err(1, "missing measurement");
        }
        i = next;
        self.labels.clear();
        while i < b.len() && b[i] == b',' {
            let (key, after_key) = scan(text, i + 1, b"= ,", true);
            if after_key >= b.len() || b[after_key] != b'=' || key.is_empty() {
                return err(i + 2, "a tag needs `key=value`");
            }
            let (value, after_value) = scan(text, after_key + 1, b", ", true);
            if value.is_empty() {
                return err(after_key + 2, format!("tag `{key}` has an empty value"));
            }
            if self.labels.len() == self.limits.max_labels {
                let reason = format!("more than {} tags (max_labels)", self.limits.max_labels);
                return err(i + 2, reason);
            }
            if let Err(reason) = self.limits.check_label(&key, &value) {
                return err(i + 2, reason);
            }
            self.labels.push((key, value));
            i = after_value;
        }
        if i >= b.len() || b[i] != b' ' {
            return err(i + 1, "missing fields after the measurement and tags");
        }
        i += 1;
        let mut fields: Vec<(String, FieldValue)> = Vec::new();
        loop {
            let (key, after_key) = scan(text, i, b"= ,", true);
            if after_key >= b.len() || b[after_key] != b'=' || key.is_empty() {
                return err(i + 1, "a field needs `key=value`");
            }
            let start = after_key + 1;
            let (value, after_value) = if b.get(start) == Some(&b'"') {
                let end = string_end(b, start + 1).ok_or(ParseError {
                    column: start + 1,
                    reason: format!("field `{key}`: unterminated string"),
                })?;
                (FieldValue::Text, end + 1)
            } else {
                let end = b[start..]
                    .iter()
                    .position(|&c| c == b',' || c == b' ')
                    .map_or(b.len(), |p| start + p);
                let raw = &text[start..end];
                let v = number(raw).ok_or_else(|| ParseError {
                    column: start + 1,
                    reason: format!("field `{key}`: {raw:?} is not a number, integer or boolean"),
                })?;
                (FieldValue::Number(v), end)
            };
            fields.push((key, value));
            i = after_value;
            if i < b.len() && b[i] == b',' {
                i += 1;
                continue;
            }
            break;
        }
        let ts_ms = if i < b.len() {
            if b[i] != b' ' {
                return err(i + 1, "expected a space before the timestamp");
            }
            let raw = text[i + 1..].trim_end();
            let t: i64 = raw.parse().map_err(|_| ParseError {
                column: i + 2,
                reason: format!("timestamp {raw:?} is not an integer"),
            })?;
            self.precision.to_ms(t)
        } else {
            self.now_ms()
        };
        sort_labels(&mut self.labels);
        for (field, value) in fields {
            match value {
                FieldValue::Number(v) => {
                    let metric = if field == "value" {
                        measurement.clone()
                    } else {
                        format!("{measurement}_{field}")
                    };
                    if let Err(reason) = self.limits.check_metric(&metric) {
                        field_rejects.push(reason);
                        continue;
                    }
                    out.push(ts_ms, &metric, &self.labels, v);
                }
                FieldValue::Text => {
                    field_rejects.push(format!("field `{field}` is a string, not a metric value"))
                }
            }
        }
        Ok(())
    }
}

/// Reads from `start` up to the first unescaped byte in `stops`, unescaping `\x` for the
/// protocol's escapable characters; returns the text and the index of the stop byte.
fn scan(text: &str, start: usize, stops: &[u8], equals_escapable: bool) -> (String, usize) {
    let b = text.as_bytes();
    let mut out = String::new();
    let mut i = start;
    let mut run = start;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && i + 1 < b.len() {
            let n = b[i + 1];
            if n == b',' || n == b' ' || (equals_escapable && n == b'=') || n == b'\\' {
                out.push_str(&text[run..i]);
                out.push(n as char);
                i += 2;
                run = i;
                continue;
            }
        }
        if stops.contains(&c) {
            break;
        }
        i += 1;
    }
    // `i` only stops on ASCII bytes or the end, so the slice is on a char boundary.
    out.push_str(&text[run..i.min(b.len())]);
    (out, i)
}

/// The index of the closing quote of a string field starting at `from`.
fn string_end(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// A field value: float, `Ni`, `Nu`, or a boolean.
fn number(raw: &str) -> Option<f64> {
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return Some(1.0),
        "f" | "F" | "false" | "False" | "FALSE" => return Some(0.0),
        _ => {}
    }
    if let Some(int) = raw.strip_suffix('i') {
        return int.parse::<i64>().ok().map(|v| v as f64);
    }
    if let Some(uint) = raw.strip_suffix('u') {
        return uint.parse::<u64>().ok().map(|v| v as f64);
    }
    // Influx floats have no NaN or infinities.
    raw.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .filter(|_| {
            raw.bytes()
                .all(|c| c.is_ascii_digit() || b"+-.eE".contains(&c))
        })
}

impl Decoder for InfluxDecoder {
    fn format(&self) -> &'static str {
        "influx"
    }

    fn decode(&mut self, payload: &[u8], out: &mut MetricsBatchBuilder, rejects: &mut Vec<Reject>) {
        let mut field_rejects = Vec::new();
        for (index, line) in lines(payload) {
            if let Err(reason) = self.limits.check_line(line.len()) {
                rejects.push(over_limit(index, line, reason));
                continue;
            }
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() || trimmed.starts_with(b"#") {
                continue;
            }
            field_rejects.clear();
            let raw = || String::from_utf8_lossy(line).into_owned();
            match self.line(trimmed, out, &mut field_rejects) {
                Ok(()) => {
                    for reason in field_rejects.drain(..) {
                        rejects.push(Reject {
                            record: index,
                            raw: raw(),
                            reason,
                        });
                    }
                }
                Err(e) => rejects.push(Reject {
                    record: index,
                    raw: raw(),
                    reason: format!("{} (column {})", e.reason, e.column),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::test_support::{Row, decode_rows, l};
    use crate::schema::MetricsColumns;

    fn decode(text: &str) -> (Vec<Row>, Vec<Reject>) {
        decode_rows(&mut InfluxDecoder::default().with_default_ts(42), text)
    }

    #[test]
    fn points_become_one_sample_per_numeric_field() {
        let (rows, rejects) = decode(
            "cpu,region=eu,host=web-1 usage_user=12.5,usage_system=3i,ok=t 1764065100000000000\n\
             # a comment\n\
             \n\
             mem value=1000u\n",
        );
        assert!(rejects.is_empty(), "{rejects:?}");
        let labels = l(&[("host", "web-1"), ("region", "eu")]);
        assert_eq!(
            rows,
            vec![
                (
                    1_764_065_100_000,
                    "cpu_usage_user".into(),
                    labels.clone(),
                    12.5
                ),
                (
                    1_764_065_100_000,
                    "cpu_usage_system".into(),
                    labels.clone(),
                    3.0
                ),
                (1_764_065_100_000, "cpu_ok".into(), labels, 1.0),
                (42, "mem".into(), vec![], 1000.0),
            ]
        );
    }

    #[test]
    fn escapes_are_honoured() {
        let (rows, rejects) =
            decode(r#"disk\ io,path=C:\\Windows,label=a\,b\ c\=d read\ bytes=1 1000000"#);
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(
            rows,
            vec![(
                1,
                "disk io_read bytes".into(),
                l(&[("label", "a,b c=d"), ("path", "C:\\Windows")]),
                1.0
            )]
        );
    }

    #[test]
    fn string_fields_are_rejected_but_the_numbers_of_the_point_are_kept() {
        let (rows, rejects) = decode(r#"app,host=a msg="hello, \"world\"",latency=0.25 1000000"#);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1, "app_latency");
        assert_eq!(rejects.len(), 1);
        assert!(
            rejects[0].reason.contains("field `msg` is a string"),
            "{rejects:?}"
        );
    }

    #[test]
    fn malformed_lines_are_rejected_with_a_reason_and_column() {
        for (line, reason) in [
            ("cpu", "missing fields"),
            ("cpu,host value=1", "a tag needs `key=value`"),
            ("cpu value=abc", "is not a number"),
            ("cpu value=1 soon", "is not an integer"),
            ("cpu value=\"open", "unterminated string"),
            ("cpu value=NaN", "is not a number"),
            (",host=a value=1", "missing measurement"),
        ] {
            let (rows, rejects) = decode(line);
            assert!(rows.is_empty(), "{line}");
            assert_eq!(rejects.len(), 1, "{line}");
            assert!(
                rejects[0].reason.contains(reason),
                "{line}: {}",
                rejects[0].reason
            );
            assert!(
                rejects[0].reason.contains("(column "),
                "{}",
                rejects[0].reason
            );
        }
    }

    #[test]
    fn precision_converts_timestamps_to_milliseconds() {
        let mut d = InfluxDecoder::new(Precision::S);
        let mut b = MetricsBatchBuilder::default();
        let mut r = Vec::new();
        d.decode(b"m value=1 1764065100", &mut b, &mut r);
        let batch = b.finish();
        let cols = MetricsColumns::try_new(&batch, "t").unwrap();
        assert_eq!(cols.ts.value(0), 1_764_065_100_000);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut d = InfluxDecoder::default();
            let mut b = MetricsBatchBuilder::default();
            let mut r = Vec::new();
            d.decode(&bytes, &mut b, &mut r);
            let _ = b.finish();
        }

        #[test]
        fn lines_near_the_grammar_never_panic(line in r#"[a-z\\, =".0-9ite]{0,60}"#) {
            let mut d = InfluxDecoder::default();
            let mut b = MetricsBatchBuilder::default();
            let mut r = Vec::new();
            d.decode(line.as_bytes(), &mut b, &mut r);
            let _ = b.finish();
        }
    }
}
