//! The dead-letter output: where records that cannot be processed go, with the reason.
//!
//! Bad input never stops a pipeline and is never silently dropped: the stage that rejects it
//! sends a [`DeadLetter`] to the pipeline's [`DeadLetterSink`] and the rejection is counted in
//! that stage's metrics. If the dead-letter output itself fails, the batch is nacked rather
//! than acknowledged.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::metrics::StageMetrics;
use crate::util::jsonl::{JsonlAppender, encode_lines};

/// One rejected record (or batch) and why it was rejected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The stage that rejected it, e.g. `source:file` or `prep:sql`.
    pub stage: String,
    /// Where it came from, e.g. `data.jsonl:17` or `topic/3@1042`.
    pub origin: String,
    /// Why it was rejected.
    pub reason: String,
    /// The record as received (lossy UTF-8), or the rows of a rejected batch as JSON.
    pub payload: String,
    /// When it was rejected, RFC 3339.
    pub time: String,
}

impl DeadLetter {
    /// A dead letter stamped with the current time.
    pub fn new(
        stage: impl Into<String>,
        origin: impl Into<String>,
        reason: impl Into<String>,
        payload: impl Into<String>,
    ) -> Self {
        Self {
            stage: stage.into(),
            origin: origin.into(),
            reason: reason.into(),
            payload: payload.into(),
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }
}

/// Somewhere dead letters are kept. Implementations must be cheap to call from any stage.
pub trait DeadLetterSink: Send + Sync + fmt::Debug {
    /// Stores one dead letter. An error means it was **not** stored.
    fn send(&self, letter: DeadLetter) -> Result<()>;

    /// Makes everything sent so far durable. The pipeline calls it before it acknowledges each
    /// batch (an error nacks the batch) and at shutdown, so it should be cheap when nothing
    /// was sent since the last call.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A stage's handle on the pipeline's dead-letter output: stamps the stage name and counts
/// what it sends in the stage's metrics.
#[derive(Debug, Clone)]
pub struct DeadLetterQueue {
    sink: Arc<dyn DeadLetterSink>,
    stage: Arc<StageMetrics>,
}

impl DeadLetterQueue {
    /// A queue that sends to `sink` on behalf of `stage`.
    pub fn new(sink: Arc<dyn DeadLetterSink>, stage: Arc<StageMetrics>) -> Self {
        Self { sink, stage }
    }

    /// A queue that logs dead letters, with metrics of its own; for stages used outside a
    /// pipeline (tests, benchmarks).
    pub fn detached(stage: &str) -> Self {
        Self::new(Arc::new(LogDeadLetters), Arc::new(StageMetrics::new(stage)))
    }

    /// Dead-letters one record. An error means it was **not** stored; the caller must then
    /// fail (nack) the batch it belongs to.
    pub fn send(
        &self,
        origin: impl Into<String>,
        reason: impl Into<String>,
        payload: impl Into<String>,
    ) -> Result<()> {
        let letter = DeadLetter::new(self.stage.name(), origin, reason, payload);
        self.sink
            .send(letter)
            .inspect_err(|_| self.stage.record_error())?;
        self.stage.record_dead_lettered(1);
        Ok(())
    }

    /// Flushes the underlying output.
    pub fn flush(&self) -> Result<()> {
        self.sink.flush()
    }

    /// The metrics of the stage this queue belongs to.
    pub fn stage(&self) -> &Arc<StageMetrics> {
        &self.stage
    }
}

/// Appends dead letters as JSON lines to a file (created with its parent directories).
///
/// Each letter is kept whole and written through to the operating system before `send`
/// returns (a dead letter is what lets its batch be acknowledged); [`flush`](DeadLetterSink::flush)
/// syncs the file to disk. With [`log_each`](Self::log_each), each letter is also logged as a
/// warning, its payload shortened (the file has it whole).
#[derive(Debug)]
pub struct JsonlDeadLetters {
    file: JsonlAppender,
    log_each: bool,
    /// Letters written since the last sync: the pipeline syncs before it acknowledges a batch,
    /// and most batches dead-letter nothing.
    unsynced: AtomicBool,
}

impl JsonlDeadLetters {
    /// Opens (appending) or creates the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = JsonlAppender::open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Ok(Self {
            file,
            log_each: false,
            unsynced: AtomicBool::new(false),
        })
    }

    /// Also logs each letter as a warning, pointing at the file.
    pub fn log_each(mut self, yes: bool) -> Self {
        self.log_each = yes;
        self
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

impl DeadLetterSink for JsonlDeadLetters {
    fn send(&self, letter: DeadLetter) -> Result<()> {
        let lines = encode_lines([&letter]).map_err(|e| Error::DeadLetter(e.to_string()))?;
        self.file
            .append(&lines, false)
            .map_err(|e| Error::io(format!("writing {}", self.path().display()), e))?;
        self.unsynced.store(true, Ordering::Release);
        if self.log_each {
            tracing::warn!(
                stage = %letter.stage,
                origin = %letter.origin,
                reason = %letter.reason,
                payload = %truncate(&letter.payload, 512),
                file = %self.path().display(),
                "dead letter (whole in the file)"
            );
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.file.sync().map_err(|e| {
            self.unsynced.store(true, Ordering::Release);
            Error::io(format!("syncing {}", self.path().display()), e)
        })
    }
}

/// Logs dead letters as warnings, whole. The log is only as durable as wherever the log goes;
/// a file ([`JsonlDeadLetters`]) is the default output.
#[derive(Debug, Default)]
pub struct LogDeadLetters;

impl DeadLetterSink for LogDeadLetters {
    fn send(&self, letter: DeadLetter) -> Result<()> {
        tracing::warn!(
            stage = %letter.stage,
            origin = %letter.origin,
            reason = %letter.reason,
            payload = %letter.payload,
            "dead letter"
        );
        Ok(())
    }
}

/// Keeps dead letters in memory, for tests and for embedders that inspect them.
#[derive(Debug, Default)]
pub struct MemoryDeadLetters {
    letters: Mutex<Vec<DeadLetter>>,
}

impl MemoryDeadLetters {
    /// A copy of everything received so far.
    pub fn letters(&self) -> Vec<DeadLetter> {
        self.letters.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    fn send(&self, letter: DeadLetter) -> Result<()> {
        self.letters
            .lock()
            .map_err(|_| Error::DeadLetter("memory dead-letter lock poisoned".into()))?
            .push(letter);
        Ok(())
    }
}

/// At most `max` bytes of `s`, cut on a character boundary, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_file_gets_one_line_per_letter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dlq.jsonl");
        let sink = JsonlDeadLetters::open(&path).unwrap();
        sink.send(DeadLetter::new(
            "source:file",
            "a.jsonl:3",
            "bad value",
            "{\"value\":\"x\"}",
        ))
        .unwrap();
        sink.send(DeadLetter::new(
            "source:file",
            "a.jsonl:4",
            "not json",
            "}{",
        ))
        .unwrap();
        sink.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["origin"], "a.jsonl:3");
        assert_eq!(lines[1]["reason"], "not json");
        assert_eq!(lines[0]["payload"], "{\"value\":\"x\"}");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
