//! Half-space trees (Tan, Ting & Liu, 2011): a streaming, tree-based density detector.
//!
//! Each point is a *shingle*, the last `shingle` values of the series scaled into `[0, 1]` by
//! the range seen so far, so the trees judge the recent shape, not only the level. A tree
//! cuts the unit cube in half again and again (random dimension, middle of a randomly
//! shifted range); the structure is random but fixed, built once from `seed` and shared by
//! every series. Per series, each node counts the points that fell in it during the last
//! complete window (the *reference* mass) while the current window is being counted. A point
//! landing where the reference saw little mass, high in a tree, is rare in the recent shape
//! of the series: anomalous.
//!
//! Score of a point: the mass `m = r · 2^k` at the first node on its path with fewer than
//! `size_limit` reference points (or the leaf), summed over trees, on a log scale:
//! `1 − log2(1 + Σm/trees) / log2(1 + window · 2^depth)`. State: two `u16` counters per node
//! per tree (`2 · 2 · trees · (2^(depth+1) − 1)` bytes; 20 KiB with the defaults) plus the
//! shingle. The first window only learns.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::keyed::{KeyedDetector, SeriesModel};
use super::{Problems, Verdict};

/// Configuration of the half-space-trees detector (`[detector] type = "hst"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HstConfig {
    /// Number of trees.
    pub trees: u32,
    /// Depth of every tree.
    pub depth: u32,
    /// Points per mass window (at most 65 535).
    pub window: u32,
    /// Values per point: the current value and the `shingle − 1` before it.
    pub shingle: u32,
    /// Seed of the random tree structure.
    pub seed: u64,
    /// Score at or above which a row is anomalous.
    pub threshold: f64,
}

impl Default for HstConfig {
    fn default() -> Self {
        Self {
            trees: 10,
            depth: 8,
            window: 250,
            shingle: 4,
            seed: 42,
            threshold: 0.7,
        }
    }
}

/// Most trees accepted.
pub const MAX_TREES: u32 = 100;
/// Largest tree depth accepted.
pub const MAX_DEPTH: u32 = 12;
/// Longest shingle accepted.
pub const MAX_SHINGLE: u32 = 16;

impl HstConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> Problems {
        Problems::new()
            .within("trees", self.trees, 1..=MAX_TREES)
            .within("depth", self.depth, 1..=MAX_DEPTH)
            .within("window", self.window, 10..=u32::from(u16::MAX))
            .within("shingle", self.shingle, 1..=MAX_SHINGLE)
    }
}

/// The shared, immutable forest: split dimension and value of every internal node.
#[derive(Debug, Clone)]
pub struct Forest {
    config: HstConfig,
    depth: u32,
    shingle: usize,
    nodes_per_tree: usize,
    split_dim: Vec<u8>,
    split_value: Vec<f32>,
}

impl Forest {
    /// Builds the random structure for `config` (values out of range are clamped).
    pub fn new(config: HstConfig) -> Self {
        let depth = config.depth.clamp(1, MAX_DEPTH);
        let shingle = config.shingle.clamp(1, MAX_SHINGLE) as usize;
        let trees = config.trees.clamp(1, MAX_TREES) as usize;
        let nodes_per_tree = (1usize << (depth + 1)) - 1;
        let internal = (1usize << depth) - 1;
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let mut split_dim = Vec::with_capacity(trees * internal);
        let mut split_value = Vec::with_capacity(trees * internal);
        for _ in 0..trees {
            // A randomly shifted work range per dimension, as in the paper.
            let mut lo = vec![0.0f64; shingle];
            let mut hi = vec![0.0f64; shingle];
            for d in 0..shingle {
                let s: f64 = rng.random();
                let size = 2.0 * s.max(1.0 - s);
                lo[d] = s - size;
                hi[d] = s + size;
            }
            // Heap layout: node i has children 2i+1 and 2i+2; ranges follow the path.
            let mut ranges = vec![(lo, hi)];
            for node in 0..internal {
                let (lo, hi) = ranges[node].clone();
                let d = rng.random_range(0..shingle);
                let mid = (lo[d] + hi[d]) / 2.0;
                split_dim.push(d as u8);
                split_value.push(mid as f32);
                let (mut left_hi, mut right_lo) = (hi.clone(), lo.clone());
                left_hi[d] = mid;
                right_lo[d] = mid;
                ranges.push((lo, left_hi));
                ranges.push((right_lo, hi));
            }
        }
        Self {
            config,
            depth,
            shingle,
            nodes_per_tree,
            split_dim,
            split_value,
        }
    }

    fn trees(&self) -> usize {
        self.split_dim.len() / ((1usize << self.depth) - 1)
    }

    /// Visits the path of `point` in `tree`: `f(node index, level)` for root to leaf.
    fn path(&self, tree: usize, point: &[f64], mut f: impl FnMut(usize, u32) -> bool) {
        let internal = (1usize << self.depth) - 1;
        let mut node = 0usize;
        for level in 0..=self.depth {
            if !f(tree * self.nodes_per_tree + node, level) || level == self.depth {
                return;
            }
            let split = tree * internal + node;
            let d = usize::from(self.split_dim[split]);
            node = if point[d] < f64::from(self.split_value[split]) {
                2 * node + 1
            } else {
                2 * node + 2
            };
        }
    }
}

/// The state of one series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HstState {
    recent: Vec<f64>,
    min: f64,
    max: f64,
    seen: u64,
    reference: Vec<u16>,
    latest: Vec<u16>,
    in_window: u32,
    has_reference: bool,
}

impl HstState {
    /// Scores `x`, then learns from it: the anomaly score in `[0, 1]`, `None` while the first
    /// window is learned or for a non-finite `x`.
    pub fn step(&mut self, forest: &Forest, x: f64) -> Option<f64> {
        if !x.is_finite() {
            return None;
        }
        let cells = forest.trees() * forest.nodes_per_tree;
        if self.reference.len() != cells || self.latest.len() != cells {
            *self = HstState {
                reference: vec![0; cells],
                latest: vec![0; cells],
                min: x,
                max: x,
                ..HstState::default()
            };
        }
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.seen += 1;
        while self.recent.len() >= forest.shingle {
            self.recent.remove(0);
        }
        self.recent.push(x);
        if self.recent.len() < forest.shingle {
            return None;
        }
        let span = self.max - self.min;
        let point: Vec<f64> = self
            .recent
            .iter()
            .map(|v| {
                if span > 0.0 {
                    ((v - self.min) / span).clamp(0.0, 1.0)
                } else {
                    0.5
                }
            })
            .collect();
        let window = forest.config.window.clamp(10, u32::from(u16::MAX));
        let size_limit = (window / 10).max(1) as u16;
        let score = self.has_reference.then(|| {
            let mut mass = 0.0;
            for tree in 0..forest.trees() {
                forest.path(tree, &point, |node, level| {
                    let r = self.reference[node];
                    if r < size_limit || level == forest.depth {
                        mass += f64::from(r) * f64::from(1u32 << level);
                        false
                    } else {
                        true
                    }
                });
            }
            let max = (f64::from(window) * f64::from(1u32 << forest.depth) + 1.0).log2();
            (1.0 - (1.0 + mass / forest.trees() as f64).log2() / max).clamp(0.0, 1.0)
        });
        for tree in 0..forest.trees() {
            forest.path(tree, &point, |node, _| {
                self.latest[node] = self.latest[node].saturating_add(1);
                true
            });
        }
        self.in_window += 1;
        if self.in_window >= window {
            std::mem::swap(&mut self.reference, &mut self.latest);
            self.latest.iter_mut().for_each(|c| *c = 0);
            self.in_window = 0;
            self.has_reference = true;
        }
        score
    }
}

impl SeriesModel for HstState {
    type Params = Forest;

    fn new(_: &Forest) -> Self {
        Self::default()
    }

    fn observe(&mut self, forest: &Forest, _ts_ms: i64, x: f64) -> Verdict {
        match self.step(forest, x) {
            Some(score) => Verdict {
                score,
                is_anomaly: score >= forest.config.threshold,
                ..Verdict::NONE
            },
            None => Verdict::NONE,
        }
    }

    fn heap_bytes(&self) -> usize {
        (self.reference.capacity() + self.latest.capacity()) * 2 + self.recent.capacity() * 8
    }
}

/// The half-space-trees detector. See the [module docs](self).
pub type HstDetector = KeyedDetector<HstState>;

impl KeyedDetector<HstState> {
    /// A detector holding up to `max_series` series.
    pub fn new(config: HstConfig, max_series: usize) -> Self {
        Self::from_parts(
            "hst",
            &config.clone(),
            Vec::new(),
            Forest::new(config),
            max_series,
        )
    }
}

impl crate::component::ComponentConfig for HstConfig {
    fn problems(&self) -> crate::error::Problems {
        HstConfig::problems(self)
    }
}

impl super::DetectorConfig for HstConfig {
    fn build(
        &self,
        _ctx: &crate::component::BuildContext,
        max_series: usize,
    ) -> crate::error::Result<Box<dyn super::Detector>> {
        Ok(Box::new(HstDetector::new(self.clone(), max_series)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_shape_never_seen_scores_higher_than_the_usual_one() {
        let forest = Forest::new(HstConfig::default());
        let mut s = HstState::default();
        let wave = |i: usize| 50.0 + 20.0 * ((i as f64) * 0.3).sin();
        let mut normal = Vec::new();
        for i in 0..2000 {
            if let Some(score) = s.step(&forest, wave(i))
                && i > 1000
            {
                normal.push(score);
            }
        }
        let anomalous = s
            .step(&forest, 69.0)
            .unwrap()
            .max(s.step(&forest, 31.0).unwrap());
        let typical = normal.iter().sum::<f64>() / normal.len() as f64;
        assert!(anomalous > typical + 0.1, "{anomalous} vs {typical}");
        assert_eq!(s.heap_bytes(), 2 * 2 * 10 * 511 + 4 * 8);
    }

    proptest! {
        #[test]
        fn scores_stay_in_the_unit_interval(values in proptest::collection::vec(
            prop_oneof![any::<f64>(), Just(f64::NAN), -1e6..1e6f64], 1..400)) {
            let forest = Forest::new(HstConfig { window: 10, ..HstConfig::default() });
            let mut s = HstState::default();
            for x in values {
                let v = s.observe(&forest, 0, x);
                prop_assert!((0.0..=1.0).contains(&v.score));
            }
        }
    }
}
