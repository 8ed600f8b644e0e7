//! The quickstart pipeline assembled in Rust instead of TOML, with a custom action.
//!
//! ```sh
//! cargo run -p smartcloudops-examples --example pipeline_in_code
//! ```

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use smartcloudops_core::action::{LogAction, LogActionConfig};
use smartcloudops_core::dead_letter::MemoryDeadLetters;
use smartcloudops_core::detector::{EwmaConfig, EwmaDetector};
use smartcloudops_core::source::{FileSource, FileSourceConfig};
use smartcloudops_core::{Action, ActionInput, Pipeline, Result};

/// Counts alerts per host — a stand-in for a pager, a ticket system or a remediation.
#[derive(Debug, Default)]
struct CountPerHost {
    web2: AtomicUsize,
    others: AtomicUsize,
}

impl Action for CountPerHost {
    fn name(&self) -> &str {
        "count_per_host"
    }

    fn execute<'a>(&'a self, input: &'a ActionInput) -> BoxFuture<'a, Result<()>> {
        for alert in &input.alerts {
            let counter = match alert.labels.get("host").map(String::as_str) {
                Some("web-2") => &self.web2,
                _ => &self.others,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Box::pin(async { Ok(()) })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/web-fleet.jsonl");
    let source = FileSource::new(FileSourceConfig {
        batch_size: 256,
        ..FileSourceConfig::new(data)
    });
    let counts = Arc::new(CountPerHost::default());
    let dead_letters = Arc::new(MemoryDeadLetters::default());

    let pipeline = Pipeline::builder(source)
        .detector(EwmaDetector::new(EwmaConfig {
            threshold: 4.0,
            ..EwmaConfig::default()
        }))
        .action(LogAction::new(LogActionConfig::default()))
        .shared_action(counts.clone())
        .dead_letters(dead_letters.clone())
        .build();

    // Ctrl-C drains in-flight batches before returning.
    let handle = pipeline.spawn();
    let shutdown = handle.shutdown_token();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    });
    let report = handle.wait().await?;

    println!(
        "{} rows, {} alerts ({} on web-2, {} elsewhere), {} dead letter(s):",
        report.metrics.rows_acked,
        report.metrics.alerts,
        counts.web2.load(Ordering::Relaxed),
        counts.others.load(Ordering::Relaxed),
        dead_letters.letters().len(),
    );
    for letter in dead_letters.letters() {
        println!("  {} — {}", letter.origin, letter.reason);
    }
    anyhow::ensure!(
        counts.web2.load(Ordering::Relaxed) > 0,
        "the incident was missed"
    );
    Ok(())
}
