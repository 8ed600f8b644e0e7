//! Change-point detection: a two-sided CUSUM on a slowly learned baseline.
//!
//! Each row is standardised against a slow EWMA baseline, `z = (x − mean) / sd`. Two sums
//! accumulate evidence of a shift up and down, `S⁺ = max(0, S⁺ + z − k)` and
//! `S⁻ = max(0, S⁻ − z − k)`, where the drift `k` (in sds) absorbs ordinary noise. A level
//! shift of `δ` sds grows a sum by about `δ − k` per row, so it is found after `h / (δ − k)`
//! rows even when each row alone looks unremarkable — the case a z-score misses. When a sum
//! crosses `h` (the threshold) the baseline jumps to the new level and the sums restart, so
//! the detector fires once per shift rather than until the slow baseline catches up.
//! State: 48 bytes.

use serde::{Deserialize, Serialize};

use super::ewma::{EwmaConfig, EwmaState};
use super::keyed::{KeyedDetector, SeriesModel};
use super::{Problems, Verdict};

/// Configuration of the CUSUM detector (`[detector] type = "cusum"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CusumConfig {
    /// Weight of a new row in the baseline, in `(0, 1]`.
    pub alpha: f64,
    /// Drift `k`, in standard deviations: shifts smaller than this are ignored.
    pub drift: f64,
    /// Decision threshold `h`, in accumulated standard deviations.
    pub threshold: f64,
    /// Rows learned before any alert.
    pub warmup: u32,
}

impl Default for CusumConfig {
    fn default() -> Self {
        Self {
            alpha: 0.01,
            drift: 1.0,
            threshold: 12.0,
            warmup: 60,
        }
    }
}

impl CusumConfig {
    fn baseline(&self) -> EwmaConfig {
        EwmaConfig {
            alpha: self.alpha,
            // Clip the baseline's updates hard: the sums, not the baseline, follow a shift.
            threshold: 3.0,
            warmup: self.warmup,
            min_sd_ratio: 0.001,
        }
    }

    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> Problems {
        Problems::new()
            .weight("alpha", self.alpha)
            .non_negative("drift", self.drift)
            .positive("threshold", self.threshold)
    }
}

/// The state of one series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CusumState {
    baseline: EwmaState,
    up: f64,
    down: f64,
}

/// What the CUSUM saw in one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CusumReading {
    /// `max(S⁺, S⁻) / h`: 1 or more means a change point.
    pub level: f64,
    /// The baseline before the row.
    pub mean: f64,
    /// The baseline's standard deviation.
    pub sd: f64,
}

impl CusumState {
    /// Scores `x`, then learns from it; `None` while warming up or for a non-finite `x`.
    pub fn step(&mut self, config: &CusumConfig, x: f64) -> Option<CusumReading> {
        let baseline = config.baseline();
        let seen = self.baseline.step(&baseline, x)?;
        let z = (x - seen.mean) / seen.sd;
        self.up = (self.up + z - config.drift).max(0.0);
        self.down = (self.down - z - config.drift).max(0.0);
        let level = self.up.max(self.down) / config.threshold;
        if level >= 1.0 || !level.is_finite() {
            // A change point: restart on the new level, keeping the spread learned so far.
            self.baseline.rebase(x);
            self.up = 0.0;
            self.down = 0.0;
        }
        Some(CusumReading {
            level: if level.is_finite() { level } else { 1.0 },
            mean: seen.mean,
            sd: seen.sd,
        })
    }
}

impl SeriesModel for CusumState {
    type Params = CusumConfig;

    fn new(_: &CusumConfig) -> Self {
        Self::default()
    }

    fn observe(&mut self, config: &CusumConfig, _ts_ms: i64, x: f64) -> Verdict {
        match self.step(config, x) {
            Some(r) => Verdict {
                score: r.level.min(1.0),
                is_anomaly: r.level >= 1.0,
                expected: r.mean,
                lower: r.mean - 3.0 * r.sd,
                upper: r.mean + 3.0 * r.sd,
                ..Verdict::NONE
            },
            None => Verdict::NONE,
        }
    }
}

/// The CUSUM change-point detector. See the [module docs](self).
pub type CusumDetector = KeyedDetector<CusumState>;

impl KeyedDetector<CusumState> {
    /// A detector holding up to `max_series` series.
    pub fn new(config: CusumConfig, max_series: usize) -> Self {
        Self::from_parts("cusum", &config.clone(), Vec::new(), config, max_series)
    }
}

impl crate::component::ComponentConfig for CusumConfig {
    fn problems(&self) -> crate::error::Problems {
        CusumConfig::problems(self)
    }
}

impl super::DetectorConfig for CusumConfig {
    fn build(
        &self,
        _ctx: &crate::component::BuildContext,
        max_series: usize,
    ) -> crate::error::Result<Box<dyn super::Detector>> {
        Ok(Box::new(CusumDetector::new(self.clone(), max_series)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn noisy(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| 50.0 + ((i * 7919) % 17) as f64 / 8.0 - 1.0)
            .collect()
    }

    #[test]
    fn a_small_level_shift_is_found_once() {
        // A shift of about 1.5 sd: no single row is an outlier.
        let mut values = noisy(600);
        for v in &mut values[300..] {
            *v += 1.5;
        }
        let config = CusumConfig::default();
        let mut s = CusumState::default();
        let flags: Vec<bool> = values
            .iter()
            .map(|&x| s.observe(&config, 0, x).is_anomaly)
            .collect();
        let first = flags.iter().position(|f| *f).expect("shift found");
        assert!((300..340).contains(&first), "found at {first}");
        assert_eq!(flags.iter().filter(|f| **f).count(), 1, "once");
    }

    proptest! {
        #[test]
        fn scores_stay_in_the_unit_interval(values in proptest::collection::vec(
            prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::NEG_INFINITY), -1e6..1e6f64], 1..300)) {
            let config = CusumConfig { warmup: 3, ..CusumConfig::default() };
            let mut s = CusumState::default();
            for x in values {
                let v = s.observe(&config, 0, x);
                prop_assert!((0.0..=1.0).contains(&v.score));
            }
        }
    }
}
