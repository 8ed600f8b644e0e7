//! Prints alerts to standard output (`[[action]] type = "log"`).

use std::io::Write;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Action, ActionConfig, ActionInput};
use crate::component::{BuildContext, ComponentConfig};
use crate::error::{Error, Result};
use crate::util::text::escape_control;

/// How the [`LogAction`] prints alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One readable line per alert.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Configuration of a [`LogAction`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogActionConfig {
    /// Output format.
    pub format: LogFormat,
}

/// Writes one line per alert to standard output; in text, control characters are written out
/// (`\n`), so each alert stays one line.
#[derive(Debug)]
pub struct LogAction {
    config: LogActionConfig,
}

impl LogAction {
    /// An action printing in `config.format`.
    pub fn new(config: LogActionConfig) -> Self {
        Self { config }
    }

    /// The lines this action prints for `input`.
    pub fn render(&self, input: &ActionInput) -> Result<String> {
        let mut out = String::new();
        for alert in &input.alerts {
            match self.config.format {
                LogFormat::Text => {
                    // Labels and reasons come from the data: a newline in one must not forge
                    // a line.
                    let line = format!(
                        "{} {} = {}: {}",
                        alert.time,
                        alert.series(),
                        alert.value,
                        alert.reason
                    );
                    out.push_str("ALERT ");
                    out.push_str(&escape_control(&line));
                    out.push('\n');
                }
                LogFormat::Json => {
                    out.push_str(&serde_json::to_string(alert).map_err(|e| Error::Action {
                        action: "log".into(),
                        message: e.to_string(),
                        retryable: false,
                    })?);
                    out.push('\n');
                }
            }
        }
        Ok(out)
    }
}

impl Action for LogAction {
    fn name(&self) -> &str {
        "log"
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let text = self.render(input)?;
            // One locked write per batch keeps lines from concurrent batches whole.
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| Error::io("writing alerts to stdout", e))
        })
    }
}

impl ComponentConfig for LogActionConfig {}

impl ActionConfig for LogActionConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<std::sync::Arc<dyn Action>> {
        Ok(std::sync::Arc::new(LogAction::new(self.clone())))
    }
}
