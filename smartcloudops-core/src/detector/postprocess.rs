//! Score post-processing shared by every detector: anomaly likelihood and range novelty.
//!
//! **Anomaly likelihood** (after Numenta's, the part of HTM that earns most of its NAB
//! score) asks not "is this raw score high?" but "is it high *for this series*?". The raw
//! score is averaged over the last `average` rows; the averages' recent distribution is
//! fitted as a Gaussian (floors on mean and sd, so a quiet series does not turn every blip
//! into an alert); the output is the upper-tail probability of the current average, on a log
//! scale: `score = ln(tail + 1e-10) / ln(1e-10)`, so 0.5 means a one-in-100 000 average and 1
//! one in 10¹⁰. Two distributions are offered:
//! - [`LikelihoodMode::Window`]: the last `history` averages, refitted every `refit` rows —
//!   the better one; costs 4 bytes per remembered row.
//! - [`LikelihoodMode::Exponential`]: an exponentially weighted mean and variance with the
//!   same memory length — O(1), 40 bytes, slightly less sharp.
//!
//! **Range novelty** flags a value outside `[min − m, max + m]` of everything the series has
//! shown so far, with `m = margin × (max − min)`: a new extreme is worth a look whatever a
//! model says. A series that has been constant so far has no range to leave; its first move
//! is for the models to judge. 24 bytes; strictly online (the range is learned, never given).

use serde::{Deserialize, Serialize};
use statrs::function::erf::erfc;

use super::Problems;

/// How the likelihood remembers the distribution of averaged scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LikelihoodMode {
    /// A window of the last `history` averages, refitted every `refit` rows.
    Window,
    /// Exponentially weighted mean and variance over about `history` rows.
    Exponential,
}

/// Configuration of the anomaly likelihood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LikelihoodConfig {
    /// Distribution kept of the averaged scores.
    pub mode: LikelihoodMode,
    /// Rows of raw score averaged (1 to 16).
    pub average: u32,
    /// Rows of averaged scores the distribution describes.
    pub history: u32,
    /// Rows learned before the likelihood says anything (score 0 until then).
    pub learning: u32,
    /// Rows between refits of the windowed distribution.
    pub refit: u32,
    /// Floor of the distribution's mean.
    pub min_mean: f64,
    /// Floor of the distribution's standard deviation.
    pub min_sd: f64,
}

impl Default for LikelihoodConfig {
    fn default() -> Self {
        Self {
            mode: LikelihoodMode::Window,
            average: 10,
            history: 2000,
            learning: 150,
            refit: 50,
            min_mean: 0.03,
            min_sd: 0.0173,
        }
    }
}

/// Longest raw-score average.
pub const MAX_AVERAGE: u32 = 16;
/// Longest history window.
pub const MAX_HISTORY: u32 = 100_000;

impl LikelihoodConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> Problems {
        Problems::new()
            .within("average", self.average, 1..=MAX_AVERAGE)
            .within("history", self.history, 10..=MAX_HISTORY)
            .require(self.refit > 0, "refit", "must be at least 1")
            .within("learning", self.learning, 0..=MAX_HISTORY)
            .positive("min_sd", self.min_sd)
    }
}

/// Upper-tail probability of a standard normal at `z`.
fn upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The tail probability `p` on the log scale used for scores: 0 for `p = 1`, 1 for
/// `p ≤ 1e-10`.
pub fn log_score(tail: f64) -> f64 {
    const FLOOR: f64 = 1e-10;
    ((tail.clamp(0.0, 1.0) + FLOOR).ln() / FLOOR.ln()).clamp(0.0, 1.0)
}

/// Per-series state of the anomaly likelihood.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LikelihoodState {
    /// Ring of the last `average` raw scores in 1/255 steps, inline: 16 bytes and no pointer
    /// to chase per row (the step is far below the distribution's `min_sd`).
    recent: [u8; MAX_AVERAGE as usize],
    recent_len: u8,
    history: Vec<f32>,
    next: u32,
    seen: u64,
    mean: f64,
    var: f64,
}

impl LikelihoodState {
    /// Feeds one raw score in `[0, 1]` (NaN counts as 0) and returns the likelihood score.
    pub fn update(&mut self, config: &LikelihoodConfig, raw: f64) -> f64 {
        let raw = if raw.is_nan() {
            0.0
        } else {
            raw.clamp(0.0, 1.0)
        };
        let average_len = config.average.clamp(1, MAX_AVERAGE) as usize;
        // The short moving average, over a ring.
        let slot = (self.seen % average_len as u64) as usize;
        // `min` also guards against a snapshot that decoded into nonsense.
        let recent_len = (usize::from(self.recent_len) + 1).min(average_len);
        self.recent_len = recent_len as u8;
        self.recent[slot] = (raw * 255.0).round() as u8;
        let filled = &self.recent[..recent_len];
        let sum: u32 = filled.iter().map(|&r| u32::from(r)).sum();
        let average = f64::from(sum) / 255.0 / f64::from(self.recent_len);
        self.seen = self.seen.saturating_add(1);

        let history = config.history.clamp(10, MAX_HISTORY);
        let learned = self.seen > u64::from(config.learning);
        let score = if learned && self.var > 0.0 {
            let mean = self.mean.max(config.min_mean);
            let sd = self.var.sqrt().max(config.min_sd);
            let z = (average - mean) / sd;
            if z > 0.0 {
                log_score(upper_tail(z))
            } else {
                0.0
            }
        } else {
            0.0
        };
        match config.mode {
            LikelihoodMode::Exponential => {
                let alpha =
                    (1.0 / self.seen.min(u64::from(history)) as f64).max(2.0 / f64::from(history));
                let diff = average - self.mean;
                let incr = alpha * diff;
                self.mean += incr;
                self.var = (1.0 - alpha) * (self.var + diff * incr);
                if self.seen <= 2 {
                    self.var = self.var.max(f64::MIN_POSITIVE);
                }
            }
            LikelihoodMode::Window => {
                if self.history.len() < history as usize {
                    self.history.push(average as f32);
                } else {
                    let i = self.next as usize % self.history.len().max(1);
                    self.history[i] = average as f32;
                }
                self.next = (self.next + 1) % history;
                // Refit every `refit` rows, and at the end of learning; O(history / refit)
                // per row.
                let refit = self.seen.is_multiple_of(u64::from(config.refit.max(1)));
                if refit || self.seen == u64::from(config.learning) + 1 {
                    let n = self.history.len() as f64;
                    let mean = self.history.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
                    let var = self
                        .history
                        .iter()
                        .map(|v| (f64::from(*v) - mean).powi(2))
                        .sum::<f64>()
                        / n;
                    self.mean = mean;
                    self.var = var.max(f64::MIN_POSITIVE);
                }
            }
        }
        if !(self.mean.is_finite() && self.var.is_finite()) {
            self.mean = 0.0;
            self.var = 0.0;
        }
        score
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.history.capacity() * 4
    }
}

/// Configuration of range novelty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RangeNoveltyConfig {
    /// Margin beyond the range seen, as a fraction of the range.
    pub margin: f64,
    /// Rows learned before a new extreme counts.
    pub warmup: u32,
    /// Raw score a statistical part of the ensemble (EWMA, MAD, seasonal, CUSUM) must also
    /// give a new extreme: a series whose cycle is not complete yet, or that is pure noise,
    /// sets new records, and that alone is no incident.
    pub min_raw: f64,
}

impl RangeNoveltyConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> Problems {
        Problems::new().non_negative("margin", self.margin).require(
            (0.0..=1.0).contains(&self.min_raw),
            "min_raw",
            format!("must be between 0 and 1, got {}", self.min_raw),
        )
    }
}

impl Default for RangeNoveltyConfig {
    fn default() -> Self {
        Self {
            margin: 0.02,
            warmup: 150,
            min_raw: 0.1,
        }
    }
}

/// Per-series state of range novelty: the range seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RangeState {
    min: f64,
    max: f64,
    seen: u32,
}

impl Default for RangeState {
    fn default() -> Self {
        Self {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            seen: 0,
        }
    }
}

impl RangeState {
    /// Whether `x` lies outside the range seen so far (with the margin); then learns it.
    pub fn update(&mut self, config: &RangeNoveltyConfig, x: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        let span = self.max - self.min;
        let margin = config.margin * span;
        let novel = self.seen >= config.warmup
            && span > 0.0
            && (x > self.max + margin || x < self.min - margin);
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.seen = self.seen.saturating_add(1);
        novel
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn quiet_then_burst(config: &LikelihoodConfig) -> Vec<f64> {
        let mut s = LikelihoodState::default();
        (0..3000)
            .map(|i| {
                let raw = if (2500..2505).contains(&i) {
                    1.0
                } else if i % 97 == 0 {
                    0.3
                } else {
                    0.0
                };
                s.update(config, raw)
            })
            .collect()
    }

    #[test]
    fn a_burst_of_high_raw_scores_is_likely_anomalous_and_a_lone_blip_is_not() {
        for mode in [LikelihoodMode::Window, LikelihoodMode::Exponential] {
            let config = LikelihoodConfig {
                mode,
                ..LikelihoodConfig::default()
            };
            let scores = quiet_then_burst(&config);
            assert!(scores[..config.learning as usize].iter().all(|s| *s == 0.0));
            let before = scores[400..2500].iter().cloned().fold(0.0, f64::max);
            let burst = scores[2500..2510].iter().cloned().fold(0.0, f64::max);
            assert!(before < 0.3, "{mode:?}: blips scored {before}");
            assert!(burst > 0.9, "{mode:?}: burst scored {burst}");
        }
    }

    #[test]
    fn log_score_maps_tails_to_the_unit_interval() {
        assert_eq!(log_score(1.0), 0.0);
        assert!((log_score(1e-5) - 0.5).abs() < 1e-4);
        assert_eq!(log_score(0.0), 1.0);
    }

    #[test]
    fn range_novelty_fires_on_new_extremes_only_after_warmup() {
        let config = RangeNoveltyConfig {
            margin: 0.1,
            warmup: 3,
            min_raw: 0.0,
        };
        let mut r = RangeState::default();
        let flags: Vec<bool> = [0.0, 10.0, 100.0, 5.0, 10.5, 101.0, 120.0, -20.0]
            .iter()
            .map(|&x| r.update(&config, x))
            .collect();
        assert_eq!(
            flags,
            [false, false, false, false, false, false, true, true]
        );
    }

    proptest! {
        #[test]
        fn likelihood_scores_stay_in_the_unit_interval(raw in proptest::collection::vec(
            prop_oneof![any::<f64>(), Just(f64::NAN), 0.0..1.0f64], 1..600),
            exponential in any::<bool>()) {
            let config = LikelihoodConfig {
                mode: if exponential { LikelihoodMode::Exponential } else { LikelihoodMode::Window },
                learning: 5,
                history: 50,
                ..LikelihoodConfig::default()
            };
            let mut s = LikelihoodState::default();
            for r in raw {
                let v = s.update(&config, r);
                prop_assert!((0.0..=1.0).contains(&v), "{}", v);
            }
        }
    }
}
