# Shared by the seed scripts of the guest-bytes fuzz targets: real images made by the real
# tools (mkfs.*, mkntfs + ntfs-3g, mtools, lvm2, sfdisk), in a scratch folder, written to
# fuzz/corpus/<target>/ in the sparse input format (sparse.py). Needs root (loop devices for
# lvm2, FUSE for ntfs-3g).
set -euo pipefail
SEEDS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TMP=$(mktemp -d)
trap 'umount "$TMP"/mnt 2>/dev/null || true; for d in $(losetup -j "$TMP" -n -O NAME 2>/dev/null); do losetup -d "$d"; done; rm -rf "$TMP"' EXIT
export PATH=$PATH:/sbin:/usr/sbin LVM_SUPPRESS_FD_WARNINGS=1

# corpus_dir TARGET: its seed folder, emptied but for regression-* inputs (what the fuzzer
# found, kept as seeds and read by unit tests).
corpus_dir() {
  local d=$SEEDS/../corpus/$1
  mkdir -p "$d"; find "$d" -maxdepth 1 -type f ! -name 'regression-*' -delete; echo "$d"
}

# sparse IMAGE OUTPUT [SIZE]
sparse() { python3 "$SEEDS/sparse.py" "$@"; }

# lvm DEV CMD ARGS...: an lvm2 command on that device only, no device-mapper, no backups in /etc.
lvm() {
  local dev=$1 cmd=$2; shift 2
  "$cmd" "$@" --driverloaded n --devices "$dev" --config 'backup { backup = 0 archive = 0 }' >/dev/null 2>"$TMP/lvm.err" ||
    { cat "$TMP/lvm.err" >&2; return 1; }
}

# make_pv IMAGE SIZE_MIB VG: a PV (UUID fuzzzz-0000-..., as the lvm targets expect) holding VG
# with swap_1 (linear, extended into a second segment) and root; swap_1 starts with a swap
# signature. Prints pe_start in bytes.
make_pv() {
  local img=$1 mib=$2 vg=$3 dev pe
  truncate -s "${mib}M" "$img"
  dev=$(losetup -f --show "$img")
  lvm "$dev" pvcreate -q --uuid fuzzzz-0000-0000-0000-0000-0000-000000 --norestorefile "$dev"
  lvm "$dev" vgcreate -q -s 1M "$vg" "$dev"
  lvm "$dev" lvcreate -q -an -Zn -L 2M -n swap_1 "$vg"
  lvm "$dev" lvcreate -q -an -Zn -L 2M -n root "$vg"
  lvm "$dev" lvextend -q -L +1M "$vg/swap_1"
  pe=$(pvs --noheadings --nosuffix --units b -o pe_start --driverloaded n --devices "$dev" 2>/dev/null | tr -d ' ')
  losetup -d "$dev"
  truncate -s 4M "$TMP/sig"; mkswap -q "$TMP/sig"
  dd if="$TMP/sig" of="$img" bs=4096 count=1 seek=$((pe / 4096)) conv=notrunc status=none
  echo "$pe"
}

# pv_text IMAGE: the current metadata text of a PV (label, metadata area header, text).
pv_text() {
  python3 - "$1" <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
assert d[512:520] == b"LABELONE"
at = 512 + 32 + 40
while struct.unpack_from("<Q", d, at)[0]:
    at += 16
at += 16
mda = struct.unpack_from("<Q", d, at)[0]
size = struct.unpack_from("<Q", d, mda + 32)[0]
off, n = struct.unpack_from("<QQ", d, mda + 40)
text = d[mda + off:mda + off + n] if off + n <= size else d[mda + off:mda + size] + d[mda + 512:mda + 512 + off + n - size]
sys.stdout.buffer.write(text.rstrip(b"\0"))
PY
}

# ntfs_volume IMAGE SIZE_MIB SETUP: mkntfs, then SETUP (a function) run in the mounted volume.
ntfs_volume() {
  local img=$1 mib=$2 setup=$3
  truncate -s "${mib}M" "$img"
  mkntfs -F -Q -q "$img" 2>/dev/null
  mkdir -p "$TMP/mnt"
  ntfs-3g "$img" "$TMP/mnt"
  (cd "$TMP/mnt" && "$setup") || { umount "$TMP/mnt"; return 1; }
  umount "$TMP/mnt"
}

# partitioned IMAGE SIZE_MIB SFDISK_SCRIPT [PART_IMAGE START_SECTOR]...
partitioned() {
  local img=$1 mib=$2 table=$3; shift 3
  truncate -s "${mib}M" "$img"
  printf '%b' "$table" | sfdisk -q "$img" >/dev/null
  while (($#)); do
    dd if="$1" of="$img" bs=512 seek="$2" conv=notrunc,sparse status=none
    shift 2
  done
}
