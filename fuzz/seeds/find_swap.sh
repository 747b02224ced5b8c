#!/usr/bin/env bash
# Seeds of the `find_swap` fuzz target: disks as VM backups see them, made by the real tools:
# MBR with a swap partition and an LVM PV with a swap volume; GPT with a swap partition; GPT
# with NTFS holding pagefile.sys (ntfs-3g; zeros, so that the input stays small); a whole-disk
# swap area.
source "$(dirname "$0")/lib.sh"
out=$(corpus_dir find_swap)
truncate -s 2M "$TMP/swap"; mkswap -q "$TMP/swap"
pe=$(make_pv "$TMP/pv" 8 seedvg)
partitioned "$TMP/mbr" 12 "label: dos\nstart=2048,size=2M,type=82\nstart=6144,size=8M,type=8e\n" "$TMP/swap" 2048 "$TMP/pv" 6144
sparse "$TMP/mbr" "$out/mbr-swap-lvm"
partitioned "$TMP/gpt" 4 "label: gpt\nstart=2048,size=2M,type=swap\n" "$TMP/swap" 2048
sparse "$TMP/gpt" "$out/gpt-swap"
pagefile() { head -c $((1 << 20)) /dev/zero > pagefile.sys; echo data > other.txt; }
ntfs_volume "$TMP/ntfs" 6 pagefile
partitioned "$TMP/win" 8 "label: gpt\nstart=2048,size=6M,type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n" "$TMP/ntfs" 2048
sparse --blank-ff "$TMP/win" "$out/gpt-ntfs-pagefile"
sparse "$TMP/swap" "$out/whole-disk-swap"
ls -l "$out"
