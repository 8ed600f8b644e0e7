//! Events the publishing sinks (Kafka, Redis) send: one per alert or per scored row, JSON,
//! with [CloudEvents 1.0](https://github.com/cloudevents/spec) attributes.
//!
//! Kafka and Redis Streams carry the attributes beside the body (`ce_*` headers or entry
//! fields, the binary content mode); Redis pub/sub messages carry them in the body (the
//! structured content mode, see [`Event::structured`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ActionInput;
use crate::error::{Error, Result};
use crate::schema::{MetricsColumns, ScoreColumns, format_ts};

/// What a publishing sink sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkPayload {
    /// One event per alert (CloudEvents type `io.smartcloudops.anomaly`).
    #[default]
    Alerts,
    /// One event per scored row, anomalous or not (type `io.smartcloudops.scored`).
    Scored,
}

impl SinkPayload {
    /// The CloudEvents `type` attribute of the events.
    pub fn ce_type(self) -> &'static str {
        match self {
            SinkPayload::Alerts => "io.smartcloudops.anomaly",
            SinkPayload::Scored => "io.smartcloudops.scored",
        }
    }
}

/// One event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The series id, as the partition or routing key.
    pub key: String,
    /// The CloudEvents `id`: unique per series, time (and detector), so a receiver can
    /// deduplicate a redelivery.
    pub id: String,
    /// The CloudEvents `time`: the sample's event time, RFC 3339.
    pub time: String,
    /// The JSON body (the CloudEvents `data`).
    pub body: Vec<u8>,
}

impl Event {
    /// The events of `input` for `payload`; `action` names the sink in errors.
    pub fn from_input(
        input: &ActionInput,
        payload: SinkPayload,
        action: &str,
    ) -> Result<Vec<Event>> {
        let json = |v: &dyn erased::Json| v.to_vec(action);
        match payload {
            SinkPayload::Alerts => input
                .alerts
                .iter()
                .map(|a| {
                    Ok(Event {
                        key: a.series_id.to_string(),
                        id: format!("{:016x}-{}-{}", a.series_id, a.ts_ms, a.detector),
                        time: a.time.clone(),
                        body: json(a)?,
                    })
                })
                .collect(),
            SinkPayload::Scored => {
                let batch = &input.batch;
                let stage = format!("action:{action}");
                let cols = MetricsColumns::try_new(batch, &stage)?;
                let scores = ScoreColumns::try_new(batch, &stage).ok();
                (0..batch.num_rows())
                    .map(|row| {
                        let series_id = cols.series_id.value(row);
                        let ts = cols.ts.value(row);
                        let time = format_ts(ts);
                        let mut object = serde_json::json!({
                            "time": time,
                            "ts_ms": ts,
                            "series_id": series_id.to_string(),
                            "metric": cols.metric(row),
                            "labels": cols.labels(row).into_iter().collect::<BTreeMap<_, _>>(),
                            "value": finite(cols.value.value(row)),
                        });
                        if let Some(s) = &scores {
                            let opt = |a: &arrow::array::Float64Array| {
                                arrow::array::Array::is_valid(a, row).then(|| a.value(row))
                            };
                            object["score"] = s.score.value(row).into();
                            object["is_anomaly"] = s.is_anomaly.value(row).into();
                            object["expected"] = opt(s.expected).into();
                            object["lower"] = opt(s.lower).into();
                            object["upper"] = opt(s.upper).into();
                            object["detector"] = s.detector(row).into();
                        }
                        Ok(Event {
                            key: series_id.to_string(),
                            id: format!("{series_id:016x}-{ts}"),
                            time,
                            body: json(&object)?,
                        })
                    })
                    .collect()
            }
        }
    }

    /// The event in the CloudEvents structured content mode: one JSON object holding the
    /// attributes and the body as `data`.
    pub fn structured(&self, ce_type: &str, source: &str) -> Vec<u8> {
        let attr = |v: &str| serde_json::Value::from(v).to_string();
        let mut out = Vec::with_capacity(self.body.len() + 192);
        out.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":");
        out.extend_from_slice(attr(&self.id).as_bytes());
        out.extend_from_slice(b",\"source\":");
        out.extend_from_slice(attr(source).as_bytes());
        out.extend_from_slice(b",\"type\":");
        out.extend_from_slice(attr(ce_type).as_bytes());
        out.extend_from_slice(b",\"time\":");
        out.extend_from_slice(attr(&self.time).as_bytes());
        out.extend_from_slice(b",\"datacontenttype\":\"application/json\",\"data\":");
        out.extend_from_slice(&self.body);
        out.push(b'}');
        out
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Serialization to JSON bytes for both payload kinds, with the error mapped once.
mod erased {
    use crate::error::Result;

    pub(super) trait Json {
        fn to_vec(&self, action: &str) -> Result<Vec<u8>>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_vec(&self, action: &str) -> Result<Vec<u8>> {
            serde_json::to_vec(self).map_err(|e| super::serialize_error(action, e))
        }
    }
}

fn serialize_error(action: &str, e: serde_json::Error) -> Error {
    Error::Action {
        action: action.into(),
        message: format!("serializing an event: {e}"),
        retryable: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_mode_wraps_the_body_as_data() {
        let event = Event {
            key: "7".into(),
            id: "0000000000000007-1000-ewma".into(),
            time: "1970-01-01T00:00:01.000Z".into(),
            body: br#"{"value":1.5,"note":"quote \" inside"}"#.to_vec(),
        };
        let bytes = event.structured("io.smartcloudops.anomaly", "smartcloudops");
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "0000000000000007-1000-ewma");
        assert_eq!(v["type"], "io.smartcloudops.anomaly");
        assert_eq!(v["source"], "smartcloudops");
        assert_eq!(v["time"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["value"], 1.5);
        assert_eq!(v["data"]["note"], "quote \" inside");
    }
}
