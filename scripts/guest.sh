#!/usr/bin/env bash
# guest.sh - tiny Linux test guests for cairn, built in seconds and run by libvirt under TCG.
#
#   scripts/guest.sh build                 kernel + initramfs + base disks into $CAIRN_GUEST_DIR
#   scripts/guest.sh define NAME [--no-agent] [--two-disks] [--network NET] [--kvm] [--start] [--wait]
#                    [--cairn-agent [MODE]] [--lun PORT]
#                                          copy the base disks to $CAIRN_VM_DIR/NAME and define
#                                          (and start) a libvirt domain NAME; --cairn-agent adds
#                                          cairn's agent (channel org.cairn.agent.0, the binary
#                                          appended to the initramfs; MODE: its --misbehave),
#                                          --lun a disk only the guest sees: nbd-client in the
#                                          guest connects through QEMU's user network (restrict=on,
#                                          one guestfwd) to a qemu-nbd on 127.0.0.1:PORT, export
#                                          "lun" (ext4, label glun), wrapped by the agent as
#                                          cairn-lun0 and mounted on /lun
#   scripts/guest.sh agent                 build the static cairn-agent (target/agent/...)
#   scripts/guest.sh wait NAME [SECONDS]   wait until the guest agent answers (or the serial
#                                          console says GUEST-READY when the guest has no agent)
#   scripts/guest.sh exec NAME CMD...      run a shell command in the guest through the agent,
#                                          print its output (needs the agent)
#   scripts/guest.sh remove NAME           destroy + undefine the domain (checkpoints too), delete its disks
#   scripts/guest.sh current               exit 0 if the built guest is of this script's format
#
# The guest: a Debian kernel (apt-get download, never installed), an initramfs with busybox-static
# and qemu-guest-agent, an ext4 data disk (vda: ext4 in 0..192 MiB, a raw scratch area
# 192..256 MiB for writes of known bytes at known offsets) and, with --two-disks, a GPT disk (vdb:
# p1 64 MiB Linux swap in use by the guest, p2 ext4). The guest appends one fsync'ed line per
# second to /data/writer.log (and /lun/writer.log with --lun; paused while /run/writer.pause
# exists, and by the fsfreeze hook). A LUN image: `scripts/guest.sh lun FILE` (64 MiB qcow2).
# Environment: CAIRN_GUEST_DIR (default /var/lib/cairn-test/guest), CAIRN_VM_DIR
# (default /var/lib/cairn-test/vms), LIBVIRT_DEFAULT_URI (default qemu:///system).
# Needs: busybox-static qemu-guest-agent qemu-utils cpio fdisk e2fsprogs kmod xz-utils binutils libvirt-clients
set -euo pipefail

GUEST_DIR=${CAIRN_GUEST_DIR:-/var/lib/cairn-test/guest}
VM_DIR=${CAIRN_VM_DIR:-/var/lib/cairn-test/vms}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}

TOP=$(cd "$(dirname "$0")/.." && pwd)
# Bumped when build() changes what a guest holds: setup.sh rebuilds an older one.
FORMAT=2
AGENT_BIN=${CAIRN_AGENT_BIN:-$TOP/target/agent/x86_64-unknown-linux-gnu/release/cairn-agent}

die() { echo "guest.sh: $*" >&2; exit 1; }

# cairn-agent, static (glibc's static libc: the musl target is not installable here), in its own
# target folder so that the main build's flags are untouched. A no-op when it is current.
agent() {
  [ -n "${CAIRN_AGENT_BIN:-}" ] && { [ -x "$AGENT_BIN" ] || die "CAIRN_AGENT_BIN=$AGENT_BIN is not a program"; return 0; }
  (cd "$TOP" && RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=$TOP/target/agent \
     cargo build -q -p cairn-agent --release --target x86_64-unknown-linux-gnu) || die "building cairn-agent failed"
  file -L "$AGENT_BIN" 2>/dev/null | grep -q 'static' || ! command -v file >/dev/null || die "$AGENT_BIN is not static"
}

build() {
  local T0=$SECONDS out=$GUEST_DIR cache=$GUEST_DIR/cache
  mkdir -p "$cache"
  local b; for b in busybox qemu-ga cpio sfdisk mkfs.ext4 mkswap qemu-img depmod modprobe dpkg readelf xz; do
    command -v $b >/dev/null || [ -x /usr/sbin/$b ] || [ -x /sbin/$b ] || die "missing tool $b: run scripts/setup.sh"
  done
  local busybox qga; busybox=$(command -v busybox); qga=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
  ldd "$busybox" >/dev/null 2>&1 && die "$busybox is not static: apt-get install busybox-static"

  # Kernel: the package linux-image-amd64 points at, unpacked, not installed.
  local kpkg kdeb kx kver
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 (apt-get update?)"
  kdeb=$(ls "$cache"/${kpkg}_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$kdeb" ]; then
    (cd "$cache" && apt-get download "$kpkg" >/dev/null) || die "apt-get download $kpkg failed"
    kdeb=$(ls "$cache"/${kpkg}_*.deb | head -1)
  fi
  kx=$cache/kpkg
  if [ ! -f "$kx/.done-$(basename "$kdeb")" ]; then
    rm -rf "$kx"; mkdir -p "$kx"; dpkg -x "$kdeb" "$kx"; touch "$kx/.done-$(basename "$kdeb")"
  fi
  kver=$(ls "$kx/lib/modules" | head -1)
  [ -f "$kx/lib/modules/$kver/modules.dep" ] || depmod -b "$kx" "$kver"
  # The uncompressed ELF has a PVH entry note: QEMU boots it directly, skipping the in-guest XZ
  # decompressor, which halves a TCG boot.
  if [ ! -s "$cache/vmlinux-$kver" ]; then
    local off
    off=$(python3 -c "import sys;d=open(sys.argv[1],'rb').read();print(d.find(b'\xfd7zXZ\x00'))" "$kx/boot/vmlinuz-$kver")
    tail -c +$((off+1)) "$kx/boot/vmlinuz-$kver" | xz -dc --single-stream > "$cache/vmlinux-$kver" 2>/dev/null || true
  fi
  if readelf -n "$cache/vmlinux-$kver" 2>/dev/null | grep -q 'Unknown note type: (0x00000012)'; then
    cp "$cache/vmlinux-$kver" "$out/kernel"
  else
    cp "$kx/boot/vmlinuz-$kver" "$out/kernel"
  fi

  # Initramfs: busybox, qemu-ga and its libraries, the modules that are not built in, /init.
  local r=$cache/root; rm -rf "$r"
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc/qemu,proc,sys,dev,run,tmp,data,data2,lib64,var,root}
  ln -s ../run "$r/var/run"
  cp "$busybox" "$r/bin/busybox"
  cp "$qga" "$r/usr/sbin/qemu-ga"
  ldd "$qga" | awk '/=>/ && $3 ~ /^\// {print $3} /^[ \t]*\/lib64\// {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$r$(dirname "$lib")"; cp -L "$lib" "$r$lib"
  done
  : > "$r/etc/modules.order"
  local m ko rel
  for m in virtio_pci virtio_blk virtio_console ext4 crc32c_generic bochs; do
    modprobe -d "$kx" -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}' | while read -r ko; do
      rel=${ko#$kx/lib/modules/$kver/}
      grep -qxF "$rel" "$r/etc/modules.order" || echo "$rel" >> "$r/etc/modules.order"
      mkdir -p "$r/lib/modules/$kver/$(dirname "$rel")"; cp "$ko" "$r/lib/modules/$kver/$rel"
    done
  done
  # Loaded only by guests with cairn's agent or a LUN: device-mapper snapshots, zram for their
  # copy-on-write space, the NBD client and the NIC it goes through.
  : > "$r/etc/modules.extra"
  for m in virtio_net nbd dm_snapshot zram; do
    modprobe -d "$kx" -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}' | while read -r ko; do
      rel=${ko#$kx/lib/modules/$kver/}
      grep -qxF "$rel" "$r/etc/modules.order" "$r/etc/modules.extra" || echo "$rel" >> "$r/etc/modules.extra"
      mkdir -p "$r/lib/modules/$kver/$(dirname "$rel")"; cp "$ko" "$r/lib/modules/$kver/$rel"
    done
  done
  # nbd-client (busybox has none): Debian's, unpacked with the one library this host lacks, and
  # the libraries it links copied like qemu-ga's.
  local nx=$cache/nbd
  if [ ! -x "$nx/usr/sbin/nbd-client" ] && [ ! -x "$nx/sbin/nbd-client" ]; then
    rm -rf "$nx"; mkdir -p "$nx"
    (cd "$cache" && rm -f nbd-client_*.deb libnl-genl-3-200_*.deb && apt-get download nbd-client libnl-genl-3-200 >/dev/null) \
      || die "apt-get download nbd-client libnl-genl-3-200 failed"
    for deb in "$cache"/nbd-client_*.deb "$cache"/libnl-genl-3-200_*.deb; do dpkg -x "$deb" "$nx"; done
  fi
  local nbdc=$nx/sbin/nbd-client; [ -x "$nbdc" ] || nbdc=$nx/usr/sbin/nbd-client
  cp "$nbdc" "$r/usr/sbin/nbd-client"
  LD_LIBRARY_PATH=$nx/lib/x86_64-linux-gnu:$nx/usr/lib/x86_64-linux-gnu ldd "$nbdc" \
    | awk '/=>/ && $3 ~ /^\// {print $3} /^[ \t]*\/lib64\// {print $1}' | sort -u | while read -r lib; do
    local dest=${lib#$nx}
    mkdir -p "$r$(dirname "$dest")"; cp -L "$lib" "$r$dest"
  done
  echo "$kver" > "$r/etc/kver"
  cat > "$r/etc/qemu/fsfreeze-hook" <<'HOOK'
#!/bin/sh
# qemu-ga runs this with "freeze" before FIFREEZE and "thaw" after FITHAW: where a real guest
# quiesces its databases. Here it pauses the writer and logs the event.
ts=$(cut -d' ' -f1 /proc/uptime)
case "$1" in
  freeze) touch /run/writer.pause; echo "$ts freeze" >> /run/freeze-events.log; sync;;
  thaw)   rm -f /run/writer.pause; echo "$ts thaw" >> /run/freeze-events.log;;
esac
exit 0
HOOK
  chmod +x "$r/etc/qemu/fsfreeze-hook"
  cat > "$r/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run
exec 0</dev/console 1>/dev/console 2>&1
KVER=$(cat /etc/kver)
for ko in $(cat /etc/modules.order); do insmod /lib/modules/$KVER/$ko 2>/dev/null; done
LUN=$(sed -n 's/.*cairn\.lun=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$LUN" ] || [ -x /usr/sbin/cairn-agent ]; then
  for ko in $(cat /etc/modules.extra); do insmod /lib/modules/$KVER/$ko 2>/dev/null; done
fi
i=0; while [ $i -lt 50 ] && [ ! -b /dev/vda ]; do sleep 0.1; i=$((i+1)); done
hostname cairn-guest
D=$(findfs LABEL=gdata 2>/dev/null || true); [ -n "$D" ] && mount -t ext4 -o noatime "$D" /data
D=$(findfs LABEL=gdata2 2>/dev/null || true); [ -n "$D" ] && mount -t ext4 -o noatime "$D" /data2
D=$(findfs LABEL=gswap 2>/dev/null || true); [ -n "$D" ] && swapon "$D"
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/vport*; do
  [ -e "$p/name" ] && ln -sf /dev/$(basename $p) /dev/virtio-ports/$(cat $p/name)
done
if [ -n "$LUN" ]; then
  # cairn.lun=IP:PORT:EXPORT: a disk the host cannot see, reached from inside the guest.
  mkdir -p /lun
  ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
  IFS=: read -r lip lport lexp <<EOF2
$LUN
EOF2
  nbd-client "$lip" "$lport" /dev/nbd0 -N "$lexp" >/run/nbd-client.log 2>&1 \
    || nbd-client "$lip" "$lport" /dev/nbd0 -N "$lexp" -nonetlink >>/run/nbd-client.log 2>&1
  i=0; while [ $i -lt 50 ] && [ "$(cat /sys/block/nbd0/size 2>/dev/null)" = 0 ]; do sleep 0.1; i=$((i+1)); done
  if [ -x /usr/sbin/cairn-agent ]; then
    cairn-agent wrap /dev/nbd0 lun0 >/run/lun.dev 2>>/run/nbd-client.log && mount -t ext4 -o noatime "$(cat /run/lun.dev)" /lun
  else
    mount -t ext4 -o noatime /dev/nbd0 /lun
  fi
fi
if [ -x /usr/sbin/cairn-agent ]; then
  cairn-agent serve $(cat /etc/cairn-agent.args 2>/dev/null) >/run/cairn-agent.log 2>&1 &
fi
if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
  qemu-ga -d -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
          -F/etc/qemu/fsfreeze-hook -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log
fi
if grep -q ' /data ' /proc/mounts; then
  ( n=$(wc -l < /data/writer.log 2>/dev/null || echo 0)
    while :; do
      if [ ! -e /run/writer.pause ]; then
        n=$((n+1)); echo "seq=$n uptime=$(cut -d' ' -f1 /proc/uptime)" >> /data/writer.log
        grep -q ' /lun ' /proc/mounts && echo "seq=$n uptime=$(cut -d' ' -f1 /proc/uptime)" >> /lun/writer.log
        sync
      fi
      sleep 1
    done ) &
  echo $! > /run/writer.pid
fi
banner() {
  echo "=================================================="
  echo "  CAIRN TEST GUEST READY   (kernel $KVER)"
  echo "  uptime: $(cut -d' ' -f1 /proc/uptime)s"
  echo "  /data: $(df -h /data 2>/dev/null | awk 'NR==2{print $1" "$2" used "$3}')"
  echo "=================================================="
}
banner > /dev/tty0 2>/dev/null
banner
echo "GUEST-READY"
while :; do setsid cttyhack sh; sleep 1; done
INIT
  chmod +x "$r/init"
  (cd "$r" && find . -print0 | cpio --null -o -H newc --quiet -R 0:0) | gzip -1 > "$out/initramfs.img"

  # vda: whole-disk ext4 (lazy init off, or ext4lazyinit keeps dirtying bitmaps) + raw scratch tail.
  local pf=$cache/prefill; rm -rf "$pf"; mkdir -p "$pf/docs"
  echo "cairn test guest data disk, built $(date -u)" > "$pf/README.txt"
  head -c 4M /dev/urandom > "$pf/random-4M.bin"
  for i in $(seq 1 20); do echo "document $i" > "$pf/docs/doc$i.txt"; done
  : > "$pf/writer.log"
  rm -f "$cache/data.raw"
  mkfs.ext4 -q -F -L gdata -E lazy_itable_init=0,lazy_journal_init=0 -d "$pf" "$cache/data.raw" 192M
  truncate -s 256M "$cache/data.raw"
  rm -f "$out/data.qcow2"; qemu-img convert -f raw -O qcow2 "$cache/data.raw" "$out/data.qcow2"; rm -f "$cache/data.raw"

  # vdb: GPT, p1 swap (used by the guest), p2 ext4. Partitions are built as files and copied in
  # at the sfdisk offsets: no loop devices needed.
  local d=$cache/swapdisk.raw s1 n1 s2 n2; rm -f "$d"; truncate -s 256M "$d"
  sfdisk -q "$d" <<'SF'
label: gpt
start=2048, size=64MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name="swap"
type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="data2"
SF
  read -r s1 n1 < <(sfdisk -d "$d" | awk -F'[=,]' '/swapdisk.raw1/{gsub(/ /,""); print $2, $4}')
  read -r s2 n2 < <(sfdisk -d "$d" | awk -F'[=,]' '/swapdisk.raw2/{gsub(/ /,""); print $2, $4}')
  rm -f "$cache/p1" "$cache/p2"
  truncate -s $((n1*512)) "$cache/p1"; mkswap -q -L gswap "$cache/p1" >/dev/null
  mkdir -p "$cache/prefill2"; echo "second disk, partition 2" > "$cache/prefill2/README.txt"
  truncate -s $((n2*512)) "$cache/p2"
  mkfs.ext4 -q -F -L gdata2 -E lazy_itable_init=0,lazy_journal_init=0 -d "$cache/prefill2" "$cache/p2"
  dd if="$cache/p1" of="$d" bs=512 seek=$s1 conv=notrunc,sparse status=none
  dd if="$cache/p2" of="$d" bs=512 seek=$s2 conv=notrunc,sparse status=none
  rm -f "$cache/p1" "$cache/p2" "$out/swapdisk.qcow2"
  qemu-img convert -f raw -O qcow2 "$d" "$out/swapdisk.qcow2"; rm -f "$d"
  printf '%s\nformat=%s\n' "$kver" "$FORMAT" > "$out/VERSION"
  echo "guest built in $((SECONDS-T0)) s: $out (kernel $kver)"
}

define() {
  local name=$1; shift
  local agent=1 two=0 start=0 wait=0 accel=qemu net="" cagent=0 misbehave="" lun=""
  while [ $# -gt 0 ]; do
    case $1 in
      --no-agent) agent=0;; --two-disks) two=1;; --start) start=1;; --wait) start=1; wait=1;;
      --network) net=$2; shift;;
      --cairn-agent) cagent=1; case ${2:-} in ""|--*) ;; *) misbehave=$2; shift;; esac;;
      --lun) lun=$2; shift;;
      --kvm) accel=kvm;; *) die "define: unknown option $1";;
    esac; shift
  done
  current || build
  local dir=$VM_DIR/$name
  mkdir -p "$dir"
  # The initrd: the base one, plus (--cairn-agent) a second cpio archive with the agent; the
  # kernel unpacks both.
  local initrd=$GUEST_DIR/initramfs.img
  if [ $cagent = 1 ]; then
    agent
    local x=$dir/agent-root; rm -rf "$x"; mkdir -p "$x/usr/sbin" "$x/etc"
    cp "$AGENT_BIN" "$x/usr/sbin/cairn-agent"; strip "$x/usr/sbin/cairn-agent" 2>/dev/null || true
    [ -n "$misbehave" ] && echo "--misbehave $misbehave" > "$x/etc/cairn-agent.args"
    { cat "$GUEST_DIR/initramfs.img"; (cd "$x" && find . -print0 | cpio --null -o -H newc --quiet -R 0:0 | gzip -1); } > "$dir/initramfs.img"
    rm -rf "$x"; initrd=$dir/initramfs.img
  fi
  local cmdline="console=tty0 console=ttyS0 panic=-1 loglevel=4"
  [ -n "$lun" ] && cmdline="$cmdline cairn.lun=10.0.2.100:10809:lun"
  cp --sparse=always "$GUEST_DIR/data.qcow2" "$dir/vda.qcow2"
  [ $two = 1 ] && cp --sparse=always "$GUEST_DIR/swapdisk.qcow2" "$dir/vdb.qcow2"
  local cpu="<cpu mode='maximum' check='none'/>"
  [ $accel = kvm ] && cpu="<cpu mode='host-passthrough'/>"
  {
    echo "<domain type='$accel' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    echo "  <name>$name</name>"
    echo "  <memory unit='MiB'>256</memory>"
    echo "  <vcpu>1</vcpu>"
    echo "  <os><type arch='x86_64' machine='q35'>hvm</type>"
    echo "    <kernel>$GUEST_DIR/kernel</kernel><initrd>$initrd</initrd>"
    echo "    <cmdline>$cmdline</cmdline></os>"
    echo "  $cpu"
    echo "  <on_reboot>destroy</on_reboot>"
    echo "  <devices>"
    echo "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$dir/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>"
    [ $two = 1 ] && echo "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$dir/vdb.qcow2'/><target dev='vdb' bus='virtio'/></disk>"
    [ -n "$net" ] && echo "    <interface type='network'><source network='$net'/><model type='virtio'/></interface>"
    [ $agent = 1 ] && echo "    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    [ $cagent = 1 ] && echo "    <channel type='unix'><target type='virtio' name='org.cairn.agent.0'/></channel>"
    echo "    <serial type='file'><source path='$dir/serial.log'/><target port='0'/></serial>"
    echo "    <video><model type='vga'/></video>"
    echo "    <memballoon model='none'/>"
    echo "  </devices>"
    if [ -n "$lun" ]; then
      # libvirt 9.0 has no XML for slirp's restrict/guestfwd: QEMU arguments. The guest reaches
      # nothing but the one forward to the LUN's server on the host's loopback.
      echo "  <qemu:commandline>"
      echo "    <qemu:arg value='-netdev'/>"
      echo "    <qemu:arg value='user,id=lun,restrict=on,net=10.0.2.0/24,guestfwd=tcp:10.0.2.100:10809-tcp:127.0.0.1:$lun'/>"
      echo "    <qemu:arg value='-device'/>"
      echo "    <qemu:arg value='virtio-net-pci,netdev=lun,bus=pcie.0,addr=0x10'/>"
      echo "  </qemu:commandline>"
    fi
    echo "</domain>"
  } > "$dir/domain.xml"
  virsh -q define "$dir/domain.xml" >/dev/null
  if [ $start = 1 ]; then : > "$dir/serial.log"; virsh -q start "$name" >/dev/null; fi
  if [ $wait = 1 ]; then wait_ready "$name"; fi
  return 0
}

wait_ready() {
  local name=$1 limit=${2:-60} t0=$SECONDS
  while (( SECONDS - t0 < limit )); do
    if virsh dumpxml "$name" | grep -q "org.qemu.guest_agent.0"; then
      virsh -q qemu-agent-command "$name" '{"execute":"guest-ping"}' --timeout 2 >/dev/null 2>&1 && return 0
    else
      grep -q GUEST-READY "$VM_DIR/$name/serial.log" 2>/dev/null && return 0
    fi
    sleep 0.3
  done
  die "$name not ready after ${limit}s (serial log: $VM_DIR/$name/serial.log)"
}

guest_exec() {
  local name=$1; shift
  local cmd=$* pid out
  cmd=${cmd//\\/\\\\}; cmd=${cmd//\"/\\\"}
  out=$(virsh -q qemu-agent-command "$name" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$cmd\"],\"capture-output\":true}}")
  pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' <<<"$out")
  for _ in $(seq 1 600); do
    out=$(virsh -q qemu-agent-command "$name" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
    if grep -q '"exited":true' <<<"$out"; then
      sed -n 's/.*"out-data":"\([^"]*\)".*/\1/p' <<<"$out" | base64 -d
      local code; code=$(sed -n 's/.*"exitcode":\([0-9]*\).*/\1/p' <<<"$out")
      return "${code:-0}"
    fi
    sleep 0.1
  done
  die "guest command timed out: $cmd"
}

remove() {
  local name=$1
  if virsh -q dominfo "$name" >/dev/null 2>&1; then
    virsh -q destroy "$name" >/dev/null 2>&1 || true
    virsh -q undefine "$name" --checkpoints-metadata --managed-save --snapshots-metadata >/dev/null 2>&1 \
      || virsh -q undefine "$name" >/dev/null
  fi
  rm -rf "${VM_DIR:?}/$name"
}

current() { grep -qx "format=$FORMAT" "$GUEST_DIR/VERSION" 2>/dev/null; }

# A LUN image: ext4 (label glun) with a few files, 64 MiB, qcow2.
lun_image() {
  local file=$1 pf; pf=$(mktemp -d)
  echo "a LUN only the guest sees" > "$pf/README.txt"
  head -c 2M /dev/urandom > "$pf/random-2M.bin"
  : > "$pf/writer.log"
  rm -f "$file.raw"
  mkfs.ext4 -q -F -L glun -E lazy_itable_init=0,lazy_journal_init=0 -d "$pf" "$file.raw" 64M
  qemu-img convert -f raw -O qcow2 "$file.raw" "$file"; rm -rf "$file.raw" "$pf"
}

cmd=${1:-}; shift || true
case $cmd in
  build) build;;
  define) [ $# -ge 1 ] || die "define NAME [options]"; define "$@";;
  wait) [ $# -ge 1 ] || die "wait NAME [SECONDS]"; wait_ready "$@";;
  exec) [ $# -ge 2 ] || die "exec NAME CMD..."; guest_exec "$@";;
  remove) [ $# -ge 1 ] || die "remove NAME"; remove "$1";;
  agent) agent;;
  current) current;;
  lun) [ $# -ge 1 ] || die "lun FILE"; lun_image "$1";;
  -h|--help|help|"") sed -n '2,36p' "$0";;
  *) die "unknown command $cmd (try --help)";;
esac
