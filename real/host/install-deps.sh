#!/usr/bin/env bash
# Installs the Debian packages that ftvm's real executor, demo and tests need, and the
# unprivileged user QEMU runs as.
# Idempotent: packages already present are left alone. Needs root (apt-get).
set -euo pipefail

packages=(
  qemu-system-x86   # the hypervisor we protect (stock, unpatched)
  busybox-static    # guest initramfs userland
  cpio              # packs the initramfs
  gcc libc6-dev     # builds the static guest service
  iproute2          # ip netns / veth / bridge for the local host pair
  nftables          # nft: segment loss on real-host scenario links (numgen drop rules)
  curl              # drives the guest service by hand
  lz4 binutils      # the guest build unpacks and inspects kernel modules
  procps            # pgrep/ps for scripts
  iputils-ping      # reachability checks in topology tests
  fonts-dejavu-core # the font of the benchmark plots (ftvm bench ... writes PNGs)
  mmdebstrap        # the database guest's Debian root (real/guest/build-db.sh)
  e2fsprogs         # mkfs.ext4 -d: its disk image, without loop mounts
  mariadb-client    # checks the database guest from the host (boot-test-db.sh)
  sysbench          # OLTP load on the database guest (boot-test-db.sh)
  qemu-utils        # qemu-img: the tests inspect replica disks as a user would
  etcd-server       # etcd: the etcd witness tests start a real 3-member cluster
  protobuf-compiler # protoc: the etcd client crate generates its gRPC code at build time
  libprotobuf-dev   # the well-known .proto files (descriptor.proto) that etcd's protos import
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing packages ${missing[*]} and not root; run as root" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# QEMU drops to this user once its machine is set up (`ftvm primary|backup --qemu-user auto`):
# a system user with no login and no home, used for nothing else.
if ! id -u ftvm-qemu >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: no user ftvm-qemu and not root; QEMU will keep running as root" >&2
  else
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ftvm-qemu
    echo "install-deps: created the user ftvm-qemu for QEMU" >&2
  fi
fi
echo "install-deps: ok" >&2
