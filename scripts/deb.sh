#!/usr/bin/env bash
# Builds cairn's Debian package, dist/cairn_VERSION_ARCH.deb: /usr/bin/cairn, the server's
# systemd unit (cairn-server.service, not enabled), man pages, bash and zsh completions, the
# docs (README, user guide), and the guest agent to copy into guests (/usr/lib/cairn/cairn-agent,
# static). Install it with `apt install ./dist/cairn_*.deb`.
#
#   scripts/deb.sh                   a release build (cargo build --release), then the package
#   scripts/deb.sh --binary PATH     package this cairn binary instead (the tests use theirs)
#   scripts/deb.sh --agent PATH      and this cairn-agent (default: scripts/guest.sh agent builds it)
#   scripts/deb.sh --out DIR         where the package goes (default: dist/)
#
# Prints the package's path. Needs dpkg-deb and strip (binutils): Debian has both.
set -euo pipefail
cd "$(dirname "$0")/.."
binary="" out=dist agent=""
while (($#)); do
  case $1 in
    --binary) binary=$2; shift 2;;
    --agent) agent=$2; shift 2;;
    --out) out=$2; shift 2;;
    -h|--help) sed -n '2,10p' "$0"; exit 0;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
if [[ -z $binary ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --release --locked -p cairn-cli >&2
  binary=target/release/cairn
fi
if [[ -z $agent ]]; then
  scripts/guest.sh agent >&2
  agent=target/agent/x86_64-unknown-linux-gnu/release/cairn-agent
fi
version=$("$binary" --version | awk '{print $2}')
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || { echo "cannot read a version from $binary --version" >&2; exit 1; }
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

install -D -m 0755 "$binary" "$root/usr/bin/cairn"
strip --strip-debug "$root/usr/bin/cairn"
# For the guests: one static file to copy into each (docs/GUIDE.md, "Disks only the guest sees").
install -D -m 0755 "$agent" "$root/usr/lib/cairn/cairn-agent"
strip --strip-debug "$root/usr/lib/cairn/cairn-agent"
install -m 0644 packaging/cairn-agent.service "$root/usr/lib/cairn/cairn-agent.service"
# The unit in the tree runs a cairn installed by hand (/usr/local/bin); the package's is /usr/bin.
install -d "$root/lib/systemd/system"
sed 's|/usr/local/bin/cairn|/usr/bin/cairn|; s|^# Install: cp .*|# Installed by the cairn package; first:|' \
  packaging/cairn-server.service > "$root/lib/systemd/system/cairn-server.service"
chmod 0644 "$root/lib/systemd/system/cairn-server.service"
install -d "$root/usr/share/man/man1"
"$binary" man "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions"
"$binary" completions bash > "$root/usr/share/bash-completion/completions/cairn"
"$binary" completions zsh > "$root/usr/share/zsh/vendor-completions/_cairn"
install -d "$root/usr/share/doc/cairn"
for f in README.md docs/GUIDE.md docs/ARCHITECTURE.md docs/FORMAT.md; do
  [[ -f $f ]] && install -m 0644 "$f" "$root/usr/share/doc/cairn/"
done
cat > "$root/usr/share/doc/cairn/copyright" <<'TEXT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: cairn
License: AGPL-3.0-or-later
Files: *
License: AGPL-3.0-or-later
 On Debian systems, the GNU Affero General Public License version 3 is not in
 /usr/share/common-licenses; see https://www.gnu.org/licenses/agpl-3.0.txt
TEXT

install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<TEXT
Package: cairn
Version: $version
Architecture: $arch
Maintainer: cairn developers <cairn@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.36), libvirt0 (>= 9.0), qemu-utils, openssh-client
Recommends: libvirt-daemon-system, qemu-system-x86
Suggests: qemu-guest-agent
Section: admin
Priority: optional
Description: host-level, agentless backup and replication for QEMU/KVM VMs
 cairn backs up whole virtual machines from the hypervisor host through
 libvirt: every disk, the VM's configuration and its checkpoints, into one
 deduplicated, encrypted repository (a folder, S3 or Azure Blob), with
 incremental-forever backups, app-consistent points through the guest agent,
 boot verification with screenshots, instant and file-level recovery.
 .
 The cairn-server unit runs the director: backup jobs on schedules, a REST
 API and a web console.
TEXT
# A new unit is made known to systemd; it is not enabled: the operator makes a token first.
cat > "$root/DEBIAN/postinst" <<'TEXT'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
TEXT
cat > "$root/DEBIAN/postrm" <<'TEXT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
TEXT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/cairn_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
