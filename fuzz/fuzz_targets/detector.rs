//! Detectors on arbitrary input: the first byte picks the preset and whether a snapshot is
//! restored from the next bytes (corrupt snapshots must be refused or yield a state that
//! scores without panicking); the rest is (timestamp, value) pairs. Every score must be in
//! [0, 1], and a snapshot taken afterwards must restore.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartcloudops_core::Detector;
use smartcloudops_core::detector::{EnsembleDetector, Preset};
use smartcloudops_core::schema::{MetricsBatchBuilder, ScoreColumns};

fuzz_target!(|data: &[u8]| {
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
        // Some bytes as a snapshot, the rest as rows.
        let split = rest.len().min(usize::from(mode >> 2) * 16);
        let _ = detector.restore(&rest[..split]);
        &rest[split..]
    } else {
        rest
    };
    let mut batch = MetricsBatchBuilder::default();
    for chunk in rows.chunks_exact(17) {
        let ts = i64::from_le_bytes(chunk[..8].try_into().unwrap());
        let value = f64::from_le_bytes(chunk[8..16].try_into().unwrap());
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
});
