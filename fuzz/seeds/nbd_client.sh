#!/usr/bin/env bash
# Seeds of the nbd_client fuzz target: real sessions of cairn's NBD client with qemu-nbd and
# with cairn's own server, recorded by a proxy (crates/cairn-nbd/tests/common) and replayed by
# the same tests, which fail if a recording does not replay to the same results.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CAIRN_FUZZ_SEEDS=$PWD/fuzz/corpus
cargo test -q -p cairn-nbd --test qemu_nbd recorded_qemu_nbd_sessions_replay_identically
cargo test -q -p cairn-nbd --test server recorded_client_sessions_replay_identically
ls -l fuzz/corpus/nbd_client
