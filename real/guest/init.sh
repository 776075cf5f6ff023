#!/bin/busybox sh
# /init of the ftvm test guest (busybox initramfs, no root disk): loads the virtio modules, configures
# eth0 from the kernel command line, then runs ftvm-guestd, which prints FTVM-GUEST-READY on the
# serial console once it listens. PID 1 must never exit (the kernel would panic), so the service
# is restarted if it ever dies — loudly, since its RAM state is lost then.
#
# Kernel command line parameters (the last occurrence wins):
#   ftvm.ip=A.B.C.D/N   eth0 address (default 10.0.2.15/24, QEMU's user-mode network)
#   ftvm.gw=A.B.C.D     default route (default: 10.0.2.2 with the default address, else none)
#   ftvm.port=P         service port (default 80)
#   ftvm.dirty=N        pages per second the dirtier rewrites from boot on (default 0)
#   ftvm.dirtymb=M      size of the dirtier's buffer in MiB (default 64)
#   ftvm.dirtymode=scatter|seq   page order of the dirtier (default scatter)
#   ftvm.diskwrite=N|max  ftvm-diskwriter writes N 4 KiB blocks per second (max: unpaced) to
#                       /dev/vda from boot on, a pattern the host can verify (default 0: off)
#   ftvm.diskblocks=N   the writer cycles over the first N blocks only (default: the whole disk)

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "ftvm-init: $*"; }

for m in $(cat /lib/modules/load.list); do
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done

ip=10.0.2.15/24
gw=
gw_set=
port=80
dirty=0
dirtymb=64
dirtymode=scatter
diskwrite=0
diskblocks=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ftvm.ip=*) ip=${arg#ftvm.ip=} ;;
        ftvm.gw=*) gw=${arg#ftvm.gw=}; gw_set=1 ;;
        ftvm.port=*) port=${arg#ftvm.port=} ;;
        ftvm.dirty=*) dirty=${arg#ftvm.dirty=} ;;
        ftvm.dirtymb=*) dirtymb=${arg#ftvm.dirtymb=} ;;
        ftvm.dirtymode=*) dirtymode=${arg#ftvm.dirtymode=} ;;
        ftvm.diskwrite=*) diskwrite=${arg#ftvm.diskwrite=} ;;
        ftvm.diskblocks=*) diskblocks=${arg#ftvm.diskblocks=} ;;
    esac
done
if [ -z "$gw_set" ] && [ "$ip" = 10.0.2.15/24 ]; then
    gw=10.0.2.2
fi

ip link set lo up
# The NIC appears when virtio_net probes it; give a slow (emulated) boot a moment.
tries=0
while [ ! -e /sys/class/net/eth0 ] && [ $tries -lt 50 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
if [ -e /sys/class/net/eth0 ]; then
    ip addr add "$ip" dev eth0 || say "bad ftvm.ip=$ip"
    ip link set eth0 up
    if [ -n "$gw" ]; then
        ip route add default via "$gw" || say "bad ftvm.gw=$gw"
    fi
    say "eth0 $(cat /sys/class/net/eth0/address) $ip gw ${gw:-none}"
else
    say "no eth0 (no virtio-net device?); serving on loopback only"
fi

if [ "$diskwrite" != 0 ]; then
    # virtio_blk probes the disk asynchronously, like the NIC above.
    tries=0
    while [ ! -b /dev/vda ] && [ $tries -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    if [ -b /dev/vda ]; then
        /bin/ftvm-diskwriter -r "$diskwrite" -n "$diskblocks" /dev/vda &
        say "disk writer started on /dev/vda ($diskwrite blocks/s)"
    else
        say "ftvm.diskwrite=$diskwrite but no /dev/vda (no virtio-blk device?)"
    fi
fi

while :; do
    /bin/ftvm-guestd -p "$port" -d "$dirty" -m "$dirtymb" -M "$dirtymode"
    say "ftvm-guestd exited with status $?; restarting (its state is lost)"
    sleep 1
done
