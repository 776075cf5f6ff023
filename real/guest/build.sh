#!/usr/bin/env bash
# Builds the ftvm test guest: Debian's cloud kernel (downloaded and unpacked, not installed) and a
# busybox initramfs that loads the virtio modules, configures eth0 and runs ftvm-guestd (our small
# static HTTP counter service, see service/) and, if asked, ftvm-diskwriter (diskwriter/). Debian packages and our own C sources only.
#
# Output: a directory holding vmlinuz, initrd.img and cmdline (default kernel arguments). Its path
# is the LAST line on stdout; everything else goes to stderr. The directory is cached under
# ${FTVM_CACHE:-/var/cache/ftvm}/guest/<inputs hash>/ and reused until an input changes: this
# script, lib.sh (the functions it shares with build-db.sh), init.sh, service/*, diskwriter/*,
# the kernel package version, busybox-static's and gcc's versions.
#
# Environment:
#   FTVM_CACHE             cache root (default /var/cache/ftvm)
#   FTVM_GUEST_KERNEL_PKG  kernel package (default: what linux-image-cloud-amd64 depends on)
#   FTVM_GUEST_KERNEL_FORMAT  pvh (default: uncompressed ELF, falls back to bzImage) or bzimage
#   FTVM_GUEST_TSC_KHZ     TSC rate for the guest's tsc_early_khz= (default: measured here)
#   FTVM_GUEST_REBUILD=1   rebuild even if a cached build matches
#
# The measured TSC rate makes a build specific to this host's CPU (the cache is machine-local).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${FTVM_CACHE:-/var/cache/ftvm}/guest
# Modules the guest needs (their dependencies are added from the modules' own metadata):
# virtio-mmio transport (microvm's devices), the network card and the disk (/dev/vda, present
# only when the VM is given one).
root_modules=(virtio_mmio virtio_net virtio_blk)
# Default kernel arguments (tsc_early_khz=<this host's TSC rate> is added at build time, see
# tools/tsc-khz.c). tsc=reliable keeps the clocksource watchdog from swapping the TSC for
# jiffies, which lose ticks under TCG. The rest only shortens the boot (~15% of its CPU time):
# no crypto self-tests, no audit, no LSMs — nothing this throwaway guest needs. pci=off: microvm
# has no PCI; it only silences a "PCI: Fatal" line.
cmdline="console=ttyS0 quiet panic=-1 pci=off tsc=reliable cryptomgr.notests audit=0 apparmor=0 security=none"

log_prefix=guest-build
# shellcheck source=lib.sh
source "$here/lib.sh"

# --- main -------------------------------------------------------------------------------------

# lz4: Debian 12's kernels are LZ4-compressed bzImages (see extract_pvh_kernel); binutils: readelf.
ensure_packages busybox-static cpio gcc libc6-dev binutils lz4
resolve_kernel
kernel_format_wanted=${FTVM_GUEST_KERNEL_FORMAT:-pvh}
[[ $kernel_format_wanted == pvh || $kernel_format_wanted == bzimage ]] ||
  die "FTVM_GUEST_KERNEL_FORMAT must be pvh or bzimage, not '$kernel_format_wanted'"
busybox=$(dpkg -L busybox-static | grep -m 1 '/busybox$') || die "busybox-static has no busybox binary"

key=$(
  {
    cat "$here/build.sh" "$here/lib.sh" "$here/init.sh"
    for d in service diskwriter tools; do
      (cd "$here/$d" && for f in $(find . -maxdepth 1 -type f | LC_ALL=C sort); do echo "== $d/$f"; cat "$f"; done)
    done
    echo "kernel $kernel_pkg $kernel_version $kernel_format_wanted"
    echo "busybox-static $(pkg_version busybox-static)"
    echo "gcc $(gcc -dumpfullversion) libc6-dev $(pkg_version libc6-dev)"
  } | sha256sum | cut -c 1-16
)
out=$cache/$key

if [[ -z ${FTVM_GUEST_REBUILD:-} && -f $out/stamp ]]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache" || die "cannot create $cache"
# One build at a time; whoever waited may find the work done.
exec 9>"$cache/.lock"
flock 9
if [[ -z ${FTVM_GUEST_REBUILD:-} && -f $out/stamp ]]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
dest=$work/out
mkdir -p "$rootfs"/{bin,lib/modules} "$dest" "$cache/debs"

# Kernel: download once (kept in the cache), unpack, never install.
deb=$cache/debs/${kernel_pkg}_${kernel_version//:/%3a}_amd64.deb
if [[ ! -f $deb ]]; then
  log "downloading $kernel_pkg $kernel_version"
  # As root apt drops to the _apt user for downloads, which cannot write here: stay root.
  (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$kernel_pkg=$kernel_version" >&2) ||
    die "apt-get download $kernel_pkg=$kernel_version failed"
  [[ -f $deb ]] || die "apt-get download did not produce $(basename "$deb")"
fi
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/kernel" || die "cannot unpack $deb"
vmlinuz=$(find "$work/kernel/boot" -name 'vmlinuz-*' | head -n 1)
[[ -n $vmlinuz ]] || die "$deb has no /boot/vmlinuz-*"
moddir=$(find "$work/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[[ -n $moddir ]] || die "$deb has no /lib/modules/<version>"
if [[ $kernel_format_wanted == pvh ]] && extract_pvh_kernel "$vmlinuz" "$dest/vmlinuz"; then
  kernel_format="ELF vmlinux (PVH entry)"
else
  cp "$vmlinuz" "$dest/vmlinuz"
  kernel_format=bzImage
fi
log "kernel: $kernel_format"

for m in "${root_modules[@]}"; do
  add_module "$m"
done
rm -f "$work/mod.tmp"
printf '%s\n' "${load_order[@]}" >"$rootfs/lib/modules/load.list"
log "modules: ${load_order[*]}"

# Userland: busybox (static), /init, and the service built static by the host's gcc.
cp "$busybox" "$rootfs/bin/busybox"
cp "$here/init.sh" "$rootfs/init"
chmod 755 "$rootfs/init" "$rootfs/bin/busybox"
log "compiling ftvm-guestd"
gcc -static -O2 -s -pthread -Wall -Wextra -o "$rootfs/bin/ftvm-guestd" \
  "$here"/service/*.c >&2 || die "compiling the guest service failed"
log "compiling ftvm-diskwriter"
gcc -static -O2 -s -Wall -Wextra -o "$rootfs/bin/ftvm-diskwriter" \
  "$here"/diskwriter/diskwriter.c >&2 || die "compiling the disk writer failed"

# The initramfs stays uncompressed: decompressing it under TCG would only slow the boot.
(cd "$rootfs" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$dest/initrd.img" ||
  die "cpio failed"
dev_archive >>"$dest/initrd.img"

# Under TCG the guest's TSC runs at the host's rate; telling the guest kernel that rate skips its
# calibration against the emulated PIT, which fails on a loaded host and then hangs the boot.
tsc_khz=${FTVM_GUEST_TSC_KHZ:-}
if [[ -z $tsc_khz ]]; then
  gcc -O2 -o "$work/tsc-khz" "$here/tools/tsc-khz.c" >&2 || die "compiling tools/tsc-khz.c failed"
  tsc_khz=$("$work/tsc-khz") || die "cannot measure the host's TSC rate (set FTVM_GUEST_TSC_KHZ)"
fi
[[ $tsc_khz =~ ^[0-9]+$ ]] || die "bad TSC rate '$tsc_khz' (kHz expected)"
log "host TSC ${tsc_khz} kHz"
echo "$cmdline tsc_early_khz=$tsc_khz" >"$dest/cmdline"
{
  echo "kernel $kernel_pkg $kernel_version ($(basename "$moddir")), $kernel_format"
  echo "busybox-static $(pkg_version busybox-static)"
  echo "modules ${load_order[*]}"
  echo "key $key"
} >"$dest/stamp"

rm -rf "$out"
mv "$dest" "$out"
# Older builds are dead weight (the kernel .deb stays, keyed by its version).
for d in "$cache"/*; do
  [[ -d $d && $d != "$out" && $(basename "$d") =~ ^[0-9a-f]{16}$ ]] && rm -rf "$d"
done
find "$cache/debs" -name '*.deb' ! -name "$(basename "$deb")" -delete
log "built $out ($(du -sh "$out" | cut -f 1))"
echo "$out"
