#!/usr/bin/env bash
# The fuzz campaign on the stable toolchain: AFL++ (afl.rs) on every target, then a minimised
# corpus into fuzz/corpus/ for CI to replay.
#
#   scripts/fuzz-campaign.sh [SECONDS_PER_TARGET] [TARGET…]
#
# Needs `cargo install cargo-afl` (it builds AFL++ from source on first use: a C compiler and
# make). Findings (crashes, hangs) are copied to target/afl-out/<target>/ and listed at the end;
# the script exits non-zero when there are any. Counts go in docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-300}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(decode_json decode_csv decode_influx decode_prometheus decode_remote_write config detector audit_verify)
fi

# Own target dir: the instrumentation flags cargo-afl sets must not invalidate the main build.
cargo afl build --release -p smartcloudops-fuzz --features afl --bin afl --target-dir target/afl

# No root here: tolerate the kernel's core_pattern and CPU governor instead of changing them.
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1 AFL_QUIET=1

findings=0
printf '%-22s %12s %10s %8s %6s %6s\n' target execs execs/s corpus crashes hangs
for t in "${targets[@]}"; do
  out=target/afl-out/$t
  rm -rf "$out"
  mkdir -p "$out"
  # -V: run for a fixed time; -c -: no CMPLOG binary (one instance per target).
  FUZZ_TARGET=$t cargo afl fuzz -c - -V "$seconds" -i "fuzz/seeds/$t" -o "$out" \
    target/afl/release/afl >"$out/log" 2>&1 || { cat "$out/log"; exit 1; }
  stats=$out/default/fuzzer_stats
  execs=$(awk -F' *: *' '$1 == "execs_done" { print $2 }' "$stats")
  rate=$(awk -F' *: *' '$1 == "execs_per_sec" { print $2 }' "$stats")
  crashes=$(find "$out/default/crashes" -type f -name 'id:*' | wc -l)
  hangs=$(find "$out/default/hangs" -type f -name 'id:*' | wc -l)
  # Minimise the queue into the committed corpus (only inputs that add coverage).
  rm -rf "fuzz/corpus/$t"
  FUZZ_TARGET=$t cargo afl cmin -i "$out/default/queue" -o "fuzz/corpus/$t" -- \
    target/afl/release/afl >"$out/cmin.log" 2>&1 || cp -r "$out/default/queue" "fuzz/corpus/$t"
  find "fuzz/corpus/$t" -name '.*' -delete
  # Keep the committed replay short: the 300 smallest inputs up to 8 KiB.
  find "fuzz/corpus/$t" -type f -size +8k -delete
  find "fuzz/corpus/$t" -type f -printf '%s %p\n' | sort -n | tail -n +301 | cut -d' ' -f2- | xargs -r rm -f
  # Stable names (AFL's carry timings that change every run).
  (cd "fuzz/corpus/$t" && for f in *; do mv -n "$f" "$(sha1sum "$f" | cut -c1-16)"; done)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  printf '%-22s %12s %10s %8s %6s %6s\n' "$t" "$execs" "$rate" "$corpus" "$crashes" "$hangs"
  findings=$((findings + crashes + hangs))
done
if [ "$findings" -gt 0 ]; then
  echo "findings: see target/afl-out/*/default/{crashes,hangs}"
  exit 1
fi
