# Shared by build.sh (the small guest) and build-db.sh (the database guest): package checks, the
# kernel package, module dependency resolution, PVH kernel extraction and the initramfs /dev
# entries. Sourced, never run. The caller sets log_prefix (e.g. guest-build) before sourcing.
#
# add_module expects these globals: moddir (the unpacked kernel's /lib/modules/<version>), work
# (a scratch directory), rootfs (the initramfs tree, with lib/modules/) and kernel_pkg.

log() { echo "${log_prefix:-guest-build}: $*" >&2; }
die() {
  echo "${log_prefix:-guest-build}: error: $*" >&2
  exit 1
}

# --- packages ---------------------------------------------------------------------------------

apt_updated=
apt_update_once() {
  [[ -n $apt_updated ]] && return 0
  log "apt-get update"
  apt-get update -qq >&2 || die "apt-get update failed"
  apt_updated=1
}

ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) -eq 0 ]] || die "missing packages ${missing[*]}; install them or run as root"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
    apt_update_once
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
      die "apt-get install ${missing[*]} failed"
  fi
}

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# The concrete kernel package (linux-image-<abi>-cloud-amd64) and its candidate version.
resolve_kernel() {
  kernel_pkg=${FTVM_GUEST_KERNEL_PKG:-}
  if [[ -z $kernel_pkg ]]; then
    kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
      sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
    if [[ -z $kernel_pkg ]]; then
      apt_update_once
      kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
    fi
    [[ -n $kernel_pkg ]] || die "apt knows no linux-image-cloud-amd64 (is this Debian 12 amd64?)"
  fi
  kernel_version=$(apt-cache policy "$kernel_pkg" 2>/dev/null | sed -n 's/^ *Candidate: //p')
  [[ -n $kernel_version && $kernel_version != "(none)" ]] ||
    die "no installable version of $kernel_pkg in apt's lists"
}

# --- building blocks --------------------------------------------------------------------------

# Prints the modules a .ko depends on (its .modinfo "depends=" entry), one per line.
module_depends() {
  tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n 1 | tr ',' '\n' | sed '/^$/d'
}

# Copies a module, decompressed, to $2 (Debian 12 ships plain .ko; later releases compress).
copy_module() {
  case $1 in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -qdc "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) die "unknown module format: $1" ;;
  esac
}

# Adds module $1 and, first, its dependencies to load_order (depth first, each once).
declare -A module_seen=()
load_order=()
add_module() {
  local name=${1//-/_} file dep
  [[ -n ${module_seen[$name]:-} ]] && return 0
  module_seen[$name]=1
  file=$(find "$moddir/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) | head -n 1)
  if [[ -z $file ]]; then
    if grep -Eq "/(${name}|${name//_/-})\.ko\$" "$moddir/modules.builtin"; then
      log "module $name is built into the kernel"
      return 0
    fi
    die "module $name not found in $kernel_pkg"
  fi
  copy_module "$file" "$work/mod.tmp"
  for dep in $(module_depends "$work/mod.tmp"); do
    add_module "$dep"
  done
  copy_module "$file" "$rootfs/lib/modules/$name.ko"
  load_order+=("$name")
}

# Extracts the kernel ELF (vmlinux) from a bzImage into $2, if it can be booted through PVH (its
# Xen PHYS32_ENTRY note, type 0x12). QEMU then loads it directly and the guest skips decompressing
# itself, which under TCG costs ~0.3-0.6 s of every boot. Returns 1 if not possible.
extract_pvh_kernel() {
  local bz=$1 out=$2 magic tool off
  local -a specs=('\x02\x21\x4c\x18|lz4 -dc' '\x28\xb5\x2f\xfd|zstd -qdc'
    '\xfd\x37\x7a\x58\x5a\x00|xz -dc' '\x1f\x8b\x08|gzip -dc')
  for spec in "${specs[@]}"; do
    magic=${spec%%|*}
    tool=${spec#*|}
    command -v "${tool%% *}" >/dev/null || continue
    for off in $(grep -obUaP "$magic" "$bz" | cut -d : -f 1 | head -n 5); do
      # Trailing bytes after the payload make the decompressor complain: judge the output.
      tail -c +$((off + 1)) "$bz" | $tool >"$out" 2>/dev/null || true
      if readelf -h "$out" 2>/dev/null | grep -q 'Type:.*EXEC' &&
        readelf -n "$out" 2>/dev/null | grep -q 'note type: (0x00000012)'; then
        return 0
      fi
    done
  done
  rm -f "$out"
  return 1
}

# Writes a newc cpio archive holding /dev and /dev/console, so the kernel can open the console
# for /init before devtmpfs is mounted (GNU cpio can only archive nodes that exist, which would
# need mknod and root).
dev_archive() {
  local ino=900000
  newc() { # name mode rdevmajor rdevminor
    local name=$1 namesize=$((${#1} + 1)) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
      "$ino" "$2" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    ((pad)) && head -c "$pad" /dev/zero
    ino=$((ino + 1))
  }
  newc dev $((0040755)) 0 0
  newc dev/console $((0020600)) 5 1
  newc TRAILER!!! 0 0 0
}
