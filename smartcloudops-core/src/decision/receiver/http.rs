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
use crate::decision::{AlertRecord, AlertStatus, Notification, NotificationKind};
use crate::schema::format_ts;
use crate::util::text::escape_control;
use crate::util::url::mask_url;

/// `type = "webhook"` settings: POST the notification as JSON (or a template of it).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST.
    pub url: Option<String>,
    /// Extra headers (e.g. `Authorization = "Bearer ${TOKEN}"`).
    pub headers: BTreeMap<String, String>,
    /// A minijinja template of the body, over the notification's fields. Values are
    /// written as JSON (`{{ rule }}` gives `"cpu-high"`, quotes included), so data cannot
    /// change the body's structure; `tojson` is there too.
    pub body: Option<String>,
    /// Accept a plain `http://` URL to a host other than loopback although the request
    /// carries secrets (`headers`, credentials in the URL).
    pub allow_insecure_http: bool,
}

impl WebhookConfig {
    pub(crate) fn build(&self, ctx: &BuildContext<'_>) -> Built {
        let options = HttpOptions {
            template: self.body.clone(),
            allow_insecure_http: self.allow_insecure_http,
            ..HttpOptions::new(&self.headers, ctx)
        };
        http_receiver(HttpFormat::Webhook, self.url.as_deref(), ctx, options)
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_http(f, "WebhookConfig", self.url.as_deref(), &self.headers)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish_non_exhaustive()
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

/// An HTTP receiver posting `format` to `url`, which must be set and be http(s); https when
/// the request carries a secret ([`check_url`]).
pub(crate) fn http_receiver(
    format: HttpFormat,
    url: Option<&str>,
    ctx: &BuildContext<'_>,
    options: HttpOptions,
) -> Built {
    let url = url.ok_or("`url` is required")?;
    check_url(url, format, &options)?;
    HttpReceiver::new(url.to_owned(), format, ctx.timeout, options)
        .map(|h| Box::new(h) as Box<dyn Receiver>)
}

/// Whether `url` may carry this receiver's requests. A request carrying a secret (Slack's URL
/// path, PagerDuty's routing key, custom headers, credentials in the URL) goes over https,
/// unless to a loopback address (a sidecar, a test) or `allow_insecure_http` says so.
fn check_url(url: &str, format: HttpFormat, options: &HttpOptions) -> Result<(), String> {
    let shown = mask_url(url);
    let parsed = reqwest::Url::parse(url).map_err(|_| format!("`{shown}` is not a URL"))?;
    match parsed.scheme() {
        "https" => return Ok(()),
        "http" => {}
        _ => return Err(format!("`{shown}` is not an http(s) URL")),
    }
    let secret = match format {
        HttpFormat::Slack => Some("a Slack webhook URL is a secret"),
        HttpFormat::PagerDuty => Some("the body carries the routing key"),
        HttpFormat::Webhook | HttpFormat::Alertmanager if !options.headers.is_empty() => {
            Some("`headers` are sent with every request")
        }
        _ if !parsed.username().is_empty() || parsed.password().is_some() => {
            Some("the URL holds credentials")
        }
        _ => None,
    };
    match secret {
        Some(why) if !options.allow_insecure_http && !is_loopback(&parsed) => Err(format!(
            "`{shown}` is plain http and {why}: use https (hint: set `allow_insecure_http = true` \
             to send it unencrypted anyway; loopback addresses need no flag)"
        )),
        _ => Ok(()),
    }
}

/// Whether `url` points at this machine: `localhost`, 127.0.0.0/8 or `::1`.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    pub(crate) allow_insecure_http: bool,
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
        // Never follow a redirect: it would carry the headers, the routing key or the Slack
        // path to wherever the receiver (or whoever answers for it) points.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("smartcloudops/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("creating the HTTP client: {e}"))?;
        let template = match options.template {
            Some(t) => {
                let mut env = minijinja::Environment::new();
                env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
                // The body is JSON: every value is written as JSON (strings quoted and
                // escaped), so a label holding `"` cannot add or change a field.
                env.set_auto_escape_callback(|_| minijinja::AutoEscape::Json);
                env.add_template_owned("body", t)
                    .map_err(|e| format!("invalid body template: {e}"))?;
                check_template(&env)?;
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
                if let Some(env) = &self.template {
                    let body = render_template(env, n)
                        .map_err(|e| format!("rendering the body template: {e}"))?;
                    check_json(&body)?;
                    return Ok(body.into_bytes());
                }
                serde_json::to_value(n).map_err(|e| e.to_string())?
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
            if status.is_redirection() {
                let to = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| "nowhere".to_owned(), mask_url);
                return Err(DeliveryError::permanent(format!(
                    "HTTP {}: redirect to {to} not followed (the request carries secrets); \
                     set `url` to the final address",
                    status.as_u16()
                )));
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
                // The far end's words go into logs and the audit trail: one line of them.
                escape_control(&text.chars().take(200).collect::<String>())
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

/// `n` through the `body` template of `env`.
fn render_template(
    env: &minijinja::Environment<'static>,
    n: &Notification,
) -> Result<String, minijinja::Error> {
    env.get_template("body")?
        .render(minijinja::Value::from_serialize(n))
}

/// Whether a rendered body is JSON, with the likely fix when it is not.
fn check_json(body: &str) -> Result<(), String> {
    serde_json::from_str::<serde::de::IgnoredAny>(body)
        .map(drop)
        .map_err(|e| {
            format!(
                "the body template did not render JSON ({e}): values are written as JSON, \
                 quotes included, so write `{{{{ rule }}}}`, not `\"{{{{ rule }}}}\"`, and \
                 build longer strings with `~`"
            )
        })
}

/// Renders the template for a made-up firing notification, so a template that cannot give
/// JSON (most likely a value in quotes, `"{{ rule }}"`, written before values were written as
/// JSON) is refused at `validate`, not at the first alert. A render error is no verdict: the
/// template may use a label the sample lacks.
fn check_template(env: &minijinja::Environment<'static>) -> Result<(), String> {
    let pairs = |list: &[(&str, &str)]| -> BTreeMap<String, String> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let alert = AlertRecord {
        fingerprint: "0000000000000000".into(),
        rule: "example".into(),
        status: AlertStatus::Firing,
        severity: Default::default(),
        labels: pairs(&[
            ("alertname", "example"),
            ("host", "example"),
            ("instance", "example:9100"),
            ("job", "example"),
            ("metric", "cpu"),
            ("service", "example"),
        ]),
        annotations: pairs(&[
            ("description", "example"),
            ("series", "cpu{host=\"example\"}"),
            ("summary", "example"),
        ]),
        starts_at_ms: 0,
        ends_at_ms: None,
        series_id: 0,
    };
    let sample = Notification::new(
        "example",
        "example",
        "example:{}",
        pairs(&[("alertname", "example")]),
        vec![alert],
        0,
        1,
        NotificationKind::Alerts,
    );
    match render_template(env, &sample) {
        Ok(body) => check_json(&body).map_err(|e| format!("`body`: {e}")),
        Err(_) => Ok(()),
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
