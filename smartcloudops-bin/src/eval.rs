//! `smartcloudops eval`: NAB-style scoring of a detector on a labelled corpus.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use smartcloudops_core::component::BuildContext;
use smartcloudops_core::config::PipelineConfig;
use smartcloudops_core::detector::DetectorConfig;
use smartcloudops_core::detector::Preset;
use smartcloudops_core::eval::{
    Corpus, CostProfile, ScoredSeries, Tally, format_nab_ts, optimize_threshold, score_series,
    tally_all,
};

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
}

/// One profile's result over the corpus.
#[derive(Debug)]
struct ProfileResult {
    profile: CostProfile,
    threshold: f64,
    total: Tally,
    categories: Vec<(String, Tally)>,
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
    let (name, detector) = match (&args.config, &args.ensemble) {
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
            // Unset fields keep the preset's values.
            let (merged, disabled) = args.preset.config().overlay(table);
            let mut config: smartcloudops_core::detector::EnsembleConfig =
                toml::Value::Table(merged)
                    .try_into()
                    .with_context(|| format!("{}", path.display()))?;
            for part in disabled {
                if !config.disable(&part) {
                    bail!(
                        "{}: `{part}` is not a part that can be disabled",
                        path.display()
                    );
                }
            }
            let problems = config.problems();
            if let Some(problem) = problems.iter().next() {
                bail!("{}: {problem}", path.display());
            }
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
    };
    eprintln!(
        "scoring {} files ({} rows, {} windows) with {name}",
        corpus.series.len(),
        corpus.row_count(),
        corpus.window_count(),
    );
    let started = std::time::Instant::now();
    let scored = score_corpus(&corpus, args, detector.as_ref())?;
    let elapsed = started.elapsed().as_secs_f64();

    let results: Vec<ProfileResult> = corpus
        .profiles
        .iter()
        .map(|profile| {
            let (threshold, total) = match args.threshold {
                Some(t) => (t, tally_all(&scored, profile, t)),
                None => optimize_threshold(&scored, profile),
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
        .collect();
    print!("{}", report(&results, args, &name));
    eprintln!(
        "scored {} rows in {elapsed:.2} s ({:.0} rows/s)",
        corpus.row_count(),
        corpus.row_count() as f64 / elapsed.max(1e-9)
    );
    if let Some(out) = &args.write_scores {
        write_scores(&corpus, &scored, out)?;
        eprintln!("scores written under {}", out.display());
    }
    if let Some(out) = &args.plot {
        let threshold = results.first().map_or(0.5, |r| r.threshold);
        for (series, s) in corpus.series.iter().zip(&scored) {
            let path = out
                .join(&series.category)
                .join(format!("{}.svg", series.file.trim_end_matches(".csv")));
            plot::write_svg(&path, series, s.scores(), threshold)?;
        }
        eprintln!("plots written under {}", out.display());
    }
    Ok(())
}

/// `detector <type> from <file>`, for the report.
fn section_name(kind: &str, path: &Path) -> String {
    format!("detector {kind} from {}", path.display())
}

/// Scores every file with a fresh detector, `jobs` files at a time.
fn score_corpus(
    corpus: &Corpus,
    args: &EvalArgs,
    detector: &dyn DetectorConfig,
) -> anyhow::Result<Vec<ScoredSeries>> {
    let bar = ProgressBar::new(corpus.series.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<anyhow::Result<ScoredSeries>>>> =
        Mutex::new((0..corpus.series.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(series) = corpus.series.get(i) else {
                        return;
                    };
                    let result = detector
                        .build(&BuildContext::default(), 1)
                        .and_then(|mut detector| score_series(detector.as_mut(), series, 1024))
                        .and_then(|scores| ScoredSeries::new(series, scores))
                        .with_context(|| format!("scoring {}", series.key()));
                    bar.set_message(series.key());
                    bar.inc(1);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                }
            });
        }
    });
    bar.finish_and_clear();
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| bail!("a scoring thread stopped early")))
        .collect()
}

fn report(results: &[ProfileResult], args: &EvalArgs, name: &str) -> String {
    let mut out = String::new();
    let how = if args.threshold.is_some() {
        "fixed"
    } else {
        "optimized"
    };
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
