//! `smartcloudops eval`: NAB-style scoring of a detector on a labelled corpus, in sample and
//! cross-validated, with the false alarms it raises on healthy data.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use smartcloudops_core::component::BuildContext;
use smartcloudops_core::config::PipelineConfig;
use smartcloudops_core::detector::{DetectorConfig, EnsembleConfig, Preset};
use smartcloudops_core::eval::{
    Corpus, CostProfile, CrossValidation, DAY_MS, FalseAlarms, FoldScheme, ScoredSeries, Tally,
    cross_validate, format_nab_ts, healthy_false_alarms, optimize_threshold, score_series,
    select_candidate, tally_all,
};
use smartcloudops_core::schema::{MetricsColumns, ScoreColumns};
use smartcloudops_core::source::generator::{Generator, GeneratorConfig};

use crate::plot;

/// What to evaluate and where to write.
#[derive(Debug)]
pub(crate) struct EvalArgs {
    pub corpus: PathBuf,
    pub preset: Preset,
    pub threshold: Option<f64>,
    pub write_scores: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub ensemble: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub jobs: usize,
    pub cv: Option<FoldScheme>,
    pub grid: Option<PathBuf>,
    pub fleet_series: usize,
    pub fleet_days: u64,
}

/// `--cv`: a number of folds, or `loco` (leave one category out).
pub(crate) fn parse_cv(text: &str) -> Result<FoldScheme, String> {
    match text {
        "loco" | "leave-one-category-out" => Ok(FoldScheme::LeaveOneCategoryOut),
        n => match n.parse::<usize>() {
            Ok(k) if k >= 2 => Ok(FoldScheme::KFold(k)),
            _ => Err(format!(
                "expected a number of folds (2 or more) or `loco`, got `{text}`"
            )),
        },
    }
}

/// One profile's result over the corpus.
#[derive(Debug)]
struct ProfileResult {
    profile: CostProfile,
    threshold: f64,
    total: Tally,
    categories: Vec<(String, Tally)>,
}

/// A detector configuration to score, with the name the report gives it.
struct Candidate {
    name: String,
    detector: Box<dyn DetectorConfig>,
}

pub(crate) fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let corpus = Corpus::load(&args.corpus)
        .with_context(|| format!("loading the corpus {}", args.corpus.display()))?;
    if corpus.series.is_empty() {
        bail!(
            "{}: no data/<category>/<file>.csv found",
            args.corpus.display()
        );
    }
    if let Some(t) = args.threshold
        && !(t > 0.0 && t <= 1.0)
    {
        bail!("--threshold must be in (0, 1], got {t}");
    }
    // Checked before the (long) scoring starts.
    let folds = match args.cv {
        Some(scheme) => {
            let categories: Vec<&str> = corpus.series.iter().map(|s| s.category.as_str()).collect();
            Some(
                scheme
                    .assign(&categories)
                    .map_err(|e| anyhow::anyhow!("--cv: {e}"))?,
            )
        }
        None => None,
    };
    let (name, base) = base_detector(args)?;
    let candidates = match &args.grid {
        None => vec![Candidate {
            name: name.clone(),
            detector: base,
        }],
        Some(path) => {
            let Some(base) = base.ensemble_config() else {
                bail!("--grid varies ensemble fields, and {name} is not an ensemble");
            };
            grid_candidates(&base, path, args.threshold)?
        }
    };
    eprintln!(
        "scoring {} files ({} rows, {} windows) with {name}{}",
        corpus.series.len(),
        corpus.row_count(),
        corpus.window_count(),
        if candidates.len() > 1 {
            format!(", {} grid candidates", candidates.len())
        } else {
            String::new()
        }
    );
    let started = std::time::Instant::now();
    let scored: Vec<Vec<ScoredSeries>> = candidates
        .iter()
        .map(|c| score_corpus(&corpus, args.jobs, c.detector.as_ref()))
        .collect::<anyhow::Result<_>>()?;
    let elapsed = started.elapsed().as_secs_f64();

    // In sample: the candidate the standard profile prefers, each profile at its threshold.
    let standard = &corpus.profiles[0];
    let chosen = if candidates.len() > 1 {
        select_candidate(&scored, standard, args.threshold).0
    } else {
        0
    };
    let mut out = String::new();
    if candidates.len() > 1 {
        out.push_str(&grid_report(&candidates, &scored, standard, args.threshold));
    }
    let results = in_sample(&corpus, &scored[chosen], args.threshold);
    out.push_str(&report(
        &results,
        args.threshold.is_some(),
        &candidates[chosen].name,
    ));

    if let Some((folds, k)) = &folds {
        let validations: Vec<CrossValidation> = corpus
            .profiles
            .iter()
            .map(|p| cross_validate(&scored, folds, *k, p, args.threshold))
            .collect();
        out.push_str(&cv_report(&corpus, &candidates, args, &validations, folds));
    }

    // False alarms at the threshold a deployment alerts on.
    let threshold = args
        .threshold
        .or_else(|| {
            candidates[chosen]
                .detector
                .ensemble_config()
                .map(|c| c.threshold)
        })
        .unwrap_or(results[0].threshold);
    let mut rows = nab_false_alarms(&corpus, &scored[chosen], threshold);
    if args.fleet_series > 0 && args.fleet_days > 0 {
        rows.extend(fleet_false_alarms(
            candidates[chosen].detector.as_ref(),
            threshold,
            args.fleet_series,
            args.fleet_days,
        )?);
    }
    out.push_str(&false_alarm_report(&rows, threshold));
    print!("{out}");

    eprintln!(
        "scored {} rows × {} candidate(s) in {elapsed:.2} s ({:.0} rows/s)",
        corpus.row_count(),
        candidates.len(),
        (corpus.row_count() * candidates.len()) as f64 / elapsed.max(1e-9)
    );
    if let Some(out) = &args.write_scores {
        write_scores(&corpus, &scored[chosen], out)?;
        eprintln!("scores written under {}", out.display());
    }
    if let Some(out) = &args.plot {
        let threshold = results.first().map_or(0.5, |r| r.threshold);
        for (series, s) in corpus.series.iter().zip(&scored[chosen]) {
            let path = out
                .join(&series.category)
                .join(format!("{}.svg", series.file.trim_end_matches(".csv")));
            plot::write_svg(&path, series, s.scores(), threshold)?;
        }
        eprintln!("plots written under {}", out.display());
    }
    Ok(())
}

/// The detector the flags name: a pipeline's `[detector]`, an ensemble file over a preset,
/// or a preset; with `--threshold` laid over it where it has one.
fn base_detector(args: &EvalArgs) -> anyhow::Result<(String, Box<dyn DetectorConfig>)> {
    Ok(match (&args.config, &args.ensemble) {
        (Some(path), _) => {
            let pipeline = PipelineConfig::load(path)
                .map_err(|errors| anyhow::anyhow!("{}: {errors}", path.display()))?;
            let Some(section) = pipeline.detector else {
                bail!("{}: no [detector] to evaluate", path.display());
            };
            let mut kind = section.detector.kind;
            let mut detector = section.detector.config;
            if let (Some(t), Some(mut c)) = (args.threshold, detector.ensemble_config()) {
                // The rest holds scores just below the configured threshold: keep them equal.
                c.threshold = t;
                detector = Box::new(c);
                kind = "ensemble".into();
            }
            (section_name(&kind, path), detector)
        }
        (None, None) => {
            let mut config = args.preset.config();
            if let Some(t) = args.threshold {
                config.threshold = t;
            }
            (
                format!("preset {}", args.preset.name()),
                Box::new(config) as Box<dyn DetectorConfig>,
            )
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let table: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            let mut config = overlay(&args.preset.config(), table, &path.display().to_string())?;
            if let Some(t) = args.threshold {
                config.threshold = t;
            }
            (
                format!(
                    "ensemble {} over preset {}",
                    path.display(),
                    args.preset.name()
                ),
                Box::new(config) as Box<dyn DetectorConfig>,
            )
        }
    })
}

/// `base` with the ensemble fields of `table` laid over it (unset fields keep its values),
/// checked.
fn overlay(
    base: &EnsembleConfig,
    table: toml::Table,
    what: &str,
) -> anyhow::Result<EnsembleConfig> {
    let (merged, disabled) = base.overlay(table);
    let mut config: EnsembleConfig = toml::Value::Table(merged)
        .try_into()
        .with_context(|| what.to_owned())?;
    for part in disabled {
        if !config.disable(&part) {
            bail!("{what}: `{part}` is not a part that can be disabled");
        }
    }
    if let Some(problem) = config.problems().iter().next() {
        bail!("{what}: {problem}");
    }
    Ok(config)
}

/// Most candidates a grid may expand to: each one scores the whole corpus.
const MAX_GRID: usize = 512;

/// The candidates of a grid file: every top-level key is an ensemble field's dotted path
/// (`rest`, `"context.length"`), every value the list of values to try; the candidates are
/// all their combinations laid over `base`.
fn grid_candidates(
    base: &EnsembleConfig,
    path: &Path,
    threshold: Option<f64>,
) -> anyhow::Result<Vec<Candidate>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let grid: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut axes: Vec<(Vec<String>, Vec<toml::Value>)> = Vec::new();
    let mut combinations = 1usize;
    for (key, values) in grid {
        let toml::Value::Array(values) = values else {
            bail!(
                "{}: `{key}` must be a list of values to try",
                path.display()
            );
        };
        if values.is_empty() {
            bail!("{}: `{key}` lists no values", path.display());
        }
        if key == "threshold" {
            bail!(
                "{}: the threshold is chosen by the evaluation (or fixed with --threshold), not gridded",
                path.display()
            );
        }
        combinations = combinations.saturating_mul(values.len());
        axes.push((key.split('.').map(str::to_owned).collect(), values));
    }
    if axes.is_empty() {
        bail!("{}: no field to vary", path.display());
    }
    if combinations > MAX_GRID {
        bail!(
            "{}: {combinations} combinations, more than {MAX_GRID}",
            path.display()
        );
    }
    let mut candidates = Vec::with_capacity(combinations);
    for n in 0..combinations {
        let mut table = toml::Table::new();
        let mut name = Vec::new();
        let mut rest = n;
        for (key, values) in &axes {
            let value = &values[rest % values.len()];
            rest /= values.len();
            name.push(format!("{}={value}", key.join(".")));
            insert_path(&mut table, key, value.clone());
        }
        let name = name.join(" ");
        let mut config = overlay(base, table, &format!("{} ({name})", path.display()))?;
        if let Some(t) = threshold {
            config.threshold = t;
        }
        candidates.push(Candidate {
            name,
            detector: Box::new(config),
        });
    }
    Ok(candidates)
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// Each profile at its own threshold (chosen on the whole corpus, or fixed), with the
/// categories.
fn in_sample(corpus: &Corpus, scored: &[ScoredSeries], fixed: Option<f64>) -> Vec<ProfileResult> {
    corpus
        .profiles
        .iter()
        .map(|profile| {
            let (threshold, total) = match fixed {
                Some(t) => (t, tally_all(scored, profile, t)),
                None => optimize_threshold(scored, profile),
            };
            let mut categories: Vec<String> = scored.iter().map(|s| s.category.clone()).collect();
            categories.dedup();
            let categories = categories
                .into_iter()
                .map(|c| {
                    let t = tally_all(
                        scored.iter().filter(|s| s.category == c),
                        profile,
                        threshold,
                    );
                    (c, t)
                })
                .collect();
            ProfileResult {
                profile: profile.clone(),
                threshold,
                total,
                categories,
            }
        })
        .collect()
}

/// `detector <type> from <file>`, for the report.
fn section_name(kind: &str, path: &Path) -> String {
    format!("detector {kind} from {}", path.display())
}

fn progress(len: usize, unit: &str) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {unit} {{elapsed}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

/// Runs `work(i)` for `i` in `0..len`, `jobs` at a time, and returns the results in order.
fn parallel<T: Send>(
    len: usize,
    jobs: usize,
    work: impl Fn(usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<anyhow::Result<T>>>> =
        Mutex::new((0..len).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, len.max(1)) {
            scope.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    if i >= len {
                        return;
                    }
                    let result = work(i);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| bail!("a worker thread stopped early")))
        .collect()
}

/// Scores every file with a fresh detector, `jobs` files at a time.
fn score_corpus(
    corpus: &Corpus,
    jobs: usize,
    detector: &dyn DetectorConfig,
) -> anyhow::Result<Vec<ScoredSeries>> {
    let bar = progress(corpus.series.len(), "files");
    let scored = parallel(corpus.series.len(), jobs, |i| {
        let series = &corpus.series[i];
        let result = detector
            .build(&BuildContext::default(), 1)
            .and_then(|mut detector| score_series(detector.as_mut(), series, 1024))
            .and_then(|scores| ScoredSeries::new(series, scores))
            .with_context(|| format!("scoring {}", series.key()));
        bar.set_message(series.key());
        bar.inc(1);
        result
    });
    bar.finish_and_clear();
    scored
}

fn report(results: &[ProfileResult], fixed: bool, name: &str) -> String {
    let mut out = String::new();
    let how = if fixed { "fixed" } else { "optimized" };
    let _ = writeln!(out, "{name} — NAB normalized scores ({how} threshold)");
    let _ = writeln!(
        out,
        "{:<22} {:>9} {:>8} {:>5} {:>5} {:>6}",
        "profile", "threshold", "score", "TP", "FN", "FP"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<22} {:>9.4} {:>8.2} {:>5} {:>5} {:>6}",
            r.profile.name,
            r.threshold,
            r.total.normalized(),
            r.total.tp,
            r.total.fn_,
            r.total.fp
        );
    }
    let _ = writeln!(
        out,
        "\nper category (normalized, each profile at its threshold)"
    );
    let _ = write!(out, "{:<24}", "category");
    for r in results {
        let _ = write!(out, " {:>20}", r.profile.name);
    }
    let _ = writeln!(out);
    if let Some(first) = results.first() {
        for (i, (category, _)) in first.categories.iter().enumerate() {
            let _ = write!(out, "{category:<24}");
            for r in results {
                let _ = write!(out, " {:>20.2}", r.categories[i].1.normalized());
            }
            let _ = writeln!(out);
        }
    }
    out
}

/// Every grid candidate's in-sample standard score, best first.
fn grid_report(
    candidates: &[Candidate],
    scored: &[Vec<ScoredSeries>],
    standard: &CostProfile,
    fixed: Option<f64>,
) -> String {
    let mut rows: Vec<(f64, f64, &str)> = candidates
        .iter()
        .zip(scored)
        .map(|(c, s)| {
            let (t, tally) = match fixed {
                Some(t) => (t, tally_all(s, standard, t)),
                None => optimize_threshold(s, standard),
            };
            (tally.normalized(), t, c.name.as_str())
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "grid: {} candidates, in-sample {} score (for reference only: judge on the cross-validated one)",
        candidates.len(),
        standard.name
    );
    let _ = writeln!(out, "{:>8} {:>9}  candidate", "score", "threshold");
    for (score, t, name) in rows {
        let _ = writeln!(out, "{score:>8.2} {t:>9.4}  {name}");
    }
    let _ = writeln!(out);
    out
}

fn cv_report(
    corpus: &Corpus,
    candidates: &[Candidate],
    args: &EvalArgs,
    validations: &[CrossValidation],
    folds: &[usize],
) -> String {
    let mut out = String::new();
    let scheme = match args.cv {
        Some(FoldScheme::LeaveOneCategoryOut) => "leave one category out".to_owned(),
        Some(FoldScheme::KFold(k)) => format!("{k} folds by file, stratified by category"),
        None => String::new(),
    };
    let chosen = match (candidates.len(), args.threshold) {
        (1, Some(_)) => "nothing chosen (one candidate, fixed threshold)",
        (1, None) => "threshold chosen on the other folds",
        (_, Some(_)) => "parameters chosen on the other folds (threshold fixed)",
        (_, None) => "parameters and threshold chosen on the other folds",
    };
    let _ = writeln!(out, "\ncross-validation: {scheme}; {chosen}");
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>10} {:>8} {:>10} {:>7}",
        "profile", "cv pooled", "fold mean", "fold sd", "in-sample", "gap"
    );
    for (profile, v) in corpus.profiles.iter().zip(validations) {
        let (mean, sd) = v.fold_mean_sd();
        let pooled = v.pooled.normalized();
        let in_sample = v.in_sample.2.normalized();
        let _ = writeln!(
            out,
            "{:<22} {pooled:>10.2} {mean:>10.2} {sd:>8.2} {in_sample:>10.2} {:>7.2}",
            profile.name,
            pooled - in_sample
        );
    }
    if let Some(v) = validations.first() {
        let _ = writeln!(
            out,
            "\nheld-out folds ({} profile)",
            corpus.profiles[0].name
        );
        let _ = writeln!(
            out,
            "{:<5} {:>5} {:>7} {:>9} {:>8} {:>9} {:>4} {:>4} {:>4}  contents",
            "fold", "files", "windows", "threshold", "train", "held-out", "TP", "FN", "FP",
        );
        for (f, r) in v.folds.iter().enumerate() {
            let mut categories: Vec<&str> = corpus
                .series
                .iter()
                .zip(folds)
                .filter(|(_, x)| **x == f)
                .map(|(s, _)| s.category.as_str())
                .collect();
            categories.dedup();
            let held = if r.windows > 0 {
                format!("{:.2}", r.held_out.normalized())
            } else {
                "no window".to_owned()
            };
            let _ = writeln!(
                out,
                "{f:<5} {:>5} {:>7} {:>9.4} {:>8.2} {held:>9} {:>4} {:>4} {:>4}  {}",
                r.files,
                r.windows,
                r.threshold,
                r.train.normalized(),
                r.held_out.tp,
                r.held_out.fn_,
                r.held_out.fp,
                categories.join(" ")
            );
            if candidates.len() > 1 {
                let _ = writeln!(out, "      chosen: {}", candidates[r.candidate].name);
            }
        }
    }
    out
}

/// The corpus' healthy stretches: files without windows, and files with windows far from them.
fn nab_false_alarms(
    corpus: &Corpus,
    scored: &[ScoredSeries],
    threshold: f64,
) -> Vec<(String, usize, FalseAlarms)> {
    let mut without = (0, FalseAlarms::default());
    let mut with = (0, FalseAlarms::default());
    for (series, s) in corpus.series.iter().zip(scored) {
        let count =
            healthy_false_alarms(&series.timestamps, &series.windows, s.scores(), threshold);
        let target = if series.windows.is_empty() {
            &mut without
        } else {
            &mut with
        };
        target.0 += 1;
        target.1.add(&count);
    }
    vec![
        ("NAB files without windows".to_owned(), without.0, without.1),
        (
            "NAB files with windows, far from them".to_owned(),
            with.0,
            with.1,
        ),
    ]
}

/// The generator's healthy fleets (a daily cycle and Gaussian noise, no incident), scored
/// by one keyed detector each, as a pipeline would.
fn fleet_false_alarms(
    detector: &dyn DetectorConfig,
    threshold: f64,
    series: usize,
    days: u64,
) -> anyhow::Result<Vec<(String, usize, FalseAlarms)>> {
    let fleets = [
        ("1-minute samples, noise 3 %", 60, 0.03, 1),
        ("5-minute samples, noise 10 %", 300, 0.10, 2),
    ];
    let bar = progress(fleets.len(), "generated fleets");
    let rows = parallel(fleets.len(), fleets.len(), |i| {
        let (name, interval, noise, seed) = fleets[i];
        let config = GeneratorConfig {
            series,
            interval: Duration::from_secs(interval),
            points: days * 86_400 / interval,
            noise,
            seed,
            batch_size: 8192,
            ..GeneratorConfig::default()
        };
        let mut generator = Generator::new(config);
        let mut detector = detector.build(&BuildContext::default(), series)?;
        // Per series: (timestamps, scores).
        let mut by_series: HashMap<u64, (Vec<i64>, Vec<f64>)> = HashMap::new();
        while let Some(batch) = generator.fill(8192) {
            let scored = detector.score(&batch)?;
            let input = MetricsColumns::try_new(&batch, "eval")?;
            let scores = ScoreColumns::try_new(&scored, "eval")?;
            for row in 0..batch.num_rows() {
                let (ts, score) = by_series.entry(input.series_id.value(row)).or_default();
                ts.push(input.ts.value(row));
                score.push(scores.score.value(row));
            }
        }
        let mut total = FalseAlarms::default();
        for (ts, scores) in by_series.values() {
            total.add(&healthy_false_alarms(ts, &[], scores, threshold));
        }
        bar.inc(1);
        Ok((format!("generated fleet, {name}"), by_series.len(), total))
    });
    bar.finish_and_clear();
    rows
}

fn false_alarm_report(rows: &[(String, usize, FalseAlarms)], threshold: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nfalse alarms on healthy data (threshold {threshold:.4}; after each series' first {} h)",
        DAY_MS / 3_600_000
    );
    let _ = writeln!(
        out,
        "{:<46} {:>6} {:>11} {:>7} {:>22}",
        "data", "series", "series-days", "alerts", "per 1000 series-days"
    );
    let mut total = FalseAlarms::default();
    for (name, series, alarms) in rows {
        total.add(alarms);
        let _ = writeln!(
            out,
            "{name:<46} {series:>6} {:>11.1} {:>7} {:>22.1}",
            alarms.series_days,
            alarms.alerts,
            alarms.per_thousand_series_days()
        );
    }
    let _ = writeln!(
        out,
        "{:<46} {:>6} {:>11.1} {:>7} {:>22.1}",
        "all",
        rows.iter().map(|r| r.1).sum::<usize>(),
        total.series_days,
        total.alerts,
        total.per_thousand_series_days()
    );
    out
}

/// One CSV per data file: `OUT/<category>/<file>.csv` with `timestamp,value,anomaly_score`.
fn write_scores(corpus: &Corpus, scored: &[ScoredSeries], out: &Path) -> anyhow::Result<()> {
    for (series, s) in corpus.series.iter().zip(scored) {
        let dir = out.join(&series.category);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(&series.file);
        let mut csv = String::with_capacity(series.values.len() * 40);
        csv.push_str("timestamp,value,anomaly_score\n");
        for ((ts, value), score) in series.timestamps.iter().zip(&series.values).zip(s.scores()) {
            let _ = writeln!(csv, "{},{value},{score}", format_nab_ts(*ts));
        }
        std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
