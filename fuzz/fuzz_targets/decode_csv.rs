//! CSV decoder: never panics, whatever the header and rows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartcloudops_core::decode::{CsvDecoder, CsvOptions, Decoder};
use smartcloudops_core::schema::MetricsBatchBuilder;

fuzz_target!(|data: &[u8]| {
    let mut decoder = CsvDecoder::new(CsvOptions { metric: Some("fuzz".into()), ..CsvOptions::default() });
    let mut out = MetricsBatchBuilder::default();
    let mut rejects = Vec::new();
    // Twice: the second payload runs with whatever header the first one left.
    decoder.decode(data, &mut out, &mut rejects);
    decoder.decode(data, &mut out, &mut rejects);
    assert!(rejects.iter().all(|r| !r.reason.is_empty()));
    let _ = out.finish();
});
