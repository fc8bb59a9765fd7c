#!/usr/bin/env bash
# Runs splitvmm's fuzz targets one after the other, each for a given time, on stable Rust
# (cargo-fuzz with `-s none`: libFuzzer's coverage guidance, no sanitizer).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 60); TARGETs default to all of them (`cargo fuzz list`).
# The long run documented in docs/security.md is `fuzz/run.sh 600`.
#
# Each target starts from its checked-in seeds (fuzz/corpus/TARGET, never written to) plus
# what earlier runs found (target/fuzz-corpus/TARGET, kept between runs). A finding is
# saved under fuzz/artifacts/TARGET/; replay it with
#   cargo run -p fuzz --bin TARGET -- fuzz/artifacts/TARGET/crash-...
# then fix it and add a regression test in the crate that owns the code.
# Extra libFuzzer options can be passed in FUZZ_ARGS (e.g. FUZZ_ARGS=-jobs=2).
# Exit status: 0 if no target found anything, 1 otherwise.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-60}
shift || true
case $secs in
    '' | *[!0-9]*)
        echo "usage: $0 [SECONDS] [TARGET...]" >&2
        exit 2
        ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# Build every target first, so build time does not eat into the first run.
cargo fuzz build -s none

status=0
summary=()
for t in "${targets[@]}"; do
    work=target/fuzz-corpus/$t
    mkdir -p "$work"
    dict=()
    if [ -f "fuzz/$t.dict" ]; then
        dict=("-dict=fuzz/$t.dict")
    fi
    log=target/fuzz-corpus/$t.log
    echo "=== $t: ${secs}s" >&2
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of options
    cargo fuzz run -s none "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        "${dict[@]}" ${FUZZ_ARGS:-} 2>&1 | tee "$log" |
        grep -E '^#[0-9]+[[:space:]]+(pulse|DONE)|^Done|panicked|ERROR|SUMMARY' >&2 || true
    # qcow2_open's scratch directory is removed at exit, but not when a finding aborts it.
    for d in /dev/shm/splitvmm-fuzz-qcow2-* "${TMPDIR:-/tmp}"/splitvmm-fuzz-qcow2-*; do
        if [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null; then
            rm -rf "$d"
        fi
    done
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    if grep -qE '^==[0-9]+== ERROR|^SUMMARY|panicked|Test unit written' "$log"; then
        summary+=("$t: FINDING (see $log and fuzz/artifacts/$t/)")
        status=1
    elif [ -z "$runs" ]; then
        summary+=("$t: did not run (see $log)")
        status=1
    else
        summary+=("$t: $runs runs in ${secs}s, $rate exec/s, no finding")
    fi
done

echo >&2
printf '%s\n' "${summary[@]}" >&2
exit $status
