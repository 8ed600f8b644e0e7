//! Runtime settings: queue sizes, what happens when a queue is full, action concurrency,
//! the shutdown drain limit, and where durable state is kept.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a stage does when the queue to the next stage is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: backpressure reaches the source. Nothing is lost.
    #[default]
    Block,
    /// Drop the new batch, count its rows as dropped and nack it to its source (which may
    /// redeliver it). For live feeds where freshness beats completeness.
    DropNewest,
}

/// Runtime settings of a pipeline (`[runtime]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineOptions {
    /// Batches each inter-stage queue holds.
    pub channel_capacity: usize,
    /// What happens when a queue is full.
    pub when_full: WhenFull,
    /// Batches the action stage works on at once.
    pub action_concurrency: usize,
    /// How long a shutdown may drain before in-flight batches are abandoned (and nacked).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// The directory of every durable piece of state: the decision journal and outbox,
    /// idempotency keys, the audit log, dead letters and the detector snapshot (each unless
    /// configured elsewhere). A deployment mounts one volume here. Relative to the config
    /// file; [`DEFAULT_STATE_DIR`] when absent. Created (mode 0700) when the pipeline is built.
    pub state_dir: PathBuf,
}

/// `[runtime] state_dir` when absent, relative to the config file.
pub const DEFAULT_STATE_DIR: &str = "smartcloudops-state";

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            channel_capacity: 8,
            when_full: WhenFull::Block,
            action_concurrency: 4,
            shutdown_timeout: Duration::from_secs(30),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}
