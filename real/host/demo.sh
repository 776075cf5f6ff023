#!/usr/bin/env bash
# The main job on a fresh machine, as root: installs what is missing, builds ftvm and the demo
# guest, then runs `ftvm demo` — a primary+backup pair protecting a demo VM in network
# namespaces, a client driving its service, a kill -9 of the primary and the failover.
# Extra arguments go to `ftvm demo` (see `ftvm demo --help`).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash real/host/install-deps.sh
guest_dir=$(bash real/guest/build.sh | tail -n 1)
cargo build --release -p ftvm -p ftvm-preload
exec target/release/ftvm demo --guest-dir "$guest_dir" "$@"
