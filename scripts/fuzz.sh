#!/usr/bin/env bash
# Runs cairn's fuzz targets (fuzz/fuzz_targets, cargo-fuzz + libFuzzer) and prints one JSON
# summary line per target: executions, CPU seconds, corpus size, crashes.
#
#   scripts/fuzz.sh                      every target: its seed corpus, then 30 s of fuzzing
#   scripts/fuzz.sh --seconds 600 lvm_text nbd_client
#   scripts/fuzz.sh --replay             only replay each seed corpus (no new inputs)
#   scripts/fuzz.sh --jobs 2             targets run two at a time (default: 2)
#
# Seeds live in fuzz/corpus/<target> (committed, from real objects); what a run discovers goes
# to fuzz/work/<target> (not committed) and crashing inputs to fuzz/artifacts/<target>.
# Extra libFuzzer flags for a target may be given in fuzz/options/<target>, one per line.
# Exit status: 0 when no target crashed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=30 replay=0 jobs=2 targets=()
while (($#)); do
  case $1 in
    --seconds) seconds=$2; shift 2;;
    --replay) replay=1; shift;;
    --jobs) jobs=$2; shift 2;;
    -h|--help) sed -n '2,14p' "$0"; exit 0;;
    -*) echo "unknown option $1" >&2; exit 2;;
    *) targets+=("$1"); shift;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
# cargo-fuzz's own error carries a backtrace of cargo-fuzz when this is set: noise, not the crash.
export RUST_BACKTRACE=0
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
rustup toolchain list | grep -q '^nightly' || { echo "fuzzing needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 2; }
((${#targets[@]})) || mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
# One build for all targets (address sanitizer, debug assertions and overflow checks on). If it
# fails, its errors are shown (not the last lines of cargo-fuzz's own report) with the machine's
# free disk and memory, and it is tried once more one job at a time (a rustc killed for memory).
build_log=$(mktemp)
build() { (cd fuzz && cargo +nightly fuzz build --release --debug-assertions) >"$build_log" 2>&1; }
if ! build; then
  echo "fuzz: the build failed:" >&2
  grep -E '^error|SIGKILL|signal: |No space left|memory allocation|could not compile' -A4 "$build_log" | head -n 40 >&2 || true
  df -h . >&2; free -m >&2
  echo "fuzz: building again, one job at a time" >&2
  if ! CARGO_BUILD_JOBS=1 build; then
    grep -E '^error|SIGKILL|signal: |No space left|memory allocation|could not compile' -A4 "$build_log" | head -n 40 >&2 || true
    tail -n 15 "$build_log" >&2
    echo "fuzz: the build failed twice" >&2
    exit 1
  fi
fi
tail -n 1 "$build_log"
rm -f "$build_log"

run_one() {
  local t=$1 seeds=fuzz/corpus/$1 work=fuzz/work/$1 art=fuzz/artifacts/$1 log
  mkdir -p "$seeds" "$work" "$art"
  log=$(mktemp)
  local flags=(-rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "-artifact_prefix=$PWD/$art/")
  [[ -f fuzz/options/$t ]] && mapfile -t -O ${#flags[@]} flags < <(grep -v '^#' "fuzz/options/$t")
  local start end status=0
  start=$(date +%s)
  if ((replay)); then
    (cd fuzz && cargo +nightly fuzz run --release --debug-assertions "$t" "../$seeds" -- -runs=0 "${flags[@]}") >"$log" 2>&1 || status=$?
  else
    (cd fuzz && cargo +nightly fuzz run --release --debug-assertions "$t" "../$work" "../$seeds" -- \
      -max_total_time="$seconds" "${flags[@]}") >"$log" 2>&1 || status=$?
  fi
  end=$(date +%s)
  local execs corpus crashes
  execs=$(awk '/stat::number_of_executed_units/{print $NF}' "$log" | tail -n 1)
  corpus=$(find "$work" "$seeds" -type f | wc -l)
  crashes=$(find "$art" -type f | wc -l)
  printf '{"harness":"fuzz","target":"%s","mode":"%s","seconds":%s,"executions":%s,"corpus":%s,"crashes":%s,"status":%s}\n' \
    "$t" "$([[ $replay == 1 ]] && echo replay || echo fuzz)" "$((end - start))" "${execs:-0}" "$corpus" "$crashes" "$status"
  if ((status)); then
    # What failed, first (a CI log may keep only its last lines): libFuzzer's verdict, the
    # panic, the input it wrote; then the end of the log, without cargo-fuzz's own backtrace.
    echo "--- $t failed:" >&2
    grep -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY|Test unit written|Failing input|ALARM|out-of-memory|^Base64' "$log" | head -n 20 >&2 || true
    echo "--- the end of $t's log:" >&2
    grep -vE '^ +[0-9]+: |^ +at ' "$log" | tail -n 25 >&2
    echo "--- $t: $crashes crashing input(s) in $art" >&2
  fi
  rm -f "$log"
  return "$status"
}

failed=0
pids=()
for t in "${targets[@]}"; do
  run_one "$t" & pids+=($!)
  if ((${#pids[@]} >= jobs)); then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done
if ((failed)); then
  echo "fuzz: a target failed; crashing inputs:" >&2
  find fuzz/artifacts -type f >&2
fi
exit $failed
