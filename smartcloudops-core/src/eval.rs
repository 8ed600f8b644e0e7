//! NAB-style evaluation: score a detector on labelled series the way the Numenta Anomaly
//! Benchmark does.
//!
//! A corpus in NAB layout ([`Corpus::load`]) holds series (`data/<category>/<file>.csv` with
//! `timestamp,value`), labelled anomaly windows (`labels/combined_windows.json`) and cost
//! profiles (`config/profiles.json`). For one detector and one profile:
//!
//! - the first 15 % of each file (at most 750 rows) is **probation**: detections there count
//!   for nothing;
//! - inside a window, only the **earliest** detection counts, weighted by the scaled sigmoid
//!   `2 / (1 + e^(5x)) − 1` of its position `x ∈ [−1, 0)` in the window (−1 at the left edge,
//!   so an early detection earns the full `tp` weight, a detection at the right edge almost
//!   nothing), normalised so the left edge earns exactly `tp`;
//! - a missed window costs `fn`;
//! - a detection outside every window costs `fp` times the same sigmoid of its distance past
//!   the previous window's right edge, in window widths (full cost before the first window
//!   or 3 widths past the last one, little cost just after a window);
//! - one **threshold** for the whole corpus, chosen to maximise the profile's total (or fixed
//!   by the caller), decides which rows are detections (`score ≥ threshold`);
//! - the total is **normalised** between the null detector (detects nothing: every window
//!   missed) and the perfect one (detects every window at its first scored row):
//!   `100 · (raw − null) / (perfect − null)`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::detector::Detector;
use crate::error::{Error, Result};
use crate::schema::{MetricsBatchBuilder, ScoreColumns};

/// Share of each file that is probation.
pub const PROBATION_FRACTION: f64 = 0.15;
/// Probation is at most this many rows (15 % of 5000).
pub const PROBATION_CAP: usize = 750;

/// A cost profile: the weights of true positives, false negatives and false positives.
#[derive(Debug, Clone, PartialEq)]
pub struct CostProfile {
    /// The profile's name, e.g. `standard`.
    pub name: String,
    /// Weight of a detected window.
    pub tp: f64,
    /// Cost of a missed window.
    pub fn_: f64,
    /// Cost of a false positive.
    pub fp: f64,
}

impl CostProfile {
    /// NAB's three profiles: `standard`, `reward_low_FP_rate`, `reward_low_FN_rate`.
    pub fn nab_defaults() -> Vec<CostProfile> {
        let p = |name: &str, fn_: f64, fp: f64| CostProfile {
            name: name.to_owned(),
            tp: 1.0,
            fn_,
            fp,
        };
        vec![
            p("standard", 1.0, 0.11),
            p("reward_low_FP_rate", 1.0, 0.22),
            p("reward_low_FN_rate", 2.0, 0.11),
        ]
    }
}

/// One labelled series.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSeries {
    /// The category (directory), e.g. `realKnownCause`.
    pub category: String,
    /// The file name, e.g. `nyc_taxi.csv`.
    pub file: String,
    /// Row times, ms since the epoch (UTC).
    pub timestamps: Vec<i64>,
    /// Row values.
    pub values: Vec<f64>,
    /// Labelled anomaly windows, `[start, end]` inclusive, ms since the epoch.
    pub windows: Vec<(i64, i64)>,
}

impl LabelledSeries {
    /// `category/file`, the key NAB's label files use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.category, self.file)
    }

    /// Rows of probation: `min(⌊0.15 · rows⌋, 750)`.
    pub fn probation(&self) -> usize {
        ((PROBATION_FRACTION * self.timestamps.len() as f64).floor() as usize).min(PROBATION_CAP)
    }
}

/// A labelled corpus in NAB layout.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The corpus directory.
    pub root: PathBuf,
    /// Every series with its windows, sorted by key.
    pub series: Vec<LabelledSeries>,
    /// The cost profiles.
    pub profiles: Vec<CostProfile>,
}

#[derive(Deserialize)]
struct ProfileFile {
    #[serde(rename = "CostMatrix")]
    cost_matrix: CostMatrix,
}

#[derive(Deserialize)]
struct CostMatrix {
    #[serde(rename = "tpWeight")]
    tp: f64,
    #[serde(rename = "fnWeight")]
    fn_: f64,
    #[serde(rename = "fpWeight")]
    fp: f64,
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

fn corpus_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::io(
        path.display(),
        std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string()),
    )
}

impl Corpus {
    /// Loads `root/data/*/*.csv`, `root/labels/combined_windows.json` and
    /// `root/config/profiles.json` (NAB's defaults when that file is absent). A data file
    /// missing from the labels is an error: an unlabelled file would silently count as
    /// anomaly-free.
    pub fn load(root: &Path) -> Result<Corpus> {
        let labels_path = root.join("labels/combined_windows.json");
        let labels: BTreeMap<String, Vec<[String; 2]>> = serde_json::from_str(&read(&labels_path)?)
            .map_err(|e| corpus_error(&labels_path, e))?;
        let profiles_path = root.join("config/profiles.json");
        let profiles = if profiles_path.exists() {
            let raw: BTreeMap<String, ProfileFile> =
                serde_json::from_str(&read(&profiles_path)?)
                    .map_err(|e| corpus_error(&profiles_path, e))?;
            let order = ["standard", "reward_low_FP_rate", "reward_low_FN_rate"];
            let mut profiles: Vec<CostProfile> = raw
                .into_iter()
                .map(|(name, p)| CostProfile {
                    name,
                    tp: p.cost_matrix.tp,
                    fn_: p.cost_matrix.fn_,
                    fp: p.cost_matrix.fp,
                })
                .collect();
            profiles.sort_by_key(|p| {
                order
                    .iter()
                    .position(|o| *o == p.name)
                    .unwrap_or(order.len())
            });
            profiles
        } else {
            CostProfile::nab_defaults()
        };
        let data = root.join("data");
        let mut series = Vec::new();
        let categories = fs::read_dir(&data).map_err(|e| Error::io(data.display(), e))?;
        for category in categories {
            let category = category.map_err(|e| Error::io(data.display(), e))?.path();
            if !category.is_dir() {
                continue;
            }
            let files = fs::read_dir(&category).map_err(|e| Error::io(category.display(), e))?;
            for file in files {
                let path = file.map_err(|e| Error::io(category.display(), e))?.path();
                if path.extension().is_none_or(|e| e != "csv") {
                    continue;
                }
                let category_name = category.file_name().unwrap_or_default().to_string_lossy();
                let file_name = path.file_name().unwrap_or_default().to_string_lossy();
                let key = format!("{category_name}/{file_name}");
                let windows = labels
                    .get(&key)
                    .ok_or_else(|| corpus_error(&labels_path, format!("no labels for {key}")))?
                    .iter()
                    .map(
                        |[start, end]| match (parse_nab_ts(start), parse_nab_ts(end)) {
                            (Some(s), Some(e)) => Ok((s, e)),
                            _ => Err(corpus_error(&labels_path, format!("bad window in {key}"))),
                        },
                    )
                    .collect::<Result<Vec<_>>>()?;
                let (timestamps, values) = read_series(&path)?;
                series.push(LabelledSeries {
                    category: category_name.into_owned(),
                    file: file_name.into_owned(),
                    timestamps,
                    values,
                    windows,
                });
            }
        }
        series.sort_by_key(LabelledSeries::key);
        Ok(Corpus {
            root: root.to_owned(),
            series,
            profiles,
        })
    }

    /// Number of labelled windows.
    pub fn window_count(&self) -> usize {
        self.series.iter().map(|s| s.windows.len()).sum()
    }

    /// Number of rows.
    pub fn row_count(&self) -> usize {
        self.series.iter().map(|s| s.values.len()).sum()
    }
}

/// Reads a `timestamp,value` CSV (header required, extra columns ignored).
pub fn read_series(path: &Path) -> Result<(Vec<i64>, Vec<f64>)> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| corpus_error(path, e))?;
    let headers = reader.headers().map_err(|e| corpus_error(path, e))?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| corpus_error(path, format!("no `{name}` column")))
    };
    let (ts_col, value_col) = (column("timestamp")?, column("value")?);
    let mut timestamps = Vec::new();
    let mut values = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| corpus_error(path, e))?;
        let line = i + 2;
        let ts = record
            .get(ts_col)
            .and_then(parse_nab_ts)
            .ok_or_else(|| corpus_error(path, format!("line {line}: bad timestamp")))?;
        let value: f64 = record
            .get(value_col)
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| corpus_error(path, format!("line {line}: bad value")))?;
        timestamps.push(ts);
        values.push(value);
    }
    Ok((timestamps, values))
}

/// Parses NAB's `YYYY-MM-DD HH:MM:SS[.ffffff]` (UTC) to ms since the epoch.
pub fn parse_nab_ts(text: &str) -> Option<i64> {
    let text = text.trim().trim_end_matches('Z');
    let (date, time) = text.split_once([' ', 'T'])?;
    // Unsigned parts: a sign anywhere is malformed.
    let mut d = date.split('-').map(|p| p.parse::<u32>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<u32>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next().unwrap_or(Some(0))?);
    if y > 9999
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
    {
        return None;
    }
    let millis = if frac.is_empty() {
        0
    } else if frac.bytes().all(|b| b.is_ascii_digit()) {
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        digits.parse::<i64>().ok()?
    } else {
        return None;
    };
    let (y, m, day) = (i64::from(y), i64::from(m), i64::from(day));
    let (hh, mm, ss) = (i64::from(hh), i64::from(mm), i64::from(ss));
    let days = days_from_civil(y, m, day);
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + millis)
}

/// Formats ms since the epoch as NAB does: `YYYY-MM-DD HH:MM:SS`.
pub fn format_nab_ts(ts_ms: i64) -> String {
    let secs = ts_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Howard Hinnant's civil-calendar algorithms (public domain).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Streams one series through `detector` in batches of `batch_rows` and returns the score
/// of every row (the same path as the pipeline's detector stage).
pub fn score_series(
    detector: &mut dyn Detector,
    series: &LabelledSeries,
    batch_rows: usize,
) -> Result<Vec<f64>> {
    let mut scores = Vec::with_capacity(series.values.len());
    let labels = [("file", series.key())];
    let id = crate::schema::series_id("value", &labels);
    let mut builder = MetricsBatchBuilder::with_capacity(batch_rows);
    let rows = series.timestamps.iter().zip(&series.values);
    let mut flush = |builder: &mut MetricsBatchBuilder, scores: &mut Vec<f64>| -> Result<()> {
        let scored = detector.score(&builder.finish())?;
        scores.extend_from_slice(ScoreColumns::try_new(&scored, "eval")?.score.values());
        Ok(())
    };
    for (&ts, &value) in rows {
        builder.push_with_id(ts, "value", &labels, value, id);
        if builder.len() >= batch_rows.max(1) {
            flush(&mut builder, &mut scores)?;
        }
    }
    if !builder.is_empty() {
        flush(&mut builder, &mut scores)?;
    }
    Ok(scores)
}

/// The scaled sigmoid of NAB: `2 / (1 + e^(5x)) − 1`, and −1 beyond `x > 3`.
pub fn scaled_sigmoid(x: f64) -> f64 {
    if x > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }
}

/// How a detection at a row would count.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowKind {
    /// In probation: never counts.
    Probation,
    /// In window `window` (index across the whole scoring), with the unweighted sigmoid.
    Window { window: usize, sigmoid: f64 },
    /// Outside every window, with the (negative) unweighted sigmoid.
    Outside { sigmoid: f64 },
}

/// A series prepared for scoring: what a detection at each row would be worth.
#[derive(Debug, Clone)]
pub struct ScoredSeries {
    /// `category/file`.
    pub key: String,
    /// The category.
    pub category: String,
    kinds: Vec<RowKind>,
    scores: Vec<f64>,
    windows: usize,
    /// Best unweighted sigmoid reachable in each window (the perfect detector), `None` when
    /// the window has no scored row.
    best: Vec<Option<f64>>,
}

impl ScoredSeries {
    /// Prepares `series` with the detector's `scores` (one per row).
    pub fn new(series: &LabelledSeries, scores: Vec<f64>) -> Result<Self> {
        if scores.len() != series.timestamps.len() {
            return Err(Error::schema(
                "eval",
                format!(
                    "{}: {} scores for {} rows",
                    series.key(),
                    scores.len(),
                    series.timestamps.len()
                ),
            ));
        }
        let ts = &series.timestamps;
        let probation = series.probation();
        // Row ranges of the windows.
        let ranges: Vec<Option<(usize, usize)>> = series
            .windows
            .iter()
            .map(|&(start, end)| {
                let left = ts.partition_point(|&t| t < start);
                let right = ts.partition_point(|&t| t <= end);
                (right > left).then(|| (left, right - 1))
            })
            .collect();
        let mut kinds = Vec::with_capacity(ts.len());
        let mut best = vec![None; ranges.len()];
        let mut previous: Option<(usize, usize)> = None; // (right index, width)
        let mut w = 0;
        for i in 0..ts.len() {
            while w < ranges.len() && ranges[w].is_none_or(|(_, right)| right < i) {
                if let Some((left, right)) = ranges[w] {
                    previous = Some((right, right - left + 1));
                }
                w += 1;
            }
            let in_window = ranges
                .get(w)
                .copied()
                .flatten()
                .filter(|&(left, right)| (left..=right).contains(&i));
            let kind = if let Some((left, right)) = in_window {
                let width = (right - left + 1) as f64;
                let position = -((right - i + 1) as f64) / width;
                RowKind::Window {
                    window: w,
                    sigmoid: scaled_sigmoid(position),
                }
            } else {
                let sigmoid = match previous {
                    None => -1.0,
                    Some((right, width)) if width > 1 => {
                        scaled_sigmoid((i - right) as f64 / (width - 1) as f64)
                    }
                    Some(_) => -1.0,
                };
                RowKind::Outside { sigmoid }
            };
            if i < probation {
                kinds.push(RowKind::Probation);
                continue;
            }
            if let RowKind::Window { window, sigmoid } = kind {
                let b: &mut Option<f64> = &mut best[window];
                *b = Some(b.map_or(sigmoid, |x: f64| x.max(sigmoid)));
            }
            kinds.push(kind);
        }
        Ok(Self {
            key: series.key(),
            category: series.category.clone(),
            kinds,
            scores: scores
                .into_iter()
                .map(|s| if s.is_nan() { 0.0 } else { s })
                .collect(),
            windows: ranges.len(),
            best,
        })
    }

    /// The detector's scores.
    pub fn scores(&self) -> &[f64] {
        &self.scores
    }
}

/// Counts and score of one set of series at one threshold and profile.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Raw (weighted) score.
    pub raw: f64,
    /// The null detector's raw score.
    pub null: f64,
    /// The perfect detector's raw score.
    pub perfect: f64,
    /// Windows detected.
    pub tp: usize,
    /// Windows missed.
    pub fn_: usize,
    /// Detections outside windows (after probation).
    pub fp: usize,
}

impl Tally {
    /// `100 · (raw − null) / (perfect − null)`. With no window to find, 100 without a false
    /// positive and 0 with one.
    pub fn normalized(&self) -> f64 {
        let span = self.perfect - self.null;
        if span.abs() < f64::EPSILON {
            // No windows: a perfect score is no false positive at all.
            return if self.fp == 0 { 100.0 } else { 0.0 };
        }
        100.0 * (self.raw - self.null) / span
    }

    fn add(&mut self, other: &Tally) {
        self.raw += other.raw;
        self.null += other.null;
        self.perfect += other.perfect;
        self.tp += other.tp;
        self.fn_ += other.fn_;
        self.fp += other.fp;
    }
}

fn max_tp() -> f64 {
    scaled_sigmoid(-1.0)
}

/// Scores `series` at `threshold`: a row is a detection when its score `≥ threshold`.
pub fn tally(series: &ScoredSeries, profile: &CostProfile, threshold: f64) -> Tally {
    let mut detected: Vec<Option<f64>> = vec![None; series.windows];
    let mut t = Tally::default();
    for (kind, &score) in series.kinds.iter().zip(&series.scores) {
        if score < threshold {
            continue;
        }
        match *kind {
            RowKind::Probation => {}
            RowKind::Window { window, sigmoid } => {
                let d = &mut detected[window];
                *d = Some(d.map_or(sigmoid, |x: f64| x.max(sigmoid)));
            }
            RowKind::Outside { sigmoid } => {
                t.fp += 1;
                t.raw += profile.fp * sigmoid;
            }
        }
    }
    for (d, best) in detected.iter().zip(&series.best) {
        t.null -= profile.fn_;
        t.perfect += best.map_or(-profile.fn_, |b| profile.tp * b / max_tp());
        match d {
            Some(s) => {
                t.tp += 1;
                t.raw += profile.tp * s / max_tp();
            }
            None => {
                t.fn_ += 1;
                t.raw -= profile.fn_;
            }
        }
    }
    t
}

/// Sum of [`tally`] over many series.
pub fn tally_all<'a>(
    series: impl IntoIterator<Item = &'a ScoredSeries>,
    profile: &CostProfile,
    threshold: f64,
) -> Tally {
    let mut total = Tally::default();
    for s in series {
        total.add(&tally(s, profile, threshold));
    }
    total
}

/// The threshold maximising the corpus' raw score under `profile`, and that score. Every
/// distinct score is tried (one sweep over all rows sorted by score); ties keep the higher
/// threshold.
pub fn optimize_threshold<'a>(
    series: impl IntoIterator<Item = &'a ScoredSeries>,
    profile: &CostProfile,
) -> (f64, Tally) {
    let series: Vec<&ScoredSeries> = series.into_iter().collect();
    // (score, kind) of every scored row, with window indices made global.
    let mut rows: Vec<(f64, RowKind)> = Vec::new();
    let mut base = 0;
    for s in &series {
        for (kind, &score) in s.kinds.iter().zip(&s.scores) {
            match *kind {
                RowKind::Probation => {}
                RowKind::Window { window, sigmoid } => rows.push((
                    score,
                    RowKind::Window {
                        window: base + window,
                        sigmoid,
                    },
                )),
                outside => rows.push((score, outside)),
            }
        }
        base += s.windows;
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best_in_window: Vec<Option<f64>> = vec![None; base];
    let mut raw = -profile.fn_ * base as f64;
    let mut best = (f64::INFINITY, raw);
    let mut i = 0;
    while i < rows.len() {
        let threshold = rows[i].0;
        while i < rows.len() && rows[i].0 == threshold {
            match rows[i].1 {
                RowKind::Window { window, sigmoid } => {
                    let value = profile.tp * sigmoid / max_tp();
                    match best_in_window[window] {
                        None => raw += value + profile.fn_,
                        Some(old) if value > old => raw += value - old,
                        Some(_) => {}
                    }
                    let b = &mut best_in_window[window];
                    *b = Some(b.map_or(value, |x: f64| x.max(value)));
                }
                RowKind::Outside { sigmoid } => raw += profile.fp * sigmoid,
                RowKind::Probation => {}
            }
            i += 1;
        }
        if raw > best.1 + 1e-12 {
            best = (threshold, raw);
        }
    }
    // Recount at the chosen threshold: the sweep's running sum and a fresh tally agree, and
    // the tally carries the counts.
    let threshold = if best.0.is_finite() {
        best.0
    } else {
        1.0 + f64::EPSILON
    };
    (threshold, tally_all(series, profile, threshold))
}

/// How files are split into folds for cross-validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldScheme {
    /// `k` folds of files, stratified by category: the files of each category (in key order)
    /// are dealt to the folds in turn, continuing where the previous category stopped, so
    /// every fold holds about the same number of files and a share of each category.
    KFold(usize),
    /// One fold per category: every category is scored by parameters chosen on the others.
    LeaveOneCategoryOut,
}

impl FoldScheme {
    /// The fold of each series (given by category, in the corpus' key order) and the number
    /// of folds. K-fold needs `2 ≤ k ≤ files`; leave-one-category-out needs two categories.
    pub fn assign(&self, categories: &[&str]) -> Result<(Vec<usize>, usize)> {
        let invalid = |message: String| Error::schema("eval", message);
        match *self {
            FoldScheme::KFold(k) => {
                if k < 2 || k > categories.len() {
                    return Err(invalid(format!(
                        "{k} folds for {} files: need between 2 and the number of files",
                        categories.len()
                    )));
                }
                let mut order: Vec<usize> = (0..categories.len()).collect();
                // Stable: files keep their key order inside a category.
                order.sort_by_key(|&i| categories[i]);
                let mut folds = vec![0; categories.len()];
                for (n, i) in order.into_iter().enumerate() {
                    folds[i] = n % k;
                }
                Ok((folds, k))
            }
            FoldScheme::LeaveOneCategoryOut => {
                let mut names: Vec<&str> = categories.to_vec();
                names.sort_unstable();
                names.dedup();
                if names.len() < 2 {
                    return Err(invalid(format!(
                        "leave-one-category-out needs at least two categories, found {}",
                        names.len()
                    )));
                }
                let folds = categories
                    .iter()
                    .map(|c| names.binary_search(c).unwrap_or_default())
                    .collect();
                Ok((folds, names.len()))
            }
        }
    }
}

/// One held-out fold of a cross-validation.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldResult {
    /// Files in the fold.
    pub files: usize,
    /// Labelled windows in the fold.
    pub windows: usize,
    /// The candidate chosen on the other folds (an index into the candidates).
    pub candidate: usize,
    /// The threshold chosen on the other folds (or the fixed one).
    pub threshold: f64,
    /// The chosen candidate and threshold on the other folds.
    pub train: Tally,
    /// The chosen candidate and threshold on this fold.
    pub held_out: Tally,
}

/// The result of [`cross_validate`] for one cost profile.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossValidation {
    /// One result per fold.
    pub folds: Vec<FoldResult>,
    /// The held-out tallies summed: every file scored once, by parameters chosen without it.
    pub pooled: Tally,
    /// The candidate and threshold chosen on the whole corpus, and their (in-sample) tally.
    pub in_sample: (usize, f64, Tally),
}

impl CrossValidation {
    /// Mean and sample standard deviation of the folds' normalised held-out scores, over the
    /// folds that hold a window (a fold without one has no score span to normalise by).
    pub fn fold_mean_sd(&self) -> (f64, f64) {
        let scores: Vec<f64> = self
            .folds
            .iter()
            .filter(|f| f.windows > 0)
            .map(|f| f.held_out.normalized())
            .collect();
        let n = scores.len() as f64;
        if scores.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let mean = scores.iter().sum::<f64>() / n;
        let var = if scores.len() < 2 {
            0.0
        } else {
            scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
        };
        (mean, var.sqrt())
    }
}

/// The candidate and threshold with the best raw score on the whole corpus, and its tally:
/// what a deployment would pick from `candidates` (see [`cross_validate`]).
pub fn select_candidate(
    candidates: &[Vec<ScoredSeries>],
    profile: &CostProfile,
    threshold: Option<f64>,
) -> (usize, f64, Tally) {
    choose(candidates, |_| true, profile, threshold)
}

/// The candidate and threshold with the best raw score on the files `include` admits (ties
/// keep the earlier candidate). The null and perfect scores depend only on the windows, so
/// the best raw score is also the best normalised one.
fn choose(
    candidates: &[Vec<ScoredSeries>],
    include: impl Fn(usize) -> bool,
    profile: &CostProfile,
    threshold: Option<f64>,
) -> (usize, f64, Tally) {
    let mut best: Option<(usize, f64, Tally)> = None;
    for (c, scored) in candidates.iter().enumerate() {
        let subset = scored
            .iter()
            .enumerate()
            .filter(|(i, _)| include(*i))
            .map(|(_, s)| s);
        let (t, tally) = match threshold {
            Some(t) => (t, tally_all(subset, profile, t)),
            None => optimize_threshold(subset, profile),
        };
        if best.as_ref().is_none_or(|b| tally.raw > b.2.raw + 1e-12) {
            best = Some((c, t, tally));
        }
    }
    best.unwrap_or((0, threshold.unwrap_or(1.0), Tally::default()))
}

/// Cross-validates a choice among `candidates` (each one detector configuration's scores,
/// one [`ScoredSeries`] per corpus file, in the same order) and of the threshold: for each
/// fold, the candidate and threshold with the best score on the other folds are scored on
/// it. `threshold` fixes the threshold instead of choosing it.
///
/// Each file's scores come from a fresh detector, strictly online, so they do not depend on
/// the fold: only the choices do, and those never see the held-out files.
pub fn cross_validate(
    candidates: &[Vec<ScoredSeries>],
    folds: &[usize],
    k: usize,
    profile: &CostProfile,
    threshold: Option<f64>,
) -> CrossValidation {
    let mut results = Vec::with_capacity(k);
    let mut pooled = Tally::default();
    for fold in 0..k {
        let (candidate, threshold, train) =
            choose(candidates, |i| folds[i] != fold, profile, threshold);
        let held: Vec<&ScoredSeries> = candidates[candidate]
            .iter()
            .zip(folds)
            .filter(|(_, f)| **f == fold)
            .map(|(s, _)| s)
            .collect();
        let held_out = tally_all(held.iter().copied(), profile, threshold);
        pooled.add(&held_out);
        results.push(FoldResult {
            files: held.len(),
            windows: held.iter().map(|s| s.windows).sum(),
            candidate,
            threshold,
            train,
            held_out,
        });
    }
    CrossValidation {
        folds: results,
        pooled,
        in_sample: select_candidate(candidates, profile, threshold),
    }
}

/// Alerts raised on healthy data, for the false-alarm budget.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FalseAlarms {
    /// Alerts (rows where the score rises to the threshold) on healthy rows.
    pub alerts: usize,
    /// Healthy time, in series-days.
    pub series_days: f64,
}

impl FalseAlarms {
    /// Alerts per 1 000 series-days (0 with no healthy time).
    pub fn per_thousand_series_days(&self) -> f64 {
        if self.series_days > 0.0 {
            1000.0 * self.alerts as f64 / self.series_days
        } else {
            0.0
        }
    }

    /// Adds another count.
    pub fn add(&mut self, other: &FalseAlarms) {
        self.alerts += other.alerts;
        self.series_days += other.series_days;
    }
}

/// One day in ms: the warm-up excluded from the false-alarm budget.
pub const DAY_MS: i64 = 86_400_000;

/// Alerts on the healthy rows of a series (`timestamps` and `scores` row by row, the
/// labelled `windows`): after its first day, and farther than one window
/// width from every labelled window (before or after it). An alert is a row whose score is
/// at or above `threshold` while the previous row's is below; it counts when it starts on a
/// healthy row. Healthy time is the sum of the gaps between consecutive healthy rows.
pub fn healthy_false_alarms(
    timestamps: &[i64],
    windows: &[(i64, i64)],
    scores: &[f64],
    threshold: f64,
) -> FalseAlarms {
    let ts = timestamps;
    let Some(&first) = ts.first() else {
        return FalseAlarms::default();
    };
    let near: Vec<(i64, i64)> = windows
        .iter()
        .map(|&(s, e)| {
            let width = e - s;
            (s.saturating_sub(width), e.saturating_add(width))
        })
        .collect();
    let healthy = |t: i64| t >= first + DAY_MS && !near.iter().any(|&(s, e)| (s..=e).contains(&t));
    let mut out = FalseAlarms::default();
    let mut was_above = false;
    for (i, (&t, &score)) in ts.iter().zip(scores).enumerate() {
        let above = score >= threshold;
        let ok = healthy(t);
        if above && !was_above && ok {
            out.alerts += 1;
        }
        was_above = above;
        if ok && i > 0 && healthy(ts[i - 1]) {
            out.series_days += (t - ts[i - 1]) as f64 / DAY_MS as f64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    /// 100 rows, one per minute, one window over rows 40..=49.
    fn series() -> LabelledSeries {
        LabelledSeries {
            category: "c".into(),
            file: "f.csv".into(),
            timestamps: (0..100).map(|i| i * MIN).collect(),
            values: vec![0.0; 100],
            windows: vec![(40 * MIN, 49 * MIN)],
        }
    }

    fn standard() -> CostProfile {
        CostProfile::nab_defaults().remove(0)
    }

    fn scored(hits: &[usize]) -> ScoredSeries {
        let mut scores = vec![0.0; 100];
        for &h in hits {
            scores[h] = 1.0;
        }
        ScoredSeries::new(&series(), scores).unwrap()
    }

    #[test]
    fn the_earliest_detection_in_a_window_earns_the_full_weight() {
        let t = tally(&scored(&[40, 45]), &standard(), 0.5);
        assert_eq!((t.tp, t.fn_, t.fp), (1, 0, 0));
        assert!((t.raw - 1.0).abs() < 1e-12, "{}", t.raw);
        assert!((t.normalized() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn a_late_detection_earns_the_sigmoid_of_its_position() {
        // Row 45 of the window 40..=49: position −(49 − 45 + 1)/10 = −0.5.
        let t = tally(&scored(&[45]), &standard(), 0.5);
        let expected = (2.0 / (1.0 + (-2.5f64).exp()) - 1.0) / scaled_sigmoid(-1.0);
        assert!((t.raw - expected).abs() < 1e-12);
        assert!((expected - 0.8595).abs() < 1e-3, "{expected}");
    }

    #[test]
    fn false_positives_cost_by_distance_from_the_previous_window() {
        let p = standard();
        // Before any window: the full fp weight. (Probation is 15 rows.)
        let before = tally(&scored(&[20]), &p, 0.5);
        assert!((before.raw - (-1.0 - 0.11)).abs() < 1e-12, "{}", before.raw);
        // Right after the window: 1 / 9 widths past → sigmoid(0.111).
        let after = tally(&scored(&[50]), &p, 0.5);
        assert!((after.raw - (-1.0 + 0.11 * scaled_sigmoid(1.0 / 9.0))).abs() < 1e-12);
        // Far after: x > 3 → −1.
        let far = tally(&scored(&[90]), &p, 0.5);
        assert!((far.raw - (-1.0 - 0.11)).abs() < 1e-12);
        // In probation: nothing at all.
        let probation = tally(&scored(&[3]), &p, 0.5);
        assert_eq!((probation.fp, probation.raw), (0, -1.0));
    }

    #[test]
    fn null_and_perfect_bound_the_normalized_score() {
        let none = tally(&scored(&[]), &standard(), 0.5);
        assert_eq!(none.normalized(), 0.0);
        let low_fn = &CostProfile::nab_defaults()[2];
        let t = tally(&scored(&[]), low_fn, 0.5);
        assert_eq!((t.null, t.perfect), (-2.0, 1.0));
    }

    #[test]
    fn the_optimal_threshold_trades_false_positives_for_detections() {
        // The window is found at score 0.9; a false positive scores 0.95; lower scores are
        // mostly false positives.
        let mut scores = vec![0.1; 100];
        scores[40] = 0.9;
        scores[20] = 0.95;
        let s = ScoredSeries::new(&series(), scores).unwrap();
        let (threshold, t) = optimize_threshold(std::slice::from_ref(&s), &standard());
        assert_eq!(threshold, 0.9);
        assert_eq!((t.tp, t.fp), (1, 1));
        assert!((t.raw - (1.0 - 0.11)).abs() < 1e-12);
    }

    #[test]
    fn nab_timestamps_round_trip() {
        let t = parse_nab_ts("2014-02-19 10:50:00.000000").unwrap();
        assert_eq!(t, 1_392_807_000_000);
        assert_eq!(format_nab_ts(t), "2014-02-19 10:50:00");
        assert_eq!(parse_nab_ts("2014-02-19 10:50:00"), Some(t));
        assert_eq!(parse_nab_ts("1969-12-31 23:59:59"), Some(-1000));
        assert!(parse_nab_ts("yesterday").is_none());
        assert_eq!(parse_nab_ts("2014-02-19T10:50:00Z"), Some(t));
        assert!(parse_nab_ts("2014-02-19 -5:-3:-1").is_none());
        assert!(parse_nab_ts("2014-02-19 10:50:00.-5").is_none());
        assert!(parse_nab_ts("99999999999-01-01 00:00:00").is_none());
    }
    #[test]
    fn k_folds_deal_each_category_across_the_folds() {
        let categories = ["a", "a", "a", "b", "b", "c"];
        let (folds, k) = FoldScheme::KFold(2).assign(&categories).unwrap();
        assert_eq!((folds, k), (vec![0, 1, 0, 1, 0, 1], 2));
        let (folds, k) = FoldScheme::KFold(4).assign(&categories).unwrap();
        assert_eq!((folds, k), (vec![0, 1, 2, 3, 0, 1], 4));
        let (folds, k) = FoldScheme::LeaveOneCategoryOut.assign(&categories).unwrap();
        assert_eq!((folds, k), (vec![0, 0, 0, 1, 1, 2], 3));
        for bad in [FoldScheme::KFold(1), FoldScheme::KFold(7)] {
            assert!(bad.assign(&categories).is_err(), "{bad:?}");
        }
        assert!(FoldScheme::LeaveOneCategoryOut.assign(&["a", "a"]).is_err());
    }

    /// The 100-row series with score `window_score` at the window's first row and
    /// `fp_score` on five rows before it.
    fn with_scores(window_score: f64, fp_score: f64) -> ScoredSeries {
        let mut scores = vec![0.0; 100];
        scores[40] = window_score;
        for s in &mut scores[20..25] {
            *s = fp_score;
        }
        ScoredSeries::new(&series(), scores).unwrap()
    }

    #[test]
    fn cross_validation_scores_each_fold_with_a_threshold_chosen_without_it() {
        // File 0 needs a low threshold (0.4); file 1 finds its window at 0.8 and has five
        // false positives at 0.5. On the whole corpus 0.4 is best (both windows, five false
        // positives); each file alone prefers its own threshold, which fails the other.
        let files = vec![with_scores(0.4, 0.0), with_scores(0.8, 0.5)];
        let p = standard();
        let cv = cross_validate(std::slice::from_ref(&files), &[0, 1], 2, &p, None);
        assert_eq!(cv.folds[0].threshold, 0.8, "chosen on file 1");
        assert_eq!(cv.folds[1].threshold, 0.4, "chosen on file 0");
        // Held out: file 0 at 0.8 misses; file 1 at 0.4 finds with five false positives.
        assert_eq!((cv.folds[0].held_out.tp, cv.folds[0].held_out.fn_), (0, 1));
        assert_eq!((cv.folds[1].held_out.tp, cv.folds[1].held_out.fp), (1, 5));
        assert_eq!((cv.pooled.tp, cv.pooled.fn_, cv.pooled.fp), (1, 1, 5));
        let (candidate, threshold, in_sample) = cv.in_sample;
        assert_eq!((candidate, threshold, in_sample.tp), (0, 0.4, 2));
        // raw: −1 + (1 − 5 · 0.11) = −0.55 between null −2 and perfect 2.
        assert!(
            (cv.pooled.normalized() - 36.25).abs() < 1e-9,
            "{:?}",
            cv.pooled
        );
        assert!(cv.pooled.normalized() < in_sample.normalized());
        let (mean, sd) = cv.fold_mean_sd();
        let (f0, f1) = (0.0, 100.0 * (1.0 - 0.55 + 1.0) / 2.0);
        assert!((mean - (f0 + f1) / 2.0).abs() < 1e-9, "{mean}");
        assert!((sd - (f1 - f0) / 2f64.sqrt()).abs() < 1e-9, "{sd}");
    }

    #[test]
    fn cross_validation_chooses_candidates_on_the_training_folds_only() {
        // Candidate 0 finds file 0's window, candidate 1 file 1's: each fold gets the
        // candidate that did well on the *other* file, and misses.
        let a = vec![with_scores(0.9, 0.0), with_scores(0.0, 0.0)];
        let b = vec![with_scores(0.0, 0.0), with_scores(0.9, 0.0)];
        let cv = cross_validate(&[a, b], &[0, 1], 2, &standard(), Some(0.5));
        assert_eq!(cv.folds[0].candidate, 1);
        assert_eq!(cv.folds[1].candidate, 0);
        assert_eq!((cv.pooled.tp, cv.pooled.fn_), (0, 2));
        assert_eq!(cv.in_sample.0, 0, "a tie keeps the first candidate");
        assert_eq!(cv.in_sample.2.tp, 1);
    }

    #[test]
    fn false_alarms_count_alert_onsets_on_healthy_rows_only() {
        const HOUR: i64 = 3_600_000;
        let ts: Vec<i64> = (0..72).map(|h| h * HOUR).collect();
        let windows = [(50 * HOUR, 51 * HOUR)]; // near: hours 49..=52
        let mut scores = vec![0.0; 72];
        for h in [10, 30, 31, 50, 60] {
            scores[h] = 1.0;
        }
        let fa = healthy_false_alarms(&ts, &windows, &scores, 0.5);
        // Hour 10 is in the first day, 50 in the window; 30–31 is one alert; 60 another.
        assert_eq!(fa.alerts, 2);
        // Healthy: hours 24..=48 and 53..=71, 24 + 18 hourly gaps.
        assert!((fa.series_days - 1.75).abs() < 1e-12, "{}", fa.series_days);
        assert!((fa.per_thousand_series_days() - 2000.0 / 1.75).abs() < 1e-9);
        assert_eq!(
            healthy_false_alarms(&[], &[], &[], 0.5),
            FalseAlarms::default()
        );
    }
}
