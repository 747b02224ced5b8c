#!/usr/bin/env bash
# The director at fleet scale (issue 15): a synthetic catalog of 1,000 VMs on 10 hosts with
# 30,000 restore points, under the real `cairn server` (release build): the dashboard's and the
# VM list's time, the API's latency at 100 requests/s (open loop), the server's peak memory.
# One JSON line (cairn-director-load --help for the knobs). A benchmark, not a test.
#
#   bench/director.sh [--vms N --hosts N --points N --rate R --seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p cairn-cli -p cairn-bench 2>&1 | tail -n 1 >&2
dir=$(mktemp -d /var/tmp/cairn-director-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
target/release/cairn-director-load --cairn target/release/cairn --dir "$dir" "$@"
