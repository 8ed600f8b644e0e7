//! EWMA z-score: an exponentially weighted mean and variance per series.
//!
//! For each series the detector keeps `mean`, `var` and a count ([`EwmaState`], 24 bytes). A row scores by
//! its distance from the mean in standard deviations, `z = |x − mean| / sd`, *before* the row
//! updates the state (strictly online). `score = erf(z / √2)`, the probability mass of a
//! normal distribution within `z` sigmas; a row is anomalous when `z ≥ threshold`.
//!
//! - **Warm-up**: the first `warmup` rows of a series learn only (score 0, never anomalous);
//!   meanwhile the weight is `max(alpha, 1/n)`, so the mean starts as a plain average.
//! - **Robust update**: the deviation used to update is clipped at `threshold` sigmas
//!   (`2 × threshold` during warm-up, from the 6th row), so one spike cannot blow up the
//!   variance; a level shift is still learned within a few `1/alpha` rows.
//! - **Flat series**: `sd` has a floor of `min_sd_ratio × |mean|` (and 1e-9), so a constant
//!   series that moves by a meaningful amount is flagged while float jitter is not.
//! - **Non-finite values** (NaN, ±Inf) are not scored (score 0) and do not touch the state.

use serde::{Deserialize, Serialize};

use super::keyed::{DEFAULT_MAX_SERIES, KeyedDetector, SeriesModel};
use super::{Problems, Verdict};

/// Configuration of the [`EwmaDetector`] (`[detector] type = "ewma"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EwmaConfig {
    /// Weight of a new sample, in `(0, 1]`: about `2/alpha` rows of memory.
    pub alpha: f64,
    /// Anomaly threshold in standard deviations.
    pub threshold: f64,
    /// Rows per series learned before any alert.
    pub warmup: u32,
    /// Floor of the standard deviation, relative to the mean's magnitude.
    pub min_sd_ratio: f64,
}

impl EwmaConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid. The detector
    /// never panics on invalid values, but they make its scores meaningless.
    pub fn problems(&self) -> Problems {
        Problems::new()
            .weight("alpha", self.alpha)
            .positive("threshold", self.threshold)
            .non_negative("min_sd_ratio", self.min_sd_ratio)
    }
}

impl Default for EwmaConfig {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            threshold: 4.0,
            warmup: 30,
            min_sd_ratio: 0.001,
        }
    }
}

/// The state of one series: 24 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EwmaState {
    mean: f64,
    var: f64,
    count: u32,
}

/// What one observation looked like to an [`EwmaState`] before it learned from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deviation {
    /// `|x − mean| / sd`.
    pub z: f64,
    /// The mean before the row.
    pub mean: f64,
    /// The (floored) standard deviation before the row.
    pub sd: f64,
}

impl EwmaState {
    /// Whether the warm-up is over.
    pub fn is_warm(&self, config: &EwmaConfig) -> bool {
        self.count >= config.warmup.max(1)
    }

    /// Scores `x` against the state, then learns from it. `None` while warming up or for a
    /// non-finite `x` (which is not learned either).
    pub fn step(&mut self, config: &EwmaConfig, x: f64) -> Option<Deviation> {
        if !x.is_finite() {
            return None;
        }
        if self.count == 0 {
            *self = EwmaState {
                mean: x,
                var: 0.0,
                count: 1,
            };
            return None;
        }
        let sd = self.sd(config);
        let diff = x - self.mean;
        let warm = self.count >= config.warmup;
        let seen = warm.then_some(Deviation {
            z: diff.abs() / sd,
            mean: self.mean,
            sd,
        });
        let alpha = if warm {
            config.alpha
        } else {
            config.alpha.max(1.0 / f64::from(self.count + 1))
        };
        // Clip the update so one outlier cannot swamp the variance; looser while warming up,
        // and not at all for the first few rows, when `sd` means little yet.
        let clip = if warm {
            config.threshold * sd
        } else if self.count >= 5 {
            2.0 * config.threshold * sd
        } else {
            f64::INFINITY
        };
        // `max(0.0)` also maps a NaN clip (an invalid threshold) to 0 instead of panicking.
        let clip = clip.max(0.0);
        let step = diff.clamp(-clip, clip);
        let incr = alpha * step;
        self.mean += incr;
        self.var = (1.0 - alpha) * (self.var + step * incr);
        self.count = self.count.saturating_add(1);
        if !(self.mean.is_finite() && self.var.is_finite()) {
            // Overflow from extreme values: relearn rather than stay poisoned forever.
            *self = EwmaState::default();
        }
        seen
    }

    /// Moves the mean to `x` (a change point), keeping the variance and the count.
    pub fn rebase(&mut self, x: f64) {
        if x.is_finite() {
            self.mean = x;
        }
    }

    /// The mean learned so far.
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// The standard deviation, floored by `min_sd_ratio × |mean|` and 1e-9.
    pub fn sd(&self, config: &EwmaConfig) -> f64 {
        self.var
            .sqrt()
            .max(config.min_sd_ratio * self.mean.abs())
            .max(1e-9)
    }

    fn band(&self, config: &EwmaConfig) -> Verdict {
        if !self.is_warm(config) {
            return Verdict::NONE;
        }
        let sd = self.sd(config);
        Verdict {
            expected: self.mean,
            lower: self.mean - config.threshold * sd,
            upper: self.mean + config.threshold * sd,
            ..Verdict::NONE
        }
    }
}

impl SeriesModel for EwmaState {
    type Params = EwmaConfig;

    fn new(_: &EwmaConfig) -> Self {
        Self::default()
    }

    fn observe(&mut self, config: &EwmaConfig, _ts_ms: i64, x: f64) -> Verdict {
        match self.step(config, x) {
            Some(d) => Verdict::from_z(d.z, d.mean, d.sd, config.threshold),
            None => self.band(config),
        }
    }
}

/// The EWMA z-score detector. See the [module docs](self).
pub type EwmaDetector = KeyedDetector<EwmaState>;

impl KeyedDetector<EwmaState> {
    /// A detector with no state yet, holding up to [`DEFAULT_MAX_SERIES`] series.
    pub fn new(config: EwmaConfig) -> Self {
        Self::with_max_series(config, DEFAULT_MAX_SERIES)
    }

    /// A detector holding up to `max_series` series.
    pub fn with_max_series(config: EwmaConfig, max_series: usize) -> Self {
        Self::from_parts("ewma", &config.clone(), Vec::new(), config, max_series)
    }
}

impl crate::component::ComponentConfig for EwmaConfig {
    fn problems(&self) -> crate::error::Problems {
        let hints = [
            ("alpha", "0.05 remembers about 40 samples"),
            ("threshold", "in standard deviations, e.g. 4"),
        ];
        let mut problems = crate::error::Problems::new();
        for e in EwmaConfig::problems(self) {
            let hint = hints
                .iter()
                .find(|(f, _)| *f == e.path)
                .map_or("", |(_, h)| *h);
            problems.check(false, e.path, e.message, hint);
        }
        problems
    }
}

impl super::DetectorConfig for EwmaConfig {
    fn build(
        &self,
        _ctx: &crate::component::BuildContext,
        max_series: usize,
    ) -> crate::error::Result<Box<dyn super::Detector>> {
        Ok(Box::new(EwmaDetector::with_max_series(
            self.clone(),
            max_series,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::Detector;
    use crate::schema::{MetricsBatchBuilder, ScoreColumns};
    use arrow::record_batch::RecordBatch;
    use proptest::prelude::*;

    fn batch(values: &[f64]) -> RecordBatch {
        let mut b = MetricsBatchBuilder::default();
        for (i, v) in values.iter().enumerate() {
            b.push(i as i64 * 1000, "cpu", &[("host", "a")], *v);
        }
        b.finish()
    }

    fn scores(d: &mut EwmaDetector, values: &[f64]) -> (Vec<f64>, Vec<bool>) {
        let out = d.score(&batch(values)).unwrap();
        let s = ScoreColumns::try_new(&out, "t").unwrap();
        (
            s.score.values().to_vec(),
            (0..out.num_rows()).map(|i| s.is_anomaly.value(i)).collect(),
        )
    }

    fn noisy(n: usize) -> Vec<f64> {
        // Deterministic pseudo-noise around 50 with sd ≈ 1.
        (0..n)
            .map(|i| 50.0 + ((i * 7919) % 17) as f64 / 8.0 - 1.0)
            .collect()
    }

    #[test]
    fn flags_a_spike_after_warmup_and_not_before() {
        let mut d = EwmaDetector::new(EwmaConfig::default());
        let mut values = noisy(100);
        values[5] = 500.0; // inside warm-up: learned, not flagged
        values[80] = 90.0;
        let (score, anomaly) = scores(&mut d, &values);
        assert!(!anomaly[5]);
        assert!(anomaly[80], "spike flagged");
        assert!(score[80] > 0.999);
        assert_eq!(anomaly.iter().filter(|a| **a).count(), 1, "{anomaly:?}");
    }

    #[test]
    fn a_level_shift_alerts_then_is_learned() {
        let mut d = EwmaDetector::new(EwmaConfig::default());
        let mut values = noisy(400);
        for v in &mut values[200..] {
            *v += 20.0;
        }
        let (_, anomaly) = scores(&mut d, &values);
        assert!(anomaly[200]);
        assert!(!anomaly[350..].iter().any(|a| *a), "new level learned");
    }

    #[test]
    fn series_are_independent() {
        let mut d = EwmaDetector::new(EwmaConfig::default());
        let mut b = MetricsBatchBuilder::default();
        for i in 0..100 {
            b.push(i, "cpu", &[("host", "a")], 10.0 + (i % 3) as f64);
            b.push(i, "cpu", &[("host", "b")], 1000.0 + (i % 3) as f64);
        }
        let out = d.score(&b.finish()).unwrap();
        let s = ScoreColumns::try_new(&out, "t").unwrap();
        assert_eq!(s.is_anomaly.true_count(), 0);
        assert_eq!(d.series_count(), 2);
        assert!(d.state_bytes() > 0);
        assert_eq!(s.detector(0), "ewma");
    }

    proptest! {
        #[test]
        fn scores_in_unit_interval_for_any_input(values in proptest::collection::vec(
            prop_oneof![
                any::<f64>(),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(0.0),
                -1e6..1e6f64,
            ],
            1..300,
        )) {
            let mut d = EwmaDetector::new(EwmaConfig { warmup: 3, ..EwmaConfig::default() });
            let (score, _) = scores(&mut d, &values);
            for s in score {
                prop_assert!((0.0..=1.0).contains(&s), "score {}", s);
            }
        }

        #[test]
        fn online_prefix_scores_equal_whole_series_scores(values in proptest::collection::vec(-1e3..1e3f64, 2..200), cut in 1usize..200) {
            let cut = cut.min(values.len() - 1);
            let mut whole = EwmaDetector::new(EwmaConfig { warmup: 5, ..EwmaConfig::default() });
            let (all, _) = scores(&mut whole, &values);
            let mut prefix = EwmaDetector::new(EwmaConfig { warmup: 5, ..EwmaConfig::default() });
            let (first, _) = scores(&mut prefix, &values[..cut]);
            prop_assert_eq!(&all[..cut], &first[..]);
        }

        #[test]
        fn state_carries_across_batches(values in proptest::collection::vec(-1e3..1e3f64, 2..200), cut in 1usize..200) {
            let cut = cut.min(values.len() - 1);
            let mut whole = EwmaDetector::new(EwmaConfig { warmup: 5, ..EwmaConfig::default() });
            let (all, _) = scores(&mut whole, &values);
            let mut split = EwmaDetector::new(EwmaConfig { warmup: 5, ..EwmaConfig::default() });
            let (mut first, _) = scores(&mut split, &values[..cut]);
            let (second, _) = scores(&mut split, &values[cut..]);
            first.extend(second);
            prop_assert_eq!(all, first);
        }

        #[test]
        fn invalid_configs_do_not_panic(threshold in prop_oneof![Just(f64::NAN), Just(-1.0), Just(0.0)], values in proptest::collection::vec(-1e3..1e3f64, 1..100)) {
            let mut d = EwmaDetector::new(EwmaConfig { threshold, warmup: 2, ..EwmaConfig::default() });
            let _ = scores(&mut d, &values);
        }

        #[test]
        fn constant_series_never_alerts(c in -1e9..1e9f64, n in 1usize..300) {
            let mut d = EwmaDetector::new(EwmaConfig::default());
            let (score, anomaly) = scores(&mut d, &vec![c; n]);
            prop_assert!(anomaly.iter().all(|a| !a));
            prop_assert!(score.iter().all(|s| *s == 0.0));
        }
    }
}
