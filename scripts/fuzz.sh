#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer, on stable Rust: no sanitizer, so no
# nightly flag is needed; coverage comes from the stable `-Cpasses=sancov-module`) and runs each
# for a fixed number of executions from its committed seeds (fuzz/seeds/<target>/), with the
# dictionary of fuzz/dicts/<target>.dict where there is one, after replaying each of its
# regression inputs (fuzz/regressions/<target>/). Overflow checks and debug assertions are on.
#
#   bash scripts/fuzz.sh              the long run for the record: 1,000,000 executions a target
#   bash scripts/fuzz.sh --ci         CI: installs cargo-fuzz if missing, 5,000 executions a target
#   bash scripts/fuzz.sh --runs N     N executions a target
#   bash scripts/fuzz.sh --target T   only target T (repeatable)
#   bash scripts/fuzz.sh --keep-going past a crash (libFuzzer's fork mode): every failing input
#                                     is saved and counted, and the run still fails
#
# Targets run one at a time, single-threaded. Each prints its executions, rate and outcome, and
# the summary lists them all; a crash (a panic, an assertion, a timeout, running out of memory)
# or an allocation over a stated bound fails the script. The inputs that failed are saved under
# fuzz/artifacts/<target>/<time>/ (replay one: `fuzz/target/<triple>/release/<target> FILE`);
# libFuzzer's growing corpus stays in fuzz/corpus/<target>/ (not committed) and each full log
# in fuzz/target/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

# The cargo-fuzz release this script is written against.
CARGO_FUZZ_VERSION=0.13.1
ALL_TARGETS=(chat_request data_url image_preprocess tokenizer detokenizer_stop)

runs=1000000
ci=false
keep_going=false
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ci) ci=true; runs=5000 ;;
        --runs) runs="$2"; shift ;;
        --target) targets+=("$2"); shift ;;
        --keep-going) keep_going=true ;;
        -h|--help) sed -n '2,20p' "$0" | cut -c3-; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

installed=$(cargo fuzz --version 2>/dev/null || true)
if [ "$installed" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    if $ci; then
        cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
    else
        echo "cargo-fuzz $CARGO_FUZZ_VERSION is needed (found: ${installed:-none}):" >&2
        echo "  cargo install cargo-fuzz --version $CARGO_FUZZ_VERSION --locked" >&2
        exit 1
    fi
fi

# Largest input libFuzzer makes, per target: room for a chat body with a small image, an image
# file, and data URLs well past their 1 KiB cap.
max_len() {
    case "$1" in
        chat_request) echo 16384 ;;
        data_url) echo 65536 ;;
        image_preprocess) echo 32768 ;;
        *) echo 4096 ;;
    esac
}

# The fuzz workspace's lock file is committed: refuse to build with anything else. A new
# dependency of a main crate needs it updated (`cargo metadata --manifest-path fuzz/Cargo.toml`
# does, keeping every other version).
if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
    echo "fuzz/Cargo.lock is out of date with the crates' dependencies" >&2
    exit 1
fi
build_flags=(--sanitizer none --debug-assertions --codegen-units 16)
echo "building the fuzz targets"
# One target builds alone; otherwise all of them (one build of the shared dependencies).
[ ${#targets[@]} -eq 1 ] && build_flags+=("${targets[0]}")
cargo fuzz build "${build_flags[@]}"
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="fuzz/target/$triple/release"
mkdir -p fuzz/target/logs

failed=0
summary=()
for target in "${targets[@]}"; do
    [ -x "$bin_dir/$target" ] || { echo "$target: no binary at $bin_dir/$target" >&2; exit 1; }
    # A folder per run, so that what it holds is what this run found.
    artifacts="fuzz/artifacts/$target/$(date -u +%Y%m%dT%H%M%S)"
    mkdir -p "fuzz/corpus/$target" "$artifacts"
    # Every regression input first, each on its own: a failing one is copied among this run's
    # failing inputs, and the fuzzing still runs.
    for input in "fuzz/regressions/$target"/*; do
        [ -f "$input" ] || continue
        if ! timeout 120 "$bin_dir/$target" "$input" >"$artifacts/replay.log" 2>&1; then
            echo "regression input fails: $input"
            cp "$input" "$artifacts/crash-regression-$(basename "$input")"
        fi
    done
    rm -f "$artifacts/replay.log"
    inputs=("fuzz/corpus/$target" "fuzz/seeds/$target")
    options=(-runs="$runs" -max_len="$(max_len "$target")" -timeout=20 -rss_limit_mb=4096
        -print_final_stats=1 -artifact_prefix="$artifacts/")
    [ -f "fuzz/dicts/$target.dict" ] && options+=(-dict="fuzz/dicts/$target.dict")
    $keep_going && options+=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
    log="fuzz/target/logs/$target.log"
    echo "== $target: $runs executions (log: $log)"
    start=$(date +%s%N)
    set +e
    "$bin_dir/$target" "${inputs[@]}" "${options[@]}" >"$log" 2>&1
    status=$?
    set -e
    millis=$(( ($(date +%s%N) - start) / 1000000 ))
    if $keep_going; then
        # Fork mode counts all jobs in "#N: cov: ..."; its stat lines are the last job's.
        execs=$(sed -n 's/^#\([0-9]*\): cov.*/\1/p' "$log" | tail -n 1)
    else
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    fi
    seconds=$(awk "BEGIN { printf \"%.1f\", $millis / 1000 }")
    rate=$(awk "BEGIN { printf \"%.0f\", ${execs:-0} * 1000 / ($millis + 1) }")
    # Each new failing input, replayed: the bound assertions of the targets say "held N bytes
    # at once" or "bytes at the peak".
    crashes=0
    violations=0
    for artifact in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-*; do
        [ -f "$artifact" ] || continue
        crashes=$((crashes + 1))
        if timeout 120 "$bin_dir/$target" "$artifact" 2>&1 |
            grep -q -E "bytes at the peak|held [0-9]+ bytes at once"; then
            violations=$((violations + 1))
        fi
        echo "failing input: $artifact"
    done
    if [ "$status" -eq 0 ] && [ "$crashes" -eq 0 ] && [ "${execs:-0}" -ge "$runs" ]; then
        outcome="ok"
    else
        outcome="FAILED (exit $status)"
        failed=1
        grep -E "panicked at|ERROR: libFuzzer|Test unit written|SUMMARY" "$log" | head -n 8 || true
    fi
    line=$(printf '%-18s %10s executions %8s exec/s %8ss  crashes %d  bound violations %d  %s' \
        "$target" "${execs:-0}" "$rate" "$seconds" "$crashes" "$violations" "$outcome")
    echo "$line"
    summary+=("$line")
done

echo "== summary ($runs executions a target requested)"
printf '%s\n' "${summary[@]}"
exit "$failed"
