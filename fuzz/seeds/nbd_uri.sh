#!/usr/bin/env bash
# Seeds of the nbd_uri fuzz target: NBD URIs in the forms QEMU, libvirt (pull-mode backup
# exports), qemu-nbd and cairn's own serve-nbd print or accept.
set -euo pipefail
cd "$(dirname "$0")/../corpus"
mkdir -p nbd_uri
i=0
while IFS= read -r uri; do
  printf '%s' "$uri" > "nbd_uri/seed-$i"
  i=$((i + 1))
done <<'URIS'
nbd://localhost:10809/vda
nbd://127.0.0.1:10810/disk0
nbd://[::1]:10809/vda
nbd://backup.example.com/vda
nbd://192.0.2.10:10809/
nbd+unix:///vda?socket=/var/lib/libvirt/qemu/domain-3-web/backup.sock
nbd+unix:///?socket=/run/cairn-nbd/cairn-nbd-4b9029fc.sock
nbd+unix:///disk0?socket=/tmp/a%20b.sock
nbd+unix:///backup-vda?socket=/var/tmp/cairn/web/nbd.sock&tls=off
nbd://host/export%2Fwith%3Fescapes
URIS
ls nbd_uri | wc -l
