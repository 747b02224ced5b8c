#!/usr/bin/env bash
# Offsite copies to S3 (s3s-fs on loopback, objects on this disk), on bench/run.sh's image:
# cairn copy of a local repository into a bucket, against restic copy of a restic repository
# holding the same image into the same server, and rclone copy of cairn's repository folder
# (the files alone: the floor for moving these bytes); then the incremental copy after a 1%
# change. Wall time and peak memory; prints a Markdown table and saves it under bench/results/.
#
#   bench/copy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
command -v rclone >/dev/null || apt-get install -y -qq --no-install-recommends rclone >/dev/null
rm -rf c-cairn c-restic s3copy s3cache copy-times.txt && mkdir -p s3copy/cairn s3copy/restic s3copy/rclone
source "$top/bench/s3s-fs.sh"
start_s3s_fs s3copy
export RESTIC_PASSWORD=bench RESTIC_FROM_PASSWORD=bench CAIRN_CACHE_DIR=$work/s3cache
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other RCLONE_CONFIG_BENCH_ENDPOINT=http://127.0.0.1:$port \
  RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=bench RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=benchsecret
rr=s3:http://127.0.0.1:$port/restic/repo

timed() {
  local name=$1; shift
  /usr/bin/time -f "$name %e %M" -a -o "$work/copy-times.txt" "$@" > "$work/log-copy-$name.txt" 2>&1 || { cat "$work/log-copy-$name.txt"; exit 1; }
}
t() { awk -v n="$1" '$1 == n {print $2}' copy-times.txt; }
m() { awk -v n="$1" '$1 == n {printf "%d", $3 / 1024}' copy-times.txt; }
x() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1fx", b / a}'; }

# The local repositories (not timed).
"$cairn" init --repo c-cairn -q >/dev/null
restic init --repository-version 2 -r c-restic -q >/dev/null
"$cairn" backup image "$img" --repo c-cairn --name disk -q >/dev/null
restic -r c-restic backup -q "$img"
"$cairn" init --repo s3://cairn/repo --copy-from c-cairn -q >/dev/null
restic -r "$rr" init --repository-version 2 --copy-chunker-params --from-repo c-restic -q >/dev/null

timed cairn-copy "$cairn" copy --from c-cairn --to s3://cairn/repo
timed restic-copy restic -r "$rr" copy --from-repo c-restic -q
# (AWS_CA_BUNDLE, set on some machines, makes rclone refuse its own transport.)
timed rclone-copy env -u AWS_CA_BUNDLE rclone copy --transfers 8 c-cairn bench:rclone/repo
bytes_full=$(du -sb c-cairn/packs | cut -f1)

# The incremental copy after a 1% change.
packs_before=$(find c-cairn/packs -type f | sort)
"$top/bench/scatter-writes.py" "$img" 1 7 > changed.txt
"$cairn" backup image "$img" --repo c-cairn --name disk --changed-ranges changed.txt -q >/dev/null
restic -r c-restic backup -q "$img"
new_packs=$(comm -13 <(echo "$packs_before") <(find c-cairn/packs -type f | sort) | xargs du -cb | tail -1 | cut -f1)
timed cairn-copy2 "$cairn" copy --from c-cairn --to s3://cairn/repo --json
timed restic-copy2 restic -r "$rr" copy --from-repo c-restic -q
sent2=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stored_bytes_sent"])' "$work/log-copy-cairn-copy2.txt")

stamp=$(date -u +%Y-%m-%dT%H%M)
out="$top/bench/results/copy-$stamp.md"
{
  echo "Copies to S3 on loopback (s3s-fs 0.14.1), $(nproc) cores, ${gib} GiB image from $src; cairn $(git -C "$top" rev-parse --short HEAD), $(restic version | cut -d' ' -f1-2), $(rclone version | head -1)."
  echo
  echo "| | s / peak MiB | cairn faster |"
  echo "|---|---|---|"
  echo "| cairn copy (full, $bytes_full bytes of packs) | $(t cairn-copy) / $(m cairn-copy) | |"
  echo "| restic copy (full) | $(t restic-copy) / $(m restic-copy) | $(x "$(t cairn-copy)" "$(t restic-copy)") |"
  echo "| rclone copy of cairn's repository folder | $(t rclone-copy) / $(m rclone-copy) | $(x "$(t cairn-copy)" "$(t rclone-copy)") |"
  echo "| cairn copy after a 1% change | $(t cairn-copy2) / $(m cairn-copy2) | |"
  echo "| restic copy after a 1% change | $(t restic-copy2) / $(m restic-copy2) | $(x "$(t cairn-copy2)" "$(t restic-copy2)") |"
  echo
  echo "Incremental copy: $sent2 bytes stored in the target for $new_packs bytes of new packs in the source ($(awk -v a="$sent2" -v b="$new_packs" 'BEGIN {printf "%.2f", a / b}')x)."
} | tee "$out"
echo "saved $out"
# What this run made is large (several GiB): gone once the table is saved.
rm -rf c-cairn c-restic s3copy s3cache work.img
