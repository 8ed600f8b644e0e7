//! Fuzz targets of SmartCloudOps, one function per untrusted surface.
//!
//! Each target takes arbitrary bytes and asserts what must hold for *any* input: no panic,
//! no unbounded work, and every record accounted for (a row or a reject with a reason).
//! The functions are engine-neutral; two binaries drive them:
//!
//! - `replay` (stable, no instrumentation) runs a target over files and folders: CI replays
//!   the seeds and the campaign's minimised corpus with it;
//! - `afl` (feature `afl`, built with `cargo afl build`) is the coverage-guided campaign on
//!   the stable toolchain (AFL++ through afl.rs). See `fuzz/README.md`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use smartcloudops_core::Detector;
use smartcloudops_core::config::PipelineConfig;
use smartcloudops_core::decode::{
    CsvDecoder, CsvOptions, Decoder, InfluxDecoder, JsonDecoder, PrometheusDecoder,
    RemoteWriteDecoder,
};
use smartcloudops_core::detector::{EnsembleDetector, Preset};
use smartcloudops_core::schema::{MetricsBatchBuilder, ScoreColumns};

/// A fuzz target: arbitrary bytes in, panics on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by name (the name is the seed folder under `fuzz/seeds/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("decode_json", decode_json),
    ("decode_csv", decode_csv),
    ("decode_influx", decode_influx),
    ("decode_prometheus", decode_prometheus),
    ("decode_remote_write", decode_remote_write),
    ("config", config),
    ("detector", detector),
    ("audit_verify", audit_verify),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// JSON-lines decoder: accounts for every non-blank line exactly once (a decoded row or a
/// reject with a reason).
pub fn decode_json(data: &[u8]) {
    let mut out = MetricsBatchBuilder::default();
    let mut rejects = Vec::new();
    JsonDecoder::default().decode(data, &mut out, &mut rejects);
    let non_blank = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    assert_eq!(out.len() + rejects.len(), non_blank);
    assert!(rejects.iter().all(|r| !r.reason.is_empty()));
    let batch = out.finish();
    assert_eq!(batch.num_rows() + rejects.len(), non_blank);
}

/// CSV decoder: whatever the header and rows.
pub fn decode_csv(data: &[u8]) {
    let mut decoder = CsvDecoder::new(CsvOptions {
        metric: Some("fuzz".into()),
        ..CsvOptions::default()
    });
    let mut out = MetricsBatchBuilder::default();
    let mut rejects = Vec::new();
    // Twice: the second payload runs with whatever header the first one left.
    decoder.decode(data, &mut out, &mut rejects);
    decoder.decode(data, &mut out, &mut rejects);
    assert!(rejects.iter().all(|r| !r.reason.is_empty()));
    let _ = out.finish();
}

/// Influx line protocol: every record is a row or a reject with a reason.
pub fn decode_influx(data: &[u8]) {
    let mut out = MetricsBatchBuilder::default();
    let mut rejects = Vec::new();
    InfluxDecoder::default().decode(data, &mut out, &mut rejects);
    assert!(rejects.iter().all(|r| !r.reason.is_empty()));
    let _ = out.finish();
}

/// Prometheus text exposition: every record is a row or a reject with a reason.
pub fn decode_prometheus(data: &[u8]) {
    let mut out = MetricsBatchBuilder::default();
    let mut rejects = Vec::new();
    PrometheusDecoder::default().decode(data, &mut out, &mut rejects);
    assert!(rejects.iter().all(|r| !r.reason.is_empty()));
    let _ = out.finish();
}

/// Remote-write bodies, snappy-wrapped or not: a batch or an error, never a panic.
pub fn decode_remote_write(data: &[u8]) {
    let mut out = MetricsBatchBuilder::default();
    let _ = RemoteWriteDecoder::default().decode(data, &mut out);
    // The same bytes as the protobuf inside a valid snappy block.
    let body = snap::raw::Encoder::new()
        .compress_vec(data)
        .expect("snappy compresses any input under 4 GiB");
    let _ = RemoteWriteDecoder::default().decode(&body, &mut out);
    let _ = out.finish();
}

/// TOML config parsing and validation: an error always says what is wrong.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "SET").then(|| "value".to_owned());
    match PipelineConfig::parse(text, Path::new("/nonexistent"), env) {
        Ok(config) => {
            let _ = config.summary();
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            assert!(errors.0.iter().all(|e| !e.message.is_empty()));
        }
    }
}

/// Detectors on arbitrary input: the first byte picks the preset and whether a snapshot is
/// restored from the next bytes (a corrupt snapshot must be refused or yield a state that
/// scores); the rest is (timestamp, value, series) records. Every score is in [0, 1], and a
/// snapshot taken afterwards restores.
pub fn detector(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let preset = if mode & 1 == 0 {
        Preset::Fast
    } else {
        Preset::Precise
    };
    let mut detector = EnsembleDetector::new(preset.name(), preset.config(), 4);
    let rows = if mode & 2 != 0 {
        let split = rest.len().min(usize::from(mode >> 2) * 16);
        let _ = detector.restore(&rest[..split]);
        &rest[split..]
    } else {
        rest
    };
    let mut batch = MetricsBatchBuilder::default();
    for chunk in rows.chunks_exact(17) {
        let ts = i64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
        let value = f64::from_le_bytes(chunk[8..16].try_into().expect("8 bytes"));
        let host = ["a", "b", "c", "d", "e"][usize::from(chunk[16] % 5)];
        batch.push(ts, "cpu", &[("host", host)], value);
    }
    let scored = detector
        .score(&batch.finish())
        .expect("a canonical batch scores");
    let scores = ScoreColumns::try_new(&scored, "fuzz").expect("score columns");
    assert!(
        scores
            .score
            .values()
            .iter()
            .all(|s| (0.0..=1.0).contains(s))
    );
    let snapshot = detector.snapshot().expect("a snapshot encodes");
    let mut again = EnsembleDetector::new(preset.name(), preset.config(), 4);
    again.restore(&snapshot).expect("its own snapshot restores");
}

/// `audit verify` on an arbitrary file: it reports breaks, never panics, and a file it calls
/// intact has a gap-free run of sequence numbers.
pub fn audit_verify(data: &[u8]) {
    use smartcloudops_core::decision::audit;
    // One scratch file per process (AFL runs one input at a time per process).
    thread_local! {
        static FILE: PathBuf = std::env::temp_dir()
            .join(format!("smartcloudops-fuzz-audit-{}", std::process::id()));
    }
    FILE.with(|path| {
        std::fs::write(path, data).expect("the scratch file is writable");
        let verification =
            audit::verify(std::slice::from_ref(path)).expect("the scratch file is readable");
        if verification.is_intact() {
            if let (Some(first), Some(last)) = (verification.first_seq, verification.last_seq) {
                assert_eq!(last - first + 1, verification.records);
            }
        } else {
            assert!(verification.breaks.iter().all(|b| !b.problem.is_empty()));
        }
    });
}
