use super::*;

fn batch(rows: &[(&str, i64, f64)]) -> RecordBatch {
    let mut b = MetricsBatchBuilder::default();
    for (host, ts, v) in rows {
        b.push(*ts, "cpu", &[("host", *host)], *v);
    }
    b.finish()
}

fn rows(b: &RecordBatch) -> Vec<(String, String, i64, f64)> {
    let cols = MetricsColumns::try_new(b, "t").unwrap();
    let mut out: Vec<_> = (0..b.num_rows())
        .map(|r| {
            (
                cols.metric(r).to_owned(),
                cols.labels(r)[0].1.clone(),
                cols.ts.value(r),
                cols.value.value(r),
            )
        })
        .collect();
    out.sort_by(|a, b| (a.2, &a.1, &a.0).cmp(&(b.2, &b.1, &b.0)));
    out
}

#[test]
fn tumbling_windows_aggregate_per_series_and_emit_when_the_watermark_passes() {
    let mut w = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Avg, Aggregation::Max, Aggregation::Count],
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    let out = w
        .process(&batch(&[
            ("a", 0, 1.0),
            ("a", 30_000, 3.0),
            ("b", 10_000, 10.0),
        ]))
        .unwrap();
    assert_eq!(out.num_rows(), 0, "the first minute is still open");
    let out = w.process(&batch(&[("a", 60_000, 5.0)])).unwrap();
    // `a`'s watermark passed its first minute; `b`'s did not move (each series has its own).
    assert_eq!(
        rows(&out),
        vec![
            ("cpu_avg".into(), "a".into(), 60_000, 2.0),
            ("cpu_count".into(), "a".into(), 60_000, 2.0),
            ("cpu_max".into(), "a".into(), 60_000, 3.0),
        ]
    );
    let starts = out.column_by_name("window_start").unwrap();
    assert_eq!(starts.len(), 3);
    // End of input: the open minutes come out.
    let last = w.flush().unwrap().unwrap();
    assert_eq!(
        rows(&last),
        vec![
            ("cpu_avg".into(), "b".into(), 60_000, 10.0),
            ("cpu_count".into(), "b".into(), 60_000, 1.0),
            ("cpu_max".into(), "b".into(), 60_000, 10.0),
            ("cpu_avg".into(), "a".into(), 120_000, 5.0),
            ("cpu_count".into(), "a".into(), 120_000, 1.0),
            ("cpu_max".into(), "a".into(), 120_000, 5.0)
        ]
    );
    assert!(w.flush().unwrap().is_none());
}

#[test]
fn out_of_order_rows_count_until_the_watermark_and_late_ones_are_dropped_and_counted() {
    let mut w = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Sum],
        max_out_of_orderness: Duration::from_secs(30),
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    // 70 s seen, watermark 40 s: the first minute stays open for the row at 20 s.
    assert_eq!(
        w.process(&batch(&[("a", 10_000, 1.0), ("a", 70_000, 1.0)]))
            .unwrap()
            .num_rows(),
        0
    );
    assert_eq!(
        w.process(&batch(&[("a", 20_000, 2.0)])).unwrap().num_rows(),
        0
    );
    let out = w.process(&batch(&[("a", 95_000, 1.0)])).unwrap();
    assert_eq!(
        rows(&out),
        vec![("cpu_sum".into(), "a".into(), 60_000, 3.0)]
    );
    // The first minute is gone: a row for it is late.
    let out = w.process(&batch(&[("a", 30_000, 100.0)])).unwrap();
    assert_eq!(out.num_rows(), 0);
    assert_eq!(w.late_rows(), 1);
    let mut strict = WindowPrep::new(&WindowConfig {
        late: LatePolicy::Fail,
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    strict.process(&batch(&[("a", 120_000, 1.0)])).unwrap();
    let err = strict.process(&batch(&[("a", 1_000, 1.0)])).unwrap_err();
    assert!(
        err.to_string().contains("after its windows closed"),
        "{err}"
    );
}

#[test]
fn sliding_windows_overlap_and_percentiles_use_nearest_rank() {
    let mut w = WindowPrep::new(&WindowConfig {
        slide: Some(Duration::from_secs(30)),
        aggregations: vec![Aggregation::Count, Aggregation::P90],
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    let input: Vec<(&str, i64, f64)> = (0..10).map(|i| ("a", i * 10_000, i as f64)).collect();
    let mut r = rows(&w.process(&batch(&input)).unwrap());
    r.extend(rows(&w.flush().unwrap().unwrap()));
    // Windows [-30,30) [0,60) [30,90) [60,120) [90,150) over rows at 0, 10 … 90 s.
    let counts: Vec<f64> = r
        .iter()
        .filter(|x| x.0 == "cpu_count")
        .map(|x| x.3)
        .collect();
    assert_eq!(counts, vec![3.0, 6.0, 6.0, 4.0, 1.0]);
    let p90: Vec<f64> = r.iter().filter(|x| x.0 == "cpu_p90").map(|x| x.3).collect();
    assert_eq!(p90, vec![2.0, 5.0, 8.0, 9.0, 9.0]);
}

#[test]
fn series_that_stop_reporting_are_forgotten_while_others_go_on() {
    let mut w = WindowPrep::new(&WindowConfig::tumbling(Duration::from_secs(60))).unwrap();
    w.process(&batch(&[("gone", 0, 1.0), ("busy", 0, 1.0)]))
        .unwrap();
    assert_eq!(w.tracked_series(), 2);
    // Only `busy` reports from now on; the open windows never all close at once.
    for minute in 1..5 {
        w.process(&batch(&[("busy", minute * 60_000, 1.0)]))
            .unwrap();
    }
    assert_eq!(w.tracked_series(), 1, "only the series still reporting");
    // A series that comes back is named again; its window closes once it was quiet for a
    // round (as many rows as series) while the others went on.
    w.process(&batch(&[("gone", 300_000, 2.0), ("busy", 360_000, 1.0)]))
        .unwrap();
    let mut out = Vec::new();
    for minute in 7..9 {
        let b = w.process(&batch(&[("busy", minute * 60_000, 1.0)]));
        out.extend(rows(&b.unwrap()));
    }
    assert!(out.iter().any(|r| r.1 == "gone" && r.3 == 2.0), "{out:?}");
    assert_eq!(w.tracked_series(), 1);
}

#[test]
fn one_series_dated_ahead_makes_only_its_own_rows_late() {
    let mut w = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Count],
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap();
    const YEAR: i64 = 365 * 86_400_000;
    w.process(&batch(&[("a", 0, 1.0), ("b", 0, 1.0), ("c", 0, 1.0)]))
        .unwrap();
    // A sample from a year ahead: only `forged`'s watermark jumps.
    w.process(&batch(&[("forged", YEAR, 1.0)])).unwrap();
    let mut out = Vec::new();
    for minute in 1..=3 {
        let t = minute * 60_000;
        let b = w
            .process(&batch(&[("a", t, 1.0), ("b", t, 1.0), ("c", t, 1.0)]))
            .unwrap();
        out.extend(rows(&b));
    }
    assert_eq!(w.late_rows(), 0, "no row of the other series is late");
    let windows = |host: &str| out.iter().filter(|r| r.1 == host).count();
    assert_eq!(
        (windows("a"), windows("b"), windows("c")),
        (3, 3, 3),
        "{out:?}"
    );
    // The forged series' own earlier rows are late.
    w.process(&batch(&[("forged", 0, 1.0)])).unwrap();
    assert_eq!(w.late_rows(), 1);
}

/// Rows at the ends of time through windows, sliding windows and resampling with gap fill.
fn extremes() -> Vec<(&'static str, i64, f64)> {
    vec![
        ("a", i64::MIN, 1.0),
        ("b", i64::MAX, 2.0),
        ("a", i64::MIN + 1, 3.0),
        ("b", i64::MAX - 1, 4.0),
        ("c", 0, 5.0),
        ("a", i64::MAX, 6.0),
        ("b", i64::MIN, 7.0),
        ("c", i64::MIN + 59_999, 8.0),
        ("c", i64::MAX - 60_000, 9.0),
    ]
}

#[test]
fn timestamps_at_the_ends_of_time_neither_overflow_nor_hang_nor_pile_up() {
    let window = WindowConfig {
        aggregations: vec![Aggregation::Count, Aggregation::Last],
        slide: Some(Duration::from_secs(20)),
        max_out_of_orderness: Duration::from_secs(30),
        allowed_lateness: Duration::from_secs(30),
        ..WindowConfig::tumbling(Duration::from_secs(60))
    };
    let resample = ResampleConfig {
        fill: FillPolicy::Previous,
        max_fill: 5,
        ..ResampleConfig::new(Duration::from_secs(60))
    };
    for mut stage in [
        WindowPrep::new(&window).unwrap(),
        WindowPrep::resample(&resample).unwrap(),
    ] {
        let mut emitted = 0;
        for row in extremes() {
            emitted += stage.process(&batch(&[row])).unwrap().num_rows();
            assert!(stage.tracked_series() <= 3);
        }
        emitted += stage.flush().unwrap().map_or(0, |b| b.num_rows());
        // Each row opens at most 3 windows of 2 aggregations; resampling fills at most 5
        // steps a gap.
        assert!(emitted <= extremes().len() * 6, "{emitted} rows out");
        assert!(stage.out_of_range_rows() >= 1, "i64::MIN has no window");
    }
}

#[test]
fn resampling_gives_one_row_per_step_at_its_start_with_the_metric_name_kept() {
    let mut r = WindowPrep::resample(&ResampleConfig {
        step: Duration::from_secs(60),
        method: ResampleMethod::Last,
        ..ResampleConfig::new(Duration::ZERO)
    })
    .unwrap();
    let out = r
        .process(&batch(&[
            ("a", 5_000, 1.0),
            ("a", 50_000, 2.0),
            ("a", 61_000, 3.0),
            ("a", 125_000, 4.0),
        ]))
        .unwrap();
    assert_eq!(
        rows(&out),
        vec![
            ("cpu".into(), "a".into(), 0, 2.0),
            ("cpu".into(), "a".into(), 60_000, 3.0)
        ]
    );
    assert_eq!(
        out.num_columns(),
        5,
        "the canonical schema, nothing appended"
    );
    let mut mean = WindowPrep::resample(&ResampleConfig {
        step: Duration::from_secs(60),
        method: ResampleMethod::Mean,
        ..ResampleConfig::new(Duration::ZERO)
    })
    .unwrap();
    mean.process(&batch(&[("a", 5_000, 1.0), ("a", 50_000, 2.0)]))
        .unwrap();
    assert_eq!(
        rows(&mean.flush().unwrap().unwrap()),
        vec![("cpu".into(), "a".into(), 0, 1.5)]
    );
}

proptest::proptest! {
    #[test]
    fn every_finite_in_order_value_is_counted_once_per_window(
        values in proptest::collection::vec((0i64..600_000, -1e6f64..1e6), 1..200)
    ) {
        let mut sorted = values.clone();
        sorted.sort_by_key(|(t, _)| *t);
        let mut w = WindowPrep::new(&WindowConfig {
            aggregations: vec![Aggregation::Count],
            ..WindowConfig::tumbling(Duration::from_secs(60))
        }).unwrap();
        let rows_in: Vec<(&str, i64, f64)> = sorted.iter().map(|(t, v)| ("a", *t, *v)).collect();
        let mut total = 0.0;
        let out = w.process(&batch(&rows_in)).unwrap();
        total += rows(&out).iter().map(|r| r.3).sum::<f64>();
        if let Some(rest) = w.flush().unwrap() {
            total += rows(&rest).iter().map(|r| r.3).sum::<f64>();
        }
        proptest::prop_assert_eq!(total as usize, sorted.len());
        proptest::prop_assert_eq!(w.late_rows(), 0);
    }
}

/// Timestamps anywhere in `i64`, the ends most of all.
fn any_time() -> impl proptest::strategy::Strategy<Value = i64> {
    use proptest::prelude::*;
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        (i64::MIN..i64::MIN + 1_000_000),
        (i64::MAX - 1_000_000..=i64::MAX),
        any::<i64>(),
        (0i64..600_000),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    #[test]
    fn any_timestamps_give_bounded_output_and_state(
        rows_in in proptest::collection::vec(
            (0usize..4, any_time(), -1e6f64..1e6), 1..60),
        size_s in 1u64..120,
        slides in 1u64..4,
        fill in 0u32..20,
        resample in proptest::bool::ANY,
    ) {
        let hosts = ["a", "b", "c", "d"];
        let size = Duration::from_secs(size_s);
        let slide = Duration::from_millis((size.as_millis() as u64 / slides).max(1));
        let mut stage = if resample {
            WindowPrep::resample(&ResampleConfig {
                fill: FillPolicy::Previous,
                max_fill: fill,
                max_out_of_orderness: Duration::from_secs(5),
                ..ResampleConfig::new(size)
            }).unwrap()
        } else {
            WindowPrep::new(&WindowConfig {
                slide: Some(slide),
                aggregations: vec![Aggregation::Count, Aggregation::P90],
                allowed_lateness: Duration::from_secs(5),
                ..WindowConfig::tumbling(size)
            }).unwrap()
        };
        let per_row = if resample { fill as usize + 1 } else { 2 * (slides as usize + 1) };
        let mut emitted = 0;
        for chunk in rows_in.chunks(3) {
            let rows: Vec<(&str, i64, f64)> =
                chunk.iter().map(|(h, t, v)| (hosts[*h], *t, *v)).collect();
            emitted += stage.process(&batch(&rows)).unwrap().num_rows();
            proptest::prop_assert!(stage.tracked_series() <= hosts.len());
        }
        emitted += stage.flush().unwrap().map_or(0, |b| b.num_rows());
        proptest::prop_assert!(emitted <= rows_in.len() * per_row, "{} rows out", emitted);
        proptest::prop_assert_eq!(stage.tracked_series(), 0);
    }
}

fn minute_counts() -> WindowPrep {
    WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Count],
        ..WindowConfig::tumbling(Duration::from_secs(60))
    })
    .unwrap()
}

#[test]
fn the_oldest_retained_input_is_the_first_input_of_the_oldest_open_window() {
    let mut w = minute_counts();
    assert_eq!(w.oldest_retained_input(), None);
    w.process(&batch(&[("a", 0, 1.0)])).unwrap(); // input 0 opens a [0, 60 s)
    w.process(&batch(&[("b", 10_000, 1.0)])).unwrap(); // input 1 opens b [0, 60 s)
    w.process(&batch(&[("a", 20_000, 1.0)])).unwrap(); // input 2 only adds
    assert_eq!(w.oldest_retained_input(), Some(0));
    // Input 3 closes a's window and opens a [60 s, 120 s): b's window, from input 1, is the
    // oldest open one.
    let out = w
        .process(&batch(&[("b", 30_000, 1.0), ("a", 61_000, 1.0)]))
        .unwrap();
    assert_eq!(
        rows(&out),
        vec![("cpu_count".into(), "a".into(), 60_000, 2.0)]
    );
    assert_eq!(w.oldest_retained_input(), Some(1));
    // A late row holds nothing.
    w.process(&batch(&[("a", 1_000, 1.0)])).unwrap();
    assert_eq!(w.late_rows(), 1);
    assert_eq!(w.oldest_retained_input(), Some(1));
    w.flush().unwrap();
    assert_eq!(w.oldest_retained_input(), None);
}

#[test]
fn past_max_held_rows_the_oldest_windows_come_out_early_and_whole_rows_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = WindowPrep::new(&WindowConfig {
        aggregations: vec![Aggregation::Count],
        max_held_rows: 3,
        ..WindowConfig::tumbling(Duration::from_secs(3600))
    })
    .unwrap();
    w.acks_held(&dir.path().join("w.state")).unwrap();
    let mut emitted = Vec::new();
    for i in 0..5 {
        let out = w.process(&batch(&[("a", i * 1000, 1.0)])).unwrap();
        emitted.extend(rows(&out));
        assert!(w.held_rows() <= 3, "held {} rows", w.held_rows());
    }
    // Inputs 0…3: the fourth row went past the bound and the window came out with four rows.
    assert_eq!(
        emitted,
        vec![("cpu_count".into(), "a".into(), 3_600_000, 4.0)]
    );
    assert_eq!(w.early_windows(), 1);
    // The row after it opened the window again; its part comes out at the end.
    let rest = rows(&w.flush().unwrap().unwrap());
    assert_eq!(rest, vec![("cpu_count".into(), "a".into(), 3_600_000, 1.0)]);
}

#[test]
fn after_a_restart_rows_of_windows_emitted_before_it_are_dropped_as_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("prep0-window.state");
    let mut first = minute_counts();
    first.acks_held(&state).unwrap();
    first
        .process(&batch(&[("a", 0, 1.0), ("a", 50_000, 1.0)]))
        .unwrap();
    let out = first
        .process(&batch(&[("a", 55_000, 1.0), ("a", 60_000, 1.0)]))
        .unwrap();
    assert_eq!(
        rows(&out),
        vec![("cpu_count".into(), "a".into(), 60_000, 3.0)]
    );
    // The actions acknowledged the emitted window: its mark is saved.
    let saved = first.take_acked_hook().expect("a mark to save");
    saved().unwrap();
    assert!(first.take_acked_hook().is_none(), "saved once");
    drop(first); // a crash: [60 s, 120 s) is lost, its input delivered again

    let mut restarted = minute_counts();
    restarted.acks_held(&state).unwrap();
    let out = restarted
        .process(&batch(&[("a", 55_000, 1.0), ("a", 60_000, 1.0)]))
        .unwrap();
    assert_eq!(out.num_rows(), 0, "no second, partial [0, 60 s)");
    assert_eq!(restarted.replayed_rows(), 1);
    let out = restarted.process(&batch(&[("a", 120_000, 1.0)])).unwrap();
    assert_eq!(
        rows(&out),
        vec![("cpu_count".into(), "a".into(), 120_000, 1.0)]
    );

    // Without held acknowledgements (a push source) nothing is dropped.
    let mut plain = minute_counts();
    let out = plain
        .process(&batch(&[("a", 55_000, 1.0), ("a", 60_000, 1.0)]))
        .unwrap();
    assert_eq!(
        rows(&out),
        vec![("cpu_count".into(), "a".into(), 60_000, 1.0)]
    );
}

#[test]
fn a_window_emitted_but_never_acknowledged_is_rebuilt_by_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("prep0-window.state");
    let inputs = [
        batch(&[("a", 0, 1.0), ("a", 50_000, 1.0)]),
        batch(&[("a", 55_000, 1.0), ("a", 60_000, 1.0)]),
    ];
    let mut first = minute_counts();
    first.acks_held(&state).unwrap();
    first.process(&inputs[0]).unwrap();
    let out = first.process(&inputs[1]).unwrap();
    assert_eq!(out.num_rows(), 1);
    // An action was failing on it when the process stopped: the hook never ran.
    drop(first.take_acked_hook());
    drop(first);

    let mut restarted = minute_counts();
    restarted.acks_held(&state).unwrap();
    restarted.process(&inputs[0]).unwrap();
    let out = restarted.process(&inputs[1]).unwrap();
    assert_eq!(
        rows(&out),
        vec![("cpu_count".into(), "a".into(), 60_000, 3.0)],
        "the same window, whole"
    );
    assert_eq!(restarted.replayed_rows(), 0);
}
