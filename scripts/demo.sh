#!/usr/bin/env bash
# The main job, end to end on embedded defaults: build cairn and the tiny test guest, define and
# start it in the local libvirt (TCG), back it up app-consistently into a local repository, let the
# guest write, back it up again (incremental: only what the guest wrote is read), print the restore
# points with their method, frozen window, bytes read and time, then recover the newest point as a
# new VM, boot it and show that the guest's data is there.
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

step "cairn points"
"$cairn" points

step "cairn verify"
"$cairn" verify

step "recover the newest point as a new VM ($vm-restored), boot it, read the guest's new file"
"$top/scripts/guest.sh" remove "$vm-restored"
mkdir -p "$work/storage"
"$cairn" restore vm "$vm" --storage "$work/storage" --start
"$top/scripts/guest.sh" wait "$vm-restored"
got=$("$top/scripts/guest.sh" exec "$vm-restored" 'sha256sum /data/new.bin' | cut -d' ' -f1)
[ "$got" = "$(cut -d' ' -f1 new.sha)" ] || { echo "new.bin differs in the recovered VM" >&2; exit 1; }
echo "in the recovered VM: /data/new.bin sha256 $got (the same as in the original)"
virsh -q list | grep -E " $vm(-restored)? " || true

"$top/scripts/guest.sh" remove "$vm-restored"

step "the director: cairn server on its defaults (API and web console on 127.0.0.1:8470), a job made and run through its API"
catalog=$work/director/catalog.db
token=$("$cairn" server token create demo --role admin --catalog "$catalog")
"$cairn" server --catalog "$catalog" > server.out 2> server.err &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
until grep -q "listening on" server.out; do
  kill -0 "$server" 2>/dev/null || { cat server.err >&2; exit 1; }
  sleep 0.2
done
base=$(sed -n 's/^listening on //p' server.out)
api() { curl -fsS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' "$@"; }
field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }
job=$(api -d "{\"name\": \"demo\", \"vms\": {\"names\": [\"$vm\"]}, \"repository\": \"$CAIRN_REPO\",
              \"schedule\": \"daily\", \"retention\": {\"keep_last\": 5}, \"verify_boot\": true}" "$base/api/jobs" | field '["id"]')
task=$(api -X POST "$base/api/jobs/$job/run" | field '["id"]')
state=queued
while [[ $state == queued || $state == running ]]; do
  sleep 1
  state=$(api "$base/api/tasks/$task" | field '["state"]')
done
api "$base/api/tasks/$task/log" | python3 -c 'import json, sys; [print("  " + l["line"]) for l in json.load(sys.stdin)]'
echo "task $task ended $state"
[[ $state == ok ]] || { cat server.err >&2; exit 1; }
api "$base/api/overview" | python3 -c '
import json, sys
o = json.load(sys.stdin)
print("dashboard: %d job(s) ok, %d VM(s), %d point(s) in the catalog, gathered in %.1f ms"
      % (o["jobs"]["ok"], o["vms"]["total"], o["points"]["total"], o["generated_ms"]))'
echo "web console: $base/ (token: $token) while cairn server runs; stopping it now"
kill "$server"; wait "$server" || true
trap - EXIT

"$top/scripts/guest.sh" remove "$vm"
printf '\ndemo complete: work folder %s\n' "$work"
