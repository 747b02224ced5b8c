#!/usr/bin/env bash
# Seeds of the `files_tree` fuzz target: whole-disk volumes the files readers open, made by
# the real tools: ext4 (mke2fs -d: folders, long and odd names, a symlink, a setuid file, a
# folder hard-linked into itself by debugfs), FAT16 (mkfs.vfat + mtools, long names) and NTFS
# (mkntfs + ntfs-3g).
source "$(dirname "$0")/lib.sh"
out=$(corpus_dir files_tree)
src=$TMP/src
mkdir -p "$src/etc/app" "$src/a/b" "$src/odd name é"
echo "answer = 42" > "$src/etc/app/config.toml"
ln -s app/config.toml "$src/etc/current"
printf '#!/bin/sh\n' > "$src/suid"; chmod 4755 "$src/suid"
echo deep > "$src/a/b/deep.txt"
echo x > "$src/odd name é/$(printf 'n%.0s' {1..200})"
mke2fs -q -t ext4 -O ^metadata_csum -d "$src" "$TMP/ext4" 2M
debugfs -w -R "link /a /a/b/loop" "$TMP/ext4" 2>/dev/null
sparse "$TMP/ext4" "$out/ext4"
truncate -s 2M "$TMP/fat"; mkfs.vfat -F 16 "$TMP/fat" >/dev/null 2>&1 || mkfs.vfat "$TMP/fat" >/dev/null
mcopy -s -i "$TMP/fat" "$src/etc" "$src/a" "::/"
mmd -i "$TMP/fat" "::/Long Folder Name" "::/Long Folder Name/Inner"
echo boot | mcopy -i "$TMP/fat" - "::/Long Folder Name/Inner/bootx64.efi"
sparse "$TMP/fat" "$out/fat"
fill() { mkdir -p "Users/Alice/Documents"; echo "revenue: up" > "Users/Alice/Documents/Report 2026.txt"; echo boot > bootmgr; }
ntfs_volume "$TMP/ntfs" 3 fill
sparse --blank-ff "$TMP/ntfs" "$out/ntfs"
ls -l "$out"
