#!/usr/bin/env bash
# An ext4 filesystem filled from a folder, as a qcow2 image, rebuilt only when the folder or the
# size asked for changed (a stamp file OUT.built says what it was built from).
#   bench/ext4-qcow2.sh OUT.qcow2 SRC GIB LABEL
set -euo pipefail
out=$1 src=$2 gib=$3 label=$4
if [[ -f "$out" && "$(cat "$out.built" 2>/dev/null)" == "$src $gib $label" ]]; then
  exit 0
fi
echo "building the ${gib} GiB $label disk from $src ..."
rm -f "$out.raw" "$out"
mke2fs -q -t ext4 -L "$label" -E lazy_itable_init=0,lazy_journal_init=0 -d "$src" "$out.raw" "${gib}G"
qemu-img convert -f raw -O qcow2 "$out.raw" "$out"
rm -f "$out.raw"
echo "$src $gib $label" > "$out.built"
