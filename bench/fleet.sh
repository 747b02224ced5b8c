#!/usr/bin/env bash
# Retention at fleet scale: builds synthetic fleet repositories through cairn's real write path
# (crates/cairn-bench, `cairn-fleet`: 100 VMs x 30 daily points, 1% of each disk rewritten per
# day), at two sizes 4x apart, then times `cairn forget --keep-daily 7` and `cairn prune` on
# each (wall time, peak memory, objects read/written/deleted), a verify, and a backup and a
# restore of 1 GiB of new data against the whole index. Then compares with
# `restic forget --prune` on the same image in the same run: bench/run.sh's image backed up in
# four rounds of 1% scattered writes by both tools, all but the newest snapshot forgotten,
# pruned. Prints a Markdown table and saves it under bench/results/.
#
#   bench/fleet.sh                          (small: 100 x 32768 blocks; large: 100 x 131072)
#   FLEET_SMALL=8192 FLEET_LARGE=32768 bench/fleet.sh     (a quick run)
#   FLEET_SKIP_RESTIC=1 bench/fleet.sh
#
# Repositories are built in bench/work/fleet-<blocks>/ once and copied before each timed
# forget + prune (the build is the slow part: ~1 TiB of logical data hashed at the large size).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p cairn-cli -p cairn-bench 2>&1 | tail -n 1
cairn=$top/target/release/cairn
fleet=$top/target/release/cairn-fleet
work=${BENCH_WORK:-$top/bench/work}
small=${FLEET_SMALL:-32768}
large=${FLEET_LARGE:-131072}
vms=${FLEET_VMS:-100}
days=${FLEET_DAYS:-30}
mkdir -p "$work" "$top/bench/results"
cd "$work"
: > fleet-times.txt
timed() { # timed NAME CMD...: wall seconds and peak RSS (KiB) into fleet-times.txt, stdout to out-NAME.json
  local name=$1; shift
  /usr/bin/time -f "$name %e %M" -a -o fleet-times.txt "$@" > "out-$name.json" 2> "log-$name.txt" \
    || { cat "log-$name.txt"; exit 1; }
}
count() { find "$1" -type f ! -name '.*' | wc -l; }

for blocks in $small $large; do
  base=fleet-$blocks
  if [[ ! -f $base/built.json ]]; then
    rm -rf "$base"; mkdir -p "$base"
    echo "building $base ($vms VMs x $days days x $blocks blocks) ..."
    /usr/bin/time -f "build-$blocks %e %M" -a -o fleet-times.txt \
      "$fleet" --repo "$base/repo" --vms "$vms" --days "$days" --blocks "$blocks" > "$base/built.json"
  fi
  rm -rf "run-$blocks"; cp -a "$base/repo" "run-$blocks"
  export CAIRN_REPO=$work/run-$blocks
  for k in packs index points; do echo "$k $(count "run-$blocks/$k")"; done > "objects-before-$blocks.txt"
  sync
  timed "forget-$blocks" "$cairn" forget --keep-daily 7 --json
  timed "prune-$blocks" "$cairn" prune --grace 0 --json
  for k in packs index points; do echo "$k $(count "run-$blocks/$k")"; done > "objects-after-$blocks.txt"
  timed "verify-$blocks" "$cairn" verify --sample 5 --json
  # A backup and a restore against the whole index (1 GiB of new data; the restore checked).
  [[ -f probe.img ]] || head -c 1073741824 /dev/urandom > probe.img
  timed "backup-$blocks" "$cairn" backup image probe.img --name probe --json
  timed "restore-$blocks" "$cairn" restore image probe --to probe-restored.img --force --json
  cmp probe.img probe-restored.img; rm -f probe-restored.img
  unset CAIRN_REPO
done

if [[ -z ${FLEET_SKIP_RESTIC:-} ]]; then
  # The same image and rounds of changes for both tools (bench/run.sh's image).
  scripts/setup.sh --bench >/dev/null
  img=$work/disk.img
  gib=${BENCH_GIB:-8}
  if [[ ! -f $img || ! -f image.built || "$(cat image.built)" != "/usr $gib" ]]; then
    echo "building the ${gib} GiB image from /usr (as bench/run.sh does) ..."
    "$top/bench/make-image.sh" "$img" /usr "$gib"
    echo "/usr $gib" > image.built
  fi
  export RESTIC_PASSWORD=bench
  rm -rf rp-cairn rp-restic; cp --sparse=always "$img" rounds.img
  "$cairn" init --repo rp-cairn -q >/dev/null
  restic init --repository-version 2 -r rp-restic -q >/dev/null
  for round in 1 2 3 4; do
    [[ $round == 1 ]] || "$top/bench/scatter-writes.py" rounds.img 1 "$round" > /dev/null
    "$cairn" backup image rounds.img --repo rp-cairn --name disk -q > /dev/null
    restic -r rp-restic backup -q rounds.img
  done
  rm -f rounds.img
  sync
  timed restic-forget-prune restic -r rp-restic forget --keep-last 1 --prune -q
  export CAIRN_REPO=$work/rp-cairn
  timed cairn-forget-prune "$cairn" forget --keep-last 1 --prune --grace 0 --json
  unset CAIRN_REPO
fi

# The last run of each step (FLEET_SMALL=FLEET_LARGE runs the same size twice).
t() { awk -v n="$1" '$1==n {v=$2} END {print v}' fleet-times.txt; }
m() { awk -v n="$1" '$1==n {v=$3} END {printf "%d", v/1024}' fleet-times.txt; }
j() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
obj() { awk -v k="$2" '$1==k {print $2}' "$1"; }
out="$top/bench/results/fleet-$(date -u +%Y-%m-%dT%H%M).md"
{
  echo "Fleet: $vms VMs x $days daily points, 1% of each disk rewritten per day (one stretch); $(nproc) cores, $(uname -r); $("$cairn" --version)."
  echo
  echo "| | small | large |"
  echo "|---|---|---|"
  echo "| blocks per VM disk | $small | $large |"
  echo "| blocks indexed | $(j fleet-$small/built.json 'd["indexed_blocks"]') | $(j fleet-$large/built.json 'd["indexed_blocks"]') |"
  echo "| packs / stored GiB | $(j fleet-$small/built.json 'd["packs"]') / $(j fleet-$small/built.json 'round(d["pack_bytes"]/2**30,2)') | $(j fleet-$large/built.json 'd["packs"]') / $(j fleet-$large/built.json 'round(d["pack_bytes"]/2**30,2)') |"
  echo "| build through the write path (s) | $(j fleet-$small/built.json 'd["build_seconds"]') | $(j fleet-$large/built.json 'd["build_seconds"]') |"
  echo "| \`forget --keep-daily 7\` (s / peak MiB) | $(t forget-$small) / $(m forget-$small) | $(t forget-$large) / $(m forget-$large) |"
  echo "| points removed | $(j out-forget-$small.json 'len(d["removed"]["points"])') | $(j out-forget-$large.json 'len(d["removed"]["points"])') |"
  echo "| \`prune --grace 0\` (s / peak MiB) | $(t prune-$small) / $(m prune-$small) | $(t prune-$large) / $(m prune-$large) |"
  for s in $small $large; do
    eval "bps_$s=\$(awk -v b=\$(j fleet-$s/built.json 'd[\"indexed_blocks\"]') -v t=\$(t prune-$s) 'BEGIN {printf \"%d\", b/t}')"
  done
  echo "| prune: indexed blocks per second | $(eval echo \$bps_$small) | $(eval echo \$bps_$large) |"
  echo "| prune: points kept and read | $(j out-prune-$small.json 'd["points"]') points | $(j out-prune-$large.json 'd["points"]') points |"
  echo "| prune: packs deleted / repacked / written | $(j out-prune-$small.json 'd["deleted"]["packs"]') / $(j out-prune-$small.json 'd["repacked"]["packs"]') / $(j out-prune-$small.json 'd["repack_written"]["packs"]') | $(j out-prune-$large.json 'd["deleted"]["packs"]') / $(j out-prune-$large.json 'd["repacked"]["packs"]') / $(j out-prune-$large.json 'd["repack_written"]["packs"]') |"
  echo "| prune: index files rewritten | $(j out-prune-$small.json 'd["index_files_rewritten"]') | $(j out-prune-$large.json 'd["index_files_rewritten"]') |"
  echo "| objects before -> after (packs, index, points) | $(obj objects-before-$small.txt packs) -> $(obj objects-after-$small.txt packs), $(obj objects-before-$small.txt index) -> $(obj objects-after-$small.txt index), $(obj objects-before-$small.txt points) -> $(obj objects-after-$small.txt points) | $(obj objects-before-$large.txt packs) -> $(obj objects-after-$large.txt packs), $(obj objects-before-$large.txt index) -> $(obj objects-after-$large.txt index), $(obj objects-before-$large.txt points) -> $(obj objects-after-$large.txt points) |"
  echo "| GiB reclaimed | $(j out-prune-$small.json 'round(d["deleted"]["bytes"]/2**30,2)') | $(j out-prune-$large.json 'round(d["deleted"]["bytes"]/2**30,2)') |"
  echo "| \`verify --sample 5\` afterwards (s / peak MiB) | $(t verify-$small) / $(m verify-$small) | $(t verify-$large) / $(m verify-$large) |"
  echo "| \`backup image\` of 1 GiB of new data (s / peak MiB) | $(t backup-$small) / $(m backup-$small) | $(t backup-$large) / $(m backup-$large) |"
  echo "| \`restore image\` of it, checked (s / peak MiB) | $(t restore-$small) / $(m restore-$small) | $(t restore-$large) / $(m restore-$large) |"
  if [[ -z ${FLEET_SKIP_RESTIC:-} ]]; then
    echo
    echo "Same image for both tools (bench/run.sh's), four backups with 1% scattered writes between; keep the newest:"
    echo
    echo "| | cairn \`forget --keep-last 1 --prune --grace 0\` | restic \`forget --keep-last 1 --prune\` |"
    echo "|---|---|---|"
    echo "| wall time (s) | $(t cairn-forget-prune) | $(t restic-forget-prune) |"
    echo "| peak memory (MiB) | $(m cairn-forget-prune) | $(m restic-forget-prune) |"
  fi
} | tee "$out"
echo; echo "saved $out"
