//! Appends alerts as JSON lines to a file (`[[action]] type = "jsonl"`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{Action, ActionConfig, ActionInput};
use crate::component::{BuildContext, ComponentConfig, resolve_path};
use crate::error::{Error, Result};
use crate::util::jsonl::{JsonlAppender, encode_lines};

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
    /// Opened on first use; the lock also keeps batches' lines in order.
    file: Mutex<Option<Arc<JsonlAppender>>>,
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
}

impl Action for JsonlAction {
    fn name(&self) -> &str {
        "jsonl"
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let lines = encode_lines(&input.alerts).map_err(|e| Error::Action {
                action: "jsonl".into(),
                message: e.to_string(),
                retryable: false,
            })?;
            let mut guard = self.file.lock().await;
            let appender = match &*guard {
                Some(appender) => appender.clone(),
                None => {
                    let path = self.path.clone();
                    let opened = tokio::task::spawn_blocking(move || JsonlAppender::open(path))
                        .await
                        .map_err(|e| Error::Task(e.to_string()))?
                        .map_err(|e| Error::io(format!("opening {}", self.path.display()), e))?;
                    guard.insert(Arc::new(opened)).clone()
                }
            };
            let fsync = self.fsync;
            // File writes block: off the async workers, with the lock held so batches stay
            // in order.
            tokio::task::spawn_blocking(move || appender.append(&lines, fsync))
                .await
                .map_err(|e| Error::Task(e.to_string()))?
                .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
        })
    }
}

impl ComponentConfig for JsonlActionConfig {
    fn resolve_paths(&mut self, base_dir: &Path) {
        self.path = resolve_path(base_dir, &self.path);
    }
}

impl ActionConfig for JsonlActionConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<Arc<dyn Action>> {
        Ok(Arc::new(JsonlAction::new(self.clone())))
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
        let input = ActionInput::new(
            arrow::record_batch::RecordBatch::new_empty(crate::schema::scored_schema()),
            vec![alert.clone(), alert],
        );
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
