//! `type = "alertmanager"`: POST Alertmanager's webhook payload (version 4), so anything that
//! takes Alertmanager's webhooks takes ours.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::http::{HttpFormat, HttpOptions, debug_http, http_receiver, rfc3339};
use super::{BuildContext, Built};
use crate::decision::Notification;

/// `type = "alertmanager"` settings.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Where to POST.
    pub url: Option<String>,
    /// Extra headers (e.g. `Authorization = "Bearer ${TOKEN}"`).
    pub headers: BTreeMap<String, String>,
    /// Accept a plain `http://` URL to a host other than loopback although `headers` are set.
    pub allow_insecure_http: bool,
}

impl AlertmanagerConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let options = HttpOptions {
            allow_insecure_http: self.allow_insecure_http,
            ..HttpOptions::new(&self.headers, ctx)
        };
        http_receiver(HttpFormat::Alertmanager, self.url.as_deref(), ctx, options)
    }
}

impl fmt::Debug for AlertmanagerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_http(f, "AlertmanagerConfig", self.url.as_deref(), &self.headers)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}

/// Alertmanager's webhook payload, version 4.
pub(crate) fn alertmanager_payload(n: &Notification, external_url: &str) -> Value {
    let alerts: Vec<Value> = n
        .alerts
        .iter()
        .map(|a| {
            json!({
                "status": a.status.as_str(),
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": rfc3339(a.starts_at_ms),
                "endsAt": a.ends_at_ms.map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339),
                "generatorURL": external_url,
                "fingerprint": a.fingerprint,
            })
        })
        .collect();
    json!({
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status().as_str(),
        "receiver": n.receiver,
        "groupLabels": n.group_labels,
        "commonLabels": n.common_labels(),
        "commonAnnotations": n.common_annotations(),
        "externalURL": external_url,
        "alerts": alerts,
    })
}
