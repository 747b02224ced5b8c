#!/usr/bin/env bash
# cairn vs virtnbdbackup (Debian's package, the open-source peer) on the same running VM and the
# same guest writes, in one run: a full backup then five incrementals from each tool, the
# repository growth over the five incrementals, and the restore of
# the newest point's data disk (virtnbdrestore replays its chain; a cairn point is a synthetic full).
# Prints a Markdown table and saves it under bench/results/.
#
#   bench/vm-chain.sh                         (6 GiB data disk filled from /usr/lib)
#   BENCH_VM_SRC=/usr/share BENCH_VM_GIB=2 bench/vm-chain.sh
#
# The guest is the project's tiny test guest (scripts/guest.sh) with a bigger data disk, under TCG.
# Each round the guest overwrites 256 scattered 64 KiB blocks of a 256 MiB file and writes a new
# 48 MiB file (64 MiB in all). Both tools freeze the guest through its agent. Restores start with a
# cold page cache and write qcow2.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
scripts/setup.sh --bench
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p cairn-cli 2>&1 | tail -n 1
cairn=$top/target/release/cairn
work=${BENCH_WORK:-$top/bench/work}/vm
src=${BENCH_VM_SRC:-/usr/lib}
gib=${BENCH_VM_GIB:-6}
vm=cairn-bench
mkdir -p "$work" "$top/bench/results"
cd "$work"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
size() { du -sb "$1" | cut -f1; }
mib() { python3 -c "print(f'{$1/1048576:.1f}')"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
gexec() { "$top/scripts/guest.sh" exec "$vm" "$1"; }

if [[ ! -f data.qcow2 || "$(cat data.built 2>/dev/null)" != "$src $gib" ]]; then
  echo "building the ${gib} GiB data disk from $src ..."
  rm -f data.raw data.qcow2
  mke2fs -q -t ext4 -L gdata -E lazy_itable_init=0,lazy_journal_init=0 -d "$src" data.raw "${gib}G"
  qemu-img convert -f raw -O qcow2 data.raw data.qcow2
  rm -f data.raw
  echo "$src $gib" > data.built
fi
# virtnbdbackup refuses to work next to another tool's checkpoints, so each tool gets its own
# run of the same guest from the same disk image with the same writes (offsets from a fixed seed),
# one after the other.
start_vm() {
  "$top/scripts/guest.sh" remove "$vm"
  "$top/scripts/guest.sh" define "$vm"
  cp --sparse=always data.qcow2 "/var/lib/cairn-test/vms/$vm/vda.qcow2"
  virsh -q start "$vm" >/dev/null
  "$top/scripts/guest.sh" wait "$vm"
  gexec 'touch /run/writer.pause; dd if=/dev/zero of=/data/db.bin bs=1M count=256 conv=fsync 2>/dev/null; sync'
}
guest_writes() { # round
  gexec "awk 'BEGIN{srand($1); for(i=0;i<256;i++) print int(rand()*4096)}' | while read b; do dd if=/dev/urandom of=/data/db.bin bs=65536 count=1 seek=\$b conv=notrunc 2>/dev/null; done; dd if=/dev/urandom of=/data/new-$1.bin bs=1M count=48 conv=fsync 2>/dev/null; sync"
}

rm -rf repo vnb restore-cairn restore-vnb cairn-work
export CAIRN_REPO=$work/repo
"$cairn" init >/dev/null
declare -a tc tv
start_vm
t0=$(now); "$cairn" backup vm "$vm" -q --work-dir "$work/cairn-work" >/dev/null 2>&1; t1=$(now); tc[0]=$(secs $t0 $t1)
full_c=$(size repo)
echo "cairn full: ${tc[0]} s"
for i in 1 2 3 4 5; do
  guest_writes $i
  t0=$(now); "$cairn" backup vm "$vm" -q --work-dir "$work/cairn-work" --json > "cairn-$i.json" 2>/dev/null; t1=$(now); tc[$i]=$(secs $t0 $t1)
  echo "cairn inc $i: ${tc[$i]} s ($(python3 -c "import json;r=json.load(open('cairn-$i.json'))[0]['record'];print(r['chain'], r['vm_read_bytes'], 'bytes read')"))"
done
start_vm
t0=$(now); virtnbdbackup -d "$vm" -l full -o vnb >vnb.log 2>&1; t1=$(now); tv[0]=$(secs $t0 $t1)
full_v=$(size vnb)
echo "virtnbdbackup full: ${tv[0]} s"
for i in 1 2 3 4 5; do
  guest_writes $i
  t0=$(now); virtnbdbackup -d "$vm" -l inc -o vnb >>vnb.log 2>&1; t1=$(now); tv[$i]=$(secs $t0 $t1)
  echo "virtnbdbackup inc $i: ${tv[$i]} s"
done
"$top/scripts/guest.sh" remove "$vm"
grow_c=$(( $(size repo) - full_c )); grow_v=$(( $(size vnb) - full_v ))
sum() { python3 -c "import sys;print(f'{sum(map(float,sys.argv[1:])):.2f}')" "$@"; }
chain_c=$(sum "${tc[@]}"); chain_v=$(sum "${tv[@]}")

mkdir -p restore-cairn
cold; t0=$(now); "$cairn" restore image "$vm" --disk vda --format qcow2 --to restore-cairn/vda.qcow2 -q >/dev/null; sync; t1=$(now); rc=$(secs $t0 $t1)
mkdir -p restore-vnb
cold; t0=$(now); virtnbdrestore -i vnb -o restore-vnb -d vda -n >/dev/null 2>&1; sync; t1=$(now); rv=$(secs $t0 $t1)
vsize() { qemu-img info --output=json "$1" | python3 -c "import json,sys;print(json.load(sys.stdin)['virtual-size'])"; }
same="cairn $(vsize restore-cairn/vda.qcow2) bytes, virtnbdrestore $(vsize restore-vnb/vda.qcow2) bytes (virtual size)"

stamp=$(date -u +%Y-%m-%dT%H%M)
out=$top/bench/results/vm-$stamp.md
{
  echo "# cairn vs virtnbdbackup, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Command: \`bench/vm-chain.sh\` (data disk ${gib} GiB from $src; 5 rounds of 64 MiB guest writes; TCG guest; $(nproc) cores)."
  echo "virtnbdbackup $(virtnbdbackup -V 2>&1 | tail -1), QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), libvirt $(virsh -v)."
  echo
  echo "| | cairn | virtnbdbackup | ratio |"
  echo "|---|---|---|---|"
  echo "| full backup | ${tc[0]} s | ${tv[0]} s | $(python3 -c "print(f'{${tv[0]}/${tc[0]}:.1f}x')") |"
  for i in 1 2 3 4 5; do echo "| incremental $i | ${tc[$i]} s | ${tv[$i]} s | $(python3 -c "print(f'{${tv[$i]}/${tc[$i]}:.1f}x')") |"; done
  echo "| chain total (full + 5) | $chain_c s | $chain_v s | $(python3 -c "print(f'{$chain_v/$chain_c:.1f}x')") |"
  echo "| stored after the full | $(mib $full_c) MiB | $(mib $full_v) MiB | |"
  echo "| growth over 5 incrementals (320 MiB written) | $(mib $grow_c) MiB | $(mib $grow_v) MiB | $(python3 -c "print(f'{$grow_c/$grow_v:.2f}')") |"
  echo "| restore newest point (vda, qcow2, cold cache) | $rc s | $rv s | $(python3 -c "print(f'{$rv/$rc:.1f}x')") |"
  echo
  echo "Restored images: $same."
} | tee "$out"
echo "saved $out"
