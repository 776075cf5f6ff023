#!/bin/busybox sh
# /init of the ftvm database guest's initramfs: loads the virtio modules (block, network), mounts
# the root disk read-write and hands over to /sbin/ftvm-init on it (which configures eth0 and runs
# MariaDB). Nothing here survives switch_root except the kernel state it set up (modules).
#
# Kernel command line parameters (the last occurrence wins):
#   ftvm.root=DEV   root block device (default /dev/vda: the first virtio-blk device)

/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "ftvm-initrd: $*"; }
# PID 1 must not exit: on a fatal error say why, then end the VM (panic=-1 + -no-reboot).
fatal() {
    say "FATAL: $*"
    echo o >/proc/sysrq-trigger 2>/dev/null
    poweroff -f
    while :; do sleep 3600; done
}

for m in $(cat /lib/modules/load.list); do
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done

root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ftvm.root=*) root=${arg#ftvm.root=} ;;
    esac
done

# The disk appears when virtio_blk probes it; give a slow (emulated) boot a moment.
tries=0
while [ ! -b "$root" ] && [ $tries -lt 100 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
[ -b "$root" ] || fatal "no $root (no virtio-blk device attached?)"
mount -t ext4 -o rw,noatime "$root" /newroot || fatal "cannot mount $root (ext4)"
[ -x /newroot/sbin/ftvm-init ] || fatal "$root has no /sbin/ftvm-init"

# ftvm-init mounts its own proc and sys; keep /dev (devtmpfs) for it.
mount --move /dev /newroot/dev
umount /sys
umount /proc
exec switch_root /newroot /sbin/ftvm-init
