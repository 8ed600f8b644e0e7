//! Per-stage metrics, readable while a pipeline runs.
//!
//! Every stage owns a [`StageMetrics`]: rows and batches in and out, errors, drops,
//! dead letters, the depth of its input queue and an HDR histogram of its per-batch latency.
//! [`PipelineMetrics::snapshot`] copies them all; [`PipelineMetrics::render_prometheus`]
//! renders them in the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters, a queue gauge and a latency histogram for one stage.
#[derive(Debug)]
pub struct StageMetrics {
    name: String,
    rows_in: AtomicU64,
    rows_out: AtomicU64,
    batches_in: AtomicU64,
    batches_out: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    dead_lettered: AtomicU64,
    queue_depth: AtomicI64,
    /// Per-batch processing time in nanoseconds.
    latency: Mutex<Histogram<u64>>,
    /// Gauges a component publishes itself (e.g. Kafka consumer lag per partition), by name
    /// and sorted labels.
    gauges: Mutex<BTreeMap<GaugeKey, f64>>,
}

/// A component gauge's name and sorted labels.
type GaugeKey = (String, Vec<(String, String)>);

impl StageMetrics {
    /// Metrics for a stage called `name` (e.g. `detector:ewma`).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            batches_in: AtomicU64::new(0),
            batches_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            queue_depth: AtomicI64::new(0),
            // 1 ns .. 1 h at 3 significant digits: ~190 KiB, allocated once per stage.
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                    .expect("static histogram bounds are valid"),
            ),
            gauges: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets a component gauge, rendered as `smartcloudops_<name>{stage="…", labels…}`.
    pub fn set_gauge(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        if let Ok(mut g) = self.gauges.lock() {
            g.insert((name.to_owned(), labels), value);
        }
    }

    /// Removes every gauge called `name` (before republishing a fresh set).
    pub fn clear_gauges(&self, name: &str) {
        if let Ok(mut g) = self.gauges.lock() {
            g.retain(|(n, _), _| n != name);
        }
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A batch of `rows` rows entered the stage.
    pub fn record_in(&self, rows: usize) {
        self.rows_in.fetch_add(rows as u64, Ordering::Relaxed);
        self.batches_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch of `rows` rows left the stage after `elapsed` of work.
    pub fn record_out(&self, rows: usize, elapsed: Duration) {
        self.rows_out.fetch_add(rows as u64, Ordering::Relaxed);
        self.batches_out.fetch_add(1, Ordering::Relaxed);
        self.record_latency(elapsed);
    }

    /// Records the time one batch spent in the stage.
    pub fn record_latency(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
        if let Ok(mut h) = self.latency.lock() {
            h.saturating_record(nanos);
        }
    }

    /// The stage failed on something (a batch, a call).
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// `rows` rows were dropped by a when-full policy (and their batch nacked).
    pub fn record_dropped(&self, rows: usize) {
        self.dropped.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// `records` records were sent to the dead-letter output.
    pub fn record_dead_lettered(&self, records: usize) {
        self.dead_lettered
            .fetch_add(records as u64, Ordering::Relaxed);
    }

    pub(crate) fn queue_push(&self) {
        self.queue_depth.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn queue_pop(&self) {
        self.queue_depth.fetch_sub(1, Ordering::Relaxed);
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> StageSnapshot {
        let (count, p50, p99, p999, max) = match self.latency.lock() {
            Ok(h) => (
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
            ),
            Err(_) => (0, 0, 0, 0, 0),
        };
        StageSnapshot {
            name: self.name.clone(),
            rows_in: self.rows_in.load(Ordering::Relaxed),
            rows_out: self.rows_out.load(Ordering::Relaxed),
            batches_in: self.batches_in.load(Ordering::Relaxed),
            batches_out: self.batches_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            queue_depth: self.queue_depth.load(Ordering::Relaxed).max(0) as u64,
            latency_count: count,
            latency_p50_ns: p50,
            latency_p99_ns: p99,
            latency_p999_ns: p999,
            latency_max_ns: max,
            gauges: self
                .gauges
                .lock()
                .map(|g| {
                    g.iter()
                        .map(|((name, labels), value)| GaugeSnapshot {
                            name: name.clone(),
                            labels: labels.clone(),
                            value: *value,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// One component gauge of a stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GaugeSnapshot {
    /// Metric name without the `smartcloudops_` prefix, e.g. `kafka_consumer_lag`.
    pub name: String,
    /// Labels besides `stage`, sorted.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// A point-in-time copy of a stage's metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageSnapshot {
    /// Stage name, e.g. `source:file`, `detector:ewma`, `action:log`.
    pub name: String,
    /// Rows received.
    pub rows_in: u64,
    /// Rows passed on.
    pub rows_out: u64,
    /// Batches received.
    pub batches_in: u64,
    /// Batches passed on.
    pub batches_out: u64,
    /// Failures (a failed batch, a failed action call).
    pub errors: u64,
    /// Rows dropped by a when-full policy.
    pub dropped: u64,
    /// Records (or rows) sent to the dead-letter output.
    pub dead_lettered: u64,
    /// Batches waiting in the stage's input queue.
    pub queue_depth: u64,
    /// Batches timed.
    pub latency_count: u64,
    /// Median per-batch latency, ns.
    pub latency_p50_ns: u64,
    /// 99th percentile per-batch latency, ns.
    pub latency_p99_ns: u64,
    /// 99.9th percentile per-batch latency, ns.
    pub latency_p999_ns: u64,
    /// Largest per-batch latency, ns.
    pub latency_max_ns: u64,
    /// Gauges the stage's component publishes (e.g. Kafka consumer lag per partition).
    pub gauges: Vec<GaugeSnapshot>,
}

/// All the metrics of one pipeline.
#[derive(Debug)]
pub struct PipelineMetrics {
    stages: Vec<Arc<StageMetrics>>,
    batches_acked: AtomicU64,
    batches_nacked: AtomicU64,
    rows_acked: AtomicU64,
    rows_nacked: AtomicU64,
    alerts: AtomicU64,
    started: Instant,
}

impl PipelineMetrics {
    pub(crate) fn new(stages: Vec<Arc<StageMetrics>>) -> Self {
        Self {
            stages,
            batches_acked: AtomicU64::new(0),
            batches_nacked: AtomicU64::new(0),
            rows_acked: AtomicU64::new(0),
            rows_nacked: AtomicU64::new(0),
            alerts: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The stage called `name`, if any.
    pub fn stage(&self, name: &str) -> Option<&Arc<StageMetrics>> {
        self.stages.iter().find(|s| s.name() == name)
    }

    pub(crate) fn record_outcome(&self, acked: bool, rows: usize) {
        if acked {
            self.batches_acked.fetch_add(1, Ordering::Relaxed);
            self.rows_acked.fetch_add(rows as u64, Ordering::Relaxed);
        } else {
            self.batches_nacked.fetch_add(1, Ordering::Relaxed);
            self.rows_nacked.fetch_add(rows as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_alerts(&self, n: usize) {
        self.alerts.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A copy of every counter and gauge.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            batches_acked: self.batches_acked.load(Ordering::Relaxed),
            batches_nacked: self.batches_nacked.load(Ordering::Relaxed),
            rows_acked: self.rows_acked.load(Ordering::Relaxed),
            rows_nacked: self.rows_nacked.load(Ordering::Relaxed),
            alerts: self.alerts.load(Ordering::Relaxed),
            stages: self.stages.iter().map(|s| s.snapshot()).collect(),
        }
    }

    /// The metrics in the Prometheus text exposition format (names `smartcloudops_*`, base
    /// units: seconds, not nanoseconds).
    pub fn render_prometheus(&self) -> String {
        self.snapshot().render_prometheus()
    }
}

/// A point-in-time copy of a pipeline's metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    /// Seconds since the pipeline was built.
    pub uptime_seconds: f64,
    /// Batches whose source was told they were fully handled.
    pub batches_acked: u64,
    /// Batches whose source was told they failed.
    pub batches_nacked: u64,
    /// Rows in acked batches.
    pub rows_acked: u64,
    /// Rows in nacked batches.
    pub rows_nacked: u64,
    /// Rows the detector flagged as anomalous.
    pub alerts: u64,
    /// One entry per stage, in pipeline order.
    pub stages: Vec<StageSnapshot>,
}

impl MetricsSnapshot {
    /// The stage called `name`, if any.
    pub fn stage(&self, name: &str) -> Option<&StageSnapshot> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Total dead-lettered records over all stages.
    pub fn dead_lettered(&self) -> u64 {
        self.stages.iter().map(|s| s.dead_lettered).sum()
    }

    /// Total errors over all stages.
    pub fn errors(&self) -> u64 {
        self.stages.iter().map(|s| s.errors).sum()
    }

    /// The snapshot in the Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
            let _ = writeln!(out, "# HELP smartcloudops_{name} {help}");
            let _ = writeln!(out, "# TYPE smartcloudops_{name} {kind}");
            let _ = writeln!(out, "smartcloudops_{name} {value}");
        };
        gauge(
            "uptime_seconds",
            "Seconds since the pipeline started.",
            "gauge",
            self.uptime_seconds,
        );
        gauge(
            "batches_acked_total",
            "Batches acknowledged to their source.",
            "counter",
            self.batches_acked as f64,
        );
        gauge(
            "batches_nacked_total",
            "Batches negatively acknowledged to their source.",
            "counter",
            self.batches_nacked as f64,
        );
        gauge(
            "rows_acked_total",
            "Rows in acknowledged batches.",
            "counter",
            self.rows_acked as f64,
        );
        gauge(
            "rows_nacked_total",
            "Rows in negatively acknowledged batches.",
            "counter",
            self.rows_nacked as f64,
        );
        gauge(
            "alerts_total",
            "Rows the detector flagged as anomalous.",
            "counter",
            self.alerts as f64,
        );

        type Field = fn(&StageSnapshot) -> f64;
        let per_stage: [(&str, &str, &str, Field); 9] = [
            (
                "stage_rows_in_total",
                "Rows received by the stage.",
                "counter",
                |s| s.rows_in as f64,
            ),
            (
                "stage_rows_out_total",
                "Rows passed on by the stage.",
                "counter",
                |s| s.rows_out as f64,
            ),
            (
                "stage_batches_in_total",
                "Batches received by the stage.",
                "counter",
                |s| s.batches_in as f64,
            ),
            (
                "stage_batches_out_total",
                "Batches passed on by the stage.",
                "counter",
                |s| s.batches_out as f64,
            ),
            (
                "stage_errors_total",
                "Failures in the stage.",
                "counter",
                |s| s.errors as f64,
            ),
            (
                "stage_dropped_rows_total",
                "Rows dropped by the stage's when-full policy.",
                "counter",
                |s| s.dropped as f64,
            ),
            (
                "stage_dead_lettered_total",
                "Records sent to the dead-letter output by the stage.",
                "counter",
                |s| s.dead_lettered as f64,
            ),
            (
                "stage_queue_depth",
                "Batches waiting in the stage's input queue.",
                "gauge",
                |s| s.queue_depth as f64,
            ),
            (
                "stage_latency_seconds_max",
                "Largest per-batch latency of the stage.",
                "gauge",
                |s| s.latency_max_ns as f64 / 1e9,
            ),
        ];
        for (name, help, kind, field) in per_stage {
            let _ = writeln!(out, "# HELP smartcloudops_{name} {help}");
            let _ = writeln!(out, "# TYPE smartcloudops_{name} {kind}");
            for s in &self.stages {
                let _ = writeln!(
                    out,
                    "smartcloudops_{name}{{stage=\"{}\"}} {}",
                    escape_label(&s.name),
                    field(s)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP smartcloudops_stage_latency_seconds Per-batch latency of the stage."
        );
        let _ = writeln!(out, "# TYPE smartcloudops_stage_latency_seconds summary");
        for s in &self.stages {
            let stage = escape_label(&s.name);
            for (q, v) in [
                ("0.5", s.latency_p50_ns),
                ("0.99", s.latency_p99_ns),
                ("0.999", s.latency_p999_ns),
            ] {
                let _ = writeln!(
                    out,
                    "smartcloudops_stage_latency_seconds{{stage=\"{stage}\",quantile=\"{q}\"}} {}",
                    v as f64 / 1e9
                );
            }
            let _ = writeln!(
                out,
                "smartcloudops_stage_latency_seconds_count{{stage=\"{stage}\"}} {}",
                s.latency_count
            );
        }
        // Component gauges, grouped by name so each gets one HELP/TYPE header.
        let mut by_name: BTreeMap<&str, Vec<(&str, &GaugeSnapshot)>> = BTreeMap::new();
        for s in &self.stages {
            for g in &s.gauges {
                by_name
                    .entry(g.name.as_str())
                    .or_default()
                    .push((s.name.as_str(), g));
            }
        }
        for (name, gauges) in by_name {
            let _ = writeln!(
                out,
                "# HELP smartcloudops_{name} Published by the stage's component."
            );
            let _ = writeln!(out, "# TYPE smartcloudops_{name} gauge");
            for (stage, g) in gauges {
                let mut labels = format!("stage=\"{}\"", escape_label(stage));
                for (k, v) in &g.labels {
                    let _ = write!(labels, ",{k}=\"{}\"", escape_label(v));
                }
                let _ = writeln!(out, "smartcloudops_{name}{{{labels}}} {}", g.value);
            }
        }
        out
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_latency_show_up_in_snapshot_and_exposition() {
        let stage = Arc::new(StageMetrics::new("detector:ewma"));
        let metrics = PipelineMetrics::new(vec![stage.clone()]);
        stage.record_in(10);
        stage.record_out(10, Duration::from_micros(250));
        stage.record_dead_lettered(2);
        metrics.record_outcome(true, 10);
        metrics.record_outcome(false, 5);
        let snap = metrics.snapshot();
        let s = snap.stage("detector:ewma").unwrap();
        assert_eq!(
            (s.rows_in, s.rows_out, s.batches_out, s.dead_lettered),
            (10, 10, 1, 2)
        );
        assert!(
            s.latency_p50_ns >= 249_000 && s.latency_p50_ns <= 251_000,
            "{}",
            s.latency_p50_ns
        );
        assert_eq!(
            (snap.batches_acked, snap.batches_nacked, snap.rows_nacked),
            (1, 1, 5)
        );
        let text = snap.render_prometheus();
        assert!(
            text.contains("smartcloudops_stage_rows_in_total{stage=\"detector:ewma\"} 10\n"),
            "{text}"
        );
        assert!(text.contains("smartcloudops_batches_nacked_total 1\n"));
        assert!(text.contains(
            "smartcloudops_stage_latency_seconds{stage=\"detector:ewma\",quantile=\"0.5\"} 0.00025"
        ));
    }

    #[test]
    fn component_gauges_are_rendered_with_their_labels_and_can_be_cleared() {
        let stage = Arc::new(StageMetrics::new("source:kafka"));
        let metrics = PipelineMetrics::new(vec![stage.clone()]);
        stage.set_gauge(
            "kafka_consumer_lag",
            &[("topic", "m"), ("partition", "0")],
            12.0,
        );
        stage.set_gauge(
            "kafka_consumer_lag",
            &[("topic", "m"), ("partition", "1")],
            0.0,
        );
        let text = metrics.render_prometheus();
        assert!(
            text.contains("# TYPE smartcloudops_kafka_consumer_lag gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("smartcloudops_kafka_consumer_lag{stage=\"source:kafka\",partition=\"0\",topic=\"m\"} 12\n"),
            "{text}"
        );
        stage.clear_gauges("kafka_consumer_lag");
        assert!(metrics.snapshot().stages[0].gauges.is_empty());
    }
}
