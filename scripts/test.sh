#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) and runs every test: unit tests and the
# integration tests against real files, qemu-img, qemu-io, qemu-nbd, libvirt and QEMU test guests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
cargo test --workspace --locked -- --test-threads=2
