//! The ensemble: several detectors per series, one calibrated score, a readable explanation.
//!
//! Per row and series:
//! 1. every enabled part ([`ewma`](super::ewma), [`mad`](super::mad),
//!    [`seasonal`](super::seasonal), [`cusum`](super::cusum), [`hst`](super::hst)) scores the
//!    value; a z-score becomes a raw score by a ramp from `z_low` (0) to `z_high` (1);
//!    (and [`context`](super::context) novelty gives its share of unseen shapes);
//! 2. [anomaly likelihood](super::postprocess) turns raw scores into "how unusual is this
//!    for this series", which is what makes one threshold fit every series: either one
//!    likelihood for the parts' combined raw score (`combine`: mean or maximum), or one per
//!    part, combined the same way (`likelihood_per_part`, as in `precise`);
//! 3. [range novelty](super::postprocess) raises the score to 1 for a value beyond anything
//!    the series has shown, if some part finds it at least a little unusual;
//! 4. the row is anomalous when the score reaches `threshold`; then, for `rest` rows (restarted
//!    while the series stays anomalous, with `extend_rest`), the series' score is held just
//!    below the threshold, so one incident raises one alert rather than a storm. The
//!    episode's first alert is reported as `anomaly_since` until the series is quiet again.
//!
//! **Cold start**: a new series learns silently. Its parts have their own warm-ups, the
//! likelihood scores nothing for its first `likelihood.learning` rows and range novelty
//! waits `range_novelty.warmup` rows, so with the presets no series alerts on its first 150
//! rows.
//!
//! Two presets are tuned on the NAB corpus with one parameter set for all series (see
//! `docs/detection.md`): [`Preset::Fast`] and [`Preset::Precise`].

use serde::{Deserialize, Serialize};

use super::context::{ContextConfig, ContextState};
use super::cusum::{CusumConfig, CusumState};
use super::ewma::{EwmaConfig, EwmaState};
use super::hst::{Forest, HstConfig, HstState};
use super::keyed::{DEFAULT_MAX_SERIES, KeyedDetector, SeriesModel};
use super::mad::{MadConfig, MadState};
use super::postprocess::{
    LikelihoodConfig, LikelihoodMode, LikelihoodState, RangeNoveltyConfig, RangeState,
};
use super::seasonal::{SeasonalConfig, SeasonalState};
use super::{Problems, Verdict};

/// Names of the parts, in the bit order of [`Verdict::fired`].
pub const PARTS: [&str; 8] = [
    "ewma",
    "mad",
    "seasonal",
    "cusum",
    "hst",
    "likelihood",
    "range",
    "context",
];
const EWMA: u32 = 1;
const MAD: u32 = 1 << 1;
const SEASONAL: u32 = 1 << 2;
const CUSUM: u32 = 1 << 3;
const HST: u32 = 1 << 4;
const LIKELIHOOD: u32 = 1 << 5;
const RANGE: u32 = 1 << 6;
const CONTEXT: u32 = 1 << 7;

/// A named, tuned configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// For millions of series: EWMA, CUSUM, hourly seasonal slots and a small context set,
    /// one O(1) likelihood and range novelty; under 1 KiB per series.
    Fast,
    /// The best quality: weekly seasonal slots and context novelty, a windowed likelihood per
    /// part, range novelty; about 42 KiB per long-lived series.
    Precise,
}

impl Preset {
    /// The preset's configuration.
    pub fn config(self) -> EnsembleConfig {
        match self {
            // One O(1) likelihood over the mean raw score of EWMA, CUSUM, an hourly seasonal
            // baseline and a small context bit set (1 Kibit): < 1 KiB per series.
            Preset::Fast => EnsembleConfig {
                ewma: Some(EwmaConfig::default()),
                cusum: Some(CusumConfig::default()),
                seasonal: Some(SeasonalConfig {
                    slots: 24,
                    ..SeasonalConfig::default()
                }),
                context: Some(ContextConfig {
                    length: 4,
                    bits_log2: 10,
                    ..ContextConfig::default()
                }),
                likelihood: LikelihoodConfig {
                    mode: LikelihoodMode::Exponential,
                    ..LikelihoodConfig::default()
                },
                likelihood_per_part: false,
                z_high: 6.0,
                threshold: 0.6,
                ..EnsembleConfig::default()
            },
            Preset::Precise => EnsembleConfig::default(),
        }
    }

    /// The preset's name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Fast => "fast",
            Preset::Precise => "precise",
        }
    }
}

/// How the parts' raw scores combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The highest raw score: any part can raise an alert.
    Max,
    /// The mean raw score of the parts with an opinion: parts must agree.
    Mean,
}

/// Configuration of the ensemble (`[detector] type = "ensemble"`; every field defaults to the
/// `precise` preset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnsembleConfig {
    /// EWMA z-score part (`[detector.ewma]`), if enabled.
    pub ewma: Option<EwmaConfig>,
    /// Median/MAD part.
    pub mad: Option<MadConfig>,
    /// Seasonal part.
    pub seasonal: Option<SeasonalConfig>,
    /// CUSUM change-point part.
    pub cusum: Option<CusumConfig>,
    /// Half-space-trees part.
    pub hst: Option<HstConfig>,
    /// Context-novelty part.
    pub context: Option<ContextConfig>,
    /// One likelihood per part (the maximum is the score) instead of one for the combined
    /// raw score.
    pub likelihood_per_part: bool,
    /// How the parts' raw scores combine.
    pub combine: Combine,
    /// z-score at and below which a part's raw score is 0.
    pub z_low: f64,
    /// z-score at and above which a part's raw score is 1.
    pub z_high: f64,
    /// Anomaly likelihood.
    pub likelihood: LikelihoodConfig,
    /// Range novelty, if enabled.
    pub range_novelty: Option<RangeNoveltyConfig>,
    /// Score at or above which a row is anomalous.
    pub threshold: f64,
    /// Model `sign(x)·ln(1 + |x|)` instead of `x` (range novelty still sees `x`): for
    /// heavy-tailed metrics (bytes, request counts), where a spread learned on the raw
    /// values makes every burst look alike.
    pub log_scale: bool,
    /// Rows after an alert during which the series does not alert again.
    pub rest: u32,
    /// Restart the rest on every row that would have alerted: an incident longer than
    /// `rest` rows (and its recovery) still raises one alert.
    pub extend_rest: bool,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        // The `precise` preset. EWMA, MAD, CUSUM and HST are available as parts but, tuned
        // on NAB, added false positives without finding more windows (docs/detection.md).
        Self {
            ewma: None,
            mad: None,
            seasonal: Some(SeasonalConfig {
                weekly: true,
                slots: 96,
                ..SeasonalConfig::default()
            }),
            cusum: None,
            hst: None,
            context: Some(ContextConfig {
                length: 6,
                ..ContextConfig::default()
            }),
            likelihood_per_part: true,
            combine: Combine::Mean,
            z_low: 1.5,
            z_high: 12.0,
            likelihood: LikelihoodConfig {
                history: 4000,
                ..LikelihoodConfig::default()
            },
            range_novelty: Some(RangeNoveltyConfig::default()),
            threshold: 0.5,
            log_scale: false,
            rest: 20,
            extend_rest: true,
        }
    }
}

impl EnsembleConfig {
    /// Problems with the values, as `(field, message)` pairs (field paths relative to
    /// `[detector]`); empty when valid.
    pub fn problems(&self) -> Problems {
        // Each enabled part's own problems, under its table's name.
        let nested = [
            ("ewma", self.ewma.as_ref().map(EwmaConfig::problems)),
            ("mad", self.mad.as_ref().map(MadConfig::problems)),
            (
                "seasonal",
                self.seasonal.as_ref().map(SeasonalConfig::problems),
            ),
            ("cusum", self.cusum.as_ref().map(CusumConfig::problems)),
            ("hst", self.hst.as_ref().map(HstConfig::problems)),
            (
                "context",
                self.context.as_ref().map(ContextConfig::problems),
            ),
            (
                "range_novelty",
                self.range_novelty
                    .as_ref()
                    .map(RangeNoveltyConfig::problems),
            ),
            ("likelihood", Some(self.likelihood.problems())),
        ];
        let mut out = Problems::new();
        for (part, problems) in nested {
            if let Some(problems) = problems {
                out.extend_at(part, problems);
            }
        }
        if !(self.z_low >= 0.0 && self.z_high > self.z_low && self.z_high.is_finite()) {
            out.push(
                "z_high",
                format!(
                    "must be above z_low ({}) and finite, got {}",
                    self.z_low, self.z_high
                ),
            );
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            out.push(
                "threshold",
                format!("must be in (0, 1], got {}", self.threshold),
            );
        }
        let parts = [
            self.ewma.is_some(),
            self.mad.is_some(),
            self.seasonal.is_some(),
            self.cusum.is_some(),
            self.hst.is_some(),
            self.context.is_some(),
        ];
        // Range novelty needs a part's raw score too: alone it could never alert.
        if !parts.iter().any(|p| *p) {
            out.push(
                "seasonal",
                "enable at least one part (ewma, mad, seasonal, cusum, hst, context)",
            );
        }
        out
    }

    /// Removes the optional part called `name` (as in its TOML table); `false` if there is
    /// no such part.
    pub fn disable(&mut self, name: &str) -> bool {
        match name {
            "ewma" => self.ewma = None,
            "mad" => self.mad = None,
            "seasonal" => self.seasonal = None,
            "cusum" => self.cusum = None,
            "hst" => self.hst = None,
            "context" => self.context = None,
            "range_novelty" => self.range_novelty = None,
            _ => return false,
        }
        true
    }

    /// Lays the TOML fields `over` (those of `[detector] type = "ensemble"`) over this
    /// configuration: unset fields keep their values, a part's table adds or adjusts that
    /// part, and `enabled = false` in a part's table removes it. Returns the merged table, to
    /// deserialize (with whatever error reporting the caller wants), and the parts to
    /// [`disable`](Self::disable) afterwards — a part absent from a table would otherwise
    /// come back with the default configuration's value.
    pub fn overlay(&self, over: toml::Table) -> (toml::Table, Vec<String>) {
        let mut base = toml::Table::try_from(self).unwrap_or_default();
        let mut disabled = Vec::new();
        for (part, absent) in [
            ("ewma", self.ewma.is_none()),
            ("mad", self.mad.is_none()),
            ("seasonal", self.seasonal.is_none()),
            ("cusum", self.cusum.is_none()),
            ("hst", self.hst.is_none()),
            ("context", self.context.is_none()),
            ("range_novelty", self.range_novelty.is_none()),
        ] {
            if absent && !over.contains_key(part) {
                disabled.push(part.to_owned());
            }
        }
        for (key, value) in over {
            match (base.get_mut(&key), value) {
                (_, toml::Value::Table(t))
                    if t.get("enabled") == Some(&toml::Value::Boolean(false)) =>
                {
                    base.remove(&key);
                    disabled.push(key);
                }
                (Some(toml::Value::Table(b)), toml::Value::Table(mut t)) => {
                    t.remove("enabled");
                    b.extend(t);
                }
                (_, toml::Value::Table(mut t)) => {
                    t.remove("enabled");
                    base.insert(key, toml::Value::Table(t));
                }
                (_, v) => {
                    base.insert(key, v);
                }
            }
        }
        (base, disabled)
    }

    /// The alert threshold for a sensitivity in `[0, 1]`: 0.5 keeps the tuned threshold,
    /// 1 halves it (more alerts), 0 raises it by half (fewer).
    pub fn threshold_for_sensitivity(&self, sensitivity: f64) -> f64 {
        (self.threshold * (1.5 - sensitivity.clamp(0.0, 1.0))).clamp(1e-6, 1.0)
    }
}

/// What the ensemble shares between series: its configuration and the HST forest.
#[derive(Debug)]
pub struct EnsembleParams {
    config: EnsembleConfig,
    forest: Option<Forest>,
}

impl EnsembleParams {
    /// Builds the shared parts of `config`.
    pub fn new(config: EnsembleConfig) -> Self {
        let forest = config.hst.clone().map(Forest::new);
        Self { config, forest }
    }

    /// The configuration.
    pub fn config(&self) -> &EnsembleConfig {
        &self.config
    }
}

/// The state of one series: each enabled part's state plus the post-processing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnsembleState {
    ewma: EwmaState,
    mad: Option<Box<MadState>>,
    cusum: CusumState,
    seasonal: Option<Box<SeasonalState>>,
    hst: Option<Box<HstState>>,
    context: Option<Box<ContextState>>,
    likelihood: LikelihoodState,
    part_likelihoods: Vec<LikelihoodState>,
    range: RangeState,
    /// Rows still to rest after the last alert.
    rest_left: u32,
    /// Start of the current anomalous episode.
    episode_start: Option<i64>,
}

fn ramp(z: f64, low: f64, high: f64) -> f64 {
    if z.is_nan() {
        return 0.0;
    }
    ((z - low) / (high - low)).clamp(0.0, 1.0)
}

impl SeriesModel for EnsembleState {
    type Params = EnsembleParams;

    fn new(params: &EnsembleParams) -> Self {
        Self {
            seasonal: params.config.seasonal.as_ref().map(|_| Box::default()),
            hst: params.config.hst.as_ref().map(|_| Box::default()),
            context: params.config.context.as_ref().map(|_| Box::default()),
            ..Self::default()
        }
    }

    fn observe(&mut self, params: &EnsembleParams, ts_ms: i64, x: f64) -> Verdict {
        let c = &params.config;
        if !x.is_finite() {
            return Verdict::NONE;
        }
        let original = x;
        let x = if c.log_scale {
            x.signum() * x.abs().ln_1p()
        } else {
            x
        };
        let mut raw = 0.0f64;
        let mut raw_sum = 0.0f64;
        let mut opinions = 0u32;
        let mut fired = 0u32;
        let per_part = c.likelihood_per_part;
        let mut part_likely = 0.0f64;
        let mut part_likely_sum = 0.0f64;
        let part_likelihoods = &mut self.part_likelihoods;
        // The best opinion of the expected value: seasonal, then robust, then mean.
        let mut band: Option<(f64, f64)> = None;
        // The highest raw score of the statistical parts (those with a baseline and a spread):
        // what range novelty needs behind a new record. With a seasonal part, only its
        // opinion counts: before a full cycle, every part without seasons sees the daily
        // rise as a trend of new records.
        let mut statistical_raw = 0.0f64;
        let statistical = if c.seasonal.is_some() {
            SEASONAL
        } else {
            EWMA | MAD | CUSUM
        };
        let mut take = |part_raw: f64, bit: u32, fired: &mut u32| {
            if part_raw >= 0.5 {
                *fired |= bit;
            }
            if bit & statistical != 0 {
                statistical_raw = statistical_raw.max(part_raw);
            }
            raw = raw.max(part_raw);
            raw_sum += part_raw;
            if per_part {
                let slot = bit.trailing_zeros() as usize;
                if part_likelihoods.len() <= slot {
                    part_likelihoods.resize_with(slot + 1, LikelihoodState::default);
                }
                let l = part_likelihoods[slot].update(&c.likelihood, part_raw);
                part_likely = part_likely.max(l);
                part_likely_sum += l;
            }
            opinions += 1;
        };
        if let (Some(cfg), Some(state)) = (&c.seasonal, self.seasonal.as_mut())
            && let Some(r) = state.step(cfg, ts_ms, x)
        {
            take(ramp(r.z, c.z_low, c.z_high), SEASONAL, &mut fired);
            band = band.or(Some((r.expected, r.sd)));
        }
        if let Some(cfg) = &c.mad
            && let Some(r) = self.mad.get_or_insert_with(Box::default).step(cfg, x)
        {
            take(ramp(r.z, c.z_low, c.z_high), MAD, &mut fired);
            band = band.or(Some((r.median, r.scale)));
        }
        if let Some(cfg) = &c.ewma
            && let Some(r) = self.ewma.step(cfg, x)
        {
            take(ramp(r.z, c.z_low, c.z_high), EWMA, &mut fired);
            band = band.or(Some((r.mean, r.sd)));
        }
        if let Some(cfg) = &c.cusum
            && let Some(r) = self.cusum.step(cfg, x)
        {
            take(if r.level >= 1.0 { 1.0 } else { 0.0 }, CUSUM, &mut fired);
            band = band.or(Some((r.mean, r.sd)));
        }
        if let (Some(forest), Some(state)) = (&params.forest, self.hst.as_mut())
            && let Some(score) = state.step(forest, x)
        {
            let threshold = forest_threshold(c);
            take(ramp(score, threshold - 0.3, threshold), HST, &mut fired);
        }
        if let (Some(cfg), Some(state)) = (&c.context, self.context.as_mut())
            && let Some(novelty) = state.step(cfg, x)
        {
            take(novelty, CONTEXT, &mut fired);
        }
        if c.combine == Combine::Mean && opinions > 0 {
            raw = raw_sum / f64::from(opinions);
        }
        let likely = if per_part {
            match c.combine {
                Combine::Max => part_likely,
                Combine::Mean => part_likely_sum / f64::from(opinions.max(1)),
            }
        } else {
            self.likelihood.update(&c.likelihood, raw)
        };
        let mut score = likely;
        if likely >= c.threshold {
            fired |= LIKELIHOOD;
        }
        if let Some(cfg) = &c.range_novelty
            && self.range.update(cfg, original)
            && statistical_raw >= cfg.min_raw
        {
            score = 1.0;
            fired |= RANGE;
        }
        let resting = self.rest_left > 0;
        if resting {
            self.rest_left -= 1;
            if c.extend_rest && score >= c.threshold {
                // Still anomalous: the same incident goes on, and so does the rest.
                self.rest_left = c.rest;
            }
            // Held just below the threshold: the incident is still visible in the score
            // without alerting again.
            score = score.min(c.threshold * 0.999);
        }
        let is_anomaly = score >= c.threshold;
        if is_anomaly {
            self.rest_left = c.rest;
            // An alert right after a rest (or with no rest) continues the episode.
            self.episode_start.get_or_insert(ts_ms);
        } else if !resting {
            // Quiet: neither anomalous nor resting. The episode is over.
            self.episode_start = None;
        }
        let (expected, spread) = band.unwrap_or((f64::NAN, f64::NAN));
        let (expected, lower, upper) = if c.log_scale {
            let back = |v: f64| v.signum() * v.abs().exp_m1();
            (
                back(expected),
                back(expected - c.z_high * spread),
                back(expected + c.z_high * spread),
            )
        } else {
            (
                expected,
                expected - c.z_high * spread,
                expected + c.z_high * spread,
            )
        };
        Verdict {
            score,
            is_anomaly,
            expected,
            lower,
            upper,
            fired: if is_anomaly { fired } else { 0 },
            since_ms: if is_anomaly { self.episode_start } else { None },
        }
    }

    fn heap_bytes(&self) -> usize {
        self.likelihood.heap_bytes()
            + self
                .part_likelihoods
                .iter()
                .map(|l| l.heap_bytes() + 64)
                .sum::<usize>()
            + self
                .mad
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<MadState>())
            + self
                .context
                .as_ref()
                .map_or(0, |s| std::mem::size_of::<ContextState>() + s.heap_bytes())
            + self
                .seasonal
                .as_ref()
                .map_or(0, |s| std::mem::size_of::<SeasonalState>() + s.heap_bytes())
            + self
                .hst
                .as_ref()
                .map_or(0, |s| std::mem::size_of::<HstState>() + s.heap_bytes())
    }
}

fn forest_threshold(c: &EnsembleConfig) -> f64 {
    c.hst.as_ref().map_or(0.7, |h| h.threshold)
}

/// The ensemble detector. See the [module docs](self).
pub type EnsembleDetector = KeyedDetector<EnsembleState>;

impl KeyedDetector<EnsembleState> {
    /// An ensemble named `name` (the `detector` column of normal rows).
    pub fn new(name: &str, config: EnsembleConfig, max_series: usize) -> Self {
        Self::from_parts(
            name,
            &config.clone(),
            PARTS.to_vec(),
            EnsembleParams::new(config),
            max_series,
        )
    }

    /// A preset with the default series cap.
    pub fn preset(preset: Preset) -> Self {
        Self::new(preset.name(), preset.config(), DEFAULT_MAX_SERIES)
    }
}

#[cfg(test)]
mod tests;
