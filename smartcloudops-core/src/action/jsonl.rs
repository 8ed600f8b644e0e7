//! Appends alerts as JSON lines to a file (`[[action]] type = "jsonl"`).

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Action, ActionInput};
use crate::error::{Error, Result};

/// Configuration of a [`JsonlAction`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlActionConfig {
    /// The file to append to (created with its parent directories).
    pub path: PathBuf,
    /// `fsync` after each batch, so an acknowledged alert survives a power cut.
    #[serde(default)]
    pub fsync: bool,
}

/// Appends one JSON object per alert to a file; a batch is done once its lines are written
/// (and synced, with `fsync = true`).
#[derive(Debug)]
pub struct JsonlAction {
    path: PathBuf,
    fsync: bool,
    file: Mutex<Option<tokio::fs::File>>,
}

impl JsonlAction {
    /// An action for `config`; the file is opened on first use.
    pub fn new(config: JsonlActionConfig) -> Self {
        Self {
            path: config.path,
            fsync: config.fsync,
            file: Mutex::new(None),
        }
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn open(&self) -> Result<tokio::fs::File> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(|e| Error::io(format!("opening {}", self.path.display()), e))
    }
}

impl Action for JsonlAction {
    fn name(&self) -> &str {
        "jsonl"
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut lines = Vec::with_capacity(input.alerts.len() * 256);
            for alert in &input.alerts {
                serde_json::to_writer(&mut lines, alert).map_err(|e| Error::Action {
                    action: "jsonl".into(),
                    message: e.to_string(),
                    retryable: false,
                })?;
                lines.push(b'\n');
            }
            let mut guard = self.file.lock().await;
            if guard.is_none() {
                *guard = Some(self.open().await?);
            }
            let file = guard.as_mut().expect("opened above");
            let write = async {
                file.write_all(&lines).await?;
                file.flush().await?;
                if self.fsync {
                    file.sync_data().await?;
                }
                Ok(())
            };
            write
                .await
                .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Alert;

    #[tokio::test]
    async fn appends_one_line_per_alert() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/alerts.jsonl");
        let action = JsonlAction::new(JsonlActionConfig {
            path: path.clone(),
            fsync: true,
        });
        let alert = Alert {
            time: "2026-01-01T00:00:00.000Z".into(),
            ts_ms: 1_767_225_600_000,
            series_id: 7,
            metric: "cpu".into(),
            labels: [("host".to_owned(), "a".to_owned())].into(),
            value: 99.0,
            score: 0.99,
            expected: Some(40.0),
            lower: Some(30.0),
            upper: Some(50.0),
            detector: "ewma".into(),
            since: None,
            reason: "99 above expected 40".into(),
        };
        let input = ActionInput {
            batch: arrow::record_batch::RecordBatch::new_empty(crate::schema::scored_schema()),
            alerts: vec![alert.clone(), alert],
        };
        action.execute(&input).await.unwrap();
        action.execute(&input).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["metric"], "cpu");
        assert_eq!(first["expected"], 40.0);
        assert_eq!(first["reason"], "99 above expected 40");
    }
}
