#!/usr/bin/env bash
# The main job on a fresh machine, as root: installs what is missing, builds ftvm and the demo
# guest, then runs `ftvm demo` — a primary+backup pair protecting a demo VM in network
# namespaces, a client driving its service, a kill -9 of the primary and the failover.
# Extra arguments go to `ftvm demo` (see `ftvm demo --help`); with `--workload db` the guest is
# the database guest (real/guest/build-db.sh: MariaDB on a replicated disk) and the client runs
# sysbench plus a commit checker.
set -euo pipefail
cd "$(dirname "$0")/../.."

build=real/guest/build.sh
prev=
for a in "$@"; do
  if [[ $a == --workload=db || ($prev == --workload && $a == db) ]]; then
    build=real/guest/build-db.sh
  fi
  prev=$a
done

bash real/host/install-deps.sh
guest_dir=$(bash "$build" | tail -n 1)
cargo build --release -p ftvm -p ftvm-preload
exec target/release/ftvm demo --guest-dir "$guest_dir" "$@"
