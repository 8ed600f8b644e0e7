//! JSON lines: one sample per line.
//!
//! ```json
//! {"ts": "2026-11-25T10:05:00Z", "metric": "cpu_utilization", "labels": {"host": "web-1"}, "value": 97.2}
//! ```
//!
//! - `ts` (aliases `timestamp`, `time`): epoch milliseconds (number or string) or RFC 3339.
//! - `metric` (alias `name`): the metric name.
//! - `labels` (alias `tags`, optional): an object; values may be strings, numbers or booleans.
//! - `value`: a number, or a string such as `"NaN"` or `"+Inf"`.
//!
//! Other fields are ignored. Blank lines are skipped; every other line that is not such an
//! object is rejected with the parser's message.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::{DecodeLimits, Decoder, Reject, lines, over_limit, parse_timestamp, parse_value};
use crate::schema::{MetricsBatchBuilder, sort_labels};

/// Decodes JSON lines (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct JsonDecoder {
    limits: DecodeLimits,
}

impl JsonDecoder {
    /// A decoder rejecting records over `limits`.
    pub fn with_limits(limits: DecodeLimits) -> Self {
        Self { limits }
    }
}

impl Decoder for JsonDecoder {
    fn format(&self) -> &'static str {
        "json"
    }

    fn decode(&mut self, payload: &[u8], out: &mut MetricsBatchBuilder, rejects: &mut Vec<Reject>) {
        for (index, line) in lines(payload) {
            if let Err(reason) = self.limits.check_line(line.len()) {
                rejects.push(over_limit(index, line, reason));
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<JsonSample<'_>>(line) {
                Ok(mut sample) => {
                    let checked = self
                        .limits
                        .check_metric(&sample.metric.0)
                        .and_then(|()| self.limits.check_labels(&sample.labels.0));
                    if let Err(reason) = checked {
                        rejects.push(over_limit(index, line, reason));
                        continue;
                    }
                    sort_labels(&mut sample.labels.0);
                    out.push(
                        sample.ts.0,
                        &sample.metric.0,
                        &sample.labels.0,
                        sample.value.0,
                    );
                }
                Err(e) => rejects.push(Reject {
                    record: index,
                    raw: String::from_utf8_lossy(line).into_owned(),
                    reason: reason(&e),
                }),
            }
        }
    }
}

/// serde_json's message without its "at line 1" (every record is one line; the source
/// reports the line in the file).
fn reason(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match message.rfind(" at line ") {
        Some(at) => format!("{} (column {})", &message[..at], e.column()),
        None => message,
    }
}

#[derive(Deserialize)]
struct JsonSample<'a> {
    #[serde(alias = "timestamp", alias = "time")]
    ts: Millis,
    #[serde(alias = "name", borrow)]
    metric: CowStr<'a>,
    #[serde(default, alias = "tags", borrow)]
    labels: Labels<'a>,
    value: Value,
}

/// A string that borrows from the input when it has no escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A label value: strings as they are, numbers and booleans in their JSON spelling.
struct LabelValue<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for LabelValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LabelValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean label value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LabelValue(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LabelValue(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(LabelValue(Cow::Owned(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(LabelValue(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(LabelValue(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(LabelValue(Cow::Owned(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(LabelValue(Cow::Borrowed(if v { "true" } else { "false" })))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Default)]
struct Labels<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Labels<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Labels<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of labels")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Labels::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut labels = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some((k, v)) = map.next_entry::<CowStr<'de>, LabelValue<'de>>()? {
                    labels.push((k.0, v.0));
                }
                Ok(Labels(labels))
            }
        }
        d.deserialize_any(V)
    }
}

struct Millis(i64);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("epoch milliseconds or an RFC 3339 timestamp")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                Ok(Millis(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millis, E> {
                i64::try_from(v)
                    .map(Millis)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Millis, E> {
                if v.is_finite() && v.abs() < 9.0e18 {
                    Ok(Millis(v.round() as i64))
                } else {
                    Err(E::custom("timestamp out of range"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Millis, E> {
                parse_timestamp(v).map(Millis).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

struct Value(f64);

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
                Ok(Value(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
                Ok(Value(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
                parse_value(v).map(Value).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{MetricsColumns, series_id};

    fn decode(input: &str) -> (arrow::record_batch::RecordBatch, Vec<Reject>) {
        let mut out = MetricsBatchBuilder::default();
        let mut rejects = Vec::new();
        JsonDecoder::default().decode(input.as_bytes(), &mut out, &mut rejects);
        (out.finish(), rejects)
    }

    #[test]
    fn decodes_the_documented_shape_and_aliases() {
        let input = concat!(
            r#"{"ts": 1000, "metric": "cpu", "labels": {"region": "eu", "host": "a"}, "value": 1.5}"#,
            "\n",
            r#"{"timestamp": "1970-01-01T00:00:02Z", "name": "mem", "tags": {"n": 3, "ok": true}, "value": "2"}"#,
            "\r\n\n",
            r#"{"time": "3000", "metric": "m\u00e9tric", "value": 3, "extra": [1, 2]}"#,
        );
        let (batch, rejects) = decode(input);
        assert!(rejects.is_empty(), "{rejects:?}");
        let c = MetricsColumns::try_new(&batch, "test").unwrap();
        assert_eq!(batch.num_rows(), 3);
        assert_eq!(c.ts.values().to_vec(), vec![1000, 2000, 3000]);
        assert_eq!(c.metric(2), "métric");
        // Labels come out sorted by key.
        assert_eq!(
            c.labels(0),
            vec![("host".into(), "a".into()), ("region".into(), "eu".into())]
        );
        assert_eq!(
            c.labels(1),
            vec![("n".into(), "3".into()), ("ok".into(), "true".into())]
        );
        assert_eq!(
            c.series_id.value(0),
            series_id("cpu", &[("host", "a"), ("region", "eu")])
        );
        assert_eq!(c.value.values().to_vec(), vec![1.5, 2.0, 3.0]);
    }

    #[test]
    fn bad_lines_are_rejected_with_index_and_reason() {
        let input = "{\"ts\":1,\"metric\":\"a\",\"value\":1}\nnot json\n{\"ts\":1,\"metric\":\"a\"}\n{\"ts\":1,\"metric\":\"a\",\"value\":\"x\"}\n{\"ts\":\"later\",\"metric\":\"a\",\"value\":1}";
        let (batch, rejects) = decode(input);
        assert_eq!(batch.num_rows(), 1);
        let got: Vec<(usize, bool)> = rejects
            .iter()
            .map(|r| (r.record, !r.reason.is_empty()))
            .collect();
        assert_eq!(got, vec![(1, true), (2, true), (3, true), (4, true)]);
        assert!(
            rejects[1].reason.contains("missing field `value`"),
            "{}",
            rejects[1].reason
        );
        assert!(
            rejects[2].reason.contains("not a number"),
            "{}",
            rejects[2].reason
        );
        assert!(
            rejects[3].reason.contains("RFC 3339"),
            "{}",
            rejects[3].reason
        );
        assert_eq!(rejects[0].raw, "not json");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_accounts_for_every_line(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut out = MetricsBatchBuilder::default();
            let mut rejects = Vec::new();
            JsonDecoder::default().decode(&bytes, &mut out, &mut rejects);
            let non_blank = lines(&bytes).filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace)).count();
            proptest::prop_assert_eq!(out.len() + rejects.len(), non_blank);
        }
    }
}
