//! SVG plots of a series with its scores, labelled windows and alerts — written by hand:
//! a few hundred lines of SVG need no plotting library.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use smartcloudops_core::eval::{LabelledSeries, format_nab_ts};

const WIDTH: f64 = 1200.0;
const VALUE_TOP: f64 = 40.0;
const VALUE_HEIGHT: f64 = 260.0;
const SCORE_TOP: f64 = 330.0;
const SCORE_HEIGHT: f64 = 110.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
/// Most points drawn per line; longer series are reduced to min and max per pixel column.
const MAX_POINTS: usize = 2400;

/// Writes `path` (creating its directory): the values on top with labelled windows shaded
/// and alerts (`score ≥ threshold` after probation) marked, the score below with the
/// threshold.
pub(crate) fn write_svg(
    path: &Path,
    series: &LabelledSeries,
    scores: &[f64],
    threshold: f64,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, svg(series, scores, threshold))
        .with_context(|| format!("writing {}", path.display()))
}

fn svg(series: &LabelledSeries, scores: &[f64], threshold: f64) -> String {
    let n = series.values.len().max(2);
    let plot_width = WIDTH - LEFT - RIGHT;
    let x_of = |i: usize| LEFT + plot_width * i as f64 / (n - 1) as f64;
    let finite = series.values.iter().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(*v), hi.max(*v))
    });
    // A flat, empty or overflowing range gets a unit band so coordinates stay finite.
    let (lo, hi) = if lo.is_finite() && hi > lo && (hi - lo).is_finite() {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let y_value = |v: f64| VALUE_TOP + VALUE_HEIGHT * (1.0 - (v - lo) / (hi - lo));
    let y_score = |s: f64| SCORE_TOP + SCORE_HEIGHT * (1.0 - s.clamp(0.0, 1.0));

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="480" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="22" font-size="15">{}: values, labelled windows (orange), alerts (red); score below, threshold {threshold:.3}</text>"#,
        escape(&series.key())
    );
    // Probation, then the labelled windows.
    let probation = series.probation();
    if probation > 0 {
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{VALUE_TOP}" width="{:.1}" height="{}" fill="#eeeeee"/>"##,
            x_of(probation) - LEFT,
            SCORE_TOP + SCORE_HEIGHT - VALUE_TOP
        );
    }
    for &(start, end) in &series.windows {
        let a = series.timestamps.partition_point(|&t| t < start);
        let b = series.timestamps.partition_point(|&t| t <= end);
        if b > a {
            let _ = writeln!(
                out,
                r##"<rect x="{:.1}" y="{VALUE_TOP}" width="{:.1}" height="{}" fill="#ffa500" fill-opacity="0.25"/>"##,
                x_of(a),
                (x_of(b - 1) - x_of(a)).max(1.0),
                SCORE_TOP + SCORE_HEIGHT - VALUE_TOP
            );
        }
    }
    polyline(&mut out, &series.values, &x_of, &y_value, "#1f4e99");
    polyline(&mut out, scores, &x_of, &y_score, "#555555");
    let yt = y_score(threshold);
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" x2="{:.1}" y1="{yt:.1}" y2="{yt:.1}" stroke="#d62728" stroke-dasharray="4 3"/>"##,
        WIDTH - RIGHT
    );
    for (i, (&s, &v)) in scores.iter().zip(&series.values).enumerate() {
        if i >= probation && s >= threshold && v.is_finite() {
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#d62728"/>"##,
                x_of(i),
                y_value(v)
            );
        }
    }
    // Axes labels: value range and time range.
    let first = series.timestamps.first().copied().unwrap_or(0);
    let last = series.timestamps.last().copied().unwrap_or(0);
    let _ = writeln!(
        out,
        r#"<text x="4" y="{}">{}</text>"#,
        VALUE_TOP + 10.0,
        short(hi)
    );
    let _ = writeln!(
        out,
        r#"<text x="4" y="{}">{}</text>"#,
        VALUE_TOP + VALUE_HEIGHT,
        short(lo)
    );
    let _ = writeln!(out, r#"<text x="4" y="{}">score</text>"#, SCORE_TOP + 10.0);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="470">{}</text>"#,
        format_nab_ts(first)
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="470" text-anchor="end">{}</text>"#,
        WIDTH - RIGHT,
        format_nab_ts(last)
    );
    out.push_str("</svg>\n");
    out
}

/// Draws `values` as one polyline, reduced to the min and max of each pixel column when
/// there are more points than pixels, so spikes stay visible.
fn polyline(
    out: &mut String,
    values: &[f64],
    x_of: &dyn Fn(usize) -> f64,
    y_of: &dyn Fn(f64) -> f64,
    color: &str,
) {
    let step = values.len().div_ceil(MAX_POINTS / 2).max(1);
    let mut points = String::new();
    for (chunk_index, chunk) in values.chunks(step).enumerate() {
        let base = chunk_index * step;
        let mut pick: Vec<(usize, f64)> = Vec::with_capacity(2);
        let finite = chunk.iter().enumerate().filter(|(_, v)| v.is_finite());
        if step == 1 {
            pick.extend(finite.map(|(i, v)| (base + i, *v)));
        } else {
            let (mut min, mut max) = ((0, f64::INFINITY), (0, f64::NEG_INFINITY));
            for (i, &v) in finite {
                if v < min.1 {
                    min = (i, v);
                }
                if v > max.1 {
                    max = (i, v);
                }
            }
            if min.1.is_finite() {
                let (a, b) = if min.0 <= max.0 {
                    (min, max)
                } else {
                    (max, min)
                };
                pick.push((base + a.0, a.1));
                pick.push((base + b.0, b.1));
            }
        }
        for (i, v) in pick {
            let _ = write!(points, "{:.1},{:.1} ", x_of(i), y_of(v));
        }
    }
    let _ = writeln!(
        out,
        r#"<polyline fill="none" stroke="{color}" stroke-width="1" points="{}"/>"#,
        points.trim_end()
    );
}

fn short(v: f64) -> String {
    if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_shows_windows_alerts_and_the_threshold() {
        let series = LabelledSeries {
            category: "c".into(),
            file: "f<1>.csv".into(),
            timestamps: (0..10_000).map(|i| i * 60_000).collect(),
            values: (0..10_000)
                .map(|i| if i == 5000 { 100.0 } else { (i % 10) as f64 })
                .collect(),
            windows: vec![(4900 * 60_000, 5100 * 60_000)],
        };
        let mut scores = vec![0.0; 10_000];
        scores[5000] = 0.9;
        let svg = svg(&series, &scores, 0.5);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("f&lt;1&gt;.csv"));
        assert_eq!(svg.matches("<circle").count(), 1, "one alert");
        assert_eq!(svg.matches("fill-opacity").count(), 1, "one window");
        assert!(svg.contains("stroke-dasharray"), "threshold line");
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(points.split(' ').count() <= MAX_POINTS + 2, "reduced");
        assert!(svg.contains(",40.0"), "the spike reaches the top");
    }
}
