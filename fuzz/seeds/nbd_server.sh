#!/usr/bin/env bash
# Seeds of the nbd_server fuzz target: what qemu-img (info, map, convert), qemu-io, qemu-nbd
# --list and cairn's own client send cairn's NBD server, recorded by a proxy
# (crates/cairn-nbd/tests/server.rs), which also checks that each replays to the same answer.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CAIRN_FUZZ_SEEDS=$PWD/fuzz/corpus
cargo test -q -p cairn-nbd --test server recorded_client_sessions_replay_identically
ls -l fuzz/corpus/nbd_server
