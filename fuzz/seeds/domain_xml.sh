#!/usr/bin/env bash
# Seeds for the domain_xml fuzz target: real libvirt documents of a test guest (scripts/guest.sh):
# its persistent and live domain XML, one of its checkpoints, and the persistent XML as a
# tampered repository could hold it (QEMU namespace, a foreign emulator, a host disk, a shared
# host folder, a second <devices>; NIC scripts, logs, fw_cfg files and other host paths). Needs libvirtd and the test guest; writes fuzz/corpus/domain_xml.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=fuzz/corpus/domain_xml
name=cairn-fuzzseed-$$
trap 'scripts/guest.sh remove "$name" >/dev/null 2>&1 || true' EXIT
mkdir -p "$out"
scripts/guest.sh define "$name" --two-disks --wait
virsh -q dumpxml "$name" > "$out/live.xml"
virsh -q dumpxml "$name" --inactive > "$out/persistent.xml"
virsh -q checkpoint-create-as "$name" cp1 --description "cairn repository 0123abcd" >/dev/null
virsh -q checkpoint-dumpxml "$name" cp1 --no-domain > "$out/checkpoint.xml"
virsh -q checkpoint-dumpxml "$name" cp1 > "$out/checkpoint-with-domain.xml"
virsh -q checkpoint-delete "$name" cp1 --metadata >/dev/null
sed -e "s|<domain type='qemu'>|<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>|" \
    -e "s|<emulator>[^<]*</emulator>|<emulator>/tmp/evil/qemu</emulator><disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdz'/></disk><filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem><hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>|" \
    -e "s|</domain>|<qemu:commandline><qemu:arg value='-fw_cfg'/><qemu:arg value='name=opt/x,string=y'/></qemu:commandline><devices><emulator>/tmp/evil2</emulator></devices></domain>|" \
    "$out/persistent.xml" > "$out/tampered-two-devices.xml"
sed -e 's|<devices><emulator>/tmp/evil2</emulator></devices>||' "$out/tampered-two-devices.xml" > "$out/tampered.xml"
# What the second review found reaching the host: a NIC script, logs, fw_cfg files, a static
# security label, host boot files, host media, evdev input, a TPM passthrough, a pipe console.
sed -e "s|<os>|<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel><sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo><os>|" \
    -e "s|</os>|<dtb>/boot/x.dtb</dtb><loader type='pflash'>/tmp/evil.fd</loader><nvram template='/etc/shadow'>/etc/passwd</nvram><acpi><table type='slic'>/etc/shadow</table></acpi></os>|" \
    -e "s|<serial type='file'>|<interface type='ethernet'><script path='/tmp/up.sh'/></interface><disk type='block' device='cdrom'><source dev='/dev/sda'/><target dev='hdc'/></disk><serial type='pty'><log file='/etc/cron.d/x'/><target port='1'/></serial><parallel type='pipe'><source path='/tmp/fifo'/></parallel><input type='evdev'><source dev='/dev/input/event0'/></input><tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm><serial type='file'>|" \
    "$out/persistent.xml" > "$out/reaches-host.xml"
ls -l "$out"
