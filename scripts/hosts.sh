#!/usr/bin/env bash
# Several libvirt "hosts" on this one machine, for the cluster tests (issue 14): each host is
# its own network, mount and UTS namespace with its own /etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt (bind mounts of
# $CNS_STATE/hosts/<h>/...), its own host UUID and hostname, its own virtlogd and libvirtd
# listening on qemu+tcp (auth none: test hosts only) at $CNS_NET.1 (a), .2 (b), .3 (c), joined
# by the bridge cns-br on which the root namespace is $CNS_NET.254. Each host also runs its own
# sshd on port 22 of its address, which takes the key $CNS_STATE/ssh/id_ed25519 for root: the
# transport of qemu+ssh:// URIs and of cairn's remote backups, as on a real host;
# $CNS_STATE/ssh/known_hosts holds the hosts' keys. $CNS_STATE/shared is the
# same folder on every host (shared storage). The system libvirtd is never touched.
#
#   scripts/hosts.sh up [HOST...]     default: a b (a b c for three); idempotent
#   scripts/hosts.sh down [--purge]   stops every host (guests destroyed first), removes the
#                                     namespaces, veths and bridge; --purge also their state
#   scripts/hosts.sh exec HOST CMD... runs CMD inside a host (nsenter: `ip netns exec` would
#                                     make a fresh mount namespace and lose its /run/libvirt)
#
# Measured facts behind the settings (QEMU as root without a security driver, no cgroup
# controllers, a private libvirtd pid file, migration_host): docs/ARCHITECTURE.md, "Several hosts".
# Host c (CNS_STOCK_HOSTS) runs QEMU as a stock Debian host does: as libvirt-qemu, with libvirt's
# ownership changes and its default security driver.
set -euo pipefail
NET=${CNS_NET:-10.77.0}
S=${CNS_STATE:-/var/lib/cairn-test/hosts}
PIN=/run/cairn-ns
BR=cns-br
GUEST_SRC=${CAIRN_GUEST_DIR:-/var/lib/cairn-test/guest}   # built by scripts/guest.sh build
HERE=$(cd "$(dirname "$0")" && pwd)

in_host() { local h=$1; shift; nsenter --net=/run/netns/cns-$h --mount=$PIN/$h.mnt --uts=$PIN/$h.uts -- "$@"; }

down() (
set +e
T0=$(date +%s.%N)
alive_in() { ip netns pids "cns-$1" 2>/dev/null; }
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cns-[a-z]$'); do
  h=${ns#cns-}
  if [ -e $PIN/$h.mnt ] && findmnt -rn -M $PIN/$h.mnt >/dev/null 2>&1; then
    for dom in $(timeout 20 nsenter --net=/run/netns/$ns --mount=$PIN/$h.mnt -- virsh -q list --name 2>/dev/null); do
      timeout 30 nsenter --net=/run/netns/$ns --mount=$PIN/$h.mnt -- virsh -q destroy "$dom" >/dev/null 2>&1 || true
    done
  fi
  pids=$(alive_in "$h")
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
  for i in $(seq 1 50); do [ -z "$(alive_in "$h")" ] && break; sleep 0.2; done
  pids=$(alive_in "$h"); [ -n "$pids" ] && { echo "kill -9 $pids"; kill -KILL $pids 2>/dev/null; sleep 0.5; }
  ip netns del "$ns"
  ip link del "cns-$h" 2>/dev/null || true
  echo "host $h: stopped"
done
for f in $PIN/*.mnt $PIN/*.uts; do
  [ -e "$f" ] || continue
  findmnt -rn -M "$f" >/dev/null 2>&1 && umount "$f"
  rm -f "$f"
done
findmnt -rn -M $PIN >/dev/null 2>&1 && umount $PIN
rmdir $PIN 2>/dev/null || true
ip link del $BR 2>/dev/null || true
rm -rf "$S"/hosts/*/run
if [ "${1:-}" = --purge ]; then rm -rf "$S/hosts" "$S/shared"; fi
echo "teardown done in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
)

up() {
HOSTS=${*:-a b}
STOCK=${CNS_STOCK_HOSTS:-c}   # hosts whose QEMU runs unprivileged, as on a stock host

die() { echo "hosts.sh up: $*" >&2; exit 1; }
ts() { date +%s.%N; }
el() { awk -v a="$1" -v b="$(ts)" 'BEGIN{printf "%.1f", b-a}'; }
ip_of() { case $1 in a) echo "$NET.1";; b) echo "$NET.2";; c) echo "$NET.3";; *) die "host must be a, b or c";; esac; }
uuid_of() { case $1 in a) echo 0c0a0000-0000-4000-8000-00000000000a;; b) echo 0c0b0000-0000-4000-8000-00000000000b;; c) echo 0c0c0000-0000-4000-8000-00000000000c;; esac; }
ssh_opts() { echo "-i $S/ssh/id_ed25519 -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"; }
ns_up() { [ -e /run/netns/cns-$1 ] && findmnt -rn -M "$PIN/$1.mnt" >/dev/null 2>&1; }
pid_alive() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null &&
  ip netns pids "cns-$2" 2>/dev/null | grep -qx "$p"; }   # alive AND inside this host's netns

[ "$(id -u)" = 0 ] || die "needs root"
for b in ip nsenter unshare findmnt libvirtd virtlogd virsh qemu-img /usr/sbin/sshd ssh-keygen; do command -v $b >/dev/null || die "missing $b"; done
T0=$(ts)

# ---- shared folders + guest files (copied, the project's build dir is only read)
mkdir -p "$S/shared" "$S/guest" "$S/hosts"
if [ ! -s "$S/guest/initramfs.img" ]; then
  if [ ! -s "$GUEST_SRC/initramfs.img" ]; then
    echo "building the tiny guest into $S/guest with scripts/guest.sh build"
    CAIRN_GUEST_DIR=$S/guest bash "$HERE/guest.sh" build >/dev/null
  else
    cp --sparse=always "$GUEST_SRC"/{kernel,initramfs.img,data.qcow2} "$S/guest/"
  fi
fi

# ---- a stock host's /dev/kvm is root:kvm 0660 (Debian's udev rule), which its unprivileged
# QEMU (libvirt-qemu, in group kvm) relies on. Some machines have it 0600: libvirt then finds
# its cached QEMU capabilities invalid at every start and probes QEMU again (a minute on 2 cores).
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
  for h in $HOSTS; do
    if [[ " $STOCK " == *" $h "* ]]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; break; fi
  done
fi

# ---- the SSH key that every host takes for root (test hosts only), and sshd's privilege
# separation folder (/run is shared by the hosts)
mkdir -p "$S/ssh" /run/sshd; chmod 700 "$S/ssh"
[ -s "$S/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C cairn-test-hosts -f "$S/ssh/id_ed25519"
cp -f "$S/ssh/id_ed25519.pub" "$S/ssh/authorized_keys"

# ---- root side of the network: a bridge with $NET.254
r=$(ip -4 route show "$NET.0/24")
if [ -n "$r" ] && ! grep -q "dev $BR" <<<"$r"; then die "$NET.0/24 is already routed ($r): set CNS_NET"; fi
ip link show $BR >/dev/null 2>&1 || ip link add $BR type bridge
ip addr replace "$NET.254/24" dev $BR
ip link set $BR up

# ---- pin directory: must be a private mount, or pinning a mount ns there fails (EINVAL)
mkdir -p $PIN
if ! findmnt -rn -M $PIN >/dev/null; then mount --bind $PIN $PIN; fi
mount --make-private $PIN

for h in $HOSTS; do
  ip=$(ip_of "$h"); d=$S/hosts/$h
  # ---- per-host state folders and config
  mkdir -p "$d"/{etc/qemu/autostart,etc/storage/autostart,etc/secrets,etc/nwfilter,etc/hooks,run,lib/images,lib/qemu,lib/boot,cache/qemu/capabilities,log/qemu}
  chmod 700 "$d/etc/secrets"
  for f in libvirt.conf libvirt-admin.conf virtlockd.conf qemu-lockd.conf; do
    [ -f "/etc/libvirt/$f" ] && cp -f "/etc/libvirt/$f" "$d/etc/$f"; done
  cat > "$d/etc/libvirtd.conf" <<EOF
# cairn-ns host $h (generated by setup-hosts.sh)
listen_tls = 0
listen_tcp = 1
listen_addr = "$ip"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_dir = "/run/libvirt"
host_uuid = "$(uuid_of "$h")"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat > "$d/etc/virtlogd.conf" <<EOF
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOF
  if [[ " $STOCK " == *" $h "* ]]; then
    # QEMU as the distribution runs it: its own unprivileged user (libvirt-qemu), libvirt
    # changing the ownership of what a VM uses, the default security driver.
    qemu_user=""
  else
    qemu_user='user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"'
  fi
  cat > "$d/etc/qemu.conf" <<EOF
# cairn-ns host $h (generated by hosts.sh)
$qemu_user
cgroup_controllers = [ ]
migration_address = "$ip"
migration_host = "$ip"
EOF
  mkdir -p "$d/ssh"
  [ -s "$d/ssh/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/ssh/host_key"
  # Stock settings otherwise (MaxSessions 10, no ClientAliveInterval): what cairn meets on a host.
  cat > "$d/ssh/sshd_config" <<EOF
# cairn-ns host $h (generated by hosts.sh)
ListenAddress $ip
HostKey $d/ssh/host_key
PidFile /run/libvirt/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $S/ssh/authorized_keys
StrictModes no
UsePAM no
AllowStreamLocalForwarding yes
EOF
  printf '127.0.0.1 localhost\n%s cns-%s\n' "$ip" "$h" > "$d/hosts"
  for o in a b c; do [ "$o" = "$h" ] || printf '%s cns-%s\n' "$(ip_of $o)" "$o" >> "$d/hosts"; done
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "$d/resolv.conf"
  # QEMU capability cache: same binaries, same kernel -> reuse the system daemon's probe results
  # (libvirtd re-validates them and re-probes if anything differs). Saves ~15 s per host on 2 cores.
  if [ -z "$(ls "$d/cache/qemu/capabilities" 2>/dev/null)" ] && [ -z "${CNS_NO_CAPS_CACHE:-}" ]; then
    cp /var/cache/libvirt/qemu/capabilities/*.xml "$d/cache/qemu/capabilities/" 2>/dev/null || true
  fi

  # ---- network namespace + veth onto the bridge
  if [ ! -e /run/netns/cns-$h ]; then
    ip netns add cns-$h
    rm -rf "$d/run"; mkdir -p "$d/run"        # fresh host: no stale sockets / pid files
  fi
  if ! ip -n cns-$h link show eth0 >/dev/null 2>&1; then
    ip link del cns-$h 2>/dev/null || true
    ip link add cns-$h type veth peer name eth0 netns cns-$h
  fi
  ip link set cns-$h master $BR up
  ip -n cns-$h addr replace "$ip/24" dev eth0
  ip -n cns-$h link set lo up
  ip -n cns-$h link set eth0 up

  # ---- mount + uts namespaces, pinned by bind mounts on files in $PIN
  if ! ns_up "$h"; then
    touch $PIN/$h.mnt $PIN/$h.uts
    nsenter --net=/run/netns/cns-$h unshare --mount=$PIN/$h.mnt --uts=$PIN/$h.uts --propagation private \
      sh -ec '
        d=$1; h=$2
        for m in /etc/libvirt:etc /run/libvirt:run /var/lib/libvirt:lib /var/cache/libvirt:cache /var/log/libvirt:log; do
          mkdir -p "${m%%:*}"; mount --bind "$d/${m#*:}" "${m%%:*}"
        done
        mount --bind "$d/hosts" /etc/hosts
        mount --bind "$d/resolv.conf" /etc/resolv.conf
        mount -t sysfs sysfs /sys 2>/dev/null || true    # /sys/class/net of this netns (cosmetic)
        hostname "cns-$h"' sh "$d" "$h"
  fi

  # ---- daemons (inside the host: their /run/libvirt is the private one)
  if ! pid_alive "$d/run/virtlogd.pid" "$h"; then
    in_host "$h" virtlogd -d -f /etc/libvirt/virtlogd.conf -p /run/libvirt/virtlogd.pid
  fi
  if ! pid_alive "$d/run/libvirtd.pid" "$h"; then
    in_host "$h" libvirtd -d --listen -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid
  fi
  if ! pid_alive "$d/run/sshd.pid" "$h"; then
    in_host "$h" /usr/sbin/sshd -f "$d/ssh/sshd_config" -E "$d/log/sshd.log"
  fi
done

# ---- known_hosts with every host's key, for URIs that check them (known_hosts=$S/ssh/known_hosts)
for h in a b c; do
  [ -s "$S/hosts/$h/ssh/host_key.pub" ] && printf '%s %s\n' "$(ip_of "$h")" "$(cut -d' ' -f1,2 "$S/hosts/$h/ssh/host_key.pub")"
done > "$S/ssh/known_hosts"

for h in $HOSTS; do
  uri=qemu+tcp://$(ip_of "$h")/system
  for i in $(seq 1 600); do
    virsh -q -c "$uri" uri >/dev/null 2>&1 && break
    [ $i = 600 ] && die "libvirtd on $h does not answer on $uri (see $S/hosts/$h/log/libvirtd.log)"
    sleep 0.1
  done
  for i in $(seq 1 100); do
    ssh -q $(ssh_opts) -o ConnectTimeout=2 root@"$(ip_of "$h")" true && break
    [ $i = 100 ] && die "sshd on $h does not answer (see $S/hosts/$h/log/sshd.log)"
    sleep 0.1
  done
  echo "$h: $uri  host uuid $(virsh -c "$uri" capabilities | sed -n 's:.*<uuid>\(.*\)</uuid>.*:\1:p' | head -1)  hostname $(virsh -c "$uri" hostname)"
done
echo "up in $(el "$T0") s"
}

case ${1:-} in
  up) shift; up "$@";;
  down) shift; down "$@";;
  exec) h=$2; shift 2; in_host "$h" "$@";;
  *) sed -n 2,20p "$0" >&2; exit 2;;
esac
