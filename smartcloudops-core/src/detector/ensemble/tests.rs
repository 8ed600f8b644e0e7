use super::*;
use crate::detector::Detector;
use crate::schema::{MetricsBatchBuilder, ScoreColumns};
use arrow::record_batch::RecordBatch;
use proptest::prelude::*;

const MIN: i64 = 60_000;

/// Rows every 5 minutes, the first at row `first`.
fn batch_from(first: usize, values: &[f64]) -> RecordBatch {
    let mut b = MetricsBatchBuilder::default();
    for (i, v) in values.iter().enumerate() {
        b.push((first + i) as i64 * 5 * MIN, "cpu", &[("host", "a")], *v);
    }
    b.finish()
}

fn batch(values: &[f64]) -> RecordBatch {
    batch_from(0, values)
}

fn scores_from(d: &mut EnsembleDetector, first: usize, values: &[f64]) -> Vec<f64> {
    let out = d.score(&batch_from(first, values)).unwrap();
    ScoreColumns::try_new(&out, "t")
        .unwrap()
        .score
        .values()
        .to_vec()
}

fn scores(d: &mut EnsembleDetector, values: &[f64]) -> Vec<f64> {
    scores_from(d, 0, values)
}

fn noisy(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| 40.0 + ((i * 7919) % 13) as f64 - 6.0)
        .collect()
}

#[test]
fn an_incident_raises_one_explained_alert_and_the_cold_start_none() {
    for preset in [Preset::Fast, Preset::Precise] {
        let mut d = EnsembleDetector::preset(preset);
        let mut values = noisy(1500);
        values[3] = 500.0; // cold start: never an alert
        for v in &mut values[1200..1230] {
            *v = 97.0;
        }
        let out = d.score(&batch(&values)).unwrap();
        let s = ScoreColumns::try_new(&out, "t").unwrap();
        let alerts: Vec<usize> = (0..values.len())
            .filter(|&i| s.is_anomaly.value(i))
            .collect();
        assert_eq!(alerts.len(), 1, "{preset:?}: one alert, got {alerts:?}");
        let at = alerts[0];
        assert!((1200..1203).contains(&at), "{preset:?}: alert at {at}");
        let why = s.detector(at);
        // Attributed to the parts that fired, not to the preset.
        assert!(
            why.contains("likelihood") || why.contains("range"),
            "{preset:?}: {why}"
        );
        assert_eq!(s.anomaly_since.value(at), at as i64 * 5 * MIN);
        let expected = s.expected.value(at);
        // The normal level (40 ± 6), not the incident's 97.
        assert!(
            (expected - 40.0).abs() < 6.0,
            "{preset:?}: expected {expected}"
        );
    }
}

#[test]
fn every_alert_of_an_episode_names_its_first_alert_as_the_start() {
    // No rest: every anomalous row alerts, and they are one episode until a quiet row.
    let config = EnsembleConfig {
        rest: 0,
        ..Preset::Fast.config()
    };
    let mut d = EnsembleDetector::new("fast", config, 10);
    let mut values = noisy(1200);
    for v in &mut values[1000..1010] {
        *v = 1000.0;
    }
    let out = d.score(&batch(&values)).unwrap();
    let s = ScoreColumns::try_new(&out, "t").unwrap();
    let alerts: Vec<usize> = (0..values.len())
        .filter(|&i| s.is_anomaly.value(i))
        .collect();
    let back_to_back = alerts.windows(2).filter(|w| w[1] == w[0] + 1).count();
    assert!(back_to_back > 0, "consecutive alerts expected: {alerts:?}");
    let first = alerts[0];
    for &i in &alerts {
        if alerts.contains(&(i.wrapping_sub(1))) || i == first {
            assert_eq!(s.anomaly_since.value(i), first as i64 * 5 * MIN, "row {i}");
        }
    }
}

#[test]
fn snapshot_and_restore_continue_exactly_where_the_series_left_off() {
    let values: Vec<f64> = (0..3000)
        .map(|i| 50.0 + 10.0 * ((i as f64) / 40.0).sin() + if i % 700 == 0 { 30.0 } else { 0.0 })
        .collect();
    let mut config = Preset::Precise.config();
    config.hst = Some(HstConfig::default());
    let mut whole = EnsembleDetector::new("p", config.clone(), 100);
    let expected = scores(&mut whole, &values);

    let mut before = EnsembleDetector::new("p", config.clone(), 100);
    let mut got = scores(&mut before, &values[..1700]);
    let bytes = before.snapshot().unwrap();
    drop(before);
    let mut after = EnsembleDetector::new("p", config.clone(), 100);
    after.restore(&bytes).unwrap();
    got.extend(scores_from(&mut after, 1700, &values[1700..]));
    let first_difference = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "scores after restore differ");

    let mut other = EnsembleDetector::new("p", Preset::Fast.config(), 100);
    let err = other.restore(&bytes).unwrap_err().to_string();
    assert!(err.contains("another configuration"), "{err}");
    assert!(other.restore(b"garbage").is_err());
}

#[test]
fn the_fast_preset_fits_in_a_kibibyte_per_series() {
    let mut d = EnsembleDetector::preset(Preset::Fast);
    let mut b = MetricsBatchBuilder::default();
    for i in 0..50_000 {
        let host = format!("h{}", i % 5000);
        b.push(i, "cpu", &[("host", host.as_str())], (i % 7) as f64);
    }
    d.score(&b.finish()).unwrap();
    assert_eq!(d.series_count(), 5000);
    let per_series = d.state_bytes() / 5000;
    assert!(per_series <= 1024, "{per_series} B per series");
}

#[test]
fn a_long_lived_precise_series_stays_under_48_kibibytes() {
    // Steady state: every ring full, every weekly slot seen.
    let mut d = EnsembleDetector::preset(Preset::Precise);
    let values: Vec<f64> = (0..10_000).map(|i| (i % 97) as f64).collect();
    d.score(&batch(&values)).unwrap();
    let bytes = d.state_bytes();
    eprintln!("precise, steady state: {bytes} B per series");
    assert!(
        bytes > 32 * 1024,
        "the likelihood windows are full: {bytes}"
    );
    assert!(bytes <= 48 * 1024, "{bytes} B for one series");
}

/// A million series through the `fast` preset: the brief's "1 million series in under
/// 1 GiB". Slow in debug builds:
/// `cargo test --release -p smartcloudops-core --lib a_million -- --ignored --nocapture`.
#[test]
#[ignore = "a million series: run in release"]
fn a_million_fast_series_fit_in_a_gibibyte() {
    let mut d = EnsembleDetector::preset(Preset::Fast);
    let series = 1_000_000u64;
    for round in 0..4 {
        let mut b = MetricsBatchBuilder::with_capacity(series as usize);
        for id in 0..series {
            let ts = (round * 300_000) as i64;
            b.push_with_id(ts, "cpu", &[("host", "h")], (id % 97) as f64, id);
        }
        d.score(&b.finish()).unwrap();
    }
    assert_eq!(d.series_count(), series as usize);
    let bytes = d.state_bytes();
    eprintln!(
        "fast: {bytes} B for {series} series ({:.0} B/series, EnsembleState {} B inline)",
        bytes as f64 / series as f64,
        std::mem::size_of::<EnsembleState>()
    );
    assert!(bytes < 1 << 30, "{bytes} B");
}

#[test]
fn eviction_bounds_the_memory_of_an_ensemble() {
    let mut d = EnsembleDetector::new("precise", Preset::Precise.config(), 1000);
    let mut b = MetricsBatchBuilder::default();
    for i in 0..20_000 {
        let host = format!("h{i}");
        b.push(0, "cpu", &[("host", host.as_str())], 1.0);
    }
    d.score(&b.finish()).unwrap();
    assert!(d.series_count() <= 1000);
    assert_eq!(d.evicted_series() as usize + d.series_count(), 20_000);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn scores_are_in_the_unit_interval_and_online(values in proptest::collection::vec(
        prop_oneof![
            any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(0.0), -1e3..1e3f64,
        ],
        1..700,
    ), cut in 0usize..700) {
        let mut config = Preset::Precise.config();
        config.hst = Some(HstConfig { window: 20, ..HstConfig::default() });
        config.likelihood.learning = 20;
        if let Some(r) = config.range_novelty.as_mut() { r.warmup = 20; }
        let mut whole = EnsembleDetector::new("p", config.clone(), 10);
        let all = scores(&mut whole, &values);
        for s in &all {
            prop_assert!((0.0..=1.0).contains(s), "{}", s);
        }
        let cut = cut.min(values.len());
        let mut prefix = EnsembleDetector::new("p", config, 10);
        let first = scores(&mut prefix, &values[..cut]);
        prop_assert_eq!(&all[..cut], &first[..]);
    }

    #[test]
    fn a_damaged_snapshot_is_refused_or_scores_without_panicking(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        fast in any::<bool>(),
    ) {
        let preset = if fast { Preset::Fast } else { Preset::Precise };
        let values: Vec<f64> = (0..400).map(|i| ((i * 37) % 101) as f64).collect();
        let mut d = EnsembleDetector::new("p", preset.config(), 10);
        scores(&mut d, &values);
        let mut bytes = d.snapshot().unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte;
        }
        let keep = cut.index(bytes.len() + 1).max(bytes.len() / 2);
        bytes.truncate(keep);
        let mut restored = EnsembleDetector::new("p", preset.config(), 10);
        if restored.restore(&bytes).is_ok() {
            for s in scores_from(&mut restored, 400, &values) {
                prop_assert!((0.0..=1.0).contains(&s));
            }
        }
    }

    #[test]
    fn a_constant_series_never_alerts(c in -1e9..1e9f64, n in 1usize..1000) {
        for preset in [Preset::Fast, Preset::Precise] {
            let mut d = EnsembleDetector::preset(preset);
            let out = d.score(&batch(&vec![c; n])).unwrap();
            let s = ScoreColumns::try_new(&out, "t").unwrap();
            prop_assert_eq!(s.is_anomaly.true_count(), 0);
        }
    }
}
