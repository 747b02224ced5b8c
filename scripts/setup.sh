#!/usr/bin/env bash
# Installs what cairn needs to build and test on Debian 12 (run as root), and starts libvirt.
# Idempotent.
#   scripts/setup.sh           build + test dependencies, libvirtd running, test guest built
#   scripts/setup.sh --bench   also restic, borg and virtnbdbackup for bench/
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")/.."

pkgs=(e2fsprogs fdisk python3 ca-certificates pkg-config procps mount
      qemu-system-x86 qemu-utils qemu-block-extra libvirt-daemon-system libvirt-clients libvirt-dev
      busybox-static qemu-guest-agent cpio kmod xz-utils binutils python3-aiosmtpd
      dosfstools mtools ntfs-3g lvm2 openssl python3-venv iproute2 util-linux
      openssh-client openssh-server curl chromium chromium-driver libc6-dev)
# libc6-dev: libc.a, for the static build of cairn-agent (scripts/guest.sh agent).
if [[ "${1:-}" == "--bench" ]]; then
  pkgs+=(restic borgbackup time virtnbdbackup)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A machine may carry a newer qemu-utils from backports, which conflicts with Debian's
# qemu-system-x86; pin the QEMU tools to the version qemu-system-x86 comes in.
qemu_ver=""
if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '^1:7\.2'; then :; else missing+=(qemu-utils); fi
if ((${#missing[@]})); then
  apt-get update -qq
  qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  list=()
  for p in "${missing[@]}"; do
    case $p in
      qemu-utils|qemu-block-extra|qemu-system-x86) list+=("$p=$qemu_ver");;
      *) list+=("$p");;
    esac
  done
  # qemu-system-x86 and qemu-utils always go together (see above).
  printf '%s\n' "${list[@]}" | grep -q '^qemu-utils=' || list+=("qemu-utils=$qemu_ver")
  printf '%s\n' "${list[@]}" | grep -q '^qemu-block-extra=' || list+=("qemu-block-extra=$qemu_ver")
  echo "installing: ${list[*]}"
  apt-get install -y -qq --no-install-recommends --allow-downgrades $(printf '%s\n' "${list[@]}" | sort -u) >/dev/null
fi

if ! command -v cargo >/dev/null; then
  for c in "$HOME/.cargo/bin/cargo" /usr/local/cargo/bin/cargo; do
    [[ -x "$c" ]] && export PATH="$(dirname "$c"):$PATH" && break
  done
fi
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.85) is required: install it with rustup" >&2; exit 1; }
command -v qemu-nbd >/dev/null || { echo "qemu-nbd missing after install" >&2; exit 1; }

# libvirt: QEMU runs as root here (as the test guests' files are root's; without it a domain
# start takes about a minute on this kind of machine), and the daemons start without systemd
# when there is none.
if ! grep -q '^user = "root"' /etc/libvirt/qemu.conf; then
  printf 'user = "root"\ngroup = "root"\n' >> /etc/libvirt/qemu.conf
  if pgrep -x libvirtd >/dev/null; then pkill -x libvirtd; sleep 1; fi
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi
virsh -c qemu:///system version >/dev/null || { echo "libvirtd did not start" >&2; exit 1; }

# The tiny test guest (kernel, initramfs, disks): seconds to build, reused afterwards.
scripts/guest.sh current || scripts/guest.sh build
# cairn-agent for the guests that carry it (static; its own target folder).
scripts/guest.sh agent

# Object storage servers for the tests (crates/cairn-storage/src/test_servers.rs starts them on
# loopback, one per test): moto (S3 with versioning and Object Lock), s3s-fs (plain S3 on a
# folder), Azurite (Azure Blob). Installed once under /var/lib/cairn-test.
srv=/var/lib/cairn-test
if [ ! -x "$srv/moto/bin/moto_server" ]; then
  python3 -m venv "$srv/moto"
  "$srv/moto/bin/pip" install -q 'moto[server]==5.2.5'
fi
if [ ! -x "$srv/s3s-fs/bin/s3s-fs" ]; then
  # 0.14.1: later versions need a newer Rust than 1.95.
  cargo install -q s3s-fs@0.14.1 --features binary --locked --root "$srv/s3s-fs"
fi
if [ ! -x "$srv/azurite/node_modules/.bin/azurite-blob" ]; then
  if ! command -v npm >/dev/null; then
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  npm install -s --no-audit --no-fund --prefix "$srv/azurite" azurite@3.37.0
fi
