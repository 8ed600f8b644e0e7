//! Keeps or drops rows by metric name (`[[prep]] type = "filter"`).

use arrow::array::{Array, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::{Prep, PrepConfig};
use crate::component::{BuildContext, ComponentConfig};
use crate::error::Result;
use crate::schema::MetricsColumns;

/// Configuration of a [`MetricFilter`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricFilterConfig {
    /// Keep only these metrics (all when empty).
    pub include: Vec<String>,
    /// Drop these metrics.
    pub exclude: Vec<String>,
}

/// Keeps rows whose metric is included and not excluded. Works on the metric dictionary, so
/// the cost per row is one lookup in a small boolean table.
#[derive(Debug)]
pub struct MetricFilter {
    config: MetricFilterConfig,
}

impl MetricFilter {
    /// A filter for `config`.
    pub fn new(config: MetricFilterConfig) -> Self {
        Self { config }
    }

    fn keeps(&self, metric: &str) -> bool {
        (self.config.include.is_empty() || self.config.include.iter().any(|m| m == metric))
            && !self.config.exclude.iter().any(|m| m == metric)
    }
}

impl Prep for MetricFilter {
    fn name(&self) -> &str {
        "filter"
    }

    fn process(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let cols = MetricsColumns::try_new(batch, "prep:filter")?;
        let keep_name: Vec<bool> = (0..cols.metric_names.len())
            .map(|i| self.keeps(cols.metric_names.value(i)))
            .collect();
        if keep_name.iter().all(|k| *k) {
            return Ok(batch.clone());
        }
        let mask: BooleanArray = cols
            .metric
            .keys()
            .values()
            .iter()
            .map(|&k| Some(keep_name.get(k as usize).copied().unwrap_or(false)))
            .collect();
        Ok(filter_record_batch(batch, &mask)?)
    }
}

impl ComponentConfig for MetricFilterConfig {}

impl PrepConfig for MetricFilterConfig {
    fn build(&self, _ctx: &BuildContext, _input: &SchemaRef) -> Result<Box<dyn Prep>> {
        Ok(Box::new(MetricFilter::new(self.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MetricsBatchBuilder;

    #[test]
    fn include_and_exclude() {
        let mut b = MetricsBatchBuilder::default();
        for m in ["cpu", "mem", "disk", "cpu"] {
            b.push(0, m, &[] as &[(&str, &str)], 1.0);
        }
        let batch = b.finish();
        let mut f = MetricFilter::new(MetricFilterConfig {
            include: vec!["cpu".into(), "mem".into()],
            exclude: vec!["mem".into()],
        });
        let out = f.process(&batch).unwrap();
        let c = MetricsColumns::try_new(&out, "t").unwrap();
        assert_eq!(out.num_rows(), 2);
        assert_eq!((c.metric(0), c.metric(1)), ("cpu", "cpu"));
    }
}
