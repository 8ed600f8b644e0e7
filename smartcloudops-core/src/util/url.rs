//! The one URL redactor: URLs go into logs, summaries and audit records without their secrets.

/// How much of a URL to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redact {
    /// Hide the password (userinfo) and `pass` / `password` query parameters; keep the host,
    /// path and the rest of the query. For connection URLs (Redis, databases), whose path is
    /// a database number and whose query holds options.
    Credentials,
    /// Keep only the scheme and host: webhook URLs (Slack, PagerDuty, generic receivers)
    /// carry their secret in the path or query. A URL without a scheme is hidden entirely.
    AllButHost,
}

/// `url` with its secrets replaced by `***`, as `how` says.
///
/// Everything between `://` and the *last* `@` before the path is credentials, so a password
/// holding `/`, `?` or `#` is still hidden.
pub fn redact_url(url: &str, how: Redact) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return match how {
            Redact::Credentials => url.to_owned(),
            Redact::AllButHost => "***".to_owned(),
        };
    };
    // The authority ends at the first `/`, `?` or `#` after the last `@` (a password may
    // hold those characters, a host may not).
    let (userinfo, after_userinfo) = match rest.rsplit_once('@') {
        Some((userinfo, host_and_rest)) => (Some(userinfo), host_and_rest),
        None => (None, rest),
    };
    let end = after_userinfo
        .find(['/', '?', '#'])
        .unwrap_or(after_userinfo.len());
    let (host, tail) = after_userinfo.split_at(end);
    match how {
        Redact::AllButHost => {
            let masked_tail = if tail.is_empty() { "" } else { "/***" };
            format!("{scheme}://{host}{masked_tail}")
        }
        Redact::Credentials => {
            let userinfo = userinfo.map(|userinfo| match userinfo.split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#']) => format!("{user}:***@"),
                // `redis://secret@host` puts the password in the user position.
                _ => "***@".to_owned(),
            });
            let tail = match tail.split_once('?') {
                Some((path, query)) => {
                    let query: Vec<String> = query
                        .split('&')
                        .map(|kv| match kv.split_once('=') {
                            Some((k, _))
                                if k.eq_ignore_ascii_case("pass")
                                    || k.eq_ignore_ascii_case("password") =>
                            {
                                format!("{k}=***")
                            }
                            _ => kv.to_owned(),
                        })
                        .collect();
                    format!("{path}?{}", query.join("&"))
                }
                None => tail.to_owned(),
            };
            format!("{scheme}://{}{host}{tail}", userinfo.unwrap_or_default())
        }
    }
}

/// A webhook URL for logs: scheme and host only ([`Redact::AllButHost`]).
pub fn mask_url(url: &str) -> String {
    redact_url(url, Redact::AllButHost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(url: &str) -> String {
        redact_url(url, Redact::Credentials)
    }

    fn host_only(url: &str) -> String {
        redact_url(url, Redact::AllButHost)
    }

    #[test]
    fn connection_urls_lose_their_passwords_everywhere() {
        assert_eq!(
            credentials("redis://app:s3cret@cache:6379/2"),
            "redis://app:***@cache:6379/2"
        );
        assert_eq!(credentials("rediss://:s3cret@cache"), "rediss://:***@cache");
        assert_eq!(credentials("redis://s3cret@cache"), "redis://***@cache");
        assert_eq!(
            credentials("redis://u:pa/ss?x@h:1/0"),
            "redis://u:***@h:1/0"
        );
        assert_eq!(
            credentials("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            credentials("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(credentials("not a url"), "not a url");
    }

    #[test]
    fn webhook_urls_are_masked_down_to_scheme_and_host() {
        assert_eq!(
            host_only("https://hooks.slack.com/services/T0ACME/B0ONCALL/s3cr3tt0ken"),
            "https://hooks.slack.com/***"
        );
        assert_eq!(
            host_only("https://user:pw@host:8443?token=1"),
            "https://host:8443/***"
        );
        assert_eq!(host_only("http://127.0.0.1:9000"), "http://127.0.0.1:9000");
        // A password holding `/` is still credentials, not the start of a path.
        assert_eq!(host_only("https://u:pa/ss@host/x"), "https://host/***");
        assert_eq!(host_only("hooks.slack.com/secret"), "***");
    }
}
