//! Influx line-protocol decoder: never panics, and every record is a row or a reject.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartcloudops_core::decode::{Decoder, InfluxDecoder};
use smartcloudops_core::schema::MetricsBatchBuilder;

fuzz_target!(|data: &[u8]| {
    let mut decoder = InfluxDecoder::default();
    let mut out = MetricsBatchBuilder::default();
    let mut rejects = Vec::new();
    decoder.decode(data, &mut out, &mut rejects);
    assert!(rejects.iter().all(|r| !r.reason.is_empty()));
    let _ = out.finish();
});
