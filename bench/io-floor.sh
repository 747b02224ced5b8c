#!/usr/bin/env bash
# The device's own floor for a restore: reads every pack of a repository (O_DIRECT, 4 MiB
# requests, 4 at a time) while writing BYTES of new data (O_DIRECT, 16 MiB requests, 2
# streams), the I/O a restore from that repository to the same disk cannot avoid, with no
# decompression or hashing at all. Prints nothing; time it.
#
#   bench/io-floor.sh REPO BYTES SCRATCH_DIR
set -euo pipefail
repo=$1 bytes=$2 dir=$3
per=$(( bytes / 2 / (16 << 20) ))
for k in 1 2; do dd if=/dev/zero of="$dir/io-floor-$k.tmp" bs=16M count="$per" oflag=direct status=none & done
find "$repo/packs" -type f -print0 | xargs -0 -P4 -n16 sh -c 'for f; do dd if="$f" of=/dev/null bs=4M iflag=direct status=none; done' _
wait
sync
rm -f "$dir"/io-floor-*.tmp
