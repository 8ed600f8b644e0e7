//! `type = "slack"`: a message to a Slack incoming webhook.

use std::borrow::Cow;
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
    /// Accept a plain `http://` URL to a host other than loopback (the URL is a secret).
    pub allow_insecure_http: bool,
}

impl SlackConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let options = HttpOptions {
            slack_channel: self.channel.clone(),
            allow_insecure_http: self.allow_insecure_http,
            ..HttpOptions::new(&self.headers, ctx)
        };
        http_receiver(HttpFormat::Slack, self.url.as_deref(), ctx, options)
    }
}

impl fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_http(f, "SlackConfig", self.url.as_deref(), &self.headers)
            .field("channel", &self.channel)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}

/// A Slack incoming-webhook message: `text` (the title, shown in notifications) and
/// `blocks` (the title, then one line per alert). Every value from the data (labels,
/// annotations, reasons) is escaped for mrkdwn ([`escape_mrkdwn`]).
pub(crate) fn slack_payload(n: &Notification, channel: Option<&str>) -> Value {
    let firing = n
        .alerts
        .iter()
        .filter(|a| a.status == AlertStatus::Firing)
        .count();
    let group: Vec<String> = n
        .group_labels
        .iter()
        .map(|(k, v)| format!("{}={}", escape_mrkdwn(k), escape_mrkdwn(v)))
        .collect();
    let rule = escape_mrkdwn(&n.rule);
    let title = match &n.kind {
        NotificationKind::Alerts => format!(
            "[{}{}] {rule} ({})",
            n.status().as_str().to_uppercase(),
            if firing > 0 {
                format!(":{firing}")
            } else {
                String::new()
            },
            group.join(" ")
        ),
        NotificationKind::Flapping => format!(
            "[FLAPPING] {rule} ({}): notifications paused",
            group.join(" ")
        ),
        NotificationKind::Escalation {
            failed_receiver,
            reason,
        } => format!(
            "[ESCALATION] {rule} ({}): receiver `{}` is failing: {}",
            group.join(" "),
            escape_mrkdwn(failed_receiver),
            escape_mrkdwn(reason)
        ),
    };
    let lines: Vec<String> = n
        .alerts
        .iter()
        .map(|a| {
            let annotation =
                |name: &str| escape_mrkdwn(a.annotations.get(name).map_or("", String::as_str));
            format!(
                "• *{}* `{}` {}",
                a.status.as_str(),
                annotation("series"),
                annotation("description")
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

/// `text` escaped for Slack's mrkdwn: `&`, `<` and `>` become entities, as Slack asks, so a
/// label holding `<!channel>` or `<http://evil|click>` is shown as text, not as a mention or
/// a link.
pub(crate) fn escape_mrkdwn(text: &str) -> Cow<'_, str> {
    if !text.contains(['&', '<', '>']) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mrkdwn_control_sequences_become_text() {
        assert_eq!(
            escape_mrkdwn("<!channel> & <http://evil|click>"),
            "&lt;!channel&gt; &amp; &lt;http://evil|click&gt;"
        );
        assert!(matches!(escape_mrkdwn("web-1"), Cow::Borrowed("web-1")));
    }
}
