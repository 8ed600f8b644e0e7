//! A source kind of your own, usable from TOML: the one thing an embedder writes is the
//! kind's folder (here, this file) plus one registry line.
//!
//! ```sh
//! cargo run -p smartcloudops-examples --example custom_source
//! ```
//!
//! The kind, `type = "heartbeat"`, emits one `heartbeat_lag_seconds` sample per host and tick,
//! with one host falling behind at a chosen tick. The pipeline around it (detector, actions)
//! comes from a TOML file like any other.

use std::sync::Arc;

use futures::StreamExt;
use serde::Deserialize;
use smartcloudops_core::action::MemoryAction;
use smartcloudops_core::component::{BuildContext, ComponentConfig};
use smartcloudops_core::config::{PipelineConfig, Registry};
use smartcloudops_core::schema::MetricsBatchBuilder;
use smartcloudops_core::source::{Source, SourceBatch, SourceConfig, SourceContext, SourceStream};
use smartcloudops_core::{Ack, Problems, Result};

// ---- the kind: config, checks, summary, build -------------------------------------------

/// `[source] type = "heartbeat"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatConfig {
    hosts: usize,
    ticks: usize,
    /// The tick at which `host-0` falls behind by `lag` seconds.
    stall_at: usize,
    #[serde(default = "default_lag")]
    lag: f64,
}

fn default_lag() -> f64 {
    30.0
}

impl ComponentConfig for HeartbeatConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.check(self.hosts > 0, "hosts", "must be at least 1", "");
        p.check(
            self.stall_at < self.ticks,
            "stall_at",
            format!("must be below ticks ({})", self.ticks),
            "ticks start at 0",
        );
        p
    }

    fn summary(&self, _ctx: &BuildContext) -> String {
        format!("heartbeat of {} hosts", self.hosts)
    }
}

impl SourceConfig for HeartbeatConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(HeartbeatSource(self.clone())))
    }
}

// ---- the source itself -------------------------------------------------------------------

#[derive(Debug)]
struct HeartbeatSource(HeartbeatConfig);

impl Source for HeartbeatSource {
    fn name(&self) -> &str {
        "heartbeat"
    }

    fn open(self: Box<Self>, _ctx: SourceContext) -> Result<SourceStream> {
        let c = self.0;
        // Live data, dated up to now: the pipeline checks a custom source's timestamps
        // against the wall clock as it does any live source's.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let first = now - c.ticks as i64 * 10_000;
        let batches = (0..c.ticks).map(move |tick| {
            let mut rows = MetricsBatchBuilder::with_capacity(c.hosts);
            for host in 0..c.hosts {
                // A little jitter so the detector learns a spread, and one stall.
                let jitter = ((tick * 7 + host * 13) % 10) as f64 / 100.0;
                let lag = if host == 0 && tick == c.stall_at {
                    c.lag
                } else {
                    1.0 + jitter
                };
                let name = format!("host-{host}");
                rows.push(
                    first + tick as i64 * 10_000,
                    "heartbeat_lag_seconds",
                    &[("host", name.as_str())],
                    lag,
                );
            }
            Ok(SourceBatch::new(rows.finish(), Ack::none()))
        });
        Ok(futures::stream::iter(batches).boxed())
    }
}

// ---- using it ----------------------------------------------------------------------------

const PIPELINE: &str = r#"
[source]
type = "heartbeat"
hosts = 20
ticks = 200
stall_at = 150

[detector]
type = "ewma"
threshold = 6.0

[[action]]
type = "log"
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // The one registry line.
    let mut registry = Registry::builtin();
    registry.source::<HeartbeatConfig>("heartbeat");

    // Its checks run with everyone else's, with field paths and hints.
    let bad = PIPELINE.replace("stall_at = 150", "stall_at = 500");
    let errors = PipelineConfig::parse_with(&bad, ".".as_ref(), |_| None, &registry)
        .expect_err("stall_at beyond ticks is a configuration error");
    println!("{errors}");
    anyhow::ensure!(errors.0[0].path == "source.stall_at");

    let config = PipelineConfig::parse_with(PIPELINE, ".".as_ref(), |_| None, &registry)?;
    println!("{}", config.summary());
    // An action that exists only in code joins the configured ones: it keeps the alerts.
    let alerts = Arc::new(MemoryAction::new());
    let report = config
        .builder()?
        .shared_action(alerts.clone())
        .build()
        .spawn()
        .wait()
        .await?;
    let alerts = alerts.alerts();
    println!(
        "{} rows scored, {} alerts: {:?}",
        report.metrics.rows_acked,
        alerts.len(),
        alerts.iter().map(|a| &a.labels["host"]).collect::<Vec<_>>()
    );
    anyhow::ensure!(report.metrics.rows_acked == 20 * 200);
    anyhow::ensure!(
        alerts.iter().any(|a| a.labels["host"] == "host-0"),
        "the stalled host was not flagged"
    );
    Ok(())
}
