//! Context novelty: has this series ever shown this short shape before?
//!
//! The idea of the NAB leaders (CAD OSE, ARTime), strictly online. Each value is quantised
//! into one of `levels` levels of the range seen so far; the last `length` levels form a
//! context, and every suffix of it (the last 1, 2, … `length` levels) is looked up in a
//! fixed-size bit set of contexts already seen (hashed). The raw score is the share of
//! those suffixes never seen before: 0 for a familiar shape, 1 for a value in a level the
//! series never visited. Familiar shapes stay familiar whatever their level or spread, so
//! a noisy series and a smooth one are judged alike, and a broken rhythm (a flat stretch in
//! a wave, a new oscillation) stands out even when every value lies in the usual range.
//! State: `bits / 8` bytes of bit set plus 40 bytes.

use serde::{Deserialize, Serialize};

use super::Problems;

/// Configuration of context novelty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// Quantisation levels of the range seen so far.
    pub levels: u32,
    /// Longest context, in values (1 to 8).
    pub length: u32,
    /// Size of the seen-context bit set, as a power of two (10 to 20).
    pub bits_log2: u32,
    /// Rows learned before the part has an opinion.
    pub warmup: u32,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            levels: 10,
            length: 4,
            bits_log2: 15,
            warmup: 100,
        }
    }
}

impl ContextConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> Problems {
        Problems::new()
            .within("levels", self.levels, 2..=MAX_LEVELS)
            .within("length", self.length, 1..=MAX_LENGTH)
            .within("bits_log2", self.bits_log2, 10..=20)
    }
}

/// Most quantisation levels (a level is one byte of a context).
pub const MAX_LEVELS: u32 = 256;
/// Longest context: eight one-byte levels in a `u64`.
pub const MAX_LENGTH: u32 = 8;

/// Per-series state of context novelty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContextState {
    seen: Vec<u64>,
    recent: u64,
    filled: u32,
    min: f64,
    max: f64,
    count: u32,
}

impl ContextState {
    /// The share of the row's contexts never seen before, in `[0, 1]`; `None` while warming
    /// up or for a non-finite `x`.
    pub fn step(&mut self, config: &ContextConfig, x: f64) -> Option<f64> {
        if !x.is_finite() {
            return None;
        }
        let bits = 1usize << config.bits_log2.clamp(10, 20);
        if self.seen.len() != bits / 64 {
            *self = ContextState {
                seen: vec![0; bits / 64],
                min: x,
                max: x,
                ..ContextState::default()
            };
        }
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        let levels = config.levels.clamp(2, MAX_LEVELS);
        let span = self.max - self.min;
        let level = if span > 0.0 {
            (((x - self.min) / span) * f64::from(levels))
                .floor()
                .clamp(0.0, f64::from(levels - 1)) as u64
        } else {
            0
        };
        // 8 bits per level, the most recent in the low byte.
        let length = config.length.clamp(1, MAX_LENGTH);
        self.recent = (self.recent << 8) | level;
        self.filled = (self.filled + 1).min(length);
        let mut novel = 0u32;
        for k in 1..=self.filled {
            let mask = if k == 8 {
                u64::MAX
            } else {
                (1u64 << (8 * k)) - 1
            };
            let context = (self.recent & mask) ^ (u64::from(k) << 60);
            let h = xxhash_rust::xxh3::xxh3_64(&context.to_le_bytes()) as usize & (bits - 1);
            let (word, bit) = (h / 64, h % 64);
            if self.seen[word] & (1 << bit) == 0 {
                novel += 1;
                self.seen[word] |= 1 << bit;
            }
        }
        self.count = self.count.saturating_add(1);
        (self.count > config.warmup).then(|| f64::from(novel) / f64::from(self.filled.max(1)))
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.seen.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_repeated_shape_becomes_familiar_and_a_new_one_stands_out() {
        let config = ContextConfig::default();
        let mut s = ContextState::default();
        let wave = [0.0, 3.0, 6.0, 9.0, 6.0, 3.0];
        let mut last = None;
        for i in 0..600 {
            last = s.step(&config, wave[i % wave.len()]);
        }
        assert_eq!(last, Some(0.0), "the wave is familiar");
        // Flat in the middle of the range: every context with it is new except level 1.
        let flat = s.step(&config, 4.5).unwrap();
        assert!(flat > 0.5, "{flat}");
        assert!(s.step(&config, f64::NAN).is_none());
        assert_eq!(s.heap_bytes(), (1 << 15) / 8);
    }

    proptest! {
        #[test]
        fn novelty_stays_in_the_unit_interval(values in proptest::collection::vec(
            prop_oneof![any::<f64>(), Just(f64::NAN), -1e6..1e6f64], 1..400)) {
            let config = ContextConfig { warmup: 0, ..ContextConfig::default() };
            let mut s = ContextState::default();
            for x in values {
                if let Some(n) = s.step(&config, x) {
                    prop_assert!((0.0..=1.0).contains(&n), "{}", n);
                }
            }
        }
    }
}
