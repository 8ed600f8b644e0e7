//! Label matchers, as rules, silences and inhibition rules write them.
//!
//! A matcher is written as its value: `"api"` (equal), `"!api"` (not equal), `"~api|web"`
//! (regular expression, anchored), `"!~api|web"` (does not match). A label an alert lacks
//! counts as the empty string, as in Alertmanager.

use std::collections::BTreeMap;

use regex::Regex;

/// One value test.
#[derive(Debug, Clone)]
pub(crate) enum Matcher {
    Equal(String),
    NotEqual(String),
    Regex(Regex),
    NotRegex(Regex),
}

fn anchored(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regex `{pattern}`: {e}"))
}

impl Matcher {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        Ok(if let Some(re) = text.strip_prefix("!~") {
            Matcher::NotRegex(anchored(re)?)
        } else if let Some(re) = text.strip_prefix('~') {
            Matcher::Regex(anchored(re)?)
        } else if let Some(v) = text.strip_prefix('!') {
            Matcher::NotEqual(v.to_owned())
        } else {
            Matcher::Equal(text.to_owned())
        })
    }

    /// A glob (`*` for any run of characters) as a matcher.
    pub(crate) fn glob(pattern: &str) -> Result<Self, String> {
        let re: Vec<String> = pattern.split('*').map(regex::escape).collect();
        Ok(Matcher::Regex(anchored(&re.join(".*"))?))
    }

    pub(crate) fn is_match(&self, value: &str) -> bool {
        match self {
            Matcher::Equal(v) => value == v,
            Matcher::NotEqual(v) => value != v,
            Matcher::Regex(re) => re.is_match(value),
            Matcher::NotRegex(re) => !re.is_match(value),
        }
    }
}

/// Matchers by label name; all must match.
#[derive(Debug, Clone, Default)]
pub(crate) struct Matchers(Vec<(String, Matcher)>);

impl Matchers {
    pub(crate) fn parse(spec: &BTreeMap<String, String>) -> Result<Self, String> {
        spec.iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    Matcher::parse(v).map_err(|e| format!("{k}: {e}"))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()
            .map(Matchers)
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|(k, m)| m.is_match(labels.get(k).map_or("", String::as_str)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_follow_alertmanager_semantics() {
        let spec = BTreeMap::from([
            ("service".to_owned(), "~api|web".to_owned()),
            ("env".to_owned(), "!dev".to_owned()),
            ("team".to_owned(), "".to_owned()),
        ]);
        let m = Matchers::parse(&spec).unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(m.matches(&labels(&[("service", "api"), ("env", "prod")])));
        assert!(
            !m.matches(&labels(&[("service", "apis"), ("env", "prod")])),
            "anchored"
        );
        assert!(!m.matches(&labels(&[("service", "api"), ("env", "dev")])));
        assert!(
            !m.matches(&labels(&[("service", "api"), ("team", "x")])),
            "empty = absent"
        );
        assert!(Matchers::parse(&BTreeMap::from([("a".to_owned(), "~(".to_owned())])).is_err());
        assert!(
            Matcher::glob("cpu_*.total")
                .unwrap()
                .is_match("cpu_user.total")
        );
        assert!(
            !Matcher::glob("cpu_*.total")
                .unwrap()
                .is_match("cpu_userXtotal")
        );
    }
}
