//! Small helpers shared by stages: the JSON-lines appender, the URL redactor, control-character
//! escaping for log lines, batch display.

pub mod jsonl;
pub mod text;
pub mod url;

use arrow::array::Array;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Every row of `batch` as a JSON object of its cells' display strings, one per line: the
/// payload of a dead-lettered batch, readable by a person and by `jq`.
pub(crate) fn batch_to_json_lines(batch: &RecordBatch) -> String {
    let options = FormatOptions::default().with_null("null");
    let schema = batch.schema();
    let formatters: Vec<Option<ArrayFormatter<'_>>> = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok())
        .collect();
    let mut out = String::new();
    for row in 0..batch.num_rows() {
        let mut object = serde_json::Map::new();
        for (i, field) in schema.fields().iter().enumerate() {
            let cell = match (&formatters[i], batch.column(i).is_null(row)) {
                (_, true) => serde_json::Value::Null,
                (Some(f), false) => serde_json::Value::String(f.value(row).to_string()),
                (None, false) => serde_json::Value::String("<unprintable>".into()),
            };
            object.insert(field.name().clone(), cell);
        }
        out.push_str(&serde_json::Value::Object(object).to_string());
        out.push('\n');
    }
    out
}

/// Runs blocking work (a wait, a large write) from inside an async task. On a multi-threaded
/// runtime the worker first hands its other tasks to its peers, so they keep running; on a
/// current-thread runtime there is no peer, and `f` simply runs.
pub(crate) fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MetricsBatchBuilder;

    #[test]
    fn rows_become_json_objects() {
        let mut b = MetricsBatchBuilder::default();
        b.push(0, "cpu", &[("host", "a")], 1.5);
        let text = batch_to_json_lines(&b.finish());
        let row: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(row["metric"], "cpu");
        assert_eq!(row["value"], "1.5");
        assert_eq!(row["ts"], "1970-01-01T00:00:00Z");
        assert_eq!(row["labels"], "{host: a}");
    }
}
