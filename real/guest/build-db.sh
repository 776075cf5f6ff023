#!/usr/bin/env bash
# Builds ftvm's database guest: the small guest's kernel (build.sh is run for it: same package,
# same PVH vmlinux, same default command line), a busybox initramfs that loads the virtio block
# and network modules, mounts /dev/vda and switch_roots into it, and disk.raw: a raw ext4 image of
# a minimal Debian 12 root (mmdebstrap --variant=minbase) with MariaDB, whose PID 1 is
# /sbin/ftvm-init (db/ftvm-init: network from the kernel command line, then mariadbd). The data
# directory is initialised at build time, with database sbtest and user sbtest (db/setup.sql).
#
# Output: a directory holding vmlinuz, initrd.img, disk.raw, cmdline and stamp. Its path is the
# LAST line on stdout; everything else goes to stderr. The directory is cached under
# ${FTVM_CACHE:-/var/cache/ftvm}/guest-db/<inputs hash>/ and reused until an input changes: this
# script, lib.sh, db/*, the kernel and command line build.sh produced, the versions of
# mariadb-server (apt's candidate), mmdebstrap, e2fsprogs and busybox-static, the disk size.
# Never write to the cached disk.raw: boot a copy or a copy-on-write overlay of it.
#
# Needs root (mmdebstrap's chroot, mariadb-install-db in it) and Debian's mirrors.
#
# Environment:
#   FTVM_CACHE               cache root (default /var/cache/ftvm)
#   FTVM_GUEST_DB_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   FTVM_GUEST_DB_DISK_MB    size of disk.raw in MiB (default 1024; the file is sparse)
#   FTVM_GUEST_REBUILD=1     rebuild even if a cached build matches (the small guest too)
#   (and build.sh's: FTVM_GUEST_KERNEL_PKG, FTVM_GUEST_KERNEL_FORMAT, FTVM_GUEST_TSC_KHZ)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${FTVM_CACHE:-/var/cache/ftvm}/guest-db
suite=bookworm
mirror=${FTVM_GUEST_DB_MIRROR:-http://deb.debian.org/debian}
security_mirror=${mirror%/debian}/debian-security
disk_mb=${FTVM_GUEST_DB_DISK_MB:-1024}
# Modules the initramfs loads (their dependencies are added from the modules' own metadata):
# virtio-mmio transport (microvm's devices), the disk, the network card, and ext4 (built into
# Debian's cloud kernel, as are jbd2, mbcache, crc16 and crc32c: add_module notes that and moves
# on, so a kernel that has them as modules still works).
root_modules=(virtio_mmio virtio_blk virtio_net ext4)

log_prefix=guest-db-build
# shellcheck source=lib.sh
source "$here/lib.sh"

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap, chroot)"
[[ $disk_mb =~ ^[1-9][0-9]*$ ]] || die "FTVM_GUEST_DB_DISK_MB must be a number of MiB"
ensure_packages mmdebstrap e2fsprogs busybox-static cpio

# The kernel, its default command line and the cached kernel package come from the small guest's
# build (cached: ~2 s when nothing changed).
log "building (or finding) the small guest for its kernel"
small=$(bash "$here/build.sh" | tail -n 1)
[[ -f $small/vmlinuz && -f $small/cmdline && -f $small/stamp ]] || die "build.sh gave no usable guest dir ('$small')"
read -r _ kernel_pkg kernel_version _ < <(grep -m 1 '^kernel ' "$small/stamp") ||
  die "$small/stamp names no kernel"
busybox=$(dpkg -L busybox-static | grep -m 1 '/busybox$') || die "busybox-static has no busybox binary"

mariadb_version=$(apt-cache policy mariadb-server 2>/dev/null | sed -n 's/^ *Candidate: //p')
if [[ -z $mariadb_version || $mariadb_version == "(none)" ]]; then
  apt_update_once
  mariadb_version=$(apt-cache policy mariadb-server 2>/dev/null | sed -n 's/^ *Candidate: //p')
fi
[[ -n $mariadb_version && $mariadb_version != "(none)" ]] || die "apt knows no mariadb-server"

key=$(
  {
    cat "$here/build-db.sh" "$here/lib.sh"
    (cd "$here/db" && for f in $(find . -maxdepth 1 -type f | LC_ALL=C sort); do echo "== db/$f"; cat "$f"; done)
    echo "kernel $kernel_pkg $kernel_version $(sha256sum <"$small/vmlinuz" | cut -c 1-16)"
    echo "cmdline $(cat "$small/cmdline")"
    echo "mariadb-server $mariadb_version suite $suite mirror $mirror disk $disk_mb"
    echo "mmdebstrap $(pkg_version mmdebstrap) e2fsprogs $(pkg_version e2fsprogs)"
    echo "busybox-static $(pkg_version busybox-static)"
  } | sha256sum | cut -c 1-16
)
out=$cache/$key

if [[ -z ${FTVM_GUEST_REBUILD:-} && -f $out/stamp ]]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache" || die "cannot create $cache"
exec 9>"$cache/.lock"
flock 9
if [[ -z ${FTVM_GUEST_REBUILD:-} && -f $out/stamp ]]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

t_start=$(date +%s)
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs=$work/initramfs
dest=$work/out
mkdir -p "$rootfs"/{bin,lib/modules} "$dest"

# --- kernel and initramfs -----------------------------------------------------------------------

cp "$small/vmlinuz" "$dest/vmlinuz"
cp "$small/cmdline" "$dest/cmdline"
deb=$(dirname "$small")/debs/${kernel_pkg}_${kernel_version//:/%3a}_amd64.deb
if [[ ! -f $deb ]]; then
  log "downloading $kernel_pkg $kernel_version (not in build.sh's cache)"
  (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kernel_pkg=$kernel_version" >&2) ||
    die "apt-get download $kernel_pkg=$kernel_version failed"
  deb=$work/${kernel_pkg}_${kernel_version//:/%3a}_amd64.deb
  [[ -f $deb ]] || die "apt-get download did not produce $(basename "$deb")"
fi
log "unpacking $(basename "$deb") for its modules"
dpkg-deb -x "$deb" "$work/kernel" || die "cannot unpack $deb"
moddir=$(find "$work/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[[ -n $moddir ]] || die "$deb has no /lib/modules/<version>"
for m in "${root_modules[@]}"; do
  add_module "$m"
done
rm -f "$work/mod.tmp"
printf '%s\n' "${load_order[@]}" >"$rootfs/lib/modules/load.list"
log "initramfs modules: ${load_order[*]}"
rm -rf "$work/kernel"

cp "$busybox" "$rootfs/bin/busybox"
cp "$here/db/init.sh" "$rootfs/init"
chmod 755 "$rootfs/init" "$rootfs/bin/busybox"
(cd "$rootfs" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$dest/initrd.img" ||
  die "cpio failed"
dev_archive >>"$dest/initrd.img"

# --- root file system ---------------------------------------------------------------------------

# Only Debian's own archives (not this host's other apt sources). Docs, man pages and locales are
# never unpacked (dpkg path-exclude); customize.sh removes the rest and sets MariaDB up.
log "mmdebstrap $suite minbase + mariadb-server $mariadb_version (a few minutes)"
t_deb=$(date +%s)
mmdebstrap --mode=root --variant=minbase --include=mariadb-server \
  --aptopt='Apt::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook="sh '$here/db/customize.sh' \"\$1\" '$here/db'" \
  "$suite" "$work/root" \
  "deb $mirror $suite main" \
  "deb $mirror $suite-updates main" \
  "deb $security_mirror $suite-security main" >&2 ||
  die "mmdebstrap failed"
log "root file system: $(du -sh "$work/root" | cut -f 1) in $(($(date +%s) - t_deb)) s"
# mmdebstrap's clean-up runs apt-get update with no sources; should its configuration ever be
# missing (a hook that empties the chroot's /tmp did that), it empties the HOST's apt lists.
if [[ $(apt-cache policy mariadb-server 2>/dev/null | sed -n 's/^ *Candidate: //p') != "$mariadb_version" ]]; then
  log "warning: the host's apt lists are empty after mmdebstrap; running apt-get update"
  apt-get update -qq >&2 || log "warning: apt-get update failed; run it by hand"
fi
installed=$(chroot "$work/root" dpkg-query -W -f='${Version}' mariadb-server) ||
  die "mariadb-server is not installed in the root"
[[ -x $work/root/sbin/ftvm-init && -d $work/root/var/lib/mysql/sbtest ]] ||
  die "the root has no /sbin/ftvm-init or no sbtest database (customize.sh failed?)"

# A sparse raw ext4 image filled from the directory (no loop mount). Inode tables and journal are
# initialised now, so the guest's kernel does not zero them in the background after every boot.
log "disk.raw: ext4, ${disk_mb} MiB"
truncate -s "${disk_mb}M" "$dest/disk.raw"
mkfs.ext4 -q -F -L ftvm-db -m 0 -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
  -d "$work/root" "$dest/disk.raw" >&2 || die "mkfs.ext4 -d failed"
rm -rf "$work/root"
chmod 0444 "$dest/disk.raw"

{
  echo "kernel $kernel_pkg $kernel_version (from $small)"
  echo "busybox-static $(pkg_version busybox-static)"
  echo "modules ${load_order[*]}"
  echo "mariadb-server $installed ($suite minbase, mmdebstrap $(pkg_version mmdebstrap))"
  echo "disk ${disk_mb} MiB, $(du -k "$dest/disk.raw" | cut -f 1) KiB allocated"
  echo "database sbtest, user sbtest@% password ftvm-sbtest, port 3306"
  echo "key $key"
} >"$dest/stamp"

rm -rf "$out"
mv "$dest" "$out"
# Older builds are dead weight (each holds a disk image).
for d in "$cache"/*; do
  [[ -d $d && $d != "$out" && $(basename "$d") =~ ^[0-9a-f]{16}$ ]] && rm -rf "$d"
done
log "built $out in $(($(date +%s) - t_start)) s ($(du -sh "$out" | cut -f 1) allocated)"
echo "$out"
