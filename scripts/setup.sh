#!/usr/bin/env bash
# Installs what cairn needs to build and test on Debian 12 (run as root). Idempotent.
#   scripts/setup.sh           build + test dependencies
#   scripts/setup.sh --bench   also restic and borg for bench/
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

pkgs=(qemu-utils e2fsprogs fdisk python3 ca-certificates)
if [[ "${1:-}" == "--bench" ]]; then
  pkgs+=(restic borgbackup time)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  for c in "$HOME/.cargo/bin/cargo" /usr/local/cargo/bin/cargo; do
    [[ -x "$c" ]] && export PATH="$(dirname "$c"):$PATH" && break
  done
fi
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.85) is required: install it with rustup" >&2; exit 1; }
command -v qemu-nbd >/dev/null || { echo "qemu-nbd missing after install" >&2; exit 1; }
