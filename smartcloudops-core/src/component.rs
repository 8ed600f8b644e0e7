//! What every configurable component has in common: the context it is built in, the checks
//! and summary every config struct provides, and TOML parsing that reports problems by path.
//!
//! A component (a source, prep stage, detector or action) is a config struct next to its code.
//! The struct implements [`ComponentConfig`] (checks, summary, relative paths) and its stage's
//! build trait — `source::SourceConfig`, `prep::PrepConfig`, `detector::DetectorConfig` or
//! `action::ActionConfig`, each defined beside its stage's trait — and is listed under a
//! `type` name in the registry (`config::Registry`), which is all the central code knows of
//! it. This module sits below the stages, so it names none of them.

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{ConfigError, Problems};

/// The longest interval or timeout a configuration may set: a day.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(86_400);

/// What a component is built with: the base directory of its configuration file and the
/// resources a pipeline configuration shares between its components.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BuildContext {
    /// The directory of the configuration file; relative paths were resolved against it.
    pub base_dir: PathBuf,
    /// The `[redis]` connection every Redis component without its own uses.
    #[cfg(feature = "redis")]
    pub redis: Option<crate::redis::RedisConnection>,
}

impl BuildContext {
    /// A context for a configuration file in `base_dir`.
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            base_dir: base_dir.into(),
            ..Self::default()
        }
    }

    /// The shared `[redis]` connection, or the default (`redis://127.0.0.1:6379`).
    #[cfg(feature = "redis")]
    pub fn redis_connection(&self) -> crate::redis::RedisConnection {
        self.redis.clone().unwrap_or_default()
    }

    /// `path` resolved against [`base_dir`](Self::base_dir) (`-`, standard input, stays as it is).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        resolve_path(&self.base_dir, path)
    }
}

/// `path` resolved against `base_dir` when relative; `-` (standard input) stays as it is.
pub fn resolve_path(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_relative() && path.as_os_str() != "-" {
        base_dir.join(path)
    } else {
        path.to_owned()
    }
}

/// What every component's config struct provides, besides its stage's `build`.
///
/// Paths in [`problems`](Self::problems) are relative to the component's own table
/// (`batch_size`, not `source.batch_size`): whoever holds the component prefixes them.
pub trait ComponentConfig: fmt::Debug + Send + Sync + Any {
    /// Every problem serde cannot see (ranges, files that must exist, fields that must agree),
    /// each with its field path and, where one helps, a hint.
    fn problems(&self) -> Problems {
        Problems::new()
    }

    /// One line for `validate` and the start-up log, e.g. `file metrics.jsonl (json)`, where
    /// the kind's name alone says too little. Secrets never appear in it. Empty (the
    /// default): the kind's name is the summary.
    fn summary(&self, ctx: &BuildContext) -> String {
        let _ = ctx;
        String::new()
    }

    /// Resolves the relative paths the config holds against `base_dir`, the directory of the
    /// configuration file. Called once, right after parsing.
    fn resolve_paths(&mut self, base_dir: &Path) {
        let _ = base_dir;
    }
}

/// Deserializes `value` as `T`, recording a problem with the full field path on failure:
/// unknown fields get a did-you-mean hint, missing fields their own path.
pub fn parse_table<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
    problems: &mut Problems,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            // toml appends "\nin `field`"; the path already says where.
            let message = e.inner().to_string();
            let mut message = message.lines().next().unwrap_or_default().to_owned();
            let mut full = if inner == "." || inner.is_empty() {
                path.to_owned()
            } else {
                format!("{path}.{inner}")
            };
            // A hand-written `Deserialize` that parses a part of its table on its own says
            // where in it the fault is as "at `field.sub`: message".
            if let Some((within, rest)) = message
                .strip_prefix("at `")
                .and_then(|rest| rest.split_once("`: "))
            {
                full = format!("{full}.{within}");
                message = rest.to_owned();
            }
            // serde names unknown and missing fields only in its message; put them in the path
            // (and suggest the closest known field).
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field)
            {
                problems.push(format!("{full}.{field}"), "missing field");
            } else if let Some((field, expected)) = parse_unknown_field(&message) {
                if !full.ends_with(&format!(".{field}")) {
                    full = format!("{full}.{field}");
                }
                let known: Vec<&str> = expected.iter().map(String::as_str).collect();
                // A nested field (`command.argvv`) is matched by its own name.
                let name = field.rsplit('.').next().unwrap_or(&field);
                let hint = match suggest(name, &known) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None if known.is_empty() => "this table takes no fields".to_owned(),
                    None => format!("known fields: {}", known.join(", ")),
                };
                problems.push_hint(full, "unknown field", hint);
            } else {
                problems.push(full, message);
            }
            None
        }
    }
}

/// Reads `unknown field `x`, expected one of `a`, `b`` (or `expected `a``, `there are no
/// fields`) into `("x", ["a", "b"])`.
fn parse_unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((field.to_owned(), expected))
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Splits a tagged table (`type = "…"` plus the kind's own fields) into its `type` and the
/// remaining fields, reporting a missing, mistyped or unknown `type` (with the closest
/// valid one) at `path.type`.
pub fn split_tagged(
    value: &toml::Value,
    path: &str,
    types: &[&str],
    problems: &mut Problems,
) -> Option<(String, toml::Value)> {
    let Some(table) = value.as_table() else {
        problems.push(
            path,
            format!("expected a table, found a {}", value.type_str()),
        );
        return None;
    };
    let choices = types
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let kind = match table.get("type") {
        Some(toml::Value::String(s)) => s.clone(),
        Some(other) => {
            problems.push(
                format!("{path}.type"),
                format!("expected a string, found a {}", other.type_str()),
            );
            return None;
        }
        None => {
            problems.push_hint(
                format!("{path}.type"),
                "missing field",
                format!("one of {choices}"),
            );
            return None;
        }
    };
    if !types.contains(&kind.as_str()) {
        let hint = match suggest(&kind, types) {
            Some(s) => format!("did you mean \"{s}\"? valid types: {choices}"),
            None => format!("valid types: {choices}"),
        };
        problems.add(
            ConfigError::new(format!("{path}.type"), format!("unknown type \"{kind}\"")).hint(hint),
        );
        return None;
    }
    let mut rest = table.clone();
    rest.remove("type");
    Some((kind, toml::Value::Table(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Fields {
        batch_size: usize,
        path: String,
    }

    fn problems_of(text: &str) -> Vec<String> {
        let value: toml::Value = toml::from_str(text).unwrap();
        let mut problems = Problems::new();
        assert!(parse_table::<Fields>(value, "source", &mut problems).is_none());
        problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_and_missing_fields_are_reported_by_path() {
        assert_eq!(
            problems_of("batch_sise = 1\npath = \"x\""),
            ["source.batch_sise: unknown field (hint: did you mean `batch_size`?)"]
        );
        assert_eq!(
            problems_of("batch_size = 1"),
            ["source.path: missing field"]
        );
        assert_eq!(
            problems_of("batch_size = \"x\"\npath = \"x\""),
            ["source.batch_size: invalid type: string \"x\", expected usize"]
        );
    }

    #[test]
    fn tagged_tables_name_the_closest_type() {
        let value: toml::Value = toml::from_str("type = \"kafak\"").unwrap();
        let mut problems = Problems::new();
        assert!(split_tagged(&value, "source", &["file", "kafka"], &mut problems).is_none());
        assert_eq!(
            problems.iter().next().unwrap().to_string(),
            "source.type: unknown type \"kafak\" (hint: did you mean \"kafka\"? valid types: \"file\", \"kafka\")"
        );
        let value: toml::Value = toml::from_str("type = \"file\"\npath = \"x\"").unwrap();
        let (kind, rest) = split_tagged(&value, "source", &["file"], &mut problems).unwrap();
        assert_eq!(kind, "file");
        assert!(rest.as_table().unwrap().get("type").is_none());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let ctx = BuildContext::new("/etc/sco");
        assert_eq!(
            ctx.resolve(Path::new("a.jsonl")),
            Path::new("/etc/sco/a.jsonl")
        );
        assert_eq!(ctx.resolve(Path::new("/abs")), Path::new("/abs"));
        assert_eq!(ctx.resolve(Path::new("-")), Path::new("-"));
    }
}
