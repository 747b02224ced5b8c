#!/usr/bin/env bash
# Compares cairn with restic and borg (Debian's packages) on the same disk image in one run:
# full backup, a second backup after 1% scattered 64 KiB writes (cairn with and without
# --changed-ranges), restore, repository sizes and peak memory. Prints a Markdown table and
# saves it under bench/results/.
#
#   bench/run.sh                      (8 GiB image built from /usr in bench/work/)
#   BENCH_SRC=/usr/share BENCH_GIB=2 bench/run.sh      (a smaller run)
#
# Conditions: every backup starts with the image in the page cache (read once before), as a
# backup of a recently used disk would; every restore starts with a cold page cache (the
# repository is read from disk) and writes a new file; borg and cairn use zstd
# (borg at level 3, cairn at its default level 2), restic its default (auto).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
export RESTIC_PASSWORD=bench BORG_PASSPHRASE='' BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
rm -rf r-cairn r-cairn-reread r-restic r-borg out-* times.txt

# timed NAME CMD...: wall seconds and peak RSS (KiB) into times.txt
timed() {
  local name=$1; shift
  /usr/bin/time -f "$name %e %M" -a -o "$work/times.txt" "$@" > "$work/log-$name.txt" 2>&1 || { cat "$work/log-$name.txt"; exit 1; }
}
size() { du -sb "$1" | cut -f1; }

"$cairn" init --repo r-cairn -q >/dev/null
restic init --repository-version 2 -r r-restic -q >/dev/null
borg init -e none r-borg

warm; timed cairn-full "$cairn" backup image "$img" --repo r-cairn --name disk
warm; timed restic-full restic -r r-restic backup -q "$img"
warm; timed borg-full borg create --compression zstd,3 r-borg::full "$img"
declare -A full
for t in cairn restic borg; do full[$t]=$(size r-$t); done
cp -a r-cairn r-cairn-reread

"$top/bench/scatter-writes.py" "$img" 1 7 > changed.txt
written=$(awk '{s+=$2} END {print s}' changed.txt)

warm; timed cairn-ranges "$cairn" backup image "$img" --repo r-cairn --name disk --changed-ranges changed.txt
warm; timed cairn-reread "$cairn" backup image "$img" --repo r-cairn-reread --name disk
warm; timed restic-second restic -r r-restic backup -q "$img"
warm; timed borg-second borg create --compression zstd,3 r-borg::second "$img"
declare -A second
for t in cairn cairn-reread restic borg; do second[$t]=$(size r-$t); done

cold
timed cairn-restore "$cairn" restore image disk --repo r-cairn --to out-cairn.img
timed cairn-sync sync
cmp "$img" out-cairn.img || { echo "cairn restore differs!"; exit 1; }
restored=$(du -B1 out-cairn.img | cut -f1)
rm -f out-cairn.img; cold
# What the disk itself allows: the same pack reads and data writes, no CPU work.
timed io-floor "$top/bench/io-floor.sh" r-cairn "$restored" "$work"
cold
timed cairn-qcow2 "$cairn" restore image disk --repo r-cairn --format qcow2 --to out-cairn.qcow2
timed cairn-qcow2-sync sync
qemu-img compare -q -f raw -F qcow2 "$img" out-cairn.qcow2 || { echo "cairn qcow2 restore differs!"; exit 1; }
rm -f out-cairn.qcow2; cold
# The floor of any restore: copying the raw image itself, holes kept.
timed cp-sparse cp --sparse=always "$img" out-cp.img
timed cp-sync sync
rm -f out-cp.img; cold
mkdir -p out-restic
timed restic-restore restic -r r-restic restore latest --target out-restic -q
timed restic-sync sync
rm -rf out-restic; cold
mkdir -p out-borg
(cd out-borg && timed borg-restore borg extract ../r-borg::second)
timed borg-sync sync
rm -rf out-borg

t() { awk -v n="$1" '$1==n {print $2}' "$work/times.txt"; }
m() { awk -v n="$1" '$1==n {printf "%d", $3/1024}' "$work/times.txt"; }
mib() { echo $(( $1 / 1048576 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1fx", a/b}'; }
growth() { awk -v a="$1" -v b="$2" -v w="$written" 'BEGIN {printf "%d MiB (%.2fx written)", (a-b)/1048576, (a-b)/w}'; }

out="$top/bench/results/$(date -u +%Y-%m-%dT%H%M).md"
{
  echo "Image: ${gib} GiB GPT disk, ext4 holding a copy of $src, 512 MiB swap half used; $(du -h --apparent-size $img | cut -f1) logical, $(du -h $img | cut -f1) allocated."
  echo "Second backup after $(wc -l < changed.txt) scattered 64 KiB writes ($(mib $written) MiB, 1%). $(nproc) cores, $(uname -r)."
  echo "Versions: $("$cairn" --version), $(restic version | cut -d' ' -f1-2), $(borg --version)."
  echo
  echo "| step | cairn | restic | borg | cairn vs restic | cairn vs borg |"
  echo "|---|---|---|---|---|---|"
  echo "| full backup (s) | $(t cairn-full) | $(t restic-full) | $(t borg-full) | $(ratio $(t restic-full) $(t cairn-full)) faster | $(ratio $(t borg-full) $(t cairn-full)) faster |"
  echo "| second backup, --changed-ranges (s) | $(t cairn-ranges) | $(t restic-second) | $(t borg-second) | $(ratio $(t restic-second) $(t cairn-ranges)) faster | $(ratio $(t borg-second) $(t cairn-ranges)) faster |"
  echo "| second backup, full re-read (s) | $(t cairn-reread) | | | $(ratio $(t restic-second) $(t cairn-reread)) faster | $(ratio $(t borg-second) $(t cairn-reread)) faster |"
  echo "| restore (s) | $(t cairn-restore) | $(t restic-restore) | $(t borg-restore) | $(ratio $(t restic-restore) $(t cairn-restore)) faster | $(ratio $(t borg-restore) $(t cairn-restore)) faster |"
  durable() { awk -v a="$(t $1-restore)" -v b="$(t $1-sync)" 'BEGIN {printf "%.2f", a+b}'; }
  echo "| restore until on disk (+ sync) (s) | $(durable cairn) | $(durable restic) | $(durable borg) | $(ratio $(durable restic) $(durable cairn)) faster | $(ratio $(durable borg) $(durable cairn)) faster |"
  plus() { awk -v a="$(t $1)" -v b="$(t $2)" 'BEGIN {printf "%.2f", a+b}'; }
  echo "| restore to qcow2, as \`restore vm\` writes (+ sync) (s) | $(plus cairn-qcow2 cairn-qcow2-sync) | | | $(ratio $(durable restic) $(plus cairn-qcow2 cairn-qcow2-sync)) faster | |"
  echo "| \`cp --sparse=always\` of the raw image (+ sync) (s) | $(plus cp-sparse cp-sync) | | | cairn raw restore takes $(ratio $(durable cairn) $(plus cp-sparse cp-sync)) the time of cp, qcow2 $(ratio $(plus cairn-qcow2 cairn-qcow2-sync) $(plus cp-sparse cp-sync)) | |"
  echo "| disk floor: the same pack reads and data writes by \`dd\` (O_DIRECT), no decoding (s) | $(t io-floor) | | | cairn raw restore takes $(ratio $(durable cairn) $(t io-floor)) the floor's time | |"
  echo "| repository after full (MiB) | $(mib ${full[cairn]}) | $(mib ${full[restic]}) | $(mib ${full[borg]}) | $(awk -v a=${full[cairn]} -v b=${full[restic]} 'BEGIN {printf "%+.1f%%", (a-b)*100/b}') | |"
  echo "| growth, second backup | $(growth ${second[cairn]} ${full[cairn]}) | $(growth ${second[restic]} ${full[restic]}) | $(growth ${second[borg]} ${full[borg]}) | | |"
  echo "| growth, cairn full re-read | $(growth ${second[cairn-reread]} ${full[cairn]}) | | | | |"
  echo "| peak memory, full backup (MiB) | $(m cairn-full) | $(m restic-full) | $(m borg-full) | | |"
  echo "| peak memory, second backup (MiB) | $(m cairn-ranges) / $(m cairn-reread) | $(m restic-second) | $(m borg-second) | | |"
  echo "| peak memory, restore (MiB) | $(m cairn-restore) | $(m restic-restore) | $(m borg-restore) | | |"
} | tee "$out"
echo; echo "saved $out"
rm -f work.img
