//! Assembling a [`Pipeline`]: its stages, where state and dead letters go, its options.

use std::sync::Arc;
use std::time::Duration;

use super::handoff::StateStoreSettings;
use super::{Pipeline, PipelineMetrics, PipelineOptions, StageMetrics, Stages};
use crate::action::Action;
use crate::dead_letter::{DeadLetterSink, LogDeadLetters};
use crate::detector::{Detector, SeriesStateStore};
use crate::prep::Prep;
use crate::source::{Source, TimestampPolicy};

/// Builds a [`Pipeline`] from its parts.
#[derive(Debug)]
pub struct PipelineBuilder {
    parts: Parts,
}

/// What a pipeline is made of: gathered by the builder, taken apart by the run.
#[derive(Debug)]
pub(super) struct Parts {
    pub(super) source: Box<dyn Source>,
    /// Which event timestamps the source's rows may carry.
    pub(super) timestamps: TimestampPolicy,
    pub(super) preps: Vec<Box<dyn Prep>>,
    pub(super) detector: Option<Box<dyn Detector>>,
    pub(super) snapshot: Option<SnapshotFile>,
    pub(super) state_store: Option<StateStoreSettings>,
    pub(super) actions: Vec<Arc<dyn Action>>,
    pub(super) dead_letters: Arc<dyn DeadLetterSink>,
    pub(super) options: PipelineOptions,
}

/// Where and how often the detector's state is saved.
#[derive(Debug, Clone)]
pub(super) struct SnapshotFile {
    pub(super) path: std::path::PathBuf,
    pub(super) every: Duration,
}

impl Pipeline {
    /// Starts building a pipeline that reads from `source`.
    pub fn builder(source: impl Source + 'static) -> PipelineBuilder {
        Self::builder_boxed(Box::new(source))
    }

    /// Starts building a pipeline from a boxed source.
    pub fn builder_boxed(source: Box<dyn Source>) -> PipelineBuilder {
        PipelineBuilder {
            parts: Parts {
                source,
                timestamps: TimestampPolicy::unchecked(),
                preps: Vec::new(),
                detector: None,
                snapshot: None,
                state_store: None,
                actions: Vec::new(),
                dead_letters: Arc::new(LogDeadLetters),
                options: PipelineOptions::default(),
            },
        }
    }
}

impl PipelineBuilder {
    /// Checks the event time of every row the source yields against the wall clock: rows
    /// outside `policy`'s window are dead-lettered with the reason, the rest of their batch
    /// goes on. Unchecked unless set (a pipeline built in code may replay anything); a
    /// pipeline built from a configuration sets its source's policy, see
    /// [`TimestampPolicy`].
    pub fn timestamps(mut self, policy: TimestampPolicy) -> Self {
        self.parts.timestamps = policy;
        self
    }

    /// Adds a prep stage; preps run in the order added.
    pub fn prep(mut self, prep: impl Prep + 'static) -> Self {
        self.parts.preps.push(Box::new(prep));
        self
    }

    /// Adds a boxed prep stage.
    pub fn boxed_prep(mut self, prep: Box<dyn Prep>) -> Self {
        self.parts.preps.push(prep);
        self
    }

    /// Sets the detector.
    pub fn detector(mut self, detector: impl Detector + 'static) -> Self {
        self.parts.detector = Some(Box::new(detector));
        self
    }

    /// Sets a boxed detector.
    pub fn boxed_detector(mut self, detector: Box<dyn Detector>) -> Self {
        self.parts.detector = Some(detector);
        self
    }

    /// Saves the detector's [snapshot](Detector::snapshot) to `path` every `every` and when
    /// the pipeline stops (written to a temporary file, then renamed, so a crash mid-write
    /// leaves the previous snapshot intact). Restoring is the caller's part, before
    /// [`detector`](Self::detector): see [`Detector::restore`].
    pub fn detector_snapshot(mut self, path: std::path::PathBuf, every: Duration) -> Self {
        self.parts.snapshot = Some(SnapshotFile { path, every });
        self
    }

    /// Keeps the detector's per-series states in `store`: series a batch brings that the
    /// detector does not hold are looked up there before the batch is scored, and the states
    /// that changed are saved every `every` and at shutdown. See [`SeriesStateStore`].
    pub fn series_state_store(mut self, store: Arc<dyn SeriesStateStore>, every: Duration) -> Self {
        self.parts.state_store = Some(StateStoreSettings { store, every });
        self
    }

    /// Adds an action; all actions see every batch that has alerts.
    pub fn action(mut self, action: impl Action + 'static) -> Self {
        self.parts.actions.push(Arc::new(action));
        self
    }

    /// Adds a shared action.
    pub fn shared_action(mut self, action: Arc<dyn Action>) -> Self {
        self.parts.actions.push(action);
        self
    }

    /// Where dead letters go (default: logged as warnings).
    pub fn dead_letters(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.parts.dead_letters = sink;
        self
    }

    /// Runtime options.
    pub fn options(mut self, options: PipelineOptions) -> Self {
        self.parts.options = options;
        self
    }

    /// The pipeline, with its metrics registered.
    pub fn build(self) -> Pipeline {
        let parts = self.parts;
        let mut names: Vec<String> = Vec::new();
        let mut stage = |kind: &str, name: &str| {
            let base = format!("{kind}:{name}");
            let n = names.iter().filter(|existing| **existing == base).count();
            names.push(base.clone());
            let unique = if n == 0 {
                base
            } else {
                format!("{base}#{}", n + 1)
            };
            Arc::new(StageMetrics::new(unique))
        };
        let stages = Stages {
            source: stage("source", parts.source.name()),
            preps: parts
                .preps
                .iter()
                .map(|p| stage("prep", p.name()))
                .collect(),
            detector: parts.detector.as_ref().map(|d| stage("detector", d.name())),
            actions: parts
                .actions
                .iter()
                .map(|a| stage("action", a.name()))
                .collect(),
        };
        let mut all = vec![stages.source.clone()];
        all.extend(stages.preps.iter().cloned());
        all.extend(stages.detector.iter().cloned());
        all.extend(stages.actions.iter().cloned());
        Pipeline {
            parts,
            stages,
            metrics: Arc::new(PipelineMetrics::new(all)),
        }
    }
}
