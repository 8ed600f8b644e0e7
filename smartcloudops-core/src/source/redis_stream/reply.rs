//! Parsing Redis's replies to the stream commands (RESP2 and RESP3 shapes).

use std::collections::HashMap;

use redis::Value;

/// One entry as read: its id and payload (`None` if the entry lacks the field, or was
/// deleted while pending).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) payload: Option<Vec<u8>>,
    /// Deleted from the stream while pending (`[id, nil]`).
    pub(super) deleted: bool,
}

/// Orders stream ids (`ms-seq`) numerically.
pub(super) fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a).cmp(&parse(b))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// `[id, [field, value, …]]`, or `[id, nil]` for an entry deleted while pending.
fn parse_entry(v: &Value, field: &str) -> Option<Entry> {
    let parts = items(v);
    let id = text(parts.first()?)?;
    let deleted = matches!(parts.get(1), None | Some(Value::Nil));
    let payload = match parts.get(1) {
        Some(Value::Array(fields)) => fields.chunks(2).find_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(v)] if k == field.as_bytes() => {
                Some(v.clone())
            }
            _ => None,
        }),
        Some(Value::Map(pairs)) => pairs.iter().find_map(|(k, v)| match (k, v) {
            (Value::BulkString(k), Value::BulkString(v)) if k == field.as_bytes() => {
                Some(v.clone())
            }
            _ => None,
        }),
        _ => None,
    };
    Some(Entry {
        id,
        payload,
        deleted,
    })
}

pub(super) fn parse_entries(v: &Value, field: &str) -> Vec<Entry> {
    items(v)
        .iter()
        .filter_map(|e| parse_entry(e, field))
        .collect()
}

/// An `XREADGROUP` reply: `[[key, [entry, …]], …]` (RESP2) or a map (RESP3); nil on timeout.
pub(super) fn parse_read(v: &Value, field: &str) -> Vec<(String, Vec<Entry>)> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, e)| Some((text(k)?, parse_entries(e, field))))
            .collect(),
        _ => items(v)
            .iter()
            .filter_map(|s| {
                let parts = items(s);
                Some((text(parts.first()?)?, parse_entries(parts.get(1)?, field)))
            })
            .collect(),
    }
}

/// An `XAUTOCLAIM` reply: `[next cursor, [entry, …], [deleted id, …]]`.
pub(super) fn parse_autoclaim(v: &Value, field: &str) -> (String, Vec<Entry>, Vec<String>) {
    let parts = items(v);
    let next = parts
        .first()
        .and_then(text)
        .unwrap_or_else(|| "0-0".to_owned());
    let entries = parts
        .get(1)
        .map(|e| parse_entries(e, field))
        .unwrap_or_default();
    let deleted = parts
        .get(2)
        .map(|d| items(d).iter().filter_map(text).collect())
        .unwrap_or_default();
    (next, entries, deleted)
}

/// An extended `XPENDING` reply: `[[id, consumer, idle ms, deliveries], …]`.
pub(super) fn parse_pending(v: &Value) -> HashMap<String, u64> {
    items(v)
        .iter()
        .filter_map(|p| {
            let parts = items(p);
            let id = text(parts.first()?)?;
            let count = match parts.get(3)? {
                Value::Int(n) => u64::try_from(*n).ok()?,
                other => text(other)?.parse().ok()?,
            };
            Some((id, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_parse_including_deleted_entries_and_missing_fields() {
        let entry = |id: &str, fields: &[(&str, &str)]| {
            Value::Array(vec![
                bulk(id),
                Value::Array(
                    fields
                        .iter()
                        .flat_map(|(k, v)| [bulk(k), bulk(v)])
                        .collect(),
                ),
            ])
        };
        let read = Value::Array(vec![Value::Array(vec![
            bulk("metrics"),
            Value::Array(vec![
                entry("1-0", &[("key", "7"), ("data", "{\"v\":1}")]),
                entry("1-1", &[("other", "x")]),
                Value::Array(vec![bulk("1-2"), Value::Nil]),
            ]),
        ])]);
        let parsed = parse_read(&read, "data");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, "metrics");
        let e = &parsed[0].1;
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].payload.as_deref(), Some(&b"{\"v\":1}"[..]));
        assert_eq!(e[1].payload, None);
        assert_eq!((e[2].id.as_str(), e[2].payload.as_ref()), ("1-2", None));
        assert!(parse_read(&Value::Nil, "data").is_empty());

        let claim = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![entry("2-0", &[("data", "x")])]),
            Value::Array(vec![bulk("1-9")]),
        ]);
        let (next, entries, deleted) = parse_autoclaim(&claim, "data");
        assert_eq!(next, "5-0");
        assert_eq!(entries.len(), 1);
        assert_eq!(deleted, vec!["1-9".to_owned()]);

        let pending = Value::Array(vec![Value::Array(vec![
            bulk("2-0"),
            bulk("c1"),
            Value::Int(1200),
            Value::Int(3),
        ])]);
        assert_eq!(parse_pending(&pending).get("2-0"), Some(&3));
    }

    #[test]
    fn ids_order_numerically() {
        let mut ids = vec!["10-0", "9-1", "9-0", "100-0"];
        ids.sort_by(|a, b| compare_ids(a, b));
        assert_eq!(ids, vec!["9-0", "9-1", "10-0", "100-0"]);
    }
}
