//! `type = "slack"`: a message to a Slack incoming webhook.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::http::{HttpFormat, HttpOptions, debug_http, http_receiver};
use super::{BuildContext, Built};
use crate::decision::{AlertStatus, Notification, NotificationKind};

/// `type = "slack"` settings.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming webhook's URL (its path is a secret).
    pub url: Option<String>,
    /// Extra headers.
    pub headers: BTreeMap<String, String>,
    /// The channel to post in (else the webhook's own).
    pub channel: Option<String>,
}

impl SlackConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let options = HttpOptions {
            slack_channel: self.channel.clone(),
            ..HttpOptions::new(&self.headers, ctx)
        };
        http_receiver(HttpFormat::Slack, self.url.as_deref(), ctx, options)
    }
}

impl fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_http(f, "SlackConfig", self.url.as_deref(), &self.headers)
            .field("channel", &self.channel)
            .finish()
    }
}

/// A Slack incoming-webhook message: `text` (the title, shown in notifications) and
/// `blocks` (the title, then one line per alert).
pub(crate) fn slack_payload(n: &Notification, channel: Option<&str>) -> Value {
    let firing = n
        .alerts
        .iter()
        .filter(|a| a.status == AlertStatus::Firing)
        .count();
    let group: Vec<String> = n
        .group_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let title = match &n.kind {
        NotificationKind::Alerts => format!(
            "[{}{}] {} ({})",
            n.status().as_str().to_uppercase(),
            if firing > 0 {
                format!(":{firing}")
            } else {
                String::new()
            },
            n.rule,
            group.join(" ")
        ),
        NotificationKind::Flapping => format!(
            "[FLAPPING] {} ({}): notifications paused",
            n.rule,
            group.join(" ")
        ),
        NotificationKind::Escalation {
            failed_receiver,
            reason,
        } => format!(
            "[ESCALATION] {} ({}): receiver `{failed_receiver}` is failing: {reason}",
            n.rule,
            group.join(" ")
        ),
    };
    let lines: Vec<String> = n
        .alerts
        .iter()
        .map(|a| {
            format!(
                "• *{}* `{}` {}",
                a.status.as_str(),
                a.annotations.get("series").map_or("", String::as_str),
                a.annotations.get("description").map_or("", String::as_str)
            )
        })
        .collect();
    let mut blocks = vec![json!({
        "type": "section",
        "text": { "type": "mrkdwn", "text": format!("*{title}*") },
    })];
    // A section holds at most 3 000 characters; Slack refuses longer ones.
    let body: String = lines.join("\n").chars().take(2900).collect();
    if !body.is_empty() {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": body } }));
    }
    let mut message = json!({ "text": title, "blocks": blocks });
    if let Some(channel) = channel {
        message["channel"] = channel.into();
    }
    message
}
