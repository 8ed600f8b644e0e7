//! Seasonal baseline: an expected value per time-of-day slot.
//!
//! The period (a day by default) is cut into `slots` equal slots by event time; each slot
//! keeps an exponentially weighted mean of the values seen in it, so the 09:00 peak is
//! compared with earlier 09:00s rather than with the quiet night before. The spread is
//! pooled over all slots (one residual variance per series), which is far steadier than a
//! variance per slot learned from a handful of cycles. A slow level offset follows trends
//! that move every slot alike. State: 4 bytes (an `f32` mean) + 1 byte (a count) per slot,
//! plus 40 bytes.
//!
//! - **Warm-up**: a row is scored only once the series has spanned `min_cycles` periods and
//!   its slot has been seen before; until then the detector only learns.
//! - **Timestamps** are the rows' event times (UTC), never the wall clock, so a replay scores
//!   exactly like the live stream did.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keyed::{KeyedDetector, SeriesModel};
use super::{Problems, Verdict};

/// Configuration of the seasonal detector (`[detector] type = "seasonal"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeasonalConfig {
    /// Length of a season, e.g. `"1d"` or `"7d"`.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// Slots per period (48 slots of a day are half-hours).
    pub slots: u32,
    /// Weight of a new row in its slot's mean, in `(0, 1]`.
    pub alpha: f64,
    /// Anomaly threshold in standard deviations of the residual.
    pub threshold: f64,
    /// Periods to learn before any alert.
    pub min_cycles: u32,
    /// Floor of the residual's sd, relative to the slot mean's magnitude.
    pub min_sd_ratio: f64,
    /// Also learn a slot per day of a seven-period week, and use it once seen: weekends
    /// and weekdays get their own baseline (7 × more slots).
    pub weekly: bool,
}

impl Default for SeasonalConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(86_400),
            slots: 48,
            alpha: 0.25,
            threshold: 4.0,
            min_cycles: 1,
            min_sd_ratio: 0.001,
            weekly: false,
        }
    }
}

/// Most slots a season may have (a week of 10-minute slots).
pub const MAX_SLOTS: u32 = 1008;

impl SeasonalConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> Problems {
        Problems::new()
            .require(
                self.period.as_millis() >= u128::from(self.slots.max(1)),
                "period",
                "must be at least one millisecond per slot",
            )
            .within("slots", self.slots, 1..=MAX_SLOTS)
            .weight("alpha", self.alpha)
            .positive("threshold", self.threshold)
    }

    fn period_ms(&self) -> i64 {
        i64::try_from(self.period.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    fn slot_of(&self, ts_ms: i64) -> usize {
        let slots = i64::from(self.slots.clamp(1, MAX_SLOTS));
        let period = self.period_ms();
        // i128: `phase × slots` can overflow i64 for long periods.
        ((i128::from(ts_ms.rem_euclid(period)) * i128::from(slots)) / i128::from(period)) as usize
    }
}

/// The state of one series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeasonalState {
    means: Vec<f32>,
    counts: Vec<u8>,
    week_means: Vec<f32>,
    week_counts: Vec<u8>,
    first_ts: Option<i64>,
    offset: f64,
    resid_var: f64,
    resid_count: u32,
}

/// What the seasonal baseline saw in one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeasonalReading {
    /// `|x − expected| / sd`.
    pub z: f64,
    /// The slot's mean plus the level offset.
    pub expected: f64,
    /// The residual's (floored) standard deviation.
    pub sd: f64,
}

impl SeasonalState {
    /// Scores `x` at `ts_ms`, then learns from it; `None` while warming up.
    pub fn step(&mut self, config: &SeasonalConfig, ts_ms: i64, x: f64) -> Option<SeasonalReading> {
        if !x.is_finite() {
            return None;
        }
        let slots = config.slots.clamp(1, MAX_SLOTS) as usize;
        let week = if config.weekly { 7 * slots } else { 0 };
        // Also catches a snapshot whose vectors decoded at inconsistent lengths.
        if self.means.len() != slots
            || self.counts.len() != slots
            || self.week_means.len() != week
            || self.week_counts.len() != week
        {
            self.means = vec![0.0; slots];
            self.counts = vec![0; slots];
            self.week_means = vec![0.0; week];
            self.week_counts = vec![0; week];
        }
        let first = *self.first_ts.get_or_insert(ts_ms);
        let slot = config.slot_of(ts_ms);
        let daily_slot = slot;
        let week_slot = config.weekly.then(|| {
            let day = ts_ms.div_euclid(config.period_ms()).rem_euclid(7) as usize;
            day * slots + slot
        });
        // The weekly slot once it has been seen, else the daily one.
        let (means, counts, slot) = match week_slot {
            Some(w) if self.week_counts[w] > 0 => {
                // Keep the daily slot learning too, for the slots the week has not seen.
                let count = self.counts[slot];
                let daily = f64::from(self.means[slot]);
                // Clipped like the main update below, so an incident cannot rewrite the
                // daily slot that seeds new weekday slots.
                let clip = if self.resid_count >= 10 {
                    // `max` maps a NaN (an invalid threshold) to 0: `clamp` panics on NaN.
                    (config.threshold * self.resid_var.sqrt()).max(0.0)
                } else {
                    f64::INFINITY
                };
                let r = (x - self.offset - daily).clamp(-clip, clip);
                self.means[slot] = if count == 0 {
                    (x - self.offset) as f32
                } else {
                    (daily + config.alpha.max(1.0 / (f64::from(count) + 1.0)) * r) as f32
                };
                self.counts[slot] = count.saturating_add(1);
                (&mut self.week_means, &mut self.week_counts, w)
            }
            Some(w) => {
                // A weekday slot starts from its time-of-day slot (never from this row
                // alone, which may be the incident) and learns from the next visits.
                self.week_means[w] = if self.counts[slot] > 0 {
                    self.means[slot]
                } else {
                    (x - self.offset) as f32
                };
                self.week_counts[w] = 1;
                (&mut self.means, &mut self.counts, slot)
            }
            None => (&mut self.means, &mut self.counts, slot),
        };
        let count = counts[slot];
        let base = f64::from(means[slot]);
        let expected = base + self.offset;
        let resid = x - expected;
        let sd = self
            .resid_var
            .sqrt()
            .max(config.min_sd_ratio * expected.abs())
            .max(1e-9);
        let spanned = ts_ms.saturating_sub(first)
            >= config
                .period_ms()
                .saturating_mul(i64::from(config.min_cycles));
        let warm = count > 0 && spanned && self.resid_count >= 10;
        let seen = warm.then_some(SeasonalReading {
            z: resid.abs() / sd,
            expected,
            sd,
        });
        // Learn: clip the residual so an incident does not rewrite the slot.
        let clip = if warm {
            (config.threshold * sd).max(0.0)
        } else {
            f64::INFINITY
        };
        let r = resid.clamp(-clip, clip);
        if count == 0 {
            means[slot] = (x - self.offset) as f32;
        } else {
            let alpha = config.alpha.max(1.0 / (f64::from(count) + 1.0));
            means[slot] = (base + alpha * r) as f32;
            // The residual after the slot's own update is what is left for the level: a
            // small share of it moves every slot.
            self.offset += 0.01 * (1.0 - alpha) * r;
            let a = (1.0 / f64::from(self.resid_count.saturating_add(1))).max(0.01);
            self.resid_var = (1.0 - a) * (self.resid_var + a * r * r);
            self.resid_count = self.resid_count.saturating_add(1);
        }
        counts[slot] = count.saturating_add(1);
        let learned_finite = means[slot].is_finite();
        if !(learned_finite
            && self.means[daily_slot].is_finite()
            && self.offset.is_finite()
            && self.resid_var.is_finite())
        {
            *self = SeasonalState::default();
        }
        seen
    }
}

impl SeriesModel for SeasonalState {
    type Params = SeasonalConfig;

    fn new(_: &SeasonalConfig) -> Self {
        Self::default()
    }

    fn observe(&mut self, config: &SeasonalConfig, ts_ms: i64, x: f64) -> Verdict {
        match self.step(config, ts_ms, x) {
            Some(r) => Verdict::from_z(r.z, r.expected, r.sd, config.threshold),
            None => Verdict::NONE,
        }
    }

    fn heap_bytes(&self) -> usize {
        (self.means.capacity() + self.week_means.capacity()) * 4
            + self.counts.capacity()
            + self.week_counts.capacity()
    }
}

/// The seasonal detector. See the [module docs](self).
pub type SeasonalDetector = KeyedDetector<SeasonalState>;

impl KeyedDetector<SeasonalState> {
    /// A detector holding up to `max_series` series.
    pub fn new(config: SeasonalConfig, max_series: usize) -> Self {
        Self::from_parts("seasonal", &config.clone(), Vec::new(), config, max_series)
    }
}

impl crate::component::ComponentConfig for SeasonalConfig {
    fn problems(&self) -> crate::error::Problems {
        SeasonalConfig::problems(self)
    }
}

impl super::DetectorConfig for SeasonalConfig {
    fn build(
        &self,
        _ctx: &crate::component::BuildContext,
        max_series: usize,
    ) -> crate::error::Result<Box<dyn super::Detector>> {
        Ok(Box::new(SeasonalDetector::new(self.clone(), max_series)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: i64 = 3_600_000;

    fn daily(hours: i64) -> Vec<(i64, f64)> {
        (0..hours * 4)
            .map(|q| {
                let ts = q * HOUR / 4;
                let hour = (ts / HOUR) % 24;
                let v = if (9..17).contains(&hour) { 80.0 } else { 20.0 };
                (ts, v + ((q * 7919) % 7) as f64 / 4.0)
            })
            .collect()
    }

    #[test]
    fn the_daily_peak_is_normal_and_a_peak_at_night_is_not() {
        let config = SeasonalConfig::default();
        let mut s = SeasonalState::default();
        let mut series = daily(24 * 5);
        // Day 5, 03:00: daytime level at night.
        let night = series.len() - 4 * 21;
        series[night].1 = 80.0;
        let flags: Vec<(usize, bool)> = series
            .iter()
            .enumerate()
            .map(|(i, &(t, x))| (i, s.observe(&config, t, x).is_anomaly))
            .collect();
        let flagged: Vec<usize> = flags.iter().filter(|f| f.1).map(|f| f.0).collect();
        assert_eq!(flagged, vec![night], "only the night peak");
        assert!(s.heap_bytes() <= 48 * 5 + 64);
    }

    proptest! {
        #[test]
        fn scores_stay_in_the_unit_interval(values in proptest::collection::vec(
            (any::<i64>(), prop_oneof![any::<f64>(), Just(f64::NAN), -1e6..1e6f64]), 1..200)) {
            let config = SeasonalConfig { min_cycles: 0, ..SeasonalConfig::default() };
            let mut s = SeasonalState::default();
            for (t, x) in values {
                let v = s.observe(&config, t, x);
                prop_assert!((0.0..=1.0).contains(&v.score));
            }
        }
    }
}
