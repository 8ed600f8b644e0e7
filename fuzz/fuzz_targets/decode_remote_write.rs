//! Remote-write decoder: never panics on any body, snappy-wrapped or not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartcloudops_core::decode::RemoteWriteDecoder;
use smartcloudops_core::schema::MetricsBatchBuilder;

fuzz_target!(|data: &[u8]| {
    let mut out = MetricsBatchBuilder::default();
    let _ = RemoteWriteDecoder::default().decode(data, &mut out);
    // The same bytes as the protobuf inside a valid snappy block.
    let body = snap::raw::Encoder::new().compress_vec(data).unwrap();
    let _ = RemoteWriteDecoder::default().decode(&body, &mut out);
    let _ = out.finish();
});
