#!/usr/bin/env bash
# Coverage-guided fuzzing of blkmirror's decoders (cargo-fuzz, libFuzzer).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Seeds each target's corpus (fuzz/corpus/TARGET) with the valid inputs of
# blkmirror::fuzz::seeds, then runs each target (default: all) for SECONDS
# (default 60) with debug assertions (overflow checks) on. A crash leaves its
# input in fuzz/artifacts/TARGET/; run it again with
#   cargo +nightly fuzz run -a TARGET fuzz/artifacts/TARGET/crash-...
# or on stable with
#   BLKMIRROR_FUZZ_REPLAY=TARGET:FILE cargo test --release --lib fuzz::tests::replay -- --nocapture
# Needs: rustup's nightly toolchain and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame nbd bitmap digest_map points volume_meta primary_state)
fi
BLKMIRROR_FUZZ_CORPUS="$PWD/fuzz/corpus" \
    cargo test --release --lib fuzz::tests::write_corpus -- --exact --quiet
cd fuzz
failed=()
for t in "${targets[@]}"; do
    echo "== fuzz target $t, ${secs} s"
    if ! cargo +nightly fuzz run -a "$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -timeout=30 -max_len=70000; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets that failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "every fuzz target ran ${secs} s without a failure"
