#!/usr/bin/env bash
# Coverage-guided fuzzing of the runtime's parsers, bounded so CI can call it:
#   fuzz/run.sh [SECONDS_PER_TARGET]     (default 60; FUZZ_TARGETS="a b" picks targets)
# Builds the targets once (cargo-fuzz, libFuzzer), then runs each for the given time, starting from
# the kept corpus in fuzz/corpus/<target>/ (read, never written) plus what earlier runs found in
# fuzz/work/<target>/ (ignored by git). A crash stops that target, leaves its input in
# fuzz/artifacts/<target>/ and makes the script exit 1 after the others ran; a summary line per
# target gives its executions. Needs `cargo install cargo-fuzz`, and a nightly toolchain (or, on
# stable, RUSTC_BOOTSTRAP=1 is used). The sanitizer is off: the crates deny unsafe code, so
# AddressSanitizer would find little and slow every run; panics and failed assertions are the finds.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
targets=${FUZZ_TARGETS:-sse_decoder chunk_decoder request_body sandbox_resolve}
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    cargo=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo fuzz)
fi

"${cargo[@]}" build --sanitizer none
failed=()
for target in $targets; do
    mkdir -p "work/$target"
    log="work/$target.log"
    if "${cargo[@]}" run --sanitizer none "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        result="no crash"
    else
        result="CRASH (see $log and artifacts/$target/)"
        failed+=("$target")
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    units=$(ls "work/$target" | wc -l)
    echo "$target: $runs executions in ${seconds} s, $units inputs in work/$target, $result"
done
if ((${#failed[@]})); then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
