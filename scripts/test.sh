#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) and runs every test: unit tests and the
# integration tests against real files, qemu-img, qemu-io, qemu-nbd, libvirt and QEMU test guests;
# then the short forms of the torture harnesses and of the fuzz targets (docs/RELIABILITY.md
# gives the full runs, their commands and their figures).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# One build per run: incremental compilation would only add gigabytes to the target folder.
export CARGO_INCREMENTAL=0
t0=$SECONDS
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
# Tests that need an object storage server fail (not skip) when it is missing.
export CAIRN_TEST_REQUIRE_SERVERS=1
cargo test --workspace --locked -- --test-threads=2
# Again with every index's entries on local disk (a large repository's index, FORMAT.md
# "Known limits"): the repository, prune, verify and repair tests and the CLI's data paths.
# --workspace, not -p: the same features as above, so nothing is compiled again.
CAIRN_INDEX_MEMORY_ENTRIES=64 CAIRN_CACHE_DIR="$(mktemp -d)" cargo test --locked --workspace \
  --test retention --test damage --test roundtrip --test incremental \
  --test verify_repair --test prune --test marks_race -- --test-threads=2
echo "tests: $((SECONDS - t0)) s"; t0=$SECONDS
# A fault at every storage call of one small backup and of a copy between repositories (its
# target's calls, then its source's); kill -9 at every crash point of a backup, a repair and a
# VM backup (each followed by the invariant checks). Exit 1 on any violation.
target/debug/cairn-torture faults --ops backup,copy,copy-source
# Real cairn runs on s3s-fs through a proxy failing one request in 5 (3 seeds, about 40 s);
# stalls outlast cairn's request timeout, so its timeout and retry run too.
target/debug/cairn-torture network --stall-ms 3000 --client-timeout-ms 1500
target/debug/cairn-torture kills --ops backup,repair,backup-vm,prune,forget --random 2 --per-point 1
echo "torture: $((SECONDS - t0)) s"; t0=$SECONDS
# Every fuzz target: its seed corpus, then 15 s of new inputs (keeps the suite under 30 min;
# docs/RELIABILITY.md gives the long runs).
scripts/fuzz.sh --seconds 10
echo "fuzz: $((SECONDS - t0)) s"
