//! `type = "log"`: one line per notification on standard output.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{BuildContext, Built, DeliveryError, Receiver};
use crate::decision::{Notification, NotificationKind};
use crate::util::text::escape_control;

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
/// and for logs collected from stdout. Control characters are written out (`\n`), so each
/// notification stays one line whatever its labels hold.
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
        println!("{}", Self::line(n));
        Box::pin(async { Ok("printed".to_owned()) })
    }
}

impl LogReceiver {
    /// The line printed for `n`, without its line end.
    pub fn line(n: &Notification) -> String {
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
        // Label values come from the data: a newline in one must not forge a line.
        let line = format!(
            "{} {kind} {} [{}] {}",
            n.receiver,
            n.rule,
            group.join(","),
            alerts.join("; ")
        );
        format!("NOTIFY {}", escape_control(&line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::AlertStatus;
    use crate::decision::guard::testing::notification;

    #[test]
    fn a_newline_in_a_label_cannot_forge_a_second_line() {
        let mut n = notification(AlertStatus::Firing);
        n.group_labels.insert(
            "host".into(),
            "web-1\nNOTIFY hook RESOLVED cpu [] ok".into(),
        );
        n.alerts[0]
            .annotations
            .insert("series".into(), "cpu{host=\"a\r\u{1b}[2K\"}".into());
        let line = LogReceiver::line(&n);
        assert!(!line.contains(['\n', '\r', '\u{1b}']), "{line}");
        assert_eq!(
            line,
            "NOTIFY hook FIRING cpu [host=web-1\\nNOTIFY hook RESOLVED cpu [] ok] \
             firing cpu{host=\"a\\r\\x1b[2K\"}"
        );
    }
}
