//! Robust z-score: a streaming median and median absolute deviation (MAD) per series.
//!
//! A true running median needs a window of values; this one is the O(1) stochastic
//! approximation of a quantile (the estimate moves a small step toward each new value, so it
//! settles where half the values lie on each side). The MAD is tracked the same way on
//! `|x − median|`, with multiplicative steps so it stays positive. One outlier moves either
//! estimate by one small step only, which is what makes the score robust where a mean and a
//! variance are not. State: 24 bytes.
//!
//! - **Warm-up**: the first `warmup` rows seed the estimates with a plain mean and mean
//!   absolute deviation (the stochastic steps need a sensible start) and are never flagged.
//! - **Score**: `z = |x − median| / (1.4826 × MAD)`, 1.4826 scaling MAD to a normal sd; the
//!   scale has a floor of `min_scale_ratio × |median|` so a flat series does not alert on jitter.

use serde::{Deserialize, Serialize};

use super::keyed::{DEFAULT_MAX_SERIES, KeyedDetector, SeriesModel};
use super::{Problems, Verdict};

/// Configuration of the median/MAD detector (`[detector] type = "mad"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MadConfig {
    /// Step size of the median and MAD estimates, relative to the scale, in `(0, 1)`.
    pub rate: f64,
    /// Anomaly threshold in robust standard deviations.
    pub threshold: f64,
    /// Rows per series learned before any alert.
    pub warmup: u32,
    /// Floor of the scale, relative to the median's magnitude.
    pub min_scale_ratio: f64,
}

impl Default for MadConfig {
    fn default() -> Self {
        Self {
            rate: 0.05,
            threshold: 5.0,
            warmup: 30,
            min_scale_ratio: 0.001,
        }
    }
}

impl MadConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> Problems {
        Problems::new()
            .require(
                self.rate > 0.0 && self.rate < 1.0,
                "rate",
                format!("must be in (0, 1), got {}", self.rate),
            )
            .positive("threshold", self.threshold)
            .non_negative("min_scale_ratio", self.min_scale_ratio)
    }
}

/// The state of one series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MadState {
    median: f64,
    mad: f64,
    count: u32,
}

/// A robust deviation: `|x − median| / scale`, with the estimates before the row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RobustDeviation {
    /// Robust z-score.
    pub z: f64,
    /// The median before the row.
    pub median: f64,
    /// The (floored) scale, `1.4826 × MAD`.
    pub scale: f64,
}

impl MadState {
    /// The median estimate.
    pub fn median(&self) -> f64 {
        self.median
    }

    /// The floored scale.
    pub fn scale(&self, config: &MadConfig) -> f64 {
        (1.4826 * self.mad)
            .max(config.min_scale_ratio * self.median.abs())
            .max(1e-9)
    }

    /// Scores `x`, then learns from it; `None` while warming up or for a non-finite `x`.
    pub fn step(&mut self, config: &MadConfig, x: f64) -> Option<RobustDeviation> {
        if !x.is_finite() {
            return None;
        }
        self.count = self.count.saturating_add(1);
        let n = f64::from(self.count);
        if self.count <= config.warmup.max(1) {
            let dev = (x - self.median).abs();
            self.median += (x - self.median) / n;
            self.mad += (dev - self.mad) / n;
            return None;
        }
        let scale = self.scale(config);
        let diff = x - self.median;
        let seen = RobustDeviation {
            z: diff.abs() / scale,
            median: self.median,
            scale,
        };
        let step = (config.rate * scale).min(diff.abs());
        self.median += step.copysign(diff);
        let dev = diff.abs();
        if self.mad <= 0.0 {
            self.mad = config.rate * dev;
        } else if dev > self.mad {
            self.mad *= 1.0 + config.rate;
        } else {
            self.mad *= 1.0 - config.rate;
        }
        if !(self.median.is_finite() && self.mad.is_finite()) {
            *self = MadState::default();
        }
        Some(seen)
    }
}

impl SeriesModel for MadState {
    type Params = MadConfig;

    fn new(_: &MadConfig) -> Self {
        Self::default()
    }

    fn observe(&mut self, config: &MadConfig, _ts_ms: i64, x: f64) -> Verdict {
        match self.step(config, x) {
            Some(d) => Verdict::from_z(d.z, d.median, d.scale, config.threshold),
            None => Verdict::NONE,
        }
    }
}

/// The median/MAD detector. See the [module docs](self).
pub type MadDetector = KeyedDetector<MadState>;

impl KeyedDetector<MadState> {
    /// A detector holding up to `max_series` series.
    pub fn new(config: MadConfig, max_series: usize) -> Self {
        Self::from_parts("mad", &config.clone(), Vec::new(), config, max_series)
    }

    /// A detector with the default series cap.
    pub fn with_config(config: MadConfig) -> Self {
        Self::new(config, DEFAULT_MAX_SERIES)
    }
}

impl crate::component::ComponentConfig for MadConfig {
    fn problems(&self) -> crate::error::Problems {
        MadConfig::problems(self)
    }
}

impl super::DetectorConfig for MadConfig {
    fn build(
        &self,
        _ctx: &crate::component::BuildContext,
        max_series: usize,
    ) -> crate::error::Result<Box<dyn super::Detector>> {
        Ok(Box::new(MadDetector::new(self.clone(), max_series)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(config: &MadConfig, values: &[f64]) -> Vec<Verdict> {
        let mut s = MadState::default();
        values.iter().map(|&x| s.observe(config, 0, x)).collect()
    }

    #[test]
    fn the_median_ignores_outliers_that_would_drag_a_mean() {
        let config = MadConfig::default();
        let mut values: Vec<f64> = (0..2000).map(|i| 10.0 + (i % 5) as f64).collect();
        for i in (100..2000).step_by(10) {
            values[i] = 1e6; // 10 % gross outliers
        }
        let mut s = MadState::default();
        for &x in &values {
            s.step(&config, x);
        }
        assert!((s.median - 12.0).abs() < 1.5, "median {}", s.median);
        let v = run(&config, &values);
        assert!(v[1990].is_anomaly && !v[1991].is_anomaly);
    }

    proptest! {
        #[test]
        fn scores_stay_in_the_unit_interval(values in proptest::collection::vec(
            prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), -1e6..1e6f64], 1..300)) {
            for v in run(&MadConfig { warmup: 3, ..MadConfig::default() }, &values) {
                prop_assert!((0.0..=1.0).contains(&v.score));
            }
        }

        #[test]
        fn a_constant_series_never_alerts(c in -1e9..1e9f64, n in 1usize..300) {
            prop_assert!(run(&MadConfig::default(), &vec![c; n]).iter().all(|v| !v.is_anomaly));
        }
    }
}
