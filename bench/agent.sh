#!/usr/bin/env bash
# A disk only the guest sees, through cairn-agent (docs/ARCHITECTURE.md "Disks only the guest
# sees"): the test guest (TCG) with a LUN its nbd-client attaches through QEMU's user network to a
# qemu-nbd on this machine's loopback, wrapped and mounted by the agent. Measures, in one run:
# the frozen window with the LUN snapshotted inside it (issue 16's limit: under 1 s), a full
# backup (the agent's hash pass, then every block with data through the virtio-serial channel),
# and an incremental after the guest wrote 16 MiB to the LUN. No peer backs up such a disk from
# the host, so the reference is the VM's own disk in the same backups.
#
#   bench/agent.sh                            (a 1 GiB LUN, about 730 MiB of it from /usr/share)
#   BENCH_LUN_SRC=/usr/lib/x86_64-linux-gnu BENCH_LUN_GIB=2 bench/agent.sh
#
# Prints a Markdown table, saved under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p cairn-cli 2>&1 | tail -n 1
scripts/guest.sh agent
cairn=$top/target/release/cairn
src=${BENCH_LUN_SRC:-/usr/share}
gib=${BENCH_LUN_GIB:-1}
work=${BENCH_WORK:-$top/bench/work}/agent
vm=cairn-bench-agent
mkdir -p "$work" "$top/bench/results"

"$top/bench/ext4-qcow2.sh" "$work/lun.base.qcow2" "$src" "$gib" glun
# A fresh copy each run: the guest writes to it.
cp --sparse=always "$work/lun.base.qcow2" "$work/lun.qcow2"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
qemu-nbd -f qcow2 -x lun -b 127.0.0.1 -p "$port" --persistent --fork --pid-file "$work/nbd.pid" "$work/lun.qcow2"
cleanup() {
  scripts/guest.sh remove "$vm" >/dev/null 2>&1 || true
  kill "$(cat "$work/nbd.pid")" 2>/dev/null || true
}
trap cleanup EXIT
scripts/guest.sh remove "$vm" >/dev/null 2>&1 || true
scripts/guest.sh define "$vm" --cairn-agent --lun "$port" --wait
repo=$work/repo; rm -rf "$repo"; "$cairn" init --repo "$repo" >/dev/null

backup() {
  local t0 t1; t0=$(date +%s.%N)
  "$cairn" backup vm "$vm" --repo "$repo" --json > "$work/$1.json"
  t1=$(date +%s.%N)
  python3 - "$work/$1.json" "$t0" "$t1" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
took = float(sys.argv[3]) - float(sys.argv[2])
rec = r["record"]
img = {d["name"]: d["stats"] for d in r["disks"]}
lun, vda = img["guest-lun0"], img["vda"]
ev = {e["event"]: e["t_ms"] for e in rec["events"]}
mib = lambda b: b / 2**20
copy_s = (ev["data copied"] - ev["thawed"]) / 1000
print(f"| {sys.argv[4]} | {rec['frozen_window_ms']} ms | {mib(lun['read_bytes']):.1f} MiB "
      f"| {mib(lun['unchanged_bytes']):.0f} MiB | {mib(vda['read_bytes']):.1f} MiB | {copy_s:.1f} s "
      f"| {mib(lun['read_bytes'] + vda['read_bytes']) / copy_s:.1f} MiB/s | {took:.1f} s |")
PY
}

out=$top/bench/results/agent-$(date +%Y%m%d-%H%M%S).md
{
  echo "## cairn-agent: a ${gib} GiB LUN only the guest sees ($(nproc) cores, TCG guest, $(date -u +%F))"
  echo
  echo "| backup | frozen window | LUN read through the agent | LUN kept | VM disk read | thaw → data copied | rate | whole run |"
  echo "|---|---|---|---|---|---|---|---|"
  backup full
  scripts/guest.sh exec "$vm" 'dd if=/dev/urandom of=/lun/bench-new bs=1M count=16 conv=fsync 2>/dev/null' >/dev/null
  backup incremental
} | tee "$out"
echo "saved to $out"
