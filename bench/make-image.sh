#!/usr/bin/env bash
# Builds the benchmark disk image: an 8 GiB GPT disk with a 512 MiB Linux swap partition half
# filled with random pages (a used swap), and an ext4 partition holding a copy of real files
# (default /usr) with free space after them. No loop devices or root mounts are needed.
#
#   bench/make-image.sh OUT.img [SOURCE_DIR] [SIZE_GIB]
set -euo pipefail
out=${1:?usage: make-image.sh OUT.img [SOURCE_DIR] [SIZE_GIB]}
src=${2:-/usr}
size_gib=${3:-8}
tmp=$(mktemp -d "$(dirname "$out")/.mkimg.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

swap_mib=512
start_mib=1
ext_start_mib=$((start_mib + swap_mib))
ext_mib=$((size_gib * 1024 - ext_start_mib - 1))

# The ext4 partition, populated straight from the directory tree (mke2fs -d).
truncate -s "${ext_mib}M" "$tmp/ext4.img"
mke2fs -q -t ext4 -L benchdata -E lazy_itable_init=0,lazy_journal_init=0 -d "$src" "$tmp/ext4.img" 2>"$tmp/mke2fs.err" \
  || { grep -v 'Warning\|could not' "$tmp/mke2fs.err" >&2 || true; }

# A used swap partition: signature, then random pages in its first half.
truncate -s "${swap_mib}M" "$tmp/swap.img"
mkswap -q -L benchswap "$tmp/swap.img" >/dev/null
dd if=/dev/urandom of="$tmp/swap.img" bs=1M seek=1 count=$((swap_mib / 2)) conv=notrunc status=none

rm -f "$out"
truncate -s "${size_gib}G" "$out"
sfdisk -q "$out" <<SFDISK
label: gpt
start=${start_mib}MiB, size=${swap_mib}MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap
start=${ext_start_mib}MiB, size=${ext_mib}MiB, type=0FC63DAF-8483-4772-8E79-3D69DE8477E4, name=data
SFDISK
dd if="$tmp/swap.img" of="$out" bs=1M seek=$start_mib conv=notrunc,sparse status=none
dd if="$tmp/ext4.img" of="$out" bs=1M seek=$ext_start_mib conv=notrunc,sparse status=none
echo "built $out: $(du -h --apparent-size "$out" | cut -f1) logical, $(du -h "$out" | cut -f1) allocated"
