//! The coverage-guided campaign on the stable toolchain: AFL++ through afl.rs.
//!
//! ```sh
//! cargo afl build --release -p smartcloudops-fuzz --features afl --bin afl --target-dir target/afl
//! FUZZ_TARGET=decode_json cargo afl fuzz -i fuzz/seeds/decode_json -o target/afl-out/decode_json \
//!     -V 600 target/afl/release/afl
//! ```
//!
//! `scripts/fuzz-campaign.sh` runs every target this way and minimises the corpus.

fn main() {
    let name = std::env::var("FUZZ_TARGET").unwrap_or_default();
    let Some(target) = smartcloudops_fuzz::target(&name) else {
        let names: Vec<&str> = smartcloudops_fuzz::TARGETS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        eprintln!("set FUZZ_TARGET to one of {}", names.join(", "));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
