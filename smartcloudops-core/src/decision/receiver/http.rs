//! HTTP receivers: the client, error classification (`Retry-After`, which statuses are worth
//! another try) and the generic `type = "webhook"`. The other HTTP kinds
//! ([`super::alertmanager`], [`super::slack`], [`super::pagerduty`]) shape the body.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::alertmanager::alertmanager_payload;
use super::pagerduty::pagerduty_payload;
use super::slack::slack_payload;
use super::{BuildContext, Built, DeliveryError, Receiver};
use crate::decision::Notification;
use crate::schema::format_ts;
use crate::util::url::mask_url;

/// `type = "webhook"` settings: POST the notification as JSON (or a template of it).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST.
    pub url: Option<String>,
    /// Extra headers (e.g. `Authorization = "Bearer ${TOKEN}"`).
    pub headers: BTreeMap<String, String>,
    /// A minijinja template of the body, over the notification's fields.
    pub body: Option<String>,
}

impl WebhookConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let options = HttpOptions {
            template: self.body.clone(),
            ..HttpOptions::new(&self.headers, ctx)
        };
        http_receiver(HttpFormat::Webhook, self.url.as_deref(), ctx, options)
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_http(f, "WebhookConfig", self.url.as_deref(), &self.headers).finish_non_exhaustive()
    }
}

/// Starts the `Debug` of HTTP settings: URLs carry secrets (Slack's path), header values carry
/// tokens, so only the masked URL and the header names are printed.
pub(crate) fn debug_http<'f, 'b>(
    f: &'f mut fmt::Formatter<'b>,
    name: &str,
    url: Option<&str>,
    headers: &BTreeMap<String, String>,
) -> fmt::DebugStruct<'f, 'b> {
    let mut d = f.debug_struct(name);
    d.field("url", &url.map(mask_url))
        .field("headers", &headers.keys().collect::<Vec<_>>());
    d
}

/// An HTTP receiver posting `format` to `url`, which must be set and be http(s).
pub(crate) fn http_receiver(
    format: HttpFormat,
    url: Option<&str>,
    ctx: &BuildContext<'_>,
    options: HttpOptions,
) -> Built {
    let url = url.ok_or("`url` is required")?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("`{}` is not an http(s) URL", mask_url(url)));
    }
    HttpReceiver::new(url.to_owned(), format, ctx.timeout, options)
        .map(|h| Box::new(h) as Box<dyn Receiver>)
}

/// The payload a webhook-style receiver posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpFormat {
    /// The notification as JSON, or a template of it.
    Webhook,
    /// Alertmanager's webhook payload, version 4.
    Alertmanager,
    /// A Slack incoming-webhook message.
    Slack,
    /// A PagerDuty Events API v2 event.
    PagerDuty,
}

/// Posts JSON to a URL. See the [module docs](self).
pub struct HttpReceiver {
    client: reqwest::Client,
    url: String,
    format: HttpFormat,
    headers: BTreeMap<String, String>,
    template: Option<minijinja::Environment<'static>>,
    routing_key: Option<String>,
    external_url: String,
    slack_channel: Option<String>,
}

impl fmt::Debug for HttpReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpReceiver")
            .field("url", &mask_url(&self.url))
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// The options of an HTTP receiver.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpOptions {
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) template: Option<String>,
    pub(crate) routing_key: Option<String>,
    pub(crate) external_url: String,
    pub(crate) slack_channel: Option<String>,
}

impl HttpOptions {
    /// `headers` and the deployment's link, nothing kind-specific.
    pub(crate) fn new(headers: &BTreeMap<String, String>, ctx: &BuildContext<'_>) -> Self {
        Self {
            headers: headers.clone(),
            external_url: ctx.external_url.to_owned(),
            ..Self::default()
        }
    }
}

impl HttpReceiver {
    pub(crate) fn new(
        url: String,
        format: HttpFormat,
        timeout: Duration,
        options: HttpOptions,
    ) -> Result<Self, String> {
        for (k, v) in &options.headers {
            reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("`{k}` is not a valid header name"))?;
            reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| format!("the value of header `{k}` is not valid"))?;
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("smartcloudops/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("creating the HTTP client: {e}"))?;
        let template = match options.template {
            Some(t) => {
                let mut env = minijinja::Environment::new();
                env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
                env.add_template_owned("body", t)
                    .map_err(|e| format!("invalid body template: {e}"))?;
                Some(env)
            }
            None => None,
        };
        Ok(Self {
            client,
            url,
            format,
            headers: options.headers,
            template,
            routing_key: options.routing_key,
            external_url: options.external_url,
            slack_channel: options.slack_channel,
        })
    }

    /// The body posted for `n`.
    pub(crate) fn body(&self, n: &Notification) -> Result<Vec<u8>, String> {
        let value = match self.format {
            HttpFormat::Webhook => {
                let data = serde_json::to_value(n).map_err(|e| e.to_string())?;
                if let Some(env) = &self.template {
                    let t = env.get_template("body").map_err(|e| e.to_string())?;
                    return t
                        .render(minijinja::Value::from_serialize(&data))
                        .map(String::into_bytes)
                        .map_err(|e| format!("rendering the body template: {e}"));
                }
                data
            }
            HttpFormat::Alertmanager => alertmanager_payload(n, &self.external_url),
            HttpFormat::Slack => slack_payload(n, self.slack_channel.as_deref()),
            HttpFormat::PagerDuty => pagerduty_payload(
                n,
                self.routing_key.as_deref().unwrap_or_default(),
                &self.external_url,
            ),
        };
        serde_json::to_vec(&value).map_err(|e| e.to_string())
    }
}

impl Receiver for HttpReceiver {
    fn kind(&self) -> &'static str {
        match self.format {
            HttpFormat::Webhook => "webhook",
            HttpFormat::Alertmanager => "alertmanager",
            HttpFormat::Slack => "slack",
            HttpFormat::PagerDuty => "pagerduty",
        }
    }

    fn target(&self) -> String {
        mask_url(&self.url)
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let body = self.body(n).map_err(DeliveryError::permanent)?;
            let mut request = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", &n.id);
            for (k, v) in &self.headers {
                request = request.header(k, v);
            }
            let response = request.body(body).send().await.map_err(|e| {
                // Timeouts and connection failures: the receiver may be back soon.
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                };
                DeliveryError::transient(format!("{what}: {}", without_url(&e)))
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(format!("HTTP {}", status.as_u16()));
            }
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let text = response.text().await.unwrap_or_default();
            let message = format!(
                "HTTP {}: {}",
                status.as_u16(),
                text.chars().take(200).collect::<String>()
            );
            // 4xx means the request is wrong and will be wrong again, except 429 (slow down).
            let retryable =
                status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408;
            Err(DeliveryError {
                message,
                retryable,
                retry_after,
            })
        })
    }
}

/// The error without the URL, which may carry a secret.
fn without_url(e: &reqwest::Error) -> String {
    let mut e = e.to_string();
    if let Some(i) = e.find(" for url (") {
        e.truncate(i);
    }
    e
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value.trim()).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// An RFC 3339 time, as Alertmanager and PagerDuty want them.
pub(crate) fn rfc3339(ms: i64) -> String {
    // Alertmanager writes seconds precision with a `Z`; keep the milliseconds we have.
    format_ts(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
