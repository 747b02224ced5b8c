#!/usr/bin/env bash
# cairn and restic with their repositories on the same S3 server (s3s-fs on loopback, its
# objects on this machine's disk), on bench/run.sh's image: full backup, a second backup after
# 1% scattered writes, restore of the newest point from S3. Wall time and peak memory; prints a
# Markdown table and saves it under bench/results/.
#
#   bench/s3.sh                       (bench/run.sh's 8 GiB image, built if missing)
#
# Conditions as in bench/run.sh: backups start with the image in the page cache, restores with
# a cold page cache and cairn's local metadata cache emptied (as on a new machine).
# The server shares the cores, so the table also gives the CPU-seconds the server spent serving
# each restore and those the restorer spent: no restore of these bytes through this server ends
# before (server + restorer CPU) / cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

# The S3 server: s3s-fs (installed by scripts/setup.sh), objects under s3data/.
rm -rf s3data s3cache out-* s3-times.txt && mkdir -p s3data/cairn s3data/restic
source "$top/bench/s3s-fs.sh"
start_s3s_fs s3data
export RESTIC_PASSWORD=bench CAIRN_CACHE_DIR=$work/s3cache
cr=s3://cairn/repo
rr=s3:http://127.0.0.1:$port/restic/repo

timed() {
  local name=$1; shift
  /usr/bin/time -f "$name %e %M %U %S" -a -o "$work/s3-times.txt" "$@" > "$work/log-s3-$name.txt" 2>&1 || { cat "$work/log-s3-$name.txt"; exit 1; }
}
size() { du -sb "s3data/$1" | cut -f1; }
# CPU-seconds the server has used so far (utime + stime, in clock ticks).
server_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$s3s_fs_pid/stat"; }
served() { local before=$1; awk -v a="$before" -v b="$(server_cpu)" 'BEGIN {printf "%.1f", b - a}'; }

"$cairn" init --repo $cr -q >/dev/null
restic init --repository-version 2 -r "$rr" -q >/dev/null

warm; timed cairn-full "$cairn" backup image "$img" --repo $cr --name disk
warm; timed restic-full restic -r "$rr" backup -q "$img"
full_cairn=$(size cairn); full_restic=$(size restic)
"$top/bench/scatter-writes.py" "$img" 1 7 > changed.txt
warm; timed cairn-second "$cairn" backup image "$img" --repo $cr --name disk --changed-ranges changed.txt
warm; timed restic-second restic -r "$rr" backup -q "$img"

rm -rf s3cache; cold
c0=$(server_cpu); timed cairn-restore "$cairn" restore image disk --repo $cr --to out-cairn.img
cpu_cairn=$(served "$c0")
cmp "$img" out-cairn.img || { echo "cairn restore differs!"; exit 1; }
rm -f out-cairn.img; cold
c0=$(server_cpu); timed restic-restore restic -r "$rr" restore latest --target out-restic -q
cpu_restic=$(served "$c0")
cmp "$img" "out-restic/$work/$img" 2>/dev/null || cmp "$img" "$(find out-restic -name "$img" | head -1)" \
  || { echo "restic restore differs!"; exit 1; }
rm -rf out-restic

t() { awk -v n="$1" '$1 == n {print $2}' s3-times.txt; }
m() { awk -v n="$1" '$1 == n {printf "%d", $3 / 1024}' s3-times.txt; }
cpu() { awk -v n="$1" '$1 == n {printf "%.1f", $4 + $5}' s3-times.txt; }
floor() { awk -v a="$1" -v b="$2" -v c="$(nproc)" 'BEGIN {printf "%.1f", (a + b) / c}'; }
x() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1fx", b / a}'; }
stamp=$(date -u +%Y-%m-%dT%H%M)
out="$top/bench/results/s3-$stamp.md"
{
  echo "S3 on loopback (s3s-fs 0.14.1, objects on this disk), $(nproc) cores, ${gib} GiB image from $src; cairn $(git -C "$top" rev-parse --short HEAD), $(restic version | cut -d' ' -f1-2)."
  echo
  echo "| | cairn (s / peak MiB) | restic (s / peak MiB) | cairn faster |"
  echo "|---|---|---|---|"
  echo "| full backup into S3 | $(t cairn-full) / $(m cairn-full) | $(t restic-full) / $(m restic-full) | $(x "$(t cairn-full)" "$(t restic-full)") |"
  echo "| second backup (1% changed) | $(t cairn-second) / $(m cairn-second) | $(t restic-second) / $(m restic-second) | $(x "$(t cairn-second)" "$(t restic-second)") |"
  echo "| restore of the newest point from S3 | $(t cairn-restore) / $(m cairn-restore) | $(t restic-restore) / $(m restic-restore) | $(x "$(t cairn-restore)" "$(t restic-restore)") |"
  echo "| bucket after the full backup (bytes) | $full_cairn | $full_restic | |"
  echo "| restore: CPU-seconds of the restorer / of the server serving it | $(cpu cairn-restore) / $cpu_cairn | $(cpu restic-restore) / $cpu_restic | |"
  echo "| restore: CPU floor on $(nproc) cores, (restorer + server) / cores (s) | $(floor "$(cpu cairn-restore)" "$cpu_cairn") | $(floor "$(cpu restic-restore)" "$cpu_restic") | |"
} | tee "$out"
echo "saved $out"
# What this run made is large (several GiB): gone once the table is saved.
rm -rf s3data s3cache work.img out-cairn.img out-restic
