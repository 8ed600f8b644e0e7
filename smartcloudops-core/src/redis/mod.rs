//! The Redis client: the connection options shared by every Redis stage, a lazily made
//! self-reconnecting connection and the mapping of Redis failures to this crate's error.
//!
//! The Redis stages live with the other stages and use this module, never the other way
//! round: the sources `source::redis_pubsub` and `source::redis_stream`, the sinks in
//! `action::redis`, the result cache `action::redis_cache` and the per-series detector
//! state store `detector::redis_state`.
//!
//! A pipeline's `[redis]` section holds the connection every Redis stage uses unless the stage
//! has a `redis` table of its own:
//!
//! ```toml
//! [redis]
//! url = "redis://cache.internal:6379/0"
//! password_env = "REDIS_PASSWORD"   # or password_file; never written in the config
//! tls = true
//! ```
//!
//! Passwords never appear in logs, `Debug` output or error messages: [`RedisConnection`]
//! redacts any password in the URL.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Problems, Result};

/// How to reach Redis. See the [module docs](self).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConnection {
    /// `redis://[user@]host[:port][/db]`, or `rediss://…` for TLS. A password written in the
    /// URL works but is discouraged; use `password_env` or `password_file`.
    #[serde(default = "default_url")]
    pub url: String,
    /// ACL user name (Redis 6+), if not in the URL.
    #[serde(default)]
    pub username: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file whose content (trailing newline trimmed) is the password, e.g. a mounted secret.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connect with TLS (same as a `rediss://` URL). Certificates are checked against the
    /// system's trusted roots (OpenSSL; `SSL_CERT_FILE` names another bundle).
    #[serde(default)]
    pub tls: bool,
    /// With TLS, accept any certificate and host name. For test set-ups only.
    #[serde(default)]
    pub tls_insecure: bool,
    /// Longest wait to establish a connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the answer to a command (blocking reads add their block time).
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
}

/// The first part of every key the Redis stages write unless configured otherwise.
pub(crate) fn default_key_prefix() -> String {
    "smartcloudops".to_owned()
}

/// The problems every stage keeping expiring keys shares, as `(field, message)`: those of
/// its own connection, if it has one, and a `ttl` under the one second that `EX` can express.
pub(crate) fn expiring_keys_problems(own: Option<&RedisConnection>, ttl: Duration) -> Problems {
    let mut problems = Problems::new();
    if let Some(own) = own {
        problems.extend_at("redis", own.problems());
    }
    if ttl < Duration::from_secs(1) {
        problems.push("ttl", "must be at least 1s");
    }
    problems
}

fn default_url() -> String {
    "redis://127.0.0.1:6379".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for RedisConnection {
    fn default() -> Self {
        Self::new(default_url())
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("url", &self.redacted_url())
            .field("username", &self.username)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("tls_insecure", &self.tls_insecure)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

impl RedisConnection {
    /// A connection to `url` with default options.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password_env: None,
            password_file: None,
            tls: false,
            tls_insecure: false,
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
        }
    }

    /// The URL with any password replaced by `***`, for logs and summaries.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Configuration problems; the password source is not read here.
    pub fn problems(&self) -> Problems {
        let mut problems = Problems::new();
        if let Err(e) = self.url.as_str().into_connection_info() {
            problems.push(
                "url",
                format!("`{}` is not a Redis URL: {e}", self.redacted_url()),
            );
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            problems.push(
                "password_env",
                "set either `password_env` or `password_file`, not both",
            );
        }
        for (field, d) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if d.is_zero() {
                problems.push(field, "must be longer than 0");
            }
        }
        problems
    }

    /// A client for this connection: URL, user, password (read now from its env variable or
    /// file) and TLS. Connecting happens later.
    pub fn client(&self) -> Result<redis::Client> {
        let mut info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| error(format!("`{}` is not a Redis URL", self.redacted_url()), e))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = self.password()? {
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
        let addr = match info.addr().clone() {
            ConnectionAddr::Tcp(host, port) if self.tls => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: self.tls_insecure,
                tls_params: None,
            },
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                tls_params,
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: insecure || self.tls_insecure,
                tls_params,
            },
            other => other,
        };
        info = info.set_addr(addr);
        redis::Client::open(info).map_err(|e| error("creating the Redis client", e))
    }

    fn password(&self) -> Result<Option<String>> {
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(Some).map_err(|_| Error::Connector {
                connector: "redis".into(),
                message: format!("the password variable `{var}` is not set"),
            });
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        Ok(None)
    }

    /// The options of a multiplexed connection with this connection's timeouts, plus `extra`
    /// on the response timeout (the block time of a blocking read).
    pub(crate) fn async_config(&self, extra: Duration) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout + extra))
    }

    /// Connects one multiplexed connection (many commands in flight on one socket).
    pub async fn connect(&self) -> Result<redis::aio::MultiplexedConnection> {
        self.connect_with(Duration::ZERO).await
    }

    /// Like [`connect`](Self::connect), for a connection whose commands may block `extra`.
    pub(crate) async fn connect_with(
        &self,
        extra: Duration,
    ) -> Result<redis::aio::MultiplexedConnection> {
        self.client()?
            .get_multiplexed_async_connection_with_config(&self.async_config(extra))
            .await
            .map_err(|e| error(format!("connecting to {}", self.redacted_url()), e))
    }

    /// A connection that reconnects by itself (with exponential backoff) after Redis went
    /// away; a command sent while it is down fails, and the one after it reconnects.
    pub async fn connection_manager(&self) -> Result<redis::aio::ConnectionManager> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        self.client()?
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| error(format!("connecting to {}", self.redacted_url()), e))
    }
}

/// A [`ConnectionManager`](redis::aio::ConnectionManager) made on first use: stages are built
/// synchronously, before the pipeline's runtime runs, and connect when they first need to.
#[derive(Debug)]
pub(crate) struct LazyConnection {
    connection: RedisConnection,
    manager: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
}

impl LazyConnection {
    pub(crate) fn new(connection: RedisConnection) -> Self {
        Self {
            connection,
            manager: tokio::sync::OnceCell::new(),
        }
    }

    /// A handle on the shared, self-reconnecting connection (cheap to clone).
    pub(crate) async fn get(&self) -> Result<redis::aio::ConnectionManager> {
        self.manager
            .get_or_try_init(|| self.connection.connection_manager())
            .await
            .cloned()
    }
}

fn redact_url(url: &str) -> String {
    crate::util::url::redact_url(url, crate::util::url::Redact::Credentials)
}

/// A Redis failure as this crate's error, with what was being done.
pub(crate) fn error(context: impl fmt::Display, e: redis::RedisError) -> Error {
    Error::Connector {
        connector: "redis".into(),
        message: format!("{context}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_everywhere() {
        assert_eq!(
            redact_url("redis://app:s3cret@cache:6379/2"),
            "redis://app:***@cache:6379/2"
        );
        assert_eq!(redact_url("rediss://:s3cret@cache"), "rediss://:***@cache");
        assert_eq!(redact_url("redis://s3cret@cache"), "redis://***@cache");
        assert_eq!(redact_url("redis://u:pa/ss?x@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        let conn = RedisConnection::new("redis://app:s3cret@cache:6379");
        assert!(!format!("{conn:?}").contains("s3cret"));
        let bad = RedisConnection::new("http://app:s3cret@cache");
        let problems = bad.problems();
        assert_eq!(problems.len(), 1);
        assert!(!problems.0[0].message.contains("s3cret"), "{problems:?}");
        let err = bad.client().unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn password_comes_from_the_named_variable_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let conn = RedisConnection {
            password_file: Some(file),
            username: Some("app".into()),
            ..RedisConnection::default()
        };
        let client = conn.client().unwrap();
        let settings = client.get_connection_info().redis_settings();
        assert_eq!(settings.password(), Some("from-file"));
        assert_eq!(settings.username(), Some("app"));

        let missing = RedisConnection {
            password_env: Some("SMARTCLOUDOPS_TEST_UNSET_PASSWORD".into()),
            ..RedisConnection::default()
        };
        let err = missing.client().unwrap_err().to_string();
        assert!(err.contains("SMARTCLOUDOPS_TEST_UNSET_PASSWORD"), "{err}");
    }

    #[test]
    fn tls_flag_switches_the_address_to_tls() {
        let conn = RedisConnection {
            tls: true,
            tls_insecure: true,
            ..RedisConnection::new("redis://cache.internal:6380")
        };
        let client = conn.client().unwrap();
        assert!(matches!(
            client.get_connection_info().addr(),
            ConnectionAddr::TcpTls { host, port: 6380, insecure: true, .. } if host == "cache.internal"
        ));
    }
}
