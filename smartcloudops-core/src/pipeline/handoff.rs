//! Per-series detector state kept in a [`SeriesStateStore`]: looked up for series a batch
//! brings that the detector does not hold, saved periodically and at shutdown.
//!
//! The store is a cache of learned state, not a source of truth: if it fails, the pipeline
//! keeps scoring (a series whose state could not be loaded starts learning again) and the
//! failure is logged and counted as an error of the detector stage. Lookups pause for a
//! while after a failure, so an outage does not add a timeout to every batch.
//!
//! A series whose state could not be looked up starts fresh; its fresh state is not saved
//! over a stored one. Its lookup is retried with each save once the pause is over: a stored
//! state found then replaces the fresh one, and a series with none stored is saved from
//! then on. A save the store refuses because another replica stored a newer state
//! ([`SeriesStateStore::take_rejected`]) drops the stale state, and the next batch of that
//! series loads the stored one.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, UInt64Array};
use arrow::record_batch::RecordBatch;
use tokio::time::Instant;

use super::state_flush::StateFlush;
use crate::detector::{Detector, SeriesStateStore};
use crate::metrics::StageMetrics;
use crate::schema::col;

/// How long lookups pause after the store failed.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Longest a load or a save may hold up scoring.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Series whose failed lookup is retried per save, so one retry stays short.
const RETRY_LOOKUPS: usize = 10_000;

/// The store and how often to save to it, as configured on the builder.
#[derive(Debug, Clone)]
pub(super) struct StateStoreSettings {
    pub(super) store: Arc<dyn SeriesStateStore>,
    pub(super) every: Duration,
}

#[derive(Debug)]
pub(super) struct StateHandoff {
    store: Arc<dyn SeriesStateStore>,
    every: Duration,
    namespace: String,
    last_save: Instant,
    paused_until: Option<Instant>,
    /// States exported but not stored (the store failed); retried with the next save.
    unsaved: Vec<(u64, Vec<u8>)>,
    loaded: u64,
    saved: u64,
    /// Series whose stored state could not be looked up (the store failed or was paused):
    /// they started fresh, and their fresh state must not overwrite the stored one.
    skipped: rustc_hash::FxHashSet<u64>,
    /// Revokes asking for a save (see [`StateFlush`]).
    flush: Arc<StateFlush>,
}

impl StateHandoff {
    /// The hand-off for `detector`, or `None` (with a warning) if it has no per-series state.
    pub(super) fn new(
        settings: StateStoreSettings,
        detector: Option<&dyn Detector>,
    ) -> Option<Self> {
        let Some(namespace) = detector.and_then(|d| d.series_state_namespace()) else {
            tracing::warn!(
                store = settings.store.name(),
                "the detector keeps no per-series state: the state store is not used"
            );
            return None;
        };
        Some(Self {
            store: settings.store,
            every: settings.every,
            namespace,
            last_save: Instant::now(),
            paused_until: None,
            unsaved: Vec::new(),
            loaded: 0,
            saved: 0,
            skipped: rustc_hash::FxHashSet::default(),
            flush: Arc::default(),
        })
    }

    /// Where a source's revokes ask for a save of the states that changed.
    pub(super) fn revoke_listener(&self) -> Arc<StateFlush> {
        self.flush.clone()
    }

    fn publish(&self, stage: &StageMetrics) {
        stage.set_gauge("detector_states_loaded_total", &[], self.loaded as f64);
        stage.set_gauge("detector_states_saved_total", &[], self.saved as f64);
        stage.set_gauge(
            "detector_state_writes_rejected_total",
            &[],
            self.store.rejected_writes() as f64,
        );
    }

    /// Looks up again (some of) the series whose lookup failed: a stored state replaces the
    /// fresh one; a series with none stored may be saved from now on. A failure keeps them
    /// waiting (and pauses the store).
    async fn retry_skipped(&mut self, detector: &mut dyn Detector, stage: &StageMetrics) {
        let ids: Vec<u64> = self.skipped.iter().copied().take(RETRY_LOOKUPS).collect();
        let loaded = tokio::time::timeout(STORE_TIMEOUT, self.store.load(&self.namespace, &ids))
            .await
            .unwrap_or_else(|_| {
                Err(crate::error::Error::Connector {
                    connector: self.store.name().into(),
                    message: format!("no answer within {STORE_TIMEOUT:?}"),
                })
            });
        match loaded {
            Ok(states) => {
                for id in &ids {
                    self.skipped.remove(id);
                }
                if !states.is_empty() {
                    let stored: Vec<u64> = states.iter().map(|(id, _)| *id).collect();
                    detector.forget_series(&stored);
                    match detector.import_series_states(states) {
                        Ok(n) => self.loaded += n as u64,
                        Err(e) => {
                            stage.record_error();
                            tracing::warn!("a stored detector state was skipped: {e}");
                        }
                    }
                }
                tracing::debug!(series = ids.len(), "lookups that had failed retried");
            }
            Err(e) => self.failed(
                stage,
                "looking up detector states again failed; retrying with the next save",
                &e,
            ),
        }
    }

    fn failed(&mut self, stage: &StageMetrics, what: &str, e: &crate::error::Error) {
        stage.record_error();
        tracing::warn!(store = self.store.name(), "{what}: {e}");
        self.paused_until = Some(Instant::now() + PAUSE_AFTER_FAILURE);
    }

    /// Installs stored states for the series of `batch` the detector does not hold.
    pub(super) async fn load_unknown(
        &mut self,
        detector: &mut dyn Detector,
        stage: &StageMetrics,
        batch: &RecordBatch,
    ) {
        let paused = self
            .paused_until
            .is_some_and(|until| Instant::now() < until);
        let Some(ids) = batch
            .column_by_name(col::SERIES_ID)
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
        else {
            return; // the detector reports the schema error
        };
        if ids.null_count() > 0 {
            return;
        }
        let unknown = detector.unknown_series(ids.values());
        if unknown.is_empty() {
            return;
        }
        if paused {
            self.skipped.extend(unknown);
            return;
        }
        let loaded =
            tokio::time::timeout(STORE_TIMEOUT, self.store.load(&self.namespace, &unknown))
                .await
                .unwrap_or_else(|_| {
                    Err(crate::error::Error::Connector {
                        connector: self.store.name().into(),
                        message: format!("no answer within {STORE_TIMEOUT:?}"),
                    })
                });
        if loaded.is_err() {
            self.skipped.extend(unknown.iter().copied());
        }
        match loaded {
            Ok(states) if states.is_empty() => {}
            Ok(states) => {
                match detector.import_series_states(states) {
                    Ok(n) => self.loaded += n as u64,
                    Err(e) => {
                        stage.record_error();
                        tracing::warn!("a stored detector state was skipped: {e}");
                    }
                }
                self.publish(stage);
            }
            Err(e) => self.failed(
                stage,
                "loading detector states failed; those series start fresh",
                &e,
            ),
        }
    }

    /// The save at shutdown: tried even while lookups are paused.
    pub(super) async fn save_final(&mut self, detector: &mut dyn Detector, stage: &StageMetrics) {
        self.paused_until = None;
        self.save(detector, stage).await;
    }

    pub(super) fn save_due(&self) -> bool {
        self.last_save.elapsed() >= self.every
    }

    /// Saves the states that changed since the last save (and any a failed save left).
    pub(super) async fn save(&mut self, detector: &mut dyn Detector, stage: &StageMetrics) {
        self.last_save = Instant::now();
        let mut paused = self
            .paused_until
            .is_some_and(|until| Instant::now() < until);
        if !paused && !self.skipped.is_empty() {
            self.retry_skipped(detector, stage).await;
            paused = self
                .paused_until
                .is_some_and(|until| Instant::now() < until);
        }
        let mut states = match detector.export_changed_series() {
            Ok(states) => states,
            Err(e) => {
                stage.record_error();
                tracing::error!("detector states not exported: {e}");
                return;
            }
        };
        if !self.unsaved.is_empty() {
            let fresh: rustc_hash::FxHashSet<u64> = states.iter().map(|(id, _)| *id).collect();
            states.extend(
                std::mem::take(&mut self.unsaved)
                    .into_iter()
                    .filter(|(id, _)| !fresh.contains(id)),
            );
        }
        if !self.skipped.is_empty() {
            states.retain(|(id, _)| !self.skipped.contains(id));
        }
        if states.is_empty() {
            return;
        }
        if paused {
            // The store is failing: keep the states for the next save instead of waiting.
            self.unsaved = states;
            return;
        }
        let started = Instant::now();
        let saved = tokio::time::timeout(STORE_TIMEOUT, self.store.save(&self.namespace, &states))
            .await
            .unwrap_or_else(|_| {
                Err(crate::error::Error::Connector {
                    connector: self.store.name().into(),
                    message: format!("no answer within {STORE_TIMEOUT:?}"),
                })
            });
        match saved {
            Ok(()) => {
                let rejected = self.store.take_rejected(&self.namespace);
                if !rejected.is_empty() {
                    let dropped = detector.forget_series(&rejected);
                    tracing::info!(
                        series = rejected.len(),
                        dropped,
                        "detector states older than the stored ones dropped; they are loaded again"
                    );
                }
                self.saved += (states.len() - rejected.len().min(states.len())) as u64;
                self.publish(stage);
                tracing::debug!(
                    series = states.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "detector states saved"
                );
            }
            Err(e) => {
                self.unsaved = states;
                self.failed(
                    stage,
                    "saving detector states failed; retrying with the next save",
                    &e,
                );
            }
        }
    }
}

impl Drop for StateHandoff {
    /// The transform task, which owns the hand-off, has ended (after its final save): a
    /// revoke now (the consumer leaving the group at shutdown) must not wait for it.
    fn drop(&mut self) {
        self.flush.close();
    }
}
