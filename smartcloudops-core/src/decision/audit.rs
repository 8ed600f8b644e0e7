//! The audit log: append-only JSON lines linking each trigger to its decisions, executions and
//! results.
//!
//! Every record has a `kind` and the ids that link it:
//!
//! | kind | written when | links |
//! |---|---|---|
//! | `trigger` | an alert fires, resolves or starts flapping | `fingerprint`, `rule` |
//! | `decision` | a notification is sent on, or held back (silenced, inhibited, duplicate, cooldown, rate limit, open circuit, suggest, dry run, invalid parameters) | `notification`, `receiver`, `key`, `fingerprints` |
//! | `execution` | one attempt starts | `notification`, `receiver`, `key`, `attempt` |
//! | `result` | an attempt ends, or the notification ends in a fallback, an escalation or a dead letter | `notification`, `receiver`, `attempt`, `outcome` |
//!
//! Records are written through and synced (`fdatasync`) before the engine moves on, so what
//! the log says happened did happen. Secrets never reach it: receivers describe their target
//! with credentials masked.

use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::util::jsonl::{JsonlAppender, encode_lines};

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Wall-clock time of the record, RFC 3339.
    pub time: String,
    /// `trigger`, `decision`, `execution` or `result`.
    pub kind: &'static str,
    /// The rule concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The notification concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification: Option<String>,
    /// The receiver concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<String>,
    /// The idempotency key of the execution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The attempt number (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// What was decided or what came of it, e.g. `notify`, `silenced`, `delivered`.
    pub outcome: String,
    /// Why, in words.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Everything else (the alert, the masked target, a command's output …).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl AuditRecord {
    /// A record of `kind` with `outcome`, stamped now.
    pub fn new(kind: &'static str, outcome: impl Into<String>) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            kind,
            rule: None,
            notification: None,
            receiver: None,
            key: None,
            attempt: None,
            outcome: outcome.into(),
            reason: String::new(),
            details: Value::Null,
        }
    }
}

/// Where audit records go.
#[derive(Debug)]
pub struct AuditLog {
    /// The file, unless the log is kept in memory only.
    file: Option<JsonlAppender>,
    /// The last records, for tests and the API.
    recent: Mutex<std::collections::VecDeque<AuditRecord>>,
}

/// Records kept in memory for [`AuditLog::recent`] (a record may hold a notification or a
/// command's output, so not many).
const RECENT: usize = 2_000;

impl AuditLog {
    /// A log appending to `path` (created with its directories).
    pub fn open(path: &Path) -> Result<Self> {
        let file = JsonlAppender::open(path)
            .map_err(|e| Error::io(format!("opening the audit log {}", path.display()), e))?;
        Ok(Self {
            file: Some(file),
            recent: Mutex::default(),
        })
    }

    /// A log kept in memory only (its recent records), for tests and embedding.
    pub fn in_memory() -> Self {
        Self {
            file: None,
            recent: Mutex::default(),
        }
    }

    /// Appends `records` and syncs them to disk. An error means they are not durable.
    pub fn write(&self, records: &[AuditRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(file) = &self.file {
            let bytes = encode_lines(records).map_err(|e| Error::Action {
                action: "decision".into(),
                message: format!("encoding an audit record: {e}"),
                retryable: false,
            })?;
            file.append(&bytes, true).map_err(|e| {
                Error::io(
                    format!("writing the audit log {}", file.path().display()),
                    e,
                )
            })?;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(r.clone());
        }
        Ok(())
    }

    /// The most recent records (up to 2 000), oldest first.
    pub fn recent(&self) -> Vec<AuditRecord> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut r = AuditRecord::new("decision", "silenced");
        r.rule = Some("cpu".into());
        log.write(&[r.clone(), AuditRecord::new("result", "delivered")])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "decision");
        assert_eq!(lines[0]["rule"], "cpu");
        assert!(lines[1].get("rule").is_none());
        assert_eq!(log.recent().len(), 2);
    }
}
