//! The keyed state store: one [`SeriesModel`] per series, bounded, accounted and snapshotted.
//!
//! [`KeyedDetector`] turns any per-series state machine into a [`Detector`]:
//!
//! - **Bounded series count.** `max_series` caps the states held. Inserting a new series into
//!   a full store evicts the least recently used eighth of the series in one pass (a
//!   selection over last-use ticks), so eviction is O(1) amortised per row and costs 8 bytes
//!   per series instead of the two pointers of a linked-list LRU. Evictions are counted
//!   ([`Detector::evicted_series`]); an evicted series starts over with a new warm-up.
//! - **Memory accounting.** [`Detector::state_bytes`] adds the table's buckets and each
//!   state's heap.
//! - **Snapshots.** [`Detector::snapshot`] writes every state with a format version, the
//!   detector's name and its configuration (compact binary, [postcard]); [`Detector::restore`]
//!   refuses a snapshot of another format, detector or configuration rather than mixing
//!   incompatible state. Scores after a restore equal the scores without the restart.
//!
//! [postcard]: https://docs.rs/postcard

use std::fmt;

use arrow::record_batch::RecordBatch;
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Detector, ScoreColumnsBuilder, SeriesStates, Verdict};
use crate::error::{Error, Result};
use crate::schema::MetricsColumns;

/// Version of the snapshot layout; bumped whenever a state's fields change.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// Default cap on series held by one detector.
pub const DEFAULT_MAX_SERIES: usize = 1_000_000;

/// A per-series online model: the state machine a [`KeyedDetector`] keeps one of per series.
pub trait SeriesModel: Clone + fmt::Debug + Send + Serialize + DeserializeOwned + 'static {
    /// What the model needs besides its own state: the configuration and anything built
    /// from it once and shared by all series (e.g. tree structure).
    type Params: fmt::Debug + Send + 'static;

    /// A fresh state for a series never seen (or evicted).
    fn new(params: &Self::Params) -> Self;

    /// Scores `value` observed at `ts_ms` using only earlier rows, then learns from it.
    fn observe(&mut self, params: &Self::Params, ts_ms: i64, value: f64) -> Verdict;

    /// Bytes this state holds on the heap, beyond `size_of::<Self>()`.
    fn heap_bytes(&self) -> usize {
        0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Slot<S> {
    state: S,
    last_used: u64,
}

/// One state per series id, at most `max_series` of them. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct KeyedStates<S> {
    map: FxHashMap<u64, Slot<S>>,
    max_series: usize,
    tick: u64,
    evicted: u64,
    /// The tick of the last export of changed states: a slot used after it changed since.
    exported_tick: u64,
}

impl<S> KeyedStates<S> {
    /// An empty store holding at most `max_series` states (at least 1).
    pub fn new(max_series: usize) -> Self {
        Self {
            map: FxHashMap::default(),
            max_series: max_series.max(1),
            tick: 0,
            evicted: 0,
            exported_tick: 0,
        }
    }

    /// Whether a state for `id` is held.
    pub fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    /// The state of `id`, created by `init` if absent (evicting first if the store is full).
    pub fn get_or_insert_with(&mut self, id: u64, init: impl FnOnce() -> S) -> &mut S {
        self.tick += 1;
        let tick = self.tick;
        if self.map.len() >= self.max_series && !self.map.contains_key(&id) {
            self.evict_least_recently_used();
        }
        let slot = self.map.entry(id).or_insert_with(|| Slot {
            state: init(),
            last_used: tick,
        });
        slot.last_used = tick;
        &mut slot.state
    }

    /// The state of `id`, if held; does not count as a use.
    pub fn get(&self, id: u64) -> Option<&S> {
        self.map.get(&id).map(|s| &s.state)
    }

    /// Number of states held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no state is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// States evicted since creation.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Bytes of the table itself: a key, a slot and one control byte per bucket.
    pub fn table_bytes(&self) -> usize {
        self.map.capacity() * (std::mem::size_of::<(u64, Slot<S>)>() + 1)
    }

    /// Drops the state of `id`; returns whether one was held.
    pub fn remove(&mut self, id: u64) -> bool {
        self.map.remove(&id).is_some()
    }

    /// Iterates over `(series_id, state)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &S)> {
        self.map.iter().map(|(id, slot)| (*id, &slot.state))
    }

    fn evict_least_recently_used(&mut self) {
        // Every use takes a fresh tick, so ticks are unique and the `remove`-th smallest one
        // splits the table exactly.
        let keep = self.max_series - self.max_series.div_ceil(8);
        let remove = self.map.len().saturating_sub(keep);
        if remove == 0 {
            return;
        }
        let mut ticks: Vec<u64> = self.map.values().map(|s| s.last_used).collect();
        let (_, cutoff, _) = ticks.select_nth_unstable(remove - 1);
        let cutoff = *cutoff;
        self.map.retain(|_, slot| slot.last_used > cutoff);
        self.evicted += remove as u64;
    }
}

/// Snapshot layout, shared by every [`KeyedDetector`].
#[derive(Serialize, Deserialize)]
struct SnapshotRepr<S> {
    format_version: u32,
    detector: String,
    /// The configuration as JSON: restoring under another configuration is refused.
    config: String,
    tick: u64,
    evicted: u64,
    series: Vec<(u64, Slot<S>)>,
}

/// A [`Detector`] made of one [`SeriesModel`] per series. See the [module docs](self).
pub struct KeyedDetector<M: SeriesModel> {
    name: String,
    config_json: String,
    parts: Vec<&'static str>,
    params: M::Params,
    states: KeyedStates<M>,
}

impl<M: SeriesModel> fmt::Debug for KeyedDetector<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedDetector")
            .field("name", &self.name)
            .field("series", &self.states.len())
            .field("max_series", &self.states.max_series)
            .finish_non_exhaustive()
    }
}

impl<M: SeriesModel> KeyedDetector<M> {
    /// A detector named `name` (the `detector` column), whose anomalous rows are attributed
    /// to `parts` by the bits of [`Verdict::fired`]. `config` identifies the configuration in
    /// snapshots.
    pub fn from_parts(
        name: impl Into<String>,
        config: &impl Serialize,
        parts: Vec<&'static str>,
        params: M::Params,
        max_series: usize,
    ) -> Self {
        Self {
            name: name.into(),
            config_json: serde_json::to_string(config).unwrap_or_default(),
            parts,
            params,
            states: KeyedStates::new(max_series),
        }
    }

    /// The shared parameters.
    pub fn params(&self) -> &M::Params {
        &self.params
    }

    /// The state of one series, if held.
    pub fn series_state(&self, series_id: u64) -> Option<&M> {
        self.states.get(series_id)
    }

    /// Scores one value of one series: the per-row core of [`Detector::score`].
    pub fn observe(&mut self, series_id: u64, ts_ms: i64, value: f64) -> Verdict {
        let params = &self.params;
        self.states
            .get_or_insert_with(series_id, || M::new(params))
            .observe(params, ts_ms, value)
    }
}

impl<M: SeriesModel> KeyedDetector<M> {
    fn decode_state(&self, id: u64, bytes: &[u8]) -> Result<M> {
        postcard::from_bytes(bytes).map_err(|e| {
            Error::Snapshot(format!(
                "state of series {id} for `{}` does not decode: {e}",
                self.name
            ))
        })
    }
}

impl<M: SeriesModel> Detector for KeyedDetector<M> {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let stage = format!("detector:{}", self.name);
        let cols = MetricsColumns::try_new(batch, &stage)?;
        let mut out = ScoreColumnsBuilder::with_capacity(batch.num_rows());
        let ids = cols.series_id.values();
        let ts = cols.ts.values();
        let values = cols.value.values();
        for ((&id, &t), &x) in ids.iter().zip(ts.iter()).zip(values.iter()) {
            out.push(self.observe(id, t, x));
        }
        out.finish_with_parts(batch, &self.name, &self.parts)
    }

    fn series_count(&self) -> usize {
        self.states.len()
    }

    fn state_bytes(&self) -> usize {
        self.states.table_bytes()
            + self
                .states
                .iter()
                .map(|(_, s)| s.heap_bytes())
                .sum::<usize>()
    }

    fn evicted_series(&self) -> u64 {
        self.states.evicted()
    }

    fn series_state_namespace(&self) -> Option<String> {
        let config = xxhash_rust::xxh3::xxh3_64(self.config_json.as_bytes());
        Some(format!(
            "v{SNAPSHOT_FORMAT_VERSION}:{}:{config:016x}",
            self.name
        ))
    }

    fn unknown_series(&self, ids: &[u64]) -> Vec<u64> {
        let mut seen = rustc_hash::FxHashSet::default();
        ids.iter()
            .copied()
            .filter(|id| !self.states.contains(*id) && seen.insert(*id))
            .collect()
    }

    fn import_series_states(&mut self, states: SeriesStates) -> Result<usize> {
        let mut installed = 0;
        let mut first_error = None;
        for (id, bytes) in states {
            if self.states.contains(id) {
                continue;
            }
            match self.decode_state(id, &bytes) {
                Ok(state) => {
                    self.states.get_or_insert_with(id, || state);
                    installed += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(installed),
        }
    }

    fn export_changed_series(&mut self) -> Result<SeriesStates> {
        let since = self.states.exported_tick;
        let mut out = Vec::new();
        for (id, slot) in &self.states.map {
            if slot.last_used > since {
                let bytes = postcard::to_allocvec(&slot.state).map_err(|e| {
                    Error::Snapshot(format!("cannot encode series {id} of `{}`: {e}", self.name))
                })?;
                out.push((*id, bytes));
            }
        }
        self.states.exported_tick = self.states.tick;
        Ok(out)
    }

    fn forget_series(&mut self, ids: &[u64]) -> usize {
        ids.iter().filter(|id| self.states.remove(**id)).count()
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        #[derive(Serialize)]
        struct Borrowed<'a, S> {
            format_version: u32,
            detector: &'a str,
            config: &'a str,
            tick: u64,
            evicted: u64,
            series: Vec<(u64, &'a Slot<S>)>,
        }
        let mut series: Vec<(u64, &Slot<M>)> =
            self.states.map.iter().map(|(id, s)| (*id, s)).collect();
        // Sorted, so equal states give equal bytes.
        series.sort_unstable_by_key(|(id, _)| *id);
        postcard::to_allocvec(&Borrowed {
            format_version: SNAPSHOT_FORMAT_VERSION,
            detector: &self.name,
            config: &self.config_json,
            tick: self.states.tick,
            evicted: self.states.evicted,
            series,
        })
        .map_err(|e| Error::Snapshot(format!("cannot encode `{}`: {e}", self.name)))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<()> {
        // The version is the first field: read it alone first, so an old layout gets a clear
        // error instead of a decoding failure.
        let version: u32 = postcard::take_from_bytes(snapshot)
            .map(|(v, _)| v)
            .map_err(|e| Error::Snapshot(format!("not a detector snapshot: {e}")))?;
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(Error::Snapshot(format!(
                "format version {version}, this build reads version {SNAPSHOT_FORMAT_VERSION}"
            )));
        }
        let repr: SnapshotRepr<M> = postcard::from_bytes(snapshot)
            .map_err(|e| Error::Snapshot(format!("corrupt snapshot: {e}")))?;
        if repr.detector != self.name {
            return Err(Error::Snapshot(format!(
                "snapshot of detector `{}` cannot restore detector `{}`",
                repr.detector, self.name
            )));
        }
        if repr.config != self.config_json {
            return Err(Error::Snapshot(format!(
                "snapshot of `{}` was taken under another configuration ({}), this one is {}",
                self.name, repr.config, self.config_json
            )));
        }
        let mut states = KeyedStates::new(self.states.max_series);
        states.tick = repr.tick;
        states.evicted = repr.evicted;
        states.map.reserve(repr.series.len());
        states.map.extend(repr.series);
        while states.map.len() > states.max_series {
            states.evict_least_recently_used();
        }
        self.states = states;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_the_most_recently_used_and_bounds_the_count() {
        let mut s: KeyedStates<u32> = KeyedStates::new(16);
        for id in 0..16 {
            s.get_or_insert_with(id, || 0);
        }
        // Touch the even ids: the odd ones are now the least recently used.
        for id in (0..16).step_by(2) {
            *s.get_or_insert_with(id, || 0) += 1;
        }
        s.get_or_insert_with(100, || 0);
        assert_eq!(s.len(), 15, "two evicted, one inserted");
        assert_eq!(s.evicted(), 2);
        assert!(s.get(1).is_none() && s.get(3).is_none());
        for id in (0..16).step_by(2) {
            assert_eq!(s.get(id), Some(&1), "recently used {id} kept");
        }
        for id in 1000..100_000 {
            s.get_or_insert_with(id, || 0);
            assert!(s.len() <= 16);
        }
    }

    #[test]
    fn a_store_of_one_series_still_works() {
        let mut s: KeyedStates<u8> = KeyedStates::new(0);
        s.get_or_insert_with(1, || 1);
        s.get_or_insert_with(2, || 2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(2), Some(&2));
        assert_eq!(s.evicted(), 1);
    }

    fn batch(rows: &[(&str, i64, f64)]) -> RecordBatch {
        let mut b = crate::schema::MetricsBatchBuilder::default();
        for (host, ts, v) in rows {
            b.push(*ts, "cpu", &[("host", *host)], *v);
        }
        b.finish()
    }

    fn scores(d: &mut dyn Detector, b: &RecordBatch) -> Vec<f64> {
        let out = d.score(b).unwrap();
        let s = crate::schema::ScoreColumns::try_new(&out, "test").unwrap();
        s.score.values().to_vec()
    }

    #[test]
    fn per_series_states_hand_off_to_a_fresh_detector_and_only_changes_are_exported() {
        use crate::detector::{EwmaConfig, EwmaDetector};
        let rows = |from: i64, to: i64| -> Vec<(&'static str, i64, f64)> {
            (from..to)
                .flat_map(|i| {
                    let v = 10.0 + (i % 5) as f64;
                    [("a", i * 1000, v), ("b", i * 1000, 2.0 * v)]
                })
                .collect()
        };
        let (first, second) = (batch(&rows(0, 100)), batch(&rows(100, 130)));
        let mut whole = EwmaDetector::new(EwmaConfig::default());
        scores(&mut whole, &first);
        let expected = scores(&mut whole, &second);

        let mut old = EwmaDetector::new(EwmaConfig::default());
        scores(&mut old, &first);
        let exported = old.export_changed_series().unwrap();
        assert_eq!(exported.len(), 2);
        assert!(
            old.export_changed_series().unwrap().is_empty(),
            "nothing changed since"
        );

        let mut fresh = EwmaDetector::new(EwmaConfig::default());
        let ids = crate::schema::MetricsColumns::try_new(&second, "t")
            .unwrap()
            .series_id
            .values()
            .to_vec();
        assert_eq!(
            fresh.unknown_series(&ids).len(),
            2,
            "each unknown series once"
        );
        assert_eq!(fresh.import_series_states(exported.clone()).unwrap(), 2);
        assert!(fresh.unknown_series(&ids).is_empty());
        assert_eq!(scores(&mut fresh, &second), expected);
        assert_eq!(fresh.series_state_namespace(), old.series_state_namespace());

        // Another configuration lives in another namespace; a damaged state is refused.
        let other = EwmaDetector::new(EwmaConfig {
            alpha: 0.2,
            ..EwmaConfig::default()
        });
        assert_ne!(other.series_state_namespace(), old.series_state_namespace());
        let mut damaged = EwmaDetector::new(EwmaConfig::default());
        let err = damaged
            .import_series_states(vec![(exported[0].0, vec![0xff; 3]), exported[1].clone()])
            .unwrap_err();
        assert!(err.to_string().contains("does not decode"), "{err}");
        assert_eq!(
            damaged.series_count(),
            1,
            "the good state was still installed"
        );
    }
}
