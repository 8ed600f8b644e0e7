//! # SmartCloudOps core
//!
//! An embeddable stream-processing engine for automated cloud operations: metrics and events
//! stream in as Apache Arrow [`RecordBatch`]es, streaming detectors score every row per series,
//! and actions respond to what is anomalous — with acknowledgements, so nothing a source
//! considers delivered is ever lost.
//!
//! A pipeline is four kinds of stage, each a small trait:
//!
//! | stage | trait | shape |
//! |-------|-------|-------|
//! | source | [`Source`] | a stream of `(RecordBatch, Ack)` |
//! | prep | [`Prep`] | `&RecordBatch → RecordBatch`, synchronous |
//! | detector | [`Detector`] | `&mut self`, batch → scored batch, state per series |
//! | action | [`Action`] | async, consumes scored batches and [`Alert`]s |
//!
//! Batches flow through bounded queues; a slow action slows the source down rather than
//! growing memory. A batch is acknowledged to its source only after every action finished with
//! it. Records that cannot be decoded or processed go to a [dead-letter output](dead_letter)
//! with the reason and are counted in the stage's [metrics].
//!
//! ## Example
//!
//! Synthetic series with an injected incident, scored by an EWMA detector, alerts collected
//! in memory:
//!
//! ```
//! use std::sync::Arc;
//! use smartcloudops_core::{Pipeline, Result};
//! use smartcloudops_core::action::MemoryAction;
//! use smartcloudops_core::detector::{EwmaConfig, EwmaDetector};
//! use smartcloudops_core::source::generator::{GeneratorConfig, GeneratorSource, InjectedAnomaly};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<()> {
//! let source = GeneratorSource::new(GeneratorConfig {
//!     series: 20,
//!     points: 200,
//!     anomalies: vec![InjectedAnomaly {
//!         series: vec![7], at: 150, duration: 1, magnitude: 30.0, kind: Default::default(),
//!     }],
//!     ..GeneratorConfig::default()
//! });
//! let alerts = Arc::new(MemoryAction::new());
//! let report = Pipeline::builder(source)
//!     .detector(EwmaDetector::new(EwmaConfig::default()))
//!     .shared_action(alerts.clone())
//!     .build()
//!     .spawn()
//!     .wait()
//!     .await?;
//!
//! assert_eq!(report.metrics.rows_acked, 20 * 200);
//! let alerts = alerts.alerts();
//! assert!(alerts.iter().any(|a| a.labels["host"] == "host-00007"));
//! # Ok(())
//! # }
//! ```
//!
//! Pipelines can also be described in TOML and built with [`config::PipelineConfig`]; the
//! `smartcloudops` binary does exactly that.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod ack;
pub mod action;
pub mod component;
pub mod config;
pub mod dead_letter;
pub mod decision;
pub mod decode;
pub mod detector;
pub mod error;
pub mod eval;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod prep;
#[cfg(feature = "redis")]
pub mod redis;
pub mod schema;
pub mod source;
pub mod util;

pub use arrow::record_batch::RecordBatch;

pub use crate::ack::{Ack, AckOutcome};
pub use crate::action::{Action, ActionInput, Alert};
pub use crate::config::{PipelineConfig, Registry};
pub use crate::detector::Detector;
pub use crate::error::{Error, Problems, Result};
pub use crate::pipeline::{Pipeline, PipelineHandle, PipelineOptions, RunReport};
pub use crate::prep::Prep;
pub use crate::source::{Source, SourceBatch};
