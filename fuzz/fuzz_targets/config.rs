//! Config parsing: never panics; an error always says what is wrong.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smartcloudops_core::config::PipelineConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
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
});
