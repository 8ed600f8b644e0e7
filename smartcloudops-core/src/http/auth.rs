//! Bearer-token and basic authentication, as Prometheus's `remote_write` sends them
//! (`authorization: {credentials_file: …}` → `Authorization: Bearer …`; `basic_auth` →
//! `Authorization: Basic …`).
//!
//! The secret is read from a file or an environment variable, never from the configuration
//! itself, and compared in constant time.

use std::fmt;
use std::path::{Path, PathBuf};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::{Error, Problems, Result};

/// `auth = { … }`: where the shared secret comes from, and an optional user name for basic
/// authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A file holding the token (surrounding whitespace is trimmed); relative to the
    /// configuration file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// With a user name, `Authorization: Basic` with this user and the token as password is
    /// accepted too (Prometheus's `basic_auth`); a bearer token always is.
    #[serde(default)]
    pub username: Option<String>,
}

impl AuthConfig {
    /// Every problem of this table, paths relative to it.
    pub fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.check(
            self.token_file.is_some() != self.token_env.is_some(),
            "token_file",
            "set exactly one of token_file and token_env",
            "token_file = \"/etc/smartcloudops/remote-write.token\", or token_env = \"RW_TOKEN\"",
        );
        if let Some(user) = &self.username {
            p.check(
                !user.is_empty() && !user.contains(':'),
                "username",
                "must be non-empty and without `:`",
                "",
            );
        }
        p
    }

    /// Reads the secret now (a missing file or variable is a start-up error).
    pub fn load(&self, base_dir: &Path) -> Result<Credentials> {
        let token = match (&self.token_file, &self.token_env) {
            (Some(file), _) => {
                let path = if file.is_absolute() {
                    file.clone()
                } else {
                    base_dir.join(file)
                };
                std::fs::read_to_string(&path).map_err(|e| {
                    Error::io(format!("reading the token file {}", path.display()), e)
                })?
            }
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                Error::Config(problem(
                    "token_env",
                    format!("the environment variable `{var}` is not set (or not UTF-8)"),
                ))
            })?,
            (None, None) => {
                return Err(Error::Config(problem(
                    "token_file",
                    "set token_file or token_env".into(),
                )));
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Config(problem(
                "token_file",
                "the token is empty".into(),
            )));
        }
        Ok(Credentials {
            token: token.as_bytes().to_vec(),
            username: self.username.clone(),
        })
    }
}

fn problem(path: &str, message: String) -> Problems {
    let mut p = Problems::new();
    p.push(format!("auth.{path}"), message);
    p
}

/// A loaded secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Credentials {
    token: Vec<u8>,
    username: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &"<redacted>")
            .field("username", &self.username)
            .finish()
    }
}

impl Credentials {
    /// Credentials from a token in memory (embedders, tests).
    pub fn new(token: impl Into<Vec<u8>>, username: Option<String>) -> Self {
        Self {
            token: token.into(),
            username,
        }
    }

    /// Whether the request's `Authorization` header carries the secret.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(AUTHORIZATION).map(|v| v.as_bytes()) else {
            return false;
        };
        let Some(space) = value.iter().position(|&b| b == b' ') else {
            return false;
        };
        let (scheme, rest) = (&value[..space], value[space + 1..].trim_ascii());
        if scheme.eq_ignore_ascii_case(b"bearer") {
            return bool::from(rest.ct_eq(&self.token));
        }
        if scheme.eq_ignore_ascii_case(b"basic") {
            let Some(user) = &self.username else {
                return false;
            };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return false;
            };
            let Some(colon) = decoded.iter().position(|&b| b == b':') else {
                return false;
            };
            let user_ok = decoded[..colon].ct_eq(user.as_bytes());
            let password_ok = decoded[colon + 1..].ct_eq(&self.token);
            return bool::from(user_ok & password_ok);
        }
        false
    }

    /// The `WWW-Authenticate` challenges a 401 carries.
    pub fn challenges(&self) -> &'static [&'static str] {
        if self.username.is_some() {
            &[
                "Bearer realm=\"smartcloudops\"",
                "Basic realm=\"smartcloudops\"",
            ]
        } else {
            &["Bearer realm=\"smartcloudops\""]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_and_basic_are_checked() {
        let c = Credentials::new("s3cret", Some("prom".into()));
        assert!(c.allows(&with("Bearer s3cret")));
        assert!(c.allows(&with("bearer  s3cret ")));
        assert!(!c.allows(&with("Bearer s3cre")));
        assert!(!c.allows(&with("Bearer s3cret2")));
        assert!(!c.allows(&HeaderMap::new()));
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert!(c.allows(&with(&basic("prom:s3cret"))));
        assert!(!c.allows(&with(&basic("other:s3cret"))));
        assert!(!c.allows(&with(&basic("prom:wrong"))));
        assert!(!c.allows(&with("Basic !!!")));
        // Without a user name, basic authentication is not accepted at all.
        let bearer_only = Credentials::new("s3cret", None);
        assert!(!bearer_only.allows(&with(&basic("prom:s3cret"))));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn exactly_one_secret_source() {
        let none = AuthConfig {
            token_file: None,
            token_env: None,
            username: None,
        };
        assert_eq!(none.problems().0[0].path, "token_file");
        let both = AuthConfig {
            token_file: Some("t".into()),
            token_env: Some("T".into()),
            username: None,
        };
        assert!(!both.problems().is_empty());
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "tok\n").unwrap();
        let config = AuthConfig {
            token_file: Some(file.path().into()),
            token_env: None,
            username: None,
        };
        assert!(config.problems().is_empty());
        let loaded = config.load(Path::new("/")).unwrap();
        assert!(loaded.allows(&with("Bearer tok")));
        let missing = AuthConfig {
            token_env: Some("SMARTCLOUDOPS_TEST_SURELY_UNSET".into()),
            token_file: None,
            username: None,
        };
        assert!(missing.load(Path::new("/")).is_err());
    }
}
