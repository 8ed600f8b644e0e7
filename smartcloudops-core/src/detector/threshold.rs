//! Static threshold rules: `cpu_utilization above 90`, `free_disk_bytes below 1e9`.
//!
//! The oldest detector there is, and still the right one when the limit is known (a disk is
//! full at 100 %, whatever its history). A row is checked against every rule whose metric
//! and labels match; any breached rule flags it with score 1, and the band is the rule's
//! limits. No state, no warm-up.

use std::collections::BTreeMap;

use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::{Detector, ScoreColumnsBuilder, Verdict};
use crate::error::Result;
use crate::schema::MetricsColumns;

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    /// The metric the rule applies to; `*` (the default) for all.
    #[serde(default = "any_metric")]
    pub metric: String,
    /// Labels a row must carry with exactly these values.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Values strictly above this breach the rule.
    pub above: Option<f64>,
    /// Values strictly below this breach the rule.
    pub below: Option<f64>,
}

fn any_metric() -> String {
    "*".to_owned()
}

/// Configuration of the threshold detector (`[detector] type = "threshold"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdConfig {
    /// The rules (`[[detector.rule]]`).
    #[serde(rename = "rule", default)]
    pub rules: Vec<ThresholdRule>,
}

impl ThresholdConfig {
    /// Problems with the values, as `(field, message)` pairs; empty when valid.
    pub fn problems(&self) -> crate::error::Problems {
        let mut out = crate::error::Problems::new();
        if self.rules.is_empty() {
            out.push("rule", "at least one rule is needed");
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.above.is_none() && r.below.is_none() {
                out.push(format!("rule[{i}]"), "needs `above`, `below` or both");
            }
            if r.above.is_some_and(f64::is_nan) || r.below.is_some_and(f64::is_nan) {
                out.push(format!("rule[{i}]"), "limits must be numbers, not NaN");
            }
        }
        out
    }
}

/// The threshold detector. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct ThresholdDetector {
    config: ThresholdConfig,
}

impl ThresholdDetector {
    /// A detector applying `config`'s rules.
    pub fn new(config: ThresholdConfig) -> Self {
        Self { config }
    }

    fn check(&self, metric: &str, labels: &dyn Fn() -> Vec<(String, String)>, x: f64) -> Verdict {
        let mut verdict = Verdict::NONE;
        let mut cached: Option<Vec<(String, String)>> = None;
        for rule in &self.config.rules {
            if rule.metric != "*" && rule.metric != metric {
                continue;
            }
            if !rule.labels.is_empty() {
                let have = cached.get_or_insert_with(labels);
                let matches = rule
                    .labels
                    .iter()
                    .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v));
                if !matches {
                    continue;
                }
            }
            let breached = rule.above.is_some_and(|a| x > a) || rule.below.is_some_and(|b| x < b);
            if verdict.lower.is_nan() && verdict.upper.is_nan() {
                verdict.lower = rule.below.unwrap_or(f64::NAN);
                verdict.upper = rule.above.unwrap_or(f64::NAN);
            }
            if breached {
                verdict.score = 1.0;
                verdict.is_anomaly = true;
                verdict.lower = rule.below.unwrap_or(f64::NAN);
                verdict.upper = rule.above.unwrap_or(f64::NAN);
                break;
            }
        }
        verdict
    }
}

impl Detector for ThresholdDetector {
    fn name(&self) -> &str {
        "threshold"
    }

    fn score(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let cols = MetricsColumns::try_new(batch, "detector:threshold")?;
        let mut out = ScoreColumnsBuilder::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            let x = cols.value.value(row);
            out.push(self.check(cols.metric(row), &|| cols.labels(row), x));
        }
        out.finish(batch, "threshold")
    }

    fn series_count(&self) -> usize {
        0
    }

    fn state_bytes(&self) -> usize {
        0
    }
}

impl crate::component::ComponentConfig for ThresholdConfig {
    fn problems(&self) -> crate::error::Problems {
        ThresholdConfig::problems(self)
    }
}

impl super::DetectorConfig for ThresholdConfig {
    fn build(
        &self,
        _ctx: &crate::component::BuildContext,
        _max_series: usize,
    ) -> crate::error::Result<Box<dyn super::Detector>> {
        Ok(Box::new(ThresholdDetector::new(self.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{MetricsBatchBuilder, ScoreColumns};

    #[test]
    fn rules_match_metric_and_labels() {
        let config: ThresholdConfig = toml::from_str(
            r#"
            [[rule]]
            metric = "cpu"
            labels = { env = "prod" }
            above = 90.0
            [[rule]]
            metric = "disk_free"
            below = 10.0
            "#,
        )
        .unwrap();
        assert!(config.problems().is_empty());
        let mut d = ThresholdDetector::new(config);
        let mut b = MetricsBatchBuilder::default();
        b.push(0, "cpu", &[("env", "prod")], 95.0);
        b.push(0, "cpu", &[("env", "dev")], 95.0);
        b.push(0, "cpu", &[("env", "prod")], 50.0);
        b.push(0, "disk_free", &[("env", "dev")], 5.0);
        b.push(0, "disk_free", &[("env", "dev")], f64::NAN);
        let out = d.score(&b.finish()).unwrap();
        let s = ScoreColumns::try_new(&out, "t").unwrap();
        let flags: Vec<bool> = (0..5).map(|i| s.is_anomaly.value(i)).collect();
        assert_eq!(flags, [true, false, false, true, false]);
        assert_eq!(s.upper.value(0), 90.0);
    }

    #[test]
    fn a_rule_without_limits_is_reported() {
        let config: ThresholdConfig = toml::from_str("[[rule]]\nmetric = \"cpu\"").unwrap();
        assert_eq!(config.problems().0[0].path, "rule[0]");
    }
}
