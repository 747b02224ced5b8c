#!/usr/bin/env bash
# Seeds of the `lvm_text` fuzz target: the metadata text of real PVs made by lvm2 (linear
# volumes in one and two segments, before and after changes), each input a byte picking the
# PV's length (40: 2^40 bytes) then the text.
source "$(dirname "$0")/lib.sh"
out=$(corpus_dir lvm_text)
make_pv "$TMP/pv" 16 seedvg >/dev/null
{ printf '\x28'; pv_text "$TMP/pv"; } > "$out/two-segments"
dev=$(losetup -f --show "$TMP/pv")
lvm "$dev" lvcreate -q -an -Zn -L 1M -n "all_digits_0123" seedvg
lvm "$dev" lvrename -q seedvg root renamed
lvm "$dev" lvchange -q --addtag backup seedvg/renamed
losetup -d "$dev"
{ printf '\x28'; pv_text "$TMP/pv"; } > "$out/tagged-renamed"
{ printf '\x14'; pv_text "$TMP/pv"; } > "$out/small-pv"
ls -l "$out"
