//! JSON-lines decoder: never panics, and accounts for every non-blank line exactly once
//! (a decoded row or a reject with a reason).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartcloudops_core::decode::{Decoder, JsonDecoder};
use smartcloudops_core::schema::MetricsBatchBuilder;

fuzz_target!(|data: &[u8]| {
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
});
