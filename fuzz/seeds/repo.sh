#!/usr/bin/env bash
# Seed corpora for the repository-format targets, from real objects: a small image backed up
# into a plain and an encrypted repository, then its packs, index files, points, keys, locks
# and catalog records copied into fuzz/corpus/<target>/. Run from anywhere; needs a built
# cairn (cargo build -p cairn-cli).
set -euo pipefail
cd "$(dirname "$0")/../.."
cairn=${CAIRN:-target/debug/cairn}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# 384 KiB: text (compressible frames), random bytes (stored frames) and a hole.
python3 - "$work/img" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.write(b"".join(b"line %08d of a seed image for cairn's fuzzers\n" % i for i in range(2800))[:131072])
    f.write(os.urandom(131072))
    f.write(bytes(131072))
PY
printf '0 65536\n131072 65536\n' > "$work/ranges"
for mode in plain encrypted; do
  repo=$work/$mode
  if [[ $mode == encrypted ]]; then export CAIRN_PASSWORD=seed; "$cairn" init --repo "$repo" --encrypt -q >/dev/null
  else unset CAIRN_PASSWORD; "$cairn" init --repo "$repo" -q >/dev/null; fi
  "$cairn" backup image "$work/img" --repo "$repo" --name seed -q >/dev/null
  "$cairn" backup image "$work/img" --repo "$repo" --name seed --changed-ranges "$work/ranges" -q >/dev/null
  "$cairn" verify --repo "$repo" -q >/dev/null
  put() { mkdir -p "fuzz/corpus/$1"; cp "$2" "fuzz/corpus/$1/$mode-$(basename "$2" | cut -c1-16)"; }
  for f in "$repo"/packs/*/*; do put pack "$f"; put envelope "$f"; done
  for f in "$repo"/index/*; do put envelope "$f"; put index "$f"; done
  for f in "$repo"/points/*; do put envelope "$f"; put point_json "$f"; done
  for f in "$repo"/catalog/*; do put envelope "$f"; put catalog "$f"; done
  for f in "$repo"/keys/*; do [[ -f $f ]] && put keyfile "$f"; done
done
# Lock files exist only while a command runs: one as cairn writes them.
mkdir -p fuzz/corpus/lock_json
printf '{"hostname":"h","pid":1,"time":1764400000,"exclusive":false,"purpose":"backup","host_id":"a:b:pid[1]"}' > fuzz/corpus/lock_json/seed-lock
mkdir -p fuzz/corpus/ranges
printf '0 65536\n0x20000 0x10000 # comment\n65536,1\n' > fuzz/corpus/ranges/text
printf '[{"offset":0,"length":65536,"type":1,"description":"dirty"},{"offset":65536,"length":5,"description":"clean"}]' > fuzz/corpus/ranges/json
echo "seeds written under fuzz/corpus"
