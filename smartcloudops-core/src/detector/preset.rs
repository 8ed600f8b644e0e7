//! The `fast` and `precise` presets and custom ensembles as `[detector]` kinds.

use serde::{Deserialize, Serialize};

use super::ensemble::{EnsembleConfig, EnsembleDetector, Preset};
use super::{Detector, DetectorConfig};
use crate::component::{BuildContext, ComponentConfig, parse_table};
use crate::error::{Problems, Result};

/// Adjustments of a preset (`[detector] type = "fast"` or `"precise"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetConfig {
    /// 0 to 1: above 0.5 alerts more readily than the tuned default, below less.
    pub sensitivity: Option<f64>,
    /// The alert threshold on the score, overriding `sensitivity`.
    pub threshold: Option<f64>,
}

/// A preset with its adjustments: the `fast` and `precise` kinds.
#[derive(Debug, Clone, PartialEq)]
pub struct PresetDetectorConfig {
    /// Which preset.
    pub preset: Preset,
    /// The user's adjustments.
    pub adjust: PresetConfig,
}

impl PresetDetectorConfig {
    /// Parses a preset's table (`sensitivity`, `threshold`) for the registry.
    pub fn parse(
        preset: Preset,
        value: toml::Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<Box<dyn DetectorConfig>> {
        let adjust = parse_table::<PresetConfig>(value, path, problems)?;
        Some(Box::new(Self { preset, adjust }))
    }
}

impl ComponentConfig for PresetDetectorConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        if let Some(s) = self.adjust.sensitivity {
            p.check(
                (0.0..=1.0).contains(&s),
                "sensitivity",
                format!("must be between 0 and 1, got {s}"),
                "0.5 is the tuned default",
            );
        }
        if let Some(t) = self.adjust.threshold {
            p.check(
                t > 0.0 && t <= 1.0,
                "threshold",
                format!("must be in (0, 1], got {t}"),
                "",
            );
        }
        p
    }
}

impl DetectorConfig for PresetDetectorConfig {
    fn build(&self, ctx: &BuildContext, max_series: usize) -> Result<Box<dyn Detector>> {
        let _ = ctx;
        Ok(Box::new(EnsembleDetector::new(
            self.preset.name(),
            self.ensemble(),
            max_series,
        )))
    }

    fn ensemble_config(&self) -> Option<EnsembleConfig> {
        Some(self.ensemble())
    }
}

impl PresetDetectorConfig {
    /// The preset's ensemble with the sensitivity or threshold applied.
    pub fn ensemble(&self) -> EnsembleConfig {
        let mut config = self.preset.config();
        if let Some(s) = self.adjust.sensitivity {
            config.threshold = config.threshold_for_sensitivity(s);
        }
        if let Some(t) = self.adjust.threshold {
            config.threshold = t;
        }
        config
    }
}

/// Parses a custom ensemble (`type = "ensemble"`) over the `precise` preset: unset fields keep
/// the preset's values, and `enabled = false` in a part's table removes that part.
pub fn parse_ensemble(
    value: toml::Value,
    path: &str,
    problems: &mut Problems,
) -> Option<Box<dyn DetectorConfig>> {
    let over = match value {
        toml::Value::Table(t) => t,
        _ => toml::Table::new(),
    };
    let (merged, disabled) = Preset::Precise.config().overlay(over);
    let mut config = parse_table::<EnsembleConfig>(toml::Value::Table(merged), path, problems)?;
    for part in &disabled {
        if !config.disable(part) {
            problems.push_hint(
                format!("{path}.{part}.enabled"),
                "unknown part",
                "parts: ewma, mad, seasonal, cusum, hst, context, range_novelty",
            );
            return None;
        }
    }
    Some(Box::new(config))
}

impl ComponentConfig for EnsembleConfig {
    fn problems(&self) -> Problems {
        EnsembleConfig::problems(self)
    }
}

impl DetectorConfig for EnsembleConfig {
    fn build(&self, ctx: &BuildContext, max_series: usize) -> Result<Box<dyn Detector>> {
        let _ = ctx;
        Ok(Box::new(EnsembleDetector::new(
            "ensemble",
            self.clone(),
            max_series,
        )))
    }

    fn ensemble_config(&self) -> Option<EnsembleConfig> {
        Some(self.clone())
    }
}
