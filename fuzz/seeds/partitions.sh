#!/usr/bin/env bash
# Seeds of the `partitions` fuzz target: GPT and MBR disks (primary, extended and logical
# partitions) made by sfdisk, holding the first 72 KiB of real ext4, swap, NTFS, FAT and LVM
# volumes (what detect_filesystem reads), and a disk with no table.
source "$(dirname "$0")/lib.sh"
out=$(corpus_dir partitions)
mke2fs -q -t ext4 "$TMP/ext4" 1M
truncate -s 1M "$TMP/swap"; mkswap -q "$TMP/swap"
truncate -s 2M "$TMP/ntfs"; mkntfs -F -Q -q "$TMP/ntfs" 2>/dev/null
truncate -s 1M "$TMP/fat"; mkfs.vfat -F 12 "$TMP/fat" >/dev/null
make_pv "$TMP/pv" 8 seedvg >/dev/null
for f in ext4 swap ntfs fat pv; do head -c 73728 "$TMP/$f" > "$TMP/$f.head"; done
partitioned "$TMP/gpt" 16 "label: gpt\nstart=2048,size=1M,type=swap\nstart=4096,size=1M,type=linux\nstart=6144,size=2M,type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\nstart=10240,size=1M,type=uefi\nstart=12288,size=2M,type=lvm\n" \
  "$TMP/swap.head" 2048 "$TMP/ext4.head" 4096 "$TMP/ntfs.head" 6144 "$TMP/fat.head" 10240 "$TMP/pv.head" 12288
sparse "$TMP/gpt" "$out/gpt"
partitioned "$TMP/mbr" 8 "label: dos\nstart=2048,size=1M,type=82\nstart=4096,size=6M,type=5\nstart=6144,size=1M,type=83\nstart=10240,size=1M,type=7\n" \
  "$TMP/swap.head" 2048 "$TMP/ext4.head" 6144 "$TMP/ntfs.head" 10240
sparse "$TMP/mbr" "$out/mbr"
truncate -s 1M "$TMP/whole"; mkswap -q "$TMP/whole"
sparse "$TMP/whole" "$out/whole-disk-swap"
ls -l "$out"
