#!/usr/bin/env bash
# Seeds of the `lvm_pv` fuzz target: real PVs made by lvm2 (label, metadata area, a swap
# signature in swap_1), sparse, claiming their real size and a far larger one (512 GiB).
source "$(dirname "$0")/lib.sh"
out=$(corpus_dir lvm_pv)
make_pv "$TMP/pv" 16 seedvg >/dev/null
sparse "$TMP/pv" "$out/pv"
sparse "$TMP/pv" "$out/pv-claims-512gib" $((1 << 39))
ls -l "$out"
