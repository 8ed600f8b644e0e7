//! `type = "log"`: one line per notification on standard output.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{BuildContext, Built, DeliveryError, Receiver};
use crate::decision::{Notification, NotificationKind};

/// `type = "log"` settings: none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {}

impl LogConfig {
    pub(crate) fn build(&self, _: &BuildContext<'_>) -> Built {
        Ok(Box::new(LogReceiver))
    }
}

/// Prints one line per notification on standard output (`NOTIFY …`), for trying things out
/// and for logs collected from stdout.
#[derive(Debug, Default)]
pub struct LogReceiver;

impl Receiver for LogReceiver {
    fn kind(&self) -> &'static str {
        "log"
    }

    fn target(&self) -> String {
        "stdout".into()
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        let kind = match &n.kind {
            NotificationKind::Alerts => n.status().as_str().to_uppercase(),
            NotificationKind::Flapping => "FLAPPING".into(),
            NotificationKind::Escalation {
                failed_receiver, ..
            } => format!("ESCALATION({failed_receiver})"),
        };
        let alerts: Vec<String> = n
            .alerts
            .iter()
            .map(|a| {
                format!(
                    "{} {}",
                    a.status.as_str(),
                    a.annotations.get("series").map_or("", String::as_str)
                )
            })
            .collect();
        let group: Vec<String> = n
            .group_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "NOTIFY {} {kind} {} [{}] {}",
            n.receiver,
            n.rule,
            group.join(","),
            alerts.join("; ")
        );
        Box::pin(async { Ok("printed".to_owned()) })
    }
}
