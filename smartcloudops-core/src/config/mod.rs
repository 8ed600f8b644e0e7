//! TOML pipeline configuration: parse, substitute environment variables, validate, build.
//!
//! ```toml
//! [source]
//! type = "file"                 # file | generator
//! path = "data/metrics.jsonl"   # relative paths are relative to this file
//!
//! [detector]
//! type = "ewma"
//! threshold = 4.0
//!
//! [[action]]
//! type = "log"
//!
//! [[action]]
//! type = "jsonl"
//! path = "${ALERTS_DIR:-/tmp}/alerts.jsonl"
//!
//! [dead_letter]
//! type = "file"                 # log | file
//! path = "dead-letters.jsonl"
//! ```
//!
//! Parsing collects **every** error it can find, each with the path of the field, a message
//! and, where one helps, a hint (`did you mean `batch_size`?`). Sections are parsed and
//! validated independently, so a typo in `[source]` does not hide a bad value in
//! `[detector]`. Within one section, a value that does not parse (a typo, a wrong type) is
//! reported first; range checks of that section follow once it parses.
//!
//! `${NAME}` in any string is replaced by the environment variable `NAME` (an error if it is
//! unset), `${NAME:-default}` falls back to `default`, and `$${` writes a literal `${`. Use it
//! for secrets rather than writing them into the file.

//!
//! Which `type` names exist is the [`Registry`]'s business: each kind's config struct lives
//! next to its code and checks, summarises and builds itself. [`PipelineConfig::parse_with`]
//! takes a registry with an embedder's own kinds.

mod env;
mod registry;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::registry::{Component, Kind, ParseFn, Registry, Stage};
use crate::action::ActionConfig;
pub use crate::component::BuildContext;
use crate::component::{MAX_DURATION, parse_table, resolve_path, split_tagged, suggest};
use crate::dead_letter::{DeadLetterSink, JsonlDeadLetters, LogDeadLetters};
use crate::decision::IdempotencyConfig;
use crate::detector::keyed::DEFAULT_MAX_SERIES;
pub use crate::detector::preset::PresetConfig;
use crate::detector::{Detector, DetectorConfig};
pub use crate::error::{ConfigError, ConfigErrors, Problems};
use crate::error::{Error, Result};
use crate::pipeline::{Pipeline, PipelineBuilder, PipelineOptions};
use crate::prep::PrepConfig;
use crate::source::{SourceConfig, TimestampPolicy};

/// `[detector]`: the detector and how its state is kept.
#[derive(Debug)]
pub struct DetectorSection {
    /// The detector.
    pub detector: Component<dyn DetectorConfig>,
    /// Most series with state; beyond, the least recently used are evicted (and counted).
    pub max_series: usize,
    /// File the state is restored from at start, and saved to every `snapshot_interval` and
    /// at shutdown, so a restart does not relearn from scratch.
    pub snapshot: Option<PathBuf>,
    /// How often the snapshot is saved while running.
    pub snapshot_interval: Duration,
    /// Per-series state kept in Redis (`[detector.redis_state]`), so a restarted replica, or
    /// one that takes over another's series, resumes where it left off.
    #[cfg(feature = "redis")]
    pub redis_state: Option<crate::detector::RedisStateStoreConfig>,
}

/// Most series a detector may be configured to hold.
const MAX_SERIES: usize = 100_000_000;

/// Where dead letters go (`[dead_letter]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeadLetterConfig {
    /// The default: `dead-letters.jsonl` in `[runtime] state_dir`, every record whole, and a
    /// warning in the log for each.
    #[default]
    StateDir,
    /// Log each dead letter, whole, as a warning (only as durable as the log).
    Log,
    /// Append dead letters as JSON lines to a file.
    File {
        /// The file.
        path: PathBuf,
    },
}

/// A whole pipeline configuration.
#[derive(Debug)]
pub struct PipelineConfig {
    /// `[source]`.
    pub source: Component<dyn SourceConfig>,
    /// `[source] timestamps`: which event times the source's rows may carry; when absent,
    /// the source kind's [default](SourceConfig::default_timestamps).
    pub timestamps: Option<TimestampPolicy>,
    /// `[[prep]]`, in order.
    pub prep: Vec<Component<dyn PrepConfig>>,
    /// `[detector]`, if any.
    pub detector: Option<DetectorSection>,
    /// `[[action]]`, in order.
    pub actions: Vec<Component<dyn ActionConfig>>,
    /// `[dead_letter]`.
    pub dead_letter: DeadLetterConfig,
    /// `[runtime]`.
    pub runtime: PipelineOptions,
    /// `[decision]`: rules, receivers, silences and the audit log; runs after the actions.
    pub decision: Option<crate::decision::DecisionConfig>,
    /// What every component is built with: the file's directory, `[redis]`.
    pub context: BuildContext,
}

/// Largest queue capacity or concurrency.
const MAX_QUEUE: usize = 65_536;

const SECTIONS: &[&str] = &[
    "source",
    "prep",
    "detector",
    "action",
    "dead_letter",
    "runtime",
    "redis",
    "decision",
];

impl PipelineConfig {
    /// Reads and parses the file at `path` with the process environment and the built-in
    /// kinds. Relative paths in the file are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, Problems> {
        Self::load_with(path, &Registry::builtin())
    }

    /// [`load`](Self::load) with the kinds of `registry`.
    pub fn load_with(path: &Path, registry: &Registry) -> Result<Self, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems::from(ConfigError::new(
                "",
                format!("cannot read {}: {e}", path.display()),
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_with(&text, base, |name| std::env::var(name).ok(), registry)
    }

    /// Parses `text` with the built-in kinds, resolving relative paths against `base_dir`
    /// and `${VAR}` with `env`.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Problems> {
        Self::parse_with(text, base_dir, env, &Registry::builtin())
    }

    /// [`parse`](Self::parse) with the kinds of `registry`.
    pub fn parse_with(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
        registry: &Registry,
    ) -> Result<Self, Problems> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            Problems::from(ConfigError::new("", format!("invalid TOML: {e}")))
        })?;
        let mut problems = Problems::new();
        env::substitute_table(&mut table, "", &env, &mut problems.0);

        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.add(unknown_key(key, key, SECTIONS));
            }
        }

        let mut timestamps = None;
        let source = match table.get("source") {
            None => {
                problems.push_hint(
                    "source",
                    "missing section",
                    "add a [source] table with type = \"file\" or \"generator\"",
                );
                None
            }
            Some(v) => {
                // `timestamps` belongs to every kind: the pipeline checks it, not the source.
                let mut v = v.clone();
                if let Some(policy) = v.as_table_mut().and_then(|t| t.remove("timestamps")) {
                    timestamps = parse_table(policy, "source.timestamps", &mut problems);
                }
                registry.parse_source(&v, "source", &mut problems)
            }
        };
        let prep = array_of(&table, "prep", &mut problems)
            .into_iter()
            .filter_map(|(path, v)| registry.parse_prep(v, &path, &mut problems))
            .collect();
        let detector = table
            .get("detector")
            .and_then(|v| parse_detector(v, registry, &mut problems));
        let actions = array_of(&table, "action", &mut problems)
            .into_iter()
            .filter_map(|(path, v)| registry.parse_action(v, &path, &mut problems))
            .collect();
        let dead_letter = table
            .get("dead_letter")
            .and_then(|v| parse_dead_letter(v, &mut problems))
            .unwrap_or_default();
        let runtime = table
            .get("runtime")
            .and_then(|v| parse_table::<PipelineOptions>(v.clone(), "runtime", &mut problems))
            .unwrap_or_default();
        let decision = table
            .get("decision")
            .and_then(|v| parse_table(v.clone(), "decision", &mut problems));
        #[allow(unused_mut)]
        let mut context = BuildContext::new(base_dir);
        #[cfg(feature = "redis")]
        {
            context.redis = table
                .get("redis")
                .and_then(|v| parse_table(v.clone(), "redis", &mut problems));
        }
        #[cfg(not(feature = "redis"))]
        if table.contains_key("redis") {
            problems.push_hint(
                "redis",
                "this build has no \"redis\" support",
                "rebuild with the `redis` cargo feature (the smartcloudops binary has it)",
            );
        }

        // Check every section that parsed, even when others did not, so one typo does not
        // hide the next problem. A source that failed to parse is stood in for by a valid
        // default, which adds no problems of its own.
        let source_parsed = source.is_some();
        let mut config = PipelineConfig {
            source: source.unwrap_or_else(|| Component {
                kind: "generator".into(),
                config: Box::new(crate::source::GeneratorConfig::default()),
            }),
            timestamps,
            prep,
            detector,
            actions,
            dead_letter,
            runtime,
            decision,
            context,
        };
        config.resolve_paths(base_dir);
        config.check(&mut problems);
        if problems.is_empty() && source_parsed {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.source.config.resolve_paths(base);
        for p in &mut self.prep {
            p.config.resolve_paths(base);
        }
        if let Some(d) = &mut self.detector {
            d.detector.config.resolve_paths(base);
            if let Some(path) = &mut d.snapshot {
                *path = resolve_path(base, path);
            }
        }
        for a in &mut self.actions {
            a.config.resolve_paths(base);
        }
        if let DeadLetterConfig::File { path } = &mut self.dead_letter {
            *path = resolve_path(base, path);
        }
        let state_dir = resolve_path(base, &self.runtime.state_dir);
        let replays = self.replays_history();
        if let Some(d) = &mut self.detector {
            // A live source's detector learns for days: by default its state survives a
            // restart. A replay (file, generator) starts fresh each run, as before.
            if d.snapshot.is_none() && !replays {
                d.snapshot = Some(state_dir.join("detector.snapshot"));
            }
        }
        if let Some(d) = &mut self.decision {
            d.audit_log = Some(match &d.audit_log {
                Some(path) => resolve_path(base, path),
                None => state_dir.join("audit.jsonl"),
            });
            d.idempotency.path = if d.idempotency.path == IdempotencyConfig::default().path {
                state_dir.join("idempotency.jsonl")
            } else {
                resolve_path(base, &d.idempotency.path)
            };
            d.state_dir = Some(state_dir.clone());
        }
        self.runtime.state_dir = state_dir;
    }

    /// Whether the source replays history (a file, the generator) rather than following a
    /// live feed: its kind's default leaves event times unchecked.
    fn replays_history(&self) -> bool {
        self.source.config.default_timestamps() == TimestampPolicy::unchecked()
    }

    /// Checks what serde cannot: every component's own checks, the schema each prep stage
    /// receives (SQL stages are planned against it), and the pipeline-wide settings.
    fn check(&self, problems: &mut Problems) {
        problems.extend_at("source", self.source.config.problems());
        if let Some(policy) = &self.timestamps {
            problems.extend_at("source.timestamps", policy.problems());
        }
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.context.redis {
            problems.extend_at("redis", redis.problems());
        }
        let mut schema = Some(self.source.config.output_schema());
        for (i, p) in self.prep.iter().enumerate() {
            let path = format!("prep[{i}]");
            problems.extend_at(&path, p.config.problems());
            // After a stage that failed to plan, the schema is unknown.
            schema = schema.and_then(|input| match p.config.output_schema(&input) {
                Ok(output) => Some(output),
                Err(e) => {
                    problems.extend_at(&path, e);
                    None
                }
            });
        }
        if let Some(d) = &self.decision {
            problems.extend_at("decision", d.problems());
        }
        if let Some(section) = &self.detector {
            problems.extend_at("detector", section.detector.config.problems());
            problems.check(
                (1..=MAX_SERIES).contains(&section.max_series),
                "detector.max_series",
                format!(
                    "must be between 1 and {MAX_SERIES}, got {}",
                    section.max_series
                ),
                "",
            );
            problems.check(
                section.snapshot_interval >= Duration::from_secs(1)
                    && section.snapshot_interval <= MAX_DURATION,
                "detector.snapshot_interval",
                format!(
                    "must be between 1s and {}",
                    humantime::format_duration(MAX_DURATION)
                ),
                "",
            );
            #[cfg(feature = "redis")]
            if let Some(state) = &section.redis_state {
                problems.extend_at("detector.redis_state", state.problems());
            }
        }
        for (i, a) in self.actions.iter().enumerate() {
            problems.extend_at(&format!("action[{i}]"), a.config.problems());
        }
        problems.check(
            (1..=MAX_QUEUE).contains(&self.runtime.channel_capacity),
            "runtime.channel_capacity",
            format!(
                "must be between 1 and {MAX_QUEUE}, got {}",
                self.runtime.channel_capacity
            ),
            "a few batches is enough; bigger queues only add latency and memory",
        );
        problems.check(
            (1..=MAX_QUEUE).contains(&self.runtime.action_concurrency),
            "runtime.action_concurrency",
            format!(
                "must be between 1 and {MAX_QUEUE}, got {}",
                self.runtime.action_concurrency
            ),
            "",
        );
        problems.check(
            self.runtime.shutdown_timeout <= MAX_DURATION,
            "runtime.shutdown_timeout",
            "must be at most a day",
            "",
        );
    }

    /// The `[redis]` connection, or the default (`redis://127.0.0.1:6379`).
    #[cfg(feature = "redis")]
    pub fn redis_connection(&self) -> crate::redis::RedisConnection {
        self.context.redis_connection()
    }

    /// The timestamp check of the source's rows: `[source] timestamps`, or the kind's default.
    pub fn source_timestamps(&self) -> TimestampPolicy {
        self.timestamps
            .unwrap_or_else(|| self.source.config.default_timestamps())
    }

    /// Builds the runtime pipeline: opens output files and constructs every stage.
    pub fn build(&self) -> Result<Pipeline> {
        Ok(self.builder()?.build())
    }

    /// A pipeline builder with every stage of this configuration, for adding stages that
    /// exist only in code (an action of the embedding program, say) before building it.
    /// Stages added to it run after the configured ones.
    pub fn builder(&self) -> Result<PipelineBuilder> {
        let ctx = &self.context;
        let source = at("source", self.source.config.build(ctx))?;
        create_state_dir(&self.runtime.state_dir)?;
        let dead_letters: Arc<dyn DeadLetterSink> = match &self.dead_letter {
            DeadLetterConfig::StateDir => Arc::new(
                JsonlDeadLetters::open(self.runtime.state_dir.join("dead-letters.jsonl"))?
                    .log_each(true),
            ),
            DeadLetterConfig::Log => Arc::new(LogDeadLetters),
            DeadLetterConfig::File { path } => Arc::new(JsonlDeadLetters::open(path)?),
        };
        let mut builder = Pipeline::builder_boxed(source)
            .timestamps(self.source_timestamps())
            .dead_letters(dead_letters.clone())
            .options(self.runtime.clone());
        let mut schema = self.source.config.output_schema();
        for (i, p) in self.prep.iter().enumerate() {
            let path = format!("prep[{i}]");
            let prep = at(&path, p.config.build(ctx, &schema))?;
            schema = p.config.output_schema(&schema).map_err(|e| {
                let mut problems = Problems::new();
                problems.extend_at(&path, e);
                Error::Config(problems)
            })?;
            builder = builder.boxed_prep(prep);
        }
        if let Some(section) = &self.detector {
            let mut detector = at(
                "detector",
                section.detector.config.build(ctx, section.max_series),
            )?;
            if let Some(path) = &section.snapshot {
                restore_snapshot(detector.as_mut(), path);
                builder = builder.detector_snapshot(path.clone(), section.snapshot_interval);
            }
            #[cfg(feature = "redis")]
            if let Some(state) = &section.redis_state {
                let store = crate::detector::RedisStateStore::new(state, self.redis_connection());
                builder = builder.series_state_store(Arc::new(store), state.interval);
            }
            builder = builder.boxed_detector(detector);
        }
        for (i, a) in self.actions.iter().enumerate() {
            let action = at(&format!("action[{i}]"), a.config.build(ctx))?;
            builder = builder.shared_action(action);
        }
        if let Some(decision) = &self.decision {
            let options = crate::decision::EngineOptions {
                #[cfg(feature = "redis")]
                redis: Some(self.redis_connection()),
                // Notifications that finally failed go where the pipeline's dead letters go.
                dead_letters: Some(dead_letters),
                ..Default::default()
            };
            let engine = crate::decision::DecisionEngine::with_options(decision.clone(), options)?;
            builder = builder.shared_action(Arc::new(engine));
        }
        Ok(builder)
    }

    /// A one-line summary of the pipeline, for `validate` and logs.
    pub fn summary(&self) -> String {
        let source = self.source.config.summary(&self.context);
        let source = if source.is_empty() {
            self.source.kind.clone()
        } else {
            source
        };
        let detector = self.detector.as_ref().map_or("none", |d| &d.detector.kind);
        let actions: Vec<&str> = self.actions.iter().map(|a| a.kind.as_str()).collect();
        let decision = self.decision.as_ref().map_or(String::new(), |d| {
            format!(
                "; decision: {} rules → {} receivers",
                d.rules.len(),
                d.receivers.len()
            )
        });
        format!(
            "source: {source}; prep stages: {}; detector: {detector}; actions: [{}]{decision}",
            self.prep.len(),
            actions.join(", ")
        )
    }
}

/// Creates the state directory, readable by its owner only: it holds the audit log and
/// idempotency keys, and dead letters with whatever the input carried.
fn create_state_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating the state directory {}", dir.display()), e))
}

/// A component's configuration error at `path` (its own paths are relative to its table).
fn at<T>(path: &str, result: Result<T>) -> Result<T> {
    result.map_err(|e| match e {
        Error::Config(inner) => {
            let mut problems = Problems::new();
            problems.extend_at(path, inner);
            Error::Config(problems)
        }
        other => other,
    })
}

fn parse_dead_letter(value: &toml::Value, problems: &mut Problems) -> Option<DeadLetterConfig> {
    /// `type = "log"` takes no other field.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LogFields {}
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FileFields {
        path: PathBuf,
    }
    let (kind, rest) = split_tagged(value, "dead_letter", &["log", "file"], problems)?;
    match kind.as_str() {
        "log" => {
            parse_table::<LogFields>(rest, "dead_letter", problems).map(|_| DeadLetterConfig::Log)
        }
        "file" => parse_table::<FileFields>(rest, "dead_letter", problems)
            .map(|f| DeadLetterConfig::File { path: f.path }),
        // `split_tagged` admits only the names above.
        _ => None,
    }
}

fn parse_detector(
    value: &toml::Value,
    registry: &Registry,
    problems: &mut Problems,
) -> Option<DetectorSection> {
    /// The state-keeping fields every detector takes.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct StateFields {
        max_series: Option<usize>,
        snapshot: Option<PathBuf>,
        #[serde(default, with = "humantime_serde")]
        snapshot_interval: Option<Duration>,
        #[cfg(feature = "redis")]
        redis_state: Option<crate::detector::RedisStateStoreConfig>,
    }
    let mut kind_fields = value.clone();
    let mut state = toml::Table::new();
    if let toml::Value::Table(t) = &mut kind_fields {
        for key in ["max_series", "snapshot", "snapshot_interval", "redis_state"] {
            if let Some(v) = t.remove(key) {
                state.insert(key.to_owned(), v);
            }
        }
    }
    #[cfg(not(feature = "redis"))]
    if state.remove("redis_state").is_some() {
        problems.push_hint(
            "detector.redis_state",
            "this build has no \"redis\" support",
            "rebuild with the `redis` cargo feature (the smartcloudops binary has it)",
        );
    }
    let detector = registry.parse_detector(&kind_fields, "detector", problems);
    let state: Option<StateFields> = parse_table(toml::Value::Table(state), "detector", problems);
    let (detector, state) = (detector?, state?);
    Some(DetectorSection {
        detector,
        max_series: state.max_series.unwrap_or(DEFAULT_MAX_SERIES),
        snapshot: state.snapshot,
        snapshot_interval: state.snapshot_interval.unwrap_or(Duration::from_secs(60)),
        #[cfg(feature = "redis")]
        redis_state: state.redis_state,
    })
}

/// Restores `detector` from the snapshot at `path`, if there is one. A snapshot that does
/// not fit (another detector or configuration, a newer format) is reported and ignored: the
/// detector starts fresh and the next save replaces the file.
fn restore_snapshot(detector: &mut dyn Detector, path: &Path) {
    match std::fs::read(path) {
        Ok(bytes) => match detector.restore(&bytes) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                series = detector.series_count(),
                "detector state restored"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                "starting with fresh detector state: {e}"
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no detector snapshot yet: starting fresh");
        }
        Err(e) => tracing::warn!(
            path = %path.display(),
            "starting with fresh detector state: cannot read the snapshot: {e}"
        ),
    }
}

/// `table[key]` as a list of `(path, item)`: an array of tables, or one table.
fn array_of<'a>(
    table: &'a toml::Table,
    key: &str,
    problems: &mut Problems,
) -> Vec<(String, &'a toml::Value)> {
    match table.get(key) {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{key}[{i}]"), v))
            .collect(),
        Some(v @ toml::Value::Table(_)) => vec![(key.to_owned(), v)],
        Some(other) => {
            problems.add(
                ConfigError::new(
                    key,
                    format!("expected tables, found a {}", other.type_str()),
                )
                .hint(format!("write each one as [[{key}]]")),
            );
            Vec::new()
        }
    }
}

fn unknown_key(path: &str, key: &str, known: &[&str]) -> ConfigError {
    let e = ConfigError::new(path, "unknown section");
    match suggest(key, known) {
        Some(s) => e.hint(format!("did you mean `{s}`?")),
        None => e.hint(format!("known sections: {}", known.join(", "))),
    }
}

#[cfg(test)]
mod tests;
