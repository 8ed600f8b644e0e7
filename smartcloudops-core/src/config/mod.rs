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

mod env;
#[cfg(feature = "redis")]
mod redis;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::action::{Action, JsonlAction, JsonlActionConfig, LogAction, LogActionConfig};
use crate::dead_letter::{DeadLetterSink, JsonlDeadLetters, LogDeadLetters};
use crate::detector::cusum::{CusumConfig, CusumDetector};
use crate::detector::hst::{HstConfig, HstDetector};
use crate::detector::keyed::DEFAULT_MAX_SERIES;
use crate::detector::mad::{MadConfig, MadDetector};
use crate::detector::seasonal::{SeasonalConfig, SeasonalDetector};
use crate::detector::{
    Detector, EnsembleConfig, EnsembleDetector, EwmaConfig, EwmaDetector, Preset, ThresholdConfig,
    ThresholdDetector,
};
pub use crate::error::{ConfigError, ConfigErrors, Problems};
use crate::error::{Error, Result};
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::prep::{MetricFilter, MetricFilterConfig, Prep};
use crate::source::{FileSource, FileSourceConfig, GeneratorConfig, GeneratorSource, Source};

/// Where the pipeline reads from (`[source]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SourceConfig {
    /// A file or standard input.
    File(FileSourceConfig),
    /// Synthetic series.
    Generator(GeneratorConfig),
    /// Prometheus `/metrics` endpoints, scraped on an interval.
    PrometheusScrape(crate::source::ScrapeConfig),
    /// A Prometheus remote-write receiver.
    RemoteWrite(crate::source::RemoteWriteConfig),
    /// A Kafka consumer group.
    #[cfg(feature = "kafka")]
    Kafka(crate::source::KafkaSourceConfig),
    /// Redis pub/sub channels and patterns.
    #[cfg(feature = "redis")]
    RedisPubsub(crate::source::RedisPubSubSourceConfig),
    /// Redis streams through a consumer group.
    #[cfg(feature = "redis")]
    RedisStream(crate::source::RedisStreamSourceConfig),
}

impl SourceConfig {
    /// The schema of the source's batches: the canonical metrics schema, plus the Kafka
    /// metadata columns when a Kafka source asks for them.
    pub fn output_schema(&self) -> arrow::datatypes::SchemaRef {
        match self {
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(c) => crate::source::kafka::output_schema(c.metadata),
            _ => crate::schema::metrics_schema(),
        }
    }
}

/// A prep stage (`[[prep]]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PrepConfig {
    /// Keep or drop rows by metric name.
    Filter(MetricFilterConfig),
    /// Event-time windows with aggregations.
    Window(crate::prep::WindowConfig),
    /// Resampling to a fixed step.
    Resample(crate::prep::ResampleConfig),
    /// A SQL query over every batch, with reference tables.
    #[cfg(feature = "sql")]
    Sql(crate::prep::SqlConfig),
}

/// The detector (`[detector]`): which one, with its own fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DetectorConfig {
    /// EWMA z-score.
    Ewma(EwmaConfig),
    /// Streaming median/MAD robust z-score.
    Mad(MadConfig),
    /// Seasonal (time-of-day) baseline.
    Seasonal(SeasonalConfig),
    /// CUSUM change points.
    Cusum(CusumConfig),
    /// Half-space trees.
    Hst(HstConfig),
    /// Static threshold rules.
    Threshold(ThresholdConfig),
    /// The `fast` preset.
    Fast(PresetConfig),
    /// The `precise` preset.
    Precise(PresetConfig),
    /// A custom ensemble (unset fields are the `precise` preset's).
    Ensemble(Box<EnsembleConfig>),
}

/// Adjustments of a preset (`[detector] type = "fast"` or `"precise"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetConfig {
    /// 0 to 1: above 0.5 alerts more readily than the tuned default, below less.
    pub sensitivity: Option<f64>,
    /// The alert threshold on the score, overriding `sensitivity`.
    pub threshold: Option<f64>,
}

/// Every `[detector]` type.
const DETECTOR_TYPES: [&str; 9] = [
    "ewma",
    "mad",
    "seasonal",
    "cusum",
    "hst",
    "threshold",
    "fast",
    "precise",
    "ensemble",
];

impl DetectorConfig {
    /// The `type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            DetectorConfig::Ewma(_) => "ewma",
            DetectorConfig::Mad(_) => "mad",
            DetectorConfig::Seasonal(_) => "seasonal",
            DetectorConfig::Cusum(_) => "cusum",
            DetectorConfig::Hst(_) => "hst",
            DetectorConfig::Threshold(_) => "threshold",
            DetectorConfig::Fast(_) => "fast",
            DetectorConfig::Precise(_) => "precise",
            DetectorConfig::Ensemble(_) => "ensemble",
        }
    }

    /// The ensemble configuration of a preset or custom ensemble, with sensitivity applied.
    pub fn ensemble_config(&self) -> Option<EnsembleConfig> {
        let (preset, adjust) = match self {
            DetectorConfig::Fast(a) => (Preset::Fast, a),
            DetectorConfig::Precise(a) => (Preset::Precise, a),
            DetectorConfig::Ensemble(c) => return Some(c.as_ref().clone()),
            _ => return None,
        };
        let mut config = preset.config();
        if let Some(s) = adjust.sensitivity {
            config.threshold = config.threshold_for_sensitivity(s);
        }
        if let Some(t) = adjust.threshold {
            config.threshold = t;
        }
        Some(config)
    }

    /// Problems with the values, as `(field, message)` pairs relative to `[detector]`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let owned = |v: Vec<(&'static str, String)>| -> Vec<(String, String)> {
            v.into_iter().map(|(f, m)| (f.to_owned(), m)).collect()
        };
        match self {
            DetectorConfig::Ewma(c) => owned(c.problems()),
            DetectorConfig::Mad(c) => owned(c.problems()),
            DetectorConfig::Seasonal(c) => owned(c.problems()),
            DetectorConfig::Cusum(c) => owned(c.problems()),
            DetectorConfig::Hst(c) => owned(c.problems()),
            DetectorConfig::Threshold(c) => c.problems(),
            DetectorConfig::Fast(a) | DetectorConfig::Precise(a) => {
                let mut out = Vec::new();
                if a.sensitivity.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
                    out.push((
                        "sensitivity".to_owned(),
                        format!(
                            "must be between 0 and 1, got {}",
                            a.sensitivity.unwrap_or(0.0)
                        ),
                    ));
                }
                if a.threshold.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
                    out.push((
                        "threshold".to_owned(),
                        format!("must be in (0, 1], got {}", a.threshold.unwrap_or(0.0)),
                    ));
                }
                out
            }
            DetectorConfig::Ensemble(c) => c.problems(),
        }
    }

    /// Builds the detector, holding state for at most `max_series` series.
    pub fn build(&self, max_series: usize) -> Box<dyn Detector> {
        if let Some(config) = self.ensemble_config() {
            return Box::new(EnsembleDetector::new(self.type_name(), config, max_series));
        }
        match self {
            DetectorConfig::Ewma(c) => {
                Box::new(EwmaDetector::with_max_series(c.clone(), max_series))
            }
            DetectorConfig::Mad(c) => Box::new(MadDetector::new(c.clone(), max_series)),
            DetectorConfig::Seasonal(c) => Box::new(SeasonalDetector::new(c.clone(), max_series)),
            DetectorConfig::Cusum(c) => Box::new(CusumDetector::new(c.clone(), max_series)),
            DetectorConfig::Hst(c) => Box::new(HstDetector::new(c.clone(), max_series)),
            DetectorConfig::Threshold(c) => Box::new(ThresholdDetector::new(c.clone())),
            DetectorConfig::Fast(_) | DetectorConfig::Precise(_) | DetectorConfig::Ensemble(_) => {
                unreachable!("ensembles are built above")
            }
        }
    }
}

/// `[detector]`: the detector and how its state is kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectorSection {
    /// The detector.
    #[serde(flatten)]
    pub detector: DetectorConfig,
    /// Most series with state; beyond, the least recently used are evicted (and counted).
    pub max_series: usize,
    /// File the state is restored from at start, and saved to every `snapshot_interval` and
    /// at shutdown, so a restart does not relearn from scratch.
    pub snapshot: Option<PathBuf>,
    /// How often the snapshot is saved while running.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// Per-series state kept in Redis (`[detector.redis_state]`), so a restarted replica, or
    /// one that takes over another's series, resumes where it left off.
    #[cfg(feature = "redis")]
    pub redis_state: Option<crate::detector::RedisStateStoreConfig>,
}

/// Most series a detector may be configured to hold.
const MAX_SERIES: usize = 100_000_000;

/// An action (`[[action]]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ActionConfig {
    /// Print alerts to standard output.
    Log(LogActionConfig),
    /// Append alerts to a JSON-lines file.
    Jsonl(JsonlActionConfig),
    /// Publish alerts or scored rows to Kafka.
    #[cfg(feature = "kafka")]
    Kafka(crate::action::KafkaSinkConfig),
    /// Publish alerts or scored rows to a Redis pub/sub channel.
    #[cfg(feature = "redis")]
    RedisPublish(crate::action::RedisPublishConfig),
    /// Append alerts or scored rows to a Redis stream.
    #[cfg(feature = "redis")]
    RedisStream(crate::action::RedisStreamSinkConfig),
    /// Keep the latest score and explanation per series in Redis.
    #[cfg(feature = "redis")]
    RedisCache(crate::action::ResultCacheConfig),
}

/// Where dead letters go (`[dead_letter]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeadLetterConfig {
    /// Log each dead letter as a warning.
    #[default]
    Log,
    /// Append dead letters as JSON lines to a file.
    File {
        /// The file.
        path: PathBuf,
    },
}

/// A whole pipeline configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineConfig {
    /// `[source]`.
    pub source: SourceConfig,
    /// `[[prep]]`, in order.
    pub prep: Vec<PrepConfig>,
    /// `[detector]`, if any.
    pub detector: Option<DetectorSection>,
    /// `[[action]]`, in order.
    pub actions: Vec<ActionConfig>,
    /// `[dead_letter]`.
    pub dead_letter: DeadLetterConfig,
    /// `[runtime]`.
    pub runtime: PipelineOptions,
    /// `[decision]`: rules, receivers, silences and the audit log; runs after the actions.
    pub decision: Option<crate::decision::DecisionConfig>,
    /// `[redis]`: the connection of every Redis stage without one of its own.
    #[cfg(feature = "redis")]
    pub redis: Option<crate::redis::RedisConnection>,
}

/// Largest batch a source may be configured to build, in rows or messages.
const MAX_BATCH: usize = 1_000_000;
/// Checks a source's `batch_size` against `1..=MAX_BATCH`.
fn check_batch_size(check: &mut impl FnMut(bool, &str, String, &str), size: usize, hint: &str) {
    check(
        (1..=MAX_BATCH).contains(&size),
        "source.batch_size",
        format!("must be between 1 and {MAX_BATCH}, got {size}"),
        hint,
    );
}

/// Largest queue capacity or concurrency.
const MAX_QUEUE: usize = 65_536;
/// Longest interval or timeout a config may set.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(86_400);

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
    /// Reads and parses the file at `path` with the process environment. Relative paths in
    /// the file are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![ConfigError::new(
                "",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base, |name| std::env::var(name).ok())
    }

    /// Parses `text`, resolving relative paths against `base_dir` and `${VAR}` with `env`.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigErrors> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            Problems(vec![ConfigError::new("", format!("invalid TOML: {e}"))])
        })?;
        let mut errors = Vec::new();
        env::substitute_table(&mut table, "", &env, &mut errors);

        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                errors.push(unknown_key(key, key, SECTIONS));
            }
        }

        let source = match table.get("source") {
            None => {
                errors.push(
                    ConfigError::new("source", "missing section")
                        .hint("add a [source] table with type = \"file\" or \"generator\""),
                );
                None
            }
            Some(v) => parse_source(v, &mut errors),
        };
        let prep = array_of(&table, "prep", &mut errors)
            .into_iter()
            .filter_map(|(path, v)| parse_prep(v, &path, &mut errors))
            .collect();
        let detector = table
            .get("detector")
            .and_then(|v| parse_detector(v, &mut errors));
        let actions = array_of(&table, "action", &mut errors)
            .into_iter()
            .filter_map(|(path, v)| parse_action(v, &path, &mut errors))
            .collect();
        let dead_letter = table
            .get("dead_letter")
            .and_then(|v| parse_dead_letter(v, &mut errors))
            .unwrap_or_default();
        let runtime = table
            .get("runtime")
            .and_then(|v| deserialize_at::<PipelineOptions>(v.clone(), "runtime", &mut errors))
            .unwrap_or_default();
        let decision = table
            .get("decision")
            .and_then(|v| deserialize_at(v.clone(), "decision", &mut errors));
        #[cfg(feature = "redis")]
        let redis = table
            .get("redis")
            .and_then(|v| deserialize_at(v.clone(), "redis", &mut errors));
        #[cfg(not(feature = "redis"))]
        if table.contains_key("redis") {
            errors.push(not_built("redis", "redis"));
        }

        // Validate every section that parsed, even when others did not, so one typo does not
        // hide the next problem. A source that failed to parse is stood in for by a valid
        // default, which adds no errors of its own.
        let source_parsed = source.is_some();
        let mut config = PipelineConfig {
            source: source.unwrap_or_else(|| SourceConfig::Generator(GeneratorConfig::default())),
            prep,
            detector,
            actions,
            dead_letter,
            runtime,
            decision,
            #[cfg(feature = "redis")]
            redis,
        };
        config.resolve_paths(base_dir);
        config.validate(&mut errors);
        if errors.is_empty() && source_parsed {
            Ok(config)
        } else {
            Err(Problems(errors))
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && p.as_os_str() != "-" {
                *p = base.join(&*p);
            }
        };
        if let SourceConfig::File(f) = &mut self.source {
            resolve(&mut f.path);
        }
        for a in &mut self.actions {
            if let ActionConfig::Jsonl(j) = a {
                resolve(&mut j.path);
            }
        }
        if let DeadLetterConfig::File { path } = &mut self.dead_letter {
            resolve(path);
        }
        if let Some(path) = self.detector.as_mut().and_then(|d| d.snapshot.as_mut()) {
            resolve(path);
        }
        #[cfg(feature = "sql")]
        for p in &mut self.prep {
            if let PrepConfig::Sql(c) = p {
                for t in &mut c.tables {
                    resolve(&mut t.path);
                }
            }
        }
        if let Some(d) = &mut self.decision {
            if let Some(path) = &mut d.audit_log {
                resolve(path);
            }
            resolve(&mut d.idempotency.path);
        }
    }

    /// Checks values serde cannot: ranges, files that must exist, cross references.
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut check = |ok: bool, path: &str, message: String, hint: &str| {
            if !ok {
                let mut e = ConfigError::new(path, message);
                if !hint.is_empty() {
                    e = e.hint(hint);
                }
                errors.push(e);
            }
        };
        match &self.source {
            SourceConfig::File(f) => {
                check_batch_size(&mut check, f.batch_size, "1024 is a good start");
                check(
                    f.speed == 0.0 || (1e-6..=1e9).contains(&f.speed),
                    "source.speed",
                    format!(
                        "must be 0 (as fast as possible) or between 1e-6 and 1e9, got {}",
                        f.speed
                    ),
                    "1 is real time, 60 plays an hour per minute",
                );
                check(
                    f.path.as_os_str() == "-" || (f.path.exists() && !f.path.is_dir()),
                    "source.path",
                    format!("no such file: {}", f.path.display()),
                    "relative paths are relative to the config file; use \"-\" for standard input",
                );
                check(
                    f.csv.delimiter.is_ascii(),
                    "source.csv.delimiter",
                    format!("must be one ASCII character, got {:?}", f.csv.delimiter),
                    "",
                );
            }
            SourceConfig::Generator(g) => {
                check(
                    (1..=100_000_000).contains(&g.series),
                    "source.series",
                    format!("must be between 1 and 100000000, got {}", g.series),
                    "",
                );
                check_batch_size(&mut check, g.batch_size, "");
                check(
                    !g.interval.is_zero() && g.interval <= MAX_DURATION,
                    "source.interval",
                    "must be longer than 0 and at most a day".into(),
                    "e.g. \"10s\"",
                );
                check(
                    g.rate == 0.0 || (0.001..=1e12).contains(&g.rate),
                    "source.rate",
                    format!(
                        "must be 0 (unthrottled) or between 0.001 and 1e12, got {}",
                        g.rate
                    ),
                    "",
                );
                check(
                    g.noise.is_finite() && g.noise >= 0.0,
                    "source.noise",
                    format!("must be 0 or positive, got {}", g.noise),
                    "",
                );
                check(
                    crate::schema::parse_ts(&g.start).is_some(),
                    "source.start",
                    format!("{:?} is not an RFC 3339 time", g.start),
                    "e.g. \"2026-01-01T00:00:00Z\"",
                );
                for (i, a) in g.anomalies.iter().enumerate() {
                    for s in &a.series {
                        check(
                            *s < g.series,
                            &format!("source.anomaly[{i}].series"),
                            format!(
                                "series index {s} is out of range: there are {} series",
                                g.series
                            ),
                            "indices start at 0",
                        );
                    }
                    check(
                        a.magnitude.is_finite(),
                        &format!("source.anomaly[{i}].magnitude"),
                        "must be a finite number".into(),
                        "",
                    );
                }
            }
            SourceConfig::PrometheusScrape(c) => {
                for (field, message) in c.problems() {
                    check(false, &format!("source.{field}"), message, "");
                }
            }
            SourceConfig::RemoteWrite(c) => {
                check(
                    c.path.starts_with('/'),
                    "source.path",
                    "must start with /".into(),
                    "e.g. \"/api/v1/write\"",
                );
                check(
                    c.max_body_bytes > 0 && !c.ack_timeout.is_zero(),
                    "source.max_body_bytes",
                    "max_body_bytes and ack_timeout must be above 0".into(),
                    "",
                );
            }
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(_) => {} // validate_kafka
            #[cfg(feature = "redis")]
            SourceConfig::RedisPubsub(_) | SourceConfig::RedisStream(_) => {} // redis::validate
        }
        #[cfg(feature = "kafka")]
        self.validate_kafka(&mut check);
        #[cfg(feature = "redis")]
        redis::validate(self, &mut check);
        // The schema each stage receives: SQL stages are planned against it.
        let mut schema = Some(self.source.output_schema());
        for (i, p) in self.prep.iter().enumerate() {
            let problems = match p {
                PrepConfig::Window(c) => c.problems(),
                PrepConfig::Resample(c) => crate::prep::WindowConfig {
                    idle_timeout: c.idle_timeout,
                    ..crate::prep::WindowConfig::tumbling(c.step)
                }
                .problems(),
                PrepConfig::Filter(_) => Vec::new(),
                #[cfg(feature = "sql")]
                PrepConfig::Sql(_) => Vec::new(),
            };
            schema = match (p, schema) {
                #[cfg(feature = "sql")]
                (PrepConfig::Sql(c), Some(input)) => match crate::prep::SqlPrep::new(c, input) {
                    Ok(sql) => Some(sql.output_schema()),
                    Err(e) => {
                        check(
                            false,
                            &format!("prep[{i}].{}", e.field),
                            e.message,
                            e.hint.as_deref().unwrap_or(""),
                        );
                        None
                    }
                },
                (p, Some(input)) => Some(prep_output_schema(p, input)),
                // An earlier SQL stage failed: the schema here is unknown.
                (_, None) => None,
            };
            for (field, message) in problems {
                let field = if matches!(p, PrepConfig::Resample(_)) && field == "size" {
                    "step"
                } else {
                    field
                };
                check(false, &format!("prep[{i}].{field}"), message, "");
            }
        }
        if let Some(d) = &self.decision {
            for (path, message) in d.problems() {
                check(false, &format!("decision.{path}"), message, "");
            }
        }
        if let Some(section) = &self.detector {
            for (field, message) in section.detector.problems() {
                let hint = match (section.detector.type_name(), field.as_str()) {
                    ("ewma", "alpha") => "0.05 remembers about 40 samples",
                    ("ewma", "threshold") => "in standard deviations, e.g. 4",
                    ("fast" | "precise", "sensitivity") => "0.5 is the tuned default",
                    _ => "",
                };
                check(false, &format!("detector.{field}"), message, hint);
            }
            check(
                (1..=MAX_SERIES).contains(&section.max_series),
                "detector.max_series",
                format!(
                    "must be between 1 and {MAX_SERIES}, got {}",
                    section.max_series
                ),
                "",
            );
            check(
                section.snapshot_interval >= Duration::from_secs(1)
                    && section.snapshot_interval <= MAX_DURATION,
                "detector.snapshot_interval",
                format!(
                    "must be between 1s and {}",
                    humantime::format_duration(MAX_DURATION)
                ),
                "",
            );
        }
        check(
            (1..=MAX_QUEUE).contains(&self.runtime.channel_capacity),
            "runtime.channel_capacity",
            format!(
                "must be between 1 and {MAX_QUEUE}, got {}",
                self.runtime.channel_capacity
            ),
            "a few batches is enough; bigger queues only add latency and memory",
        );
        check(
            (1..=MAX_QUEUE).contains(&self.runtime.action_concurrency),
            "runtime.action_concurrency",
            format!(
                "must be between 1 and {MAX_QUEUE}, got {}",
                self.runtime.action_concurrency
            ),
            "",
        );
        check(
            self.runtime.shutdown_timeout <= MAX_DURATION,
            "runtime.shutdown_timeout",
            "must be at most a day".into(),
            "",
        );
    }

    #[cfg(feature = "kafka")]
    fn validate_kafka(&self, check: &mut impl FnMut(bool, &str, String, &str)) {
        if let SourceConfig::Kafka(k) = &self.source {
            check(
                !k.brokers.trim().is_empty(),
                "source.brokers",
                "must not be empty".into(),
                "e.g. \"127.0.0.1:9092\"",
            );
            check(
                !k.group_id.trim().is_empty(),
                "source.group_id",
                "must not be empty".into(),
                "every replica of the pipeline uses the same group id",
            );
            check(
                !k.topics.is_empty(),
                "source.topics",
                "must list at least one topic".into(),
                "",
            );
            check_batch_size(check, k.batch_size, "");
            check(
                !k.commit_interval.is_zero() && k.commit_interval <= MAX_DURATION,
                "source.commit_interval",
                "must be longer than 0 and at most a day".into(),
                "e.g. \"1s\"",
            );
            for key in ["enable.auto.commit", "enable.auto.offset.store"] {
                check(
                    !k.options.contains_key(key),
                    &format!("source.options.\"{key}\""),
                    "is managed by the source (offsets are committed only after the pipeline acknowledged them)".into(),
                    "remove it",
                );
            }
            check(
                k.max_unacked > 0,
                "source.max_unacked",
                "must be at least 1".into(),
                "",
            );
            if let Some(session) = k
                .options
                .get("session.timeout.ms")
                .and_then(|s| s.parse::<u128>().ok())
            {
                check(
                    k.drain_timeout.as_millis() < session,
                    "source.drain_timeout",
                    format!("must be shorter than session.timeout.ms ({session} ms)"),
                    "a revoke that drains longer than the session gets this member kicked out",
                );
            }
        }
        for (i, a) in self.actions.iter().enumerate() {
            if let ActionConfig::Kafka(k) = a {
                check(
                    !k.brokers.trim().is_empty(),
                    &format!("action[{i}].brokers"),
                    "must not be empty".into(),
                    "",
                );
                check(
                    !k.topic.trim().is_empty(),
                    &format!("action[{i}].topic"),
                    "must not be empty".into(),
                    "",
                );
            }
        }
    }

    /// Builds the runtime pipeline: opens output files and constructs every stage.
    pub fn build(&self) -> Result<Pipeline> {
        let source: Box<dyn Source> = match &self.source {
            SourceConfig::File(c) => Box::new(FileSource::new(c.clone())),
            SourceConfig::Generator(c) => Box::new(GeneratorSource::new(c.clone())),
            SourceConfig::PrometheusScrape(c) => {
                Box::new(crate::source::ScrapeSource::new(c.clone()))
            }
            SourceConfig::RemoteWrite(c) => {
                Box::new(crate::source::RemoteWriteSource::bind(c.clone())?)
            }
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(c) => Box::new(crate::source::KafkaSource::new(c.clone())),
            #[cfg(feature = "redis")]
            SourceConfig::RedisPubsub(c) => Box::new(crate::source::RedisPubSubSource::new(
                c.clone(),
                self.redis_connection(),
            )),
            #[cfg(feature = "redis")]
            SourceConfig::RedisStream(c) => Box::new(crate::source::RedisStreamSource::new(
                c.clone(),
                self.redis_connection(),
            )),
        };
        let dead_letters: Arc<dyn DeadLetterSink> = match &self.dead_letter {
            DeadLetterConfig::Log => Arc::new(LogDeadLetters),
            DeadLetterConfig::File { path } => Arc::new(JsonlDeadLetters::open(path)?),
        };
        let mut builder = Pipeline::builder_boxed(source)
            .dead_letters(dead_letters)
            .options(self.runtime.clone());
        let mut schema = self.source.output_schema();
        for (i, p) in self.prep.iter().enumerate() {
            let prep: Box<dyn Prep> = match p {
                PrepConfig::Filter(c) => Box::new(MetricFilter::new(c.clone())),
                PrepConfig::Window(c) => Box::new(crate::prep::WindowPrep::new(c)?),
                PrepConfig::Resample(c) => Box::new(crate::prep::WindowPrep::resample(c)?),
                #[cfg(feature = "sql")]
                PrepConfig::Sql(c) => {
                    let sql = crate::prep::SqlPrep::new(c, schema.clone()).map_err(|e| {
                        let mut error =
                            ConfigError::new(format!("prep[{i}].{}", e.field), e.message);
                        if let Some(hint) = e.hint {
                            error = error.hint(hint);
                        }
                        Error::Config(Problems(vec![error]))
                    })?;
                    schema = sql.output_schema();
                    Box::new(sql)
                }
            };
            schema = prep_output_schema(p, schema);
            builder = builder.boxed_prep(prep);
        }
        if let Some(section) = &self.detector {
            let mut detector = section.detector.build(section.max_series);
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
        for a in &self.actions {
            let action: Arc<dyn Action> = match a {
                ActionConfig::Log(c) => Arc::new(LogAction::new(c.clone())),
                ActionConfig::Jsonl(c) => Arc::new(JsonlAction::new(c.clone())),
                #[cfg(feature = "kafka")]
                ActionConfig::Kafka(c) => Arc::new(crate::action::KafkaSink::new(c.clone())?),
                #[cfg(feature = "redis")]
                ActionConfig::RedisPublish(c) => Arc::new(crate::action::RedisPublish::new(
                    c.clone(),
                    self.redis_connection(),
                )),
                #[cfg(feature = "redis")]
                ActionConfig::RedisStream(c) => Arc::new(crate::action::RedisStreamSink::new(
                    c.clone(),
                    self.redis_connection(),
                )),
                #[cfg(feature = "redis")]
                ActionConfig::RedisCache(c) => {
                    Arc::new(crate::action::ResultCache::new(c, self.redis_connection()))
                }
            };
            builder = builder.shared_action(action);
        }
        if let Some(decision) = &self.decision {
            let options = crate::decision::EngineOptions {
                #[cfg(feature = "redis")]
                redis: Some(self.redis_connection()),
                ..Default::default()
            };
            let engine = crate::decision::DecisionEngine::with_options(decision.clone(), options)?;
            builder = builder.shared_action(Arc::new(engine));
        }
        Ok(builder.build())
    }

    /// A one-line summary of the pipeline, for `validate` and logs.
    pub fn summary(&self) -> String {
        let source = match &self.source {
            SourceConfig::File(f) => format!("file {} ({})", f.path.display(), f.format),
            SourceConfig::Generator(g) => format!("generator ({} series)", g.series),
            SourceConfig::PrometheusScrape(c) => format!(
                "prometheus scrape of {} targets every {:?}",
                c.targets.len(),
                c.interval
            ),
            SourceConfig::RemoteWrite(c) => {
                format!("prometheus remote-write receiver on {}{}", c.listen, c.path)
            }
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(k) => format!(
                "kafka {} (group {}, topics {})",
                k.brokers,
                k.group_id,
                k.topics.join(",")
            ),
            #[cfg(feature = "redis")]
            SourceConfig::RedisPubsub(r) => {
                let url = r.redis.clone().unwrap_or_else(|| self.redis_connection());
                let mut subs = r.channels.clone();
                subs.extend(r.patterns.iter().cloned());
                format!("redis pub/sub {} ({})", url.redacted_url(), subs.join(","))
            }
            #[cfg(feature = "redis")]
            SourceConfig::RedisStream(r) => {
                let url = r.redis.clone().unwrap_or_else(|| self.redis_connection());
                format!(
                    "redis streams {} (group {}, streams {})",
                    url.redacted_url(),
                    r.group,
                    r.streams.join(",")
                )
            }
        };
        let detector = self
            .detector
            .as_ref()
            .map_or("none", |d| d.detector.type_name());
        let actions: Vec<&str> = self
            .actions
            .iter()
            .map(|a| match a {
                ActionConfig::Log(_) => "log",
                ActionConfig::Jsonl(_) => "jsonl",
                #[cfg(feature = "kafka")]
                ActionConfig::Kafka(_) => "kafka",
                #[cfg(feature = "redis")]
                ActionConfig::RedisPublish(_) => "redis_publish",
                #[cfg(feature = "redis")]
                ActionConfig::RedisStream(_) => "redis_stream",
                #[cfg(feature = "redis")]
                ActionConfig::RedisCache(_) => "redis_cache",
            })
            .collect();
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

/// `table[key]` as a list of `(path, item)`: an array of tables, or one table.
fn array_of<'a>(
    table: &'a toml::Table,
    key: &str,
    errors: &mut Vec<ConfigError>,
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
            errors.push(
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

/// Splits a tagged table into its `type` and the remaining fields.
fn tagged(
    value: &toml::Value,
    path: &str,
    types: &[&str],
    errors: &mut Vec<ConfigError>,
) -> Option<(String, toml::Value)> {
    let Some(table) = value.as_table() else {
        errors.push(ConfigError::new(
            path,
            format!("expected a table, found a {}", value.type_str()),
        ));
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
            errors.push(ConfigError::new(
                format!("{path}.type"),
                format!("expected a string, found a {}", other.type_str()),
            ));
            return None;
        }
        None => {
            errors.push(
                ConfigError::new(format!("{path}.type"), "missing field")
                    .hint(format!("one of {choices}")),
            );
            return None;
        }
    };
    if !types.contains(&kind.as_str()) {
        let mut e = ConfigError::new(format!("{path}.type"), format!("unknown type \"{kind}\""));
        e = e.hint(match suggest(&kind, types) {
            Some(s) => format!("did you mean \"{s}\"? valid types: {choices}"),
            None => format!("valid types: {choices}"),
        });
        errors.push(e);
        return None;
    }
    let mut rest = table.clone();
    rest.remove("type");
    Some((kind, toml::Value::Table(rest)))
}

fn parse_source(value: &toml::Value, errors: &mut Vec<ConfigError>) -> Option<SourceConfig> {
    let (kind, rest) = tagged(
        value,
        "source",
        &[
            "file",
            "generator",
            "prometheus_scrape",
            "remote_write",
            "kafka",
            "redis_pubsub",
            "redis_stream",
        ],
        errors,
    )?;
    match kind.as_str() {
        "file" => deserialize_at(rest, "source", errors).map(SourceConfig::File),
        "generator" => deserialize_at(rest, "source", errors).map(SourceConfig::Generator),
        "prometheus_scrape" => {
            deserialize_at(rest, "source", errors).map(SourceConfig::PrometheusScrape)
        }
        "remote_write" => deserialize_at(rest, "source", errors).map(SourceConfig::RemoteWrite),
        #[cfg(feature = "kafka")]
        "kafka" => deserialize_at(rest, "source", errors).map(SourceConfig::Kafka),
        #[cfg(feature = "redis")]
        "redis_pubsub" => deserialize_at(rest, "source", errors).map(SourceConfig::RedisPubsub),
        #[cfg(feature = "redis")]
        "redis_stream" => deserialize_at(rest, "source", errors).map(SourceConfig::RedisStream),
        other => {
            errors.push(not_built("source.type", other));
            None
        }
    }
}

/// A component this build was compiled without.
fn not_built(path: &str, kind: &str) -> ConfigError {
    let feature = if kind.starts_with("redis") {
        "redis"
    } else {
        kind
    };
    ConfigError::new(path, format!("this build has no \"{kind}\" support")).hint(format!(
        "rebuild with the `{feature}` cargo feature (the smartcloudops binary has it)"
    ))
}

fn parse_dead_letter(
    value: &toml::Value,
    errors: &mut Vec<ConfigError>,
) -> Option<DeadLetterConfig> {
    /// `type = "log"` takes no other field.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LogFields {}
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FileFields {
        path: PathBuf,
    }
    let (kind, rest) = tagged(value, "dead_letter", &["log", "file"], errors)?;
    match kind.as_str() {
        "log" => {
            deserialize_at::<LogFields>(rest, "dead_letter", errors).map(|_| DeadLetterConfig::Log)
        }
        _ => deserialize_at::<FileFields>(rest, "dead_letter", errors)
            .map(|f| DeadLetterConfig::File { path: f.path }),
    }
}

/// The schema a prep stage other than `sql` emits for batches of `input`.
fn prep_output_schema(
    p: &PrepConfig,
    input: arrow::datatypes::SchemaRef,
) -> arrow::datatypes::SchemaRef {
    match p {
        PrepConfig::Filter(_) => input,
        PrepConfig::Window(_) => crate::prep::window::window_schema(),
        PrepConfig::Resample(_) => crate::schema::metrics_schema(),
        #[cfg(feature = "sql")]
        PrepConfig::Sql(_) => input,
    }
}

fn parse_prep(
    value: &toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<PrepConfig> {
    let (kind, rest) = tagged(
        value,
        path,
        &["filter", "window", "resample", "sql"],
        errors,
    )?;
    match kind.as_str() {
        "window" => deserialize_at(rest, path, errors).map(PrepConfig::Window),
        "resample" => deserialize_at(rest, path, errors).map(PrepConfig::Resample),
        #[cfg(feature = "sql")]
        "sql" => deserialize_at(rest, path, errors).map(PrepConfig::Sql),
        #[cfg(not(feature = "sql"))]
        "sql" => {
            errors.push(not_built(&format!("{path}.type"), "sql"));
            None
        }
        _ => deserialize_at(rest, path, errors).map(PrepConfig::Filter),
    }
}

fn parse_detector(value: &toml::Value, errors: &mut Vec<ConfigError>) -> Option<DetectorSection> {
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
    let (kind, mut rest) = tagged(value, "detector", &DETECTOR_TYPES, errors)?;
    let mut state = toml::Table::new();
    if let toml::Value::Table(t) = &mut rest {
        for key in ["max_series", "snapshot", "snapshot_interval", "redis_state"] {
            if let Some(v) = t.remove(key) {
                state.insert(key.to_owned(), v);
            }
        }
    }
    #[cfg(not(feature = "redis"))]
    if state.remove("redis_state").is_some() {
        errors.push(not_built("detector.redis_state", "redis"));
    }
    let state: Option<StateFields> = deserialize_at(toml::Value::Table(state), "detector", errors);
    let path = "detector";
    let detector = match kind.as_str() {
        "ewma" => deserialize_at(rest, path, errors).map(DetectorConfig::Ewma),
        "mad" => deserialize_at(rest, path, errors).map(DetectorConfig::Mad),
        "seasonal" => deserialize_at(rest, path, errors).map(DetectorConfig::Seasonal),
        "cusum" => deserialize_at(rest, path, errors).map(DetectorConfig::Cusum),
        "hst" => deserialize_at(rest, path, errors).map(DetectorConfig::Hst),
        "threshold" => deserialize_at(rest, path, errors).map(DetectorConfig::Threshold),
        "fast" => deserialize_at(rest, path, errors).map(DetectorConfig::Fast),
        "precise" => deserialize_at(rest, path, errors).map(DetectorConfig::Precise),
        _ => {
            // Over the `precise` preset; `enabled = false` in a part's table removes it.
            let over = match rest {
                toml::Value::Table(t) => t,
                _ => toml::Table::new(),
            };
            let (merged, disabled) = Preset::Precise.config().overlay(over);
            deserialize_at::<EnsembleConfig>(toml::Value::Table(merged), path, errors).and_then(
                |mut c| {
                    for part in &disabled {
                        if !c.disable(part) {
                            errors.push(
                                ConfigError::new(format!("{path}.{part}.enabled"), "unknown part")
                                    .hint("parts: ewma, mad, seasonal, cusum, hst, context, range_novelty"),
                            );
                            return None;
                        }
                    }
                    Some(DetectorConfig::Ensemble(Box::new(c)))
                },
            )
        }
    }?;
    let state = state?;
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

fn parse_action(
    value: &toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<ActionConfig> {
    let (kind, rest) = tagged(
        value,
        path,
        &[
            "log",
            "jsonl",
            "kafka",
            "redis_publish",
            "redis_stream",
            "redis_cache",
        ],
        errors,
    )?;
    match kind.as_str() {
        "log" => deserialize_at(rest, path, errors).map(ActionConfig::Log),
        "jsonl" => deserialize_at(rest, path, errors).map(ActionConfig::Jsonl),
        #[cfg(feature = "kafka")]
        "kafka" => deserialize_at(rest, path, errors).map(ActionConfig::Kafka),
        #[cfg(feature = "redis")]
        "redis_publish" => deserialize_at(rest, path, errors).map(ActionConfig::RedisPublish),
        #[cfg(feature = "redis")]
        "redis_stream" => deserialize_at(rest, path, errors).map(ActionConfig::RedisStream),
        #[cfg(feature = "redis")]
        "redis_cache" => deserialize_at(rest, path, errors).map(ActionConfig::RedisCache),
        other => {
            errors.push(not_built(&format!("{path}.type"), other));
            None
        }
    }
}

/// Deserializes `value` as `T`, recording an error with the full field path on failure.
fn deserialize_at<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            // toml appends "\nin `field`"; the path already says where.
            let message = e.inner().to_string();
            let message = message.lines().next().unwrap_or_default().to_owned();
            let mut full = if inner == "." || inner.is_empty() {
                path.to_owned()
            } else {
                format!("{path}.{inner}")
            };
            // serde names unknown and missing fields only in its message; put them in the path
            // (and suggest the closest known field).
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field)
            {
                errors.push(ConfigError::new(format!("{full}.{field}"), "missing field"));
            } else if let Some((field, expected)) = parse_unknown_field(&message) {
                if !full.ends_with(&format!(".{field}")) {
                    full = format!("{full}.{field}");
                }
                let known: Vec<&str> = expected.iter().map(String::as_str).collect();
                let hint = match suggest(&field, &known) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None if known.is_empty() => "this table takes no fields".to_owned(),
                    None => format!("known fields: {}", known.join(", ")),
                };
                errors.push(ConfigError::new(full, "unknown field").hint(hint));
            } else {
                errors.push(ConfigError::new(full, message));
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

fn unknown_key(path: &str, key: &str, known: &[&str]) -> ConfigError {
    let e = ConfigError::new(path, "unknown section");
    match suggest(key, known) {
        Some(s) => e.hint(format!("did you mean `{s}`?")),
        None => e.hint(format!("known sections: {}", known.join(", "))),
    }
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests;
