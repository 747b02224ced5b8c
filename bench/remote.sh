#!/usr/bin/env bash
# A VM backed up on this machine against the same VM backed up on another host over SSH, in one
# run: what the remote data path (cairn on the host, the backup job's NBD export forwarded over
# one SSH connection, bench/../docs/ARCHITECTURE.md "Several hosts") costs against reading the
# export locally. The "other host" is host a of scripts/hosts.sh (its own namespaces, libvirtd and
# sshd on this machine), so the figure is SSH's encryption and forwarding, not a network link.
#
#   bench/remote.sh                         (a 6 GiB data disk filled from /usr/lib)
#   BENCH_VM_SRC=/usr/share BENCH_VM_GIB=2 bench/remote.sh
#
# The guest is the tiny test guest with the data disk as vda, under TCG; each backup is a full
# read into a new repository, with a cold page cache. Prints a Markdown table, saved under
# bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p cairn-cli 2>&1 | tail -n 1
cairn=$top/target/release/cairn
src=${BENCH_VM_SRC:-/usr/lib}
gib=${BENCH_VM_GIB:-6}
state=${CNS_STATE:-/var/lib/cairn-test/hosts}
work=${BENCH_WORK:-$top/bench/work}/remote
vm=cairn-bench-remote
mkdir -p "$work" "$top/bench/results"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# CPU seconds the whole machine spent (user, nice, system, irq, softirq): cairn, ssh, sshd, QEMU.
busy() { awk '/^cpu /{printf "%.2f", ($2+$3+$4+$7+$8)/100}' /proc/stat; }

bash "$top/scripts/hosts.sh" up a >/dev/null
disk=$state/shared/$vm.qcow2
"$top/bench/ext4-qcow2.sh" "$work/data.qcow2" "$src" "$gib" gdata
cp --sparse=always "$work/data.qcow2" "$disk"
g=$state/guest
uuid=$(cat /proc/sys/kernel/random/uuid)
cat > "$work/vm.xml" <<EOF
<domain type='qemu'><name>$vm</name><uuid>$uuid</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>$g/kernel</kernel><initrd>$g/initramfs.img</initrd>
<cmdline>console=ttyS0 panic=-1 loglevel=4</cmdline></os><cpu mode='maximum' check='none'/><on_reboot>destroy</on_reboot>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$disk'/><target dev='vda' bus='virtio'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel><memballoon model='none'/></devices></domain>
EOF
ssh_uri="qemu+ssh://root@10.77.0.1/system?keyfile=$state/ssh/id_ed25519&known_hosts=$state/ssh/known_hosts&no_verify=1"
export CAIRN_REMOTE_CAIRN=$cairn CAIRN_REMOTE_WORK_DIR=/var/lib/libvirt/cairn-work

# One full backup of the VM running on `uri` (defined and started there, removed after).
run() { # label define-uri backup-uri
  local label=$1 def=$2 uri=$3
  virsh -q -c "$def" destroy "$vm" >/dev/null 2>&1 || true
  virsh -q -c "$def" undefine "$vm" --checkpoints-metadata >/dev/null 2>&1 || true
  virsh -q -c "$def" define "$work/vm.xml" >/dev/null
  virsh -q -c "$def" start "$vm" >/dev/null
  for _ in $(seq 1 300); do
    virsh -q -c "$def" qemu-agent-command "$vm" '{"execute":"guest-ping"}' >/dev/null 2>&1 && break; sleep 0.2
  done
  rm -rf "$work/repo-$label"
  "$cairn" init --repo "$work/repo-$label" >/dev/null
  cold
  local t0 t1 c0 c1
  c0=$(busy)
  t0=$(now)
  /usr/bin/time -f "%e %U %S %M" -o "$work/time-$label" \
    "$cairn" backup vm "$vm" --host "$uri" --repo "$work/repo-$label" --work-dir "$work/cairn-work" -q --json > "$work/$label.json"
  t1=$(now)
  c1=$(busy)
  read -r _ user sys rss < "$work/time-$label"
  local read_bytes
  read_bytes=$(python3 -c "import json;print(json.load(open('$work/$label.json'))[0]['record']['vm_read_bytes'])")
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$(secs "$t0" "$t1")" \
    "$(python3 -c "print(f'{$read_bytes/1048576:.0f}')")" \
    "$(python3 -c "print(f'{$read_bytes/1048576/($t1-$t0):.0f}')")" "$(python3 -c "print(f'{$user+$sys:.1f}')")" \
    "$(secs "$c0" "$c1")" "$((rss / 1024))"
  virsh -q -c "$def" destroy "$vm" >/dev/null 2>&1 || true
  virsh -q -c "$def" undefine "$vm" --checkpoints-metadata >/dev/null 2>&1 || true
}

out=$top/bench/results/remote-$(date +%Y-%m-%dT%H%M).md
{
  echo "# Remote (SSH) against local VM backup, $(date -u +%Y-%m-%d), cairn $(git -C "$top" rev-parse --short HEAD)"
  echo
  echo "Data disk: ${gib} GiB ext4 from $src. Command: bench/remote.sh"
  echo
  echo "| where | time (s) | read (MiB) | MiB/s | cairn CPU (s) | machine CPU (s) | cairn max RSS (MiB) |"
  echo "|---|---|---|---|---|---|---|"
  run local qemu:///system qemu:///system
  run ssh qemu+tcp://10.77.0.1/system "$ssh_uri"
  run local-again qemu:///system qemu:///system
  run ssh-again qemu+tcp://10.77.0.1/system "$ssh_uri"
} | tee "$out"
rm -rf "$disk" "$work"/repo-*
echo "saved $out"
