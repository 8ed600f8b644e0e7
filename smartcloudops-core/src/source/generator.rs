//! Synthetic metrics: many series with daily seasonality, noise and injected incidents.
//!
//! Deterministic for a given seed, so demos, tests and benchmarks are repeatable. Series `i`
//! has labels `host=host-<i>`, `service=svc-<i % 16>`, `region=<one of three>` and a metric
//! from `metrics` (round robin). Its value is a base level, a daily sine wave and Gaussian
//! noise; [`InjectedAnomaly`] adds spikes or level shifts at chosen steps.

use std::f64::consts::TAU;
use std::time::Duration;

use futures::StreamExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Source, SourceBatch, SourceConfig, SourceContext, SourceStream, check_batch_size};
use crate::ack::Ack;
use crate::component::{BuildContext, ComponentConfig, MAX_DURATION};
use crate::error::{Problems, Result};
use crate::schema::{MetricsBatchBuilder, parse_ts, series_id};

/// Configuration of a [`GeneratorSource`] (`[source] type = "generator"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Number of series.
    pub series: usize,
    /// Metric names, assigned to series round robin.
    pub metrics: Vec<String>,
    /// Event-time step between two samples of a series.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Samples per series; `0` generates forever.
    pub points: u64,
    /// Samples per second of wall-clock time over all series; `0` is as fast as possible.
    pub rate: f64,
    /// Event time of the first step, RFC 3339.
    pub start: String,
    /// Random seed.
    pub seed: u64,
    /// Rows per batch.
    pub batch_size: usize,
    /// Noise standard deviation as a fraction of each series' base level.
    pub noise: f64,
    /// Incidents to inject (`[[source.anomaly]]`).
    #[serde(rename = "anomaly")]
    pub anomalies: Vec<InjectedAnomaly>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            series: 100,
            metrics: vec!["cpu_utilization".to_owned()],
            interval: Duration::from_secs(10),
            points: 360,
            rate: 0.0,
            start: "2026-01-01T00:00:00Z".to_owned(),
            seed: 1,
            batch_size: 4096,
            noise: 0.02,
            anomalies: Vec::new(),
        }
    }
}

/// An incident the generator injects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectedAnomaly {
    /// Indices of the affected series.
    pub series: Vec<usize>,
    /// First step (0-based sample index) of the incident.
    pub at: u64,
    /// Steps it lasts; `0` lasts to the end.
    #[serde(default = "one")]
    pub duration: u64,
    /// Its shape.
    #[serde(default)]
    pub kind: AnomalyKind,
    /// Its size in multiples of the series' noise standard deviation.
    #[serde(default = "ten")]
    pub magnitude: f64,
}

fn one() -> u64 {
    1
}

fn ten() -> f64 {
    10.0
}

/// The shape of an injected incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// The value jumps by `magnitude` sigmas for `duration` steps, then returns.
    #[default]
    Spike,
    /// The value ramps linearly to `magnitude` sigmas over `duration` steps and stays there.
    LevelShift,
}

/// Generates synthetic metrics. See the [module docs](self).
#[derive(Debug)]
pub struct GeneratorSource {
    config: GeneratorConfig,
}

impl GeneratorSource {
    /// A generator for `config`.
    pub fn new(config: GeneratorConfig) -> Self {
        Self { config }
    }
}

impl Source for GeneratorSource {
    fn name(&self) -> &str {
        "generator"
    }

    fn open(self: Box<Self>, _ctx: SourceContext) -> Result<SourceStream> {
        let generator = Generator::new(self.config);
        Ok(futures::stream::unfold(generator, |mut g| async move {
            g.next_batch().await.map(|b| (Ok(b), g))
        })
        .boxed())
    }
}

struct Series {
    metric: String,
    labels: Vec<(String, String)>,
    id: u64,
    base: f64,
    amplitude: f64,
    phase: f64,
}

/// The generator's state; also usable synchronously (benchmarks) through [`Generator::fill`].
#[derive(Debug)]
pub struct Generator {
    config: GeneratorConfig,
    series: Vec<Series>,
    rng: SmallRng,
    start_ms: i64,
    step: u64,
    next_series: usize,
    emitted: u64,
    started: Option<Instant>,
    builder: MetricsBatchBuilder,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Series").field("id", &self.id).finish()
    }
}

const REGIONS: [&str; 3] = ["eu-west-1", "us-east-1", "ap-south-1"];

impl Generator {
    /// A generator at step 0.
    pub fn new(config: GeneratorConfig) -> Self {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let metrics = if config.metrics.is_empty() {
            vec!["cpu_utilization".to_owned()]
        } else {
            config.metrics.clone()
        };
        let series = (0..config.series)
            .map(|i| {
                let metric = metrics[i % metrics.len()].clone();
                let labels = vec![
                    ("host".to_owned(), format!("host-{i:05}")),
                    ("region".to_owned(), REGIONS[i % REGIONS.len()].to_owned()),
                    ("service".to_owned(), format!("svc-{}", i % 16)),
                ];
                let id = series_id(&metric, &labels);
                let base = 20.0 + 60.0 * rng.random::<f64>();
                Series {
                    metric,
                    labels,
                    id,
                    base,
                    amplitude: base * (0.05 + 0.15 * rng.random::<f64>()),
                    phase: TAU * rng.random::<f64>(),
                }
            })
            .collect();
        let start_ms = parse_ts(&config.start).unwrap_or(1_767_225_600_000);
        let batch_size = config.batch_size.max(1);
        Self {
            series,
            rng,
            start_ms,
            step: 0,
            next_series: 0,
            emitted: 0,
            started: None,
            builder: MetricsBatchBuilder::with_capacity(batch_size),
            config,
        }
    }

    fn done(&self) -> bool {
        self.series.is_empty() || (self.config.points > 0 && self.step >= self.config.points)
    }

    /// Appends up to `rows` samples to the internal builder and returns them as a batch;
    /// `None` when the configured number of points has been produced.
    pub fn fill(&mut self, rows: usize) -> Option<arrow::record_batch::RecordBatch> {
        let interval_ms = self.config.interval.as_millis().max(1) as f64;
        let day_steps = (86_400_000.0 / interval_ms).max(1.0);
        while self.builder.len() < rows && !self.done() {
            let s = &self.series[self.next_series];
            let t = self.step;
            let noise_sd = self.config.noise * s.base;
            let noise: f64 = self.rng.sample(StandardNormal);
            let mut value = s.base
                + s.amplitude * (TAU * t as f64 / day_steps + s.phase).sin()
                + noise * noise_sd;
            for a in &self.config.anomalies {
                if !a.series.contains(&self.next_series) || t < a.at {
                    continue;
                }
                let into = t - a.at;
                value += match a.kind {
                    AnomalyKind::Spike if a.duration == 0 || into < a.duration => {
                        a.magnitude * noise_sd
                    }
                    AnomalyKind::Spike => 0.0,
                    AnomalyKind::LevelShift => {
                        let ramp = if a.duration == 0 {
                            1.0
                        } else {
                            ((into + 1) as f64 / a.duration as f64).min(1.0)
                        };
                        a.magnitude * noise_sd * ramp
                    }
                };
            }
            let ts = self
                .start_ms
                .saturating_add((t as f64 * interval_ms) as i64);
            self.builder
                .push_with_id(ts, &s.metric, &s.labels, value, s.id);
            self.next_series += 1;
            if self.next_series == self.series.len() {
                self.next_series = 0;
                self.step += 1;
            }
        }
        (!self.builder.is_empty()).then(|| self.builder.finish())
    }

    async fn next_batch(&mut self) -> Option<SourceBatch> {
        let batch = self.fill(self.config.batch_size.max(1))?;
        if self.config.rate > 0.0 {
            let started = *self.started.get_or_insert_with(Instant::now);
            let due = Duration::from_secs_f64(self.emitted as f64 / self.config.rate);
            tokio::time::sleep_until(started + due).await;
        }
        self.emitted += batch.num_rows() as u64;
        Some(SourceBatch::new(batch, Ack::none()))
    }
}

impl ComponentConfig for GeneratorConfig {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.check(
            (1..=100_000_000).contains(&self.series),
            "series",
            format!("must be between 1 and 100000000, got {}", self.series),
            "",
        );
        check_batch_size(&mut p, self.batch_size, "");
        p.check(
            !self.interval.is_zero() && self.interval <= MAX_DURATION,
            "interval",
            "must be longer than 0 and at most a day",
            "e.g. \"10s\"",
        );
        p.check(
            self.rate == 0.0 || (0.001..=1e12).contains(&self.rate),
            "rate",
            format!(
                "must be 0 (unthrottled) or between 0.001 and 1e12, got {}",
                self.rate
            ),
            "",
        );
        p.check(
            self.noise.is_finite() && self.noise >= 0.0,
            "noise",
            format!("must be 0 or positive, got {}", self.noise),
            "",
        );
        p.check(
            parse_ts(&self.start).is_some(),
            "start",
            format!("{:?} is not an RFC 3339 time", self.start),
            "e.g. \"2026-01-01T00:00:00Z\"",
        );
        for (i, a) in self.anomalies.iter().enumerate() {
            for s in &a.series {
                p.check(
                    *s < self.series,
                    format!("anomaly[{i}].series"),
                    format!(
                        "series index {s} is out of range: there are {} series",
                        self.series
                    ),
                    "indices start at 0",
                );
            }
            p.check(
                a.magnitude.is_finite(),
                format!("anomaly[{i}].magnitude"),
                "must be a finite number",
                "",
            );
        }
        p
    }

    fn summary(&self, _ctx: &BuildContext) -> String {
        format!("generator ({} series)", self.series)
    }
}

impl SourceConfig for GeneratorConfig {
    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Source>> {
        Ok(Box::new(GeneratorSource::new(self.clone())))
    }

    /// Synthetic rows are dated from `start`, not from the wall clock.
    fn default_timestamps(&self) -> super::TimestampPolicy {
        super::TimestampPolicy::unchecked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MetricsColumns;

    #[test]
    fn deterministic_counts_and_injected_spike() {
        let config = GeneratorConfig {
            series: 3,
            points: 50,
            batch_size: 7,
            anomalies: vec![InjectedAnomaly {
                series: vec![1],
                at: 40,
                duration: 1,
                kind: AnomalyKind::Spike,
                magnitude: 50.0,
            }],
            ..GeneratorConfig::default()
        };
        let mut a = Generator::new(config.clone());
        let mut b = Generator::new(config);
        let mut rows = 0;
        let mut series1 = Vec::new();
        while let Some(batch) = a.fill(7) {
            assert_eq!(batch, b.fill(7).unwrap(), "same seed, same data");
            let c = MetricsColumns::try_new(&batch, "t").unwrap();
            for i in 0..batch.num_rows() {
                if c.labels(i)[0].1 == "host-00001" {
                    series1.push(c.value.value(i));
                }
            }
            rows += batch.num_rows();
        }
        assert_eq!(rows, 150);
        assert_eq!(series1.len(), 50);
        let before: f64 = series1[30..40].iter().sum::<f64>() / 10.0;
        assert!(
            series1[40] - before > 20.0 * 0.02 * 20.0,
            "spike visible: {series1:?}"
        );
        assert!(
            (series1[41] - before).abs() < (series1[40] - before) / 2.0,
            "spike over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_in_wall_clock_time() {
        let config = GeneratorConfig {
            series: 10,
            points: 100,
            batch_size: 100,
            rate: 500.0,
            ..GeneratorConfig::default()
        };
        let start = Instant::now();
        let stream = Box::new(GeneratorSource::new(config))
            .open(SourceContext::detached())
            .unwrap();
        let batches: Vec<_> = stream.collect().await;
        assert_eq!(batches.len(), 10);
        // 1000 samples at 500/s: the last batch is due after 900 samples = 1.8 s.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1800) && elapsed < Duration::from_millis(1900),
            "{elapsed:?}"
        );
        for b in batches {
            b.unwrap().ack.ack();
        }
    }
}
