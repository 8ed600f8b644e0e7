//! The registry of component kinds: the one place that knows which `type` names exist.
//!
//! Central code (parsing, checking, building, summaries) asks the registry; it never matches
//! on kind names. A kind that needs a cargo feature this build lacks is still listed, so
//! `type = "kafka"` in a build without Kafka says so instead of "unknown type".
//!
//! An embedder adds their own kind the same way the built-in ones are listed:
//!
//! ```
//! use std::sync::Arc;
//! use smartcloudops_core::component::{BuildContext, ComponentConfig};
//! use smartcloudops_core::config::{PipelineConfig, Registry};
//! use smartcloudops_core::action::{Action, ActionConfig, LogAction, LogActionConfig};
//! use smartcloudops_core::{Problems, Result};
//!
//! /// `[[action]] type = "pager"`: prints alerts for a named rota.
//! #[derive(Debug, serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct PagerConfig {
//!     rota: String,
//! }
//!
//! impl ComponentConfig for PagerConfig {
//!     fn problems(&self) -> Problems {
//!         let mut p = Problems::new();
//!         p.check(!self.rota.is_empty(), "rota", "must not be empty", "e.g. \"infra\"");
//!         p
//!     }
//! }
//!
//! impl ActionConfig for PagerConfig {
//!     fn build(&self, _ctx: &BuildContext) -> Result<Arc<dyn Action>> {
//!         Ok(Arc::new(LogAction::new(LogActionConfig::default())))
//!     }
//! }
//!
//! let mut registry = Registry::builtin();
//! registry.action::<PagerConfig>("pager");
//!
//! let text = r#"
//!     [source]
//!     type = "generator"
//!     [[action]]
//!     type = "pager"
//!     rota = ""
//! "#;
//! let errors = PipelineConfig::parse_with(text, ".".as_ref(), |_| None, &registry).unwrap_err();
//! assert_eq!(errors.0[0].path, "action[0].rota");
//!
//! let config = PipelineConfig::parse_with(
//!     &text.replace("rota = \"\"", "rota = \"infra\""), ".".as_ref(), |_| None, &registry,
//! ).unwrap();
//! assert_eq!(config.actions[0].kind, "pager");
//! ```

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::action::ActionConfig;
use crate::component::{parse_table, split_tagged};
use crate::detector::DetectorConfig;
use crate::error::{ConfigError, Problems};
use crate::prep::PrepConfig;
use crate::source::SourceConfig;

/// Parses a kind's table (its `type` already removed) into its config, recording problems
/// under `path`.
pub type ParseFn<T> = Arc<dyn Fn(toml::Value, &str, &mut Problems) -> Option<Box<T>> + Send + Sync>;

/// One kind of component: its `type` name and how to parse it, or the cargo feature this
/// build lacks for it.
pub struct Kind<T: ?Sized> {
    name: String,
    parse: Result<ParseFn<T>, &'static str>,
}

impl<T: ?Sized> Clone for Kind<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            parse: self.parse.clone(),
        }
    }
}

impl<T: ?Sized> fmt::Debug for Kind<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Kind");
        d.field("name", &self.name);
        if let Err(feature) = &self.parse {
            d.field("needs_feature", feature);
        }
        d.finish()
    }
}

/// A parsed component: its `type` name and its configuration.
#[derive(Debug)]
pub struct Component<T: ?Sized> {
    /// The `type` it was listed under, e.g. `file`.
    pub kind: String,
    /// Its configuration.
    pub config: Box<T>,
}

macro_rules! downcast {
    ($($stage:ident),*) => {$(
        impl Component<dyn $stage> {
            /// The configuration as its concrete type, if it is a `C`.
            pub fn downcast_ref<C: 'static>(&self) -> Option<&C> {
                let any: &dyn std::any::Any = &*self.config;
                any.downcast_ref()
            }
        }
    )*};
}
downcast!(SourceConfig, PrepConfig, DetectorConfig, ActionConfig);

/// Which stage a kind belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `[source]`.
    Source,
    /// `[[prep]]`.
    Prep,
    /// `[detector]`.
    Detector,
    /// `[[action]]`.
    Action,
}

/// The kinds of every stage. [`Registry::builtin`] lists this crate's; embedders add theirs.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    sources: Vec<Kind<dyn SourceConfig>>,
    preps: Vec<Kind<dyn PrepConfig>>,
    detectors: Vec<Kind<dyn DetectorConfig>>,
    actions: Vec<Kind<dyn ActionConfig>>,
}

/// Inserts `kind`, replacing one of the same name (an embedder may override a built-in).
fn insert<T: ?Sized>(kinds: &mut Vec<Kind<T>>, kind: Kind<T>) {
    match kinds.iter_mut().find(|k| k.name == kind.name) {
        Some(existing) => *existing = kind,
        None => kinds.push(kind),
    }
}

/// Lists a built-in kind that needs a cargo feature: registered when the feature is on,
/// listed as "not in this build" otherwise. One line per kind.
macro_rules! gated {
    ($registry:ident, $feature:literal, $stage:ident, $name:literal, $config:ty) => {
        #[cfg(feature = $feature)]
        $registry.$stage::<$config>($name);
        #[cfg(not(feature = $feature))]
        $registry.not_built(gated!(@stage $stage), $name, $feature);
    };
    (@stage source) => { Stage::Source };
    (@stage prep) => { Stage::Prep };
    (@stage action) => { Stage::Action };
}

impl Registry {
    /// A registry without any kind.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Every kind this crate ships, those of disabled cargo features listed as unavailable.
    pub fn builtin() -> Self {
        use crate::detector::ensemble::Preset;
        use crate::detector::preset::{PresetDetectorConfig, parse_ensemble};

        let mut r = Self::empty();
        r.source::<crate::source::FileSourceConfig>("file");
        r.source::<crate::source::GeneratorConfig>("generator");
        r.source::<crate::source::ScrapeConfig>("prometheus_scrape");
        r.source::<crate::source::RemoteWriteConfig>("remote_write");
        gated!(
            r,
            "kafka",
            source,
            "kafka",
            crate::source::KafkaSourceConfig
        );
        gated!(
            r,
            "redis",
            source,
            "redis_pubsub",
            crate::source::RedisPubSubSourceConfig
        );
        gated!(
            r,
            "redis",
            source,
            "redis_stream",
            crate::source::RedisStreamSourceConfig
        );

        r.prep::<crate::prep::MetricFilterConfig>("filter");
        r.prep::<crate::prep::WindowConfig>("window");
        r.prep::<crate::prep::ResampleConfig>("resample");
        gated!(r, "sql", prep, "sql", crate::prep::SqlConfig);

        r.detector::<crate::detector::EwmaConfig>("ewma");
        r.detector::<crate::detector::mad::MadConfig>("mad");
        r.detector::<crate::detector::seasonal::SeasonalConfig>("seasonal");
        r.detector::<crate::detector::cusum::CusumConfig>("cusum");
        r.detector::<crate::detector::hst::HstConfig>("hst");
        r.detector::<crate::detector::ThresholdConfig>("threshold");
        r.detector_with("fast", |v, path, p| {
            PresetDetectorConfig::parse(Preset::Fast, v, path, p)
        });
        r.detector_with("precise", |v, path, p| {
            PresetDetectorConfig::parse(Preset::Precise, v, path, p)
        });
        r.detector_with("ensemble", parse_ensemble);

        r.action::<crate::action::LogActionConfig>("log");
        r.action::<crate::action::JsonlActionConfig>("jsonl");
        gated!(r, "kafka", action, "kafka", crate::action::KafkaSinkConfig);
        gated!(
            r,
            "redis",
            action,
            "redis_publish",
            crate::action::RedisPublishConfig
        );
        gated!(
            r,
            "redis",
            action,
            "redis_stream",
            crate::action::RedisStreamSinkConfig
        );
        gated!(
            r,
            "redis",
            action,
            "redis_cache",
            crate::action::ResultCacheConfig
        );
        r
    }

    /// Lists the source kind `name` with config `C`, parsed by serde.
    pub fn source<C: SourceConfig + DeserializeOwned>(&mut self, name: &str) -> &mut Self {
        self.source_with(name, |v, path, p| {
            parse_table::<C>(v, path, p).map(|c| Box::new(c) as Box<dyn SourceConfig>)
        })
    }

    /// Lists the source kind `name` with a parser of its own.
    pub fn source_with(
        &mut self,
        name: &str,
        parse: impl Fn(toml::Value, &str, &mut Problems) -> Option<Box<dyn SourceConfig>>
        + Send
        + Sync
        + 'static,
    ) -> &mut Self {
        insert(
            &mut self.sources,
            Kind {
                name: name.to_owned(),
                parse: Ok(Arc::new(parse)),
            },
        );
        self
    }

    /// Lists the prep kind `name` with config `C`, parsed by serde.
    pub fn prep<C: PrepConfig + DeserializeOwned>(&mut self, name: &str) -> &mut Self {
        self.prep_with(name, |v, path, p| {
            parse_table::<C>(v, path, p).map(|c| Box::new(c) as Box<dyn PrepConfig>)
        })
    }

    /// Lists the prep kind `name` with a parser of its own.
    pub fn prep_with(
        &mut self,
        name: &str,
        parse: impl Fn(toml::Value, &str, &mut Problems) -> Option<Box<dyn PrepConfig>>
        + Send
        + Sync
        + 'static,
    ) -> &mut Self {
        insert(
            &mut self.preps,
            Kind {
                name: name.to_owned(),
                parse: Ok(Arc::new(parse)),
            },
        );
        self
    }

    /// Lists the detector kind `name` with config `C`, parsed by serde.
    pub fn detector<C: DetectorConfig + DeserializeOwned>(&mut self, name: &str) -> &mut Self {
        self.detector_with(name, |v, path, p| {
            parse_table::<C>(v, path, p).map(|c| Box::new(c) as Box<dyn DetectorConfig>)
        })
    }

    /// Lists the detector kind `name` with a parser of its own.
    pub fn detector_with(
        &mut self,
        name: &str,
        parse: impl Fn(toml::Value, &str, &mut Problems) -> Option<Box<dyn DetectorConfig>>
        + Send
        + Sync
        + 'static,
    ) -> &mut Self {
        insert(
            &mut self.detectors,
            Kind {
                name: name.to_owned(),
                parse: Ok(Arc::new(parse)),
            },
        );
        self
    }

    /// Lists the action kind `name` with config `C`, parsed by serde.
    pub fn action<C: ActionConfig + DeserializeOwned>(&mut self, name: &str) -> &mut Self {
        self.action_with(name, |v, path, p| {
            parse_table::<C>(v, path, p).map(|c| Box::new(c) as Box<dyn ActionConfig>)
        })
    }

    /// Lists the action kind `name` with a parser of its own.
    pub fn action_with(
        &mut self,
        name: &str,
        parse: impl Fn(toml::Value, &str, &mut Problems) -> Option<Box<dyn ActionConfig>>
        + Send
        + Sync
        + 'static,
    ) -> &mut Self {
        insert(
            &mut self.actions,
            Kind {
                name: name.to_owned(),
                parse: Ok(Arc::new(parse)),
            },
        );
        self
    }

    /// Lists `name` as a kind of `stage` this build lacks: using it is an error that names
    /// the cargo `feature` to build with.
    pub fn not_built(&mut self, stage: Stage, name: &str, feature: &'static str) -> &mut Self {
        let name = name.to_owned();
        match stage {
            Stage::Source => insert(
                &mut self.sources,
                Kind {
                    name,
                    parse: Err(feature),
                },
            ),
            Stage::Prep => insert(
                &mut self.preps,
                Kind {
                    name,
                    parse: Err(feature),
                },
            ),
            Stage::Detector => insert(
                &mut self.detectors,
                Kind {
                    name,
                    parse: Err(feature),
                },
            ),
            Stage::Action => insert(
                &mut self.actions,
                Kind {
                    name,
                    parse: Err(feature),
                },
            ),
        }
        self
    }

    /// The `type` names of `stage`, in the order they were listed.
    pub fn kinds(&self, stage: Stage) -> Vec<&str> {
        fn names<T: ?Sized>(kinds: &[Kind<T>]) -> Vec<&str> {
            kinds.iter().map(|k| k.name.as_str()).collect()
        }
        match stage {
            Stage::Source => names(&self.sources),
            Stage::Prep => names(&self.preps),
            Stage::Detector => names(&self.detectors),
            Stage::Action => names(&self.actions),
        }
    }

    pub(super) fn parse_source(
        &self,
        value: &toml::Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<Component<dyn SourceConfig>> {
        parse_kind(&self.sources, value, path, problems)
    }

    pub(super) fn parse_prep(
        &self,
        value: &toml::Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<Component<dyn PrepConfig>> {
        parse_kind(&self.preps, value, path, problems)
    }

    pub(super) fn parse_detector(
        &self,
        value: &toml::Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<Component<dyn DetectorConfig>> {
        parse_kind(&self.detectors, value, path, problems)
    }

    pub(super) fn parse_action(
        &self,
        value: &toml::Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<Component<dyn ActionConfig>> {
        parse_kind(&self.actions, value, path, problems)
    }
}

/// Splits `type` off `value`, finds its kind and parses the rest with it.
fn parse_kind<T: ?Sized>(
    kinds: &[Kind<T>],
    value: &toml::Value,
    path: &str,
    problems: &mut Problems,
) -> Option<Component<T>> {
    let names: Vec<&str> = kinds.iter().map(|k| k.name.as_str()).collect();
    let (name, rest) = split_tagged(value, path, &names, problems)?;
    let kind = kinds.iter().find(|k| k.name == name)?;
    match &kind.parse {
        Ok(parse) => parse(rest, path, problems).map(|config| Component { kind: name, config }),
        Err(feature) => {
            problems.add(
                ConfigError::new(
                    format!("{path}.type"),
                    format!("this build has no \"{name}\" support"),
                )
                .hint(format!(
                    "rebuild with the `{feature}` cargo feature (the smartcloudops binary has it)"
                )),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_kinds_are_listed_whatever_the_features() {
        let r = Registry::builtin();
        for (stage, name) in [
            (Stage::Source, "kafka"),
            (Stage::Source, "redis_stream"),
            (Stage::Prep, "sql"),
            (Stage::Detector, "precise"),
            (Stage::Action, "redis_cache"),
        ] {
            assert!(r.kinds(stage).contains(&name), "{stage:?} {name}");
        }
    }

    #[test]
    fn a_kind_registered_again_replaces_the_first() {
        let mut r = Registry::builtin();
        let before = r.kinds(Stage::Source).len();
        r.not_built(Stage::Source, "file", "files");
        assert_eq!(r.kinds(Stage::Source).len(), before);
        let value: toml::Value = toml::from_str("type = \"file\"\npath = \"x\"").unwrap();
        let mut problems = Problems::new();
        assert!(r.parse_source(&value, "source", &mut problems).is_none());
        assert_eq!(
            problems.iter().next().unwrap().to_string(),
            "source.type: this build has no \"file\" support (hint: rebuild with the `files` cargo feature (the smartcloudops binary has it))"
        );
    }
}
