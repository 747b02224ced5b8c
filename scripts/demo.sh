#!/usr/bin/env bash
# The main job, end to end on embedded defaults: build cairn and the tiny test guest, define and
# start it in the local libvirt (TCG), back it up app-consistently into a local repository, let the
# guest write, back it up again (incremental: only what the guest wrote is read), restore the
# newest point's data disk and check the guest's new file is in it, then print the restore points
# with their method, frozen window, bytes read and time.
#
#   scripts/demo.sh            (work folder: $CAIRN_DEMO_DIR or /var/tmp/cairn-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p cairn-cli 2>&1 | tail -n 1
cairn=$top/target/release/cairn
work=${CAIRN_DEMO_DIR:-/var/tmp/cairn-demo}
vm=cairn-demo
rm -rf "$work"; mkdir -p "$work"; cd "$work"
export CAIRN_REPO=$work/repo

step() { printf '\n== %s\n' "$*"; }

step "test guest: define and start $vm (libvirt, TCG; two disks, guest agent, swap in use)"
"$top/scripts/guest.sh" remove "$vm"
"$top/scripts/guest.sh" define "$vm" --two-disks --wait

step "cairn vm list"
"$cairn" vm list

step "cairn init"
"$cairn" init

step "backup 1: app-consistent, full"
"$cairn" backup vm "$vm" -q

step "the guest writes 8 MiB to /data/new.bin while its logger keeps appending"
"$top/scripts/guest.sh" exec "$vm" 'dd if=/dev/urandom of=/data/new.bin bs=1M count=8 conv=fsync 2>/dev/null; sha256sum /data/new.bin' | tee new.sha
sleep 2

step "backup 2: app-consistent, incremental (reads only the dirty extents)"
"$cairn" backup vm "$vm" -q --json > backup2.json
python3 - backup2.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]["record"]
written = 8 << 20
print(f"method {r['method']}, chain {r['chain']}, frozen window {r['frozen_window_ms']} ms")
print(f"read from the VM: {r['vm_read_bytes']} bytes for {written} bytes written by the guest "
      f"({r['vm_read_bytes'] / written:.2f}x)")
assert r["chain"] == "incremental" and r["vm_read_bytes"] <= 1.5 * written, "incremental read too much"
PY

step "restore the data disk (vda) of the newest point and find the guest's new file in it"
"$cairn" restore image "$vm" --disk vda --to vda.raw
python3 - vda.raw "$(cut -d' ' -f1 new.sha)" <<'PY'
import hashlib, subprocess, sys
# debugfs reads ext4 straight from the image: no mount, no loop device.
data = subprocess.run(["debugfs", "-R", "cat /new.bin", sys.argv[1]], capture_output=True, check=True).stdout
assert hashlib.sha256(data).hexdigest() == sys.argv[2], "new.bin differs"
print(f"new.bin restored: {len(data)} bytes, sha256 matches the guest's")
PY

step "cairn points"
"$cairn" points

step "cairn verify"
"$cairn" verify

"$top/scripts/guest.sh" remove "$vm"
printf '\ndemo complete: work folder %s\n' "$work"
