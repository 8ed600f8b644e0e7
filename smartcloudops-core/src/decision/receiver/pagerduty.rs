//! `type = "pagerduty"`: PagerDuty Events API v2 events, `trigger` and `resolve` with one
//! `dedup_key` per group.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::http::{HttpFormat, HttpOptions, debug_http, http_receiver, rfc3339};
use super::{BuildContext, Built};
use crate::decision::{AlertStatus, Notification, NotificationKind};

const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// `type = "pagerduty"` settings.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PagerDutyConfig {
    /// Where to POST; PagerDuty's Events API v2 endpoint when absent.
    pub url: Option<String>,
    /// Extra headers.
    pub headers: BTreeMap<String, String>,
    /// Environment variable holding the integration's routing key.
    pub routing_key_env: Option<String>,
    /// File holding the routing key.
    pub routing_key_file: Option<PathBuf>,
    /// Accept a plain `http://` URL to a host other than loopback (the body carries the
    /// routing key).
    pub allow_insecure_http: bool,
}

impl PagerDutyConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let key = read_secret(&self.routing_key_env, &self.routing_key_file)?
            .ok_or("set `routing_key_env` or `routing_key_file`")?;
        let url = self.url.as_deref().unwrap_or(PAGERDUTY_URL);
        let options = HttpOptions {
            routing_key: Some(key),
            allow_insecure_http: self.allow_insecure_http,
            ..HttpOptions::new(&self.headers, ctx)
        };
        http_receiver(HttpFormat::PagerDuty, Some(url), ctx, options)
    }
}

impl fmt::Debug for PagerDutyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_http(f, "PagerDutyConfig", self.url.as_deref(), &self.headers)
            .field("routing_key_env", &self.routing_key_env)
            .field("routing_key_file", &self.routing_key_file)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}

/// The secret in variable `env`, else in `file` (without its line end).
fn read_secret(
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> std::result::Result<Option<String>, String> {
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("the variable `{var}` is not set"));
    }
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_owned()))
            .map_err(|e| format!("reading {}: {e}", path.display()));
    }
    Ok(None)
}

/// A PagerDuty Events API v2 event: `trigger` while the group fires, `resolve` after, with
/// one `dedup_key` per group so the resolve closes the incident the trigger opened.
pub(crate) fn pagerduty_payload(n: &Notification, routing_key: &str, external_url: &str) -> Value {
    let dedup_key = n.group_id();
    if n.status() == AlertStatus::Resolved && n.kind == NotificationKind::Alerts {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key,
        });
    }
    let worst = n
        .alerts
        .iter()
        .map(|a| a.severity)
        .max()
        .unwrap_or_default();
    let first = n.alerts.first();
    let summary: String = match &n.kind {
        NotificationKind::Alerts => format!(
            "{}: {}",
            n.rule,
            first
                .and_then(|a| a.annotations.get("description"))
                .map_or("", String::as_str)
        ),
        NotificationKind::Flapping => format!("{} is flapping; notifications paused", n.rule),
        NotificationKind::Escalation {
            failed_receiver,
            reason,
        } => {
            format!(
                "{}: receiver `{failed_receiver}` is failing: {reason}",
                n.rule
            )
        }
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "client": "SmartCloudOps",
        "client_url": external_url,
        "payload": {
            "summary": summary.chars().take(1024).collect::<String>(),
            "source": first.and_then(|a| a.labels.get("host").or(a.labels.get("instance"))).cloned().unwrap_or_else(|| "smartcloudops".into()),
            "severity": worst.as_str(),
            "timestamp": first.map(|a| rfc3339(a.starts_at_ms)),
            "component": first.and_then(|a| a.labels.get("metric")).cloned(),
            "group": n.rule,
            "class": first.and_then(|a| a.annotations.get("detector")).cloned(),
            "custom_details": {
                "group_key": n.group_key,
                "alerts": n.alerts.iter().map(|a| json!({
                    "status": a.status.as_str(),
                    "labels": a.labels,
                    "description": a.annotations.get("description"),
                })).collect::<Vec<_>>(),
            },
        },
    })
}
