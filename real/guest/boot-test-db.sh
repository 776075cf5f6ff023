#!/usr/bin/env bash
# Boots the database guest (build-db.sh) under QEMU — microvm, RAM in a share=on file under
# /dev/shm, a private copy of disk.raw on virtio-blk (the cached image is never written), user-mode
# network with a forwarded port to 3306 — and checks it from the host:
#   - boot time: QEMU start to the FTVM-GUEST-READY line (printed once `mariadb-admin ping` works);
#   - sysbench oltp_read_write (1 table of --table-size rows) prepare, then run for --time seconds
#     with 1 thread: transactions per second and 95th percentile latency;
#   - durability: 20 rows with increasing ids are committed one by one, QEMU is killed (SIGKILL,
#     no shutdown) right after the last COMMIT returned, the guest is booted again from the same
#     disk copy and all 20 must be there (innodb_flush_log_at_trx_commit=1: COMMIT waits for the
#     disk);
#   - guest RAM QEMU touched (allocated part of the RAM file) after the load, and what QEMU read
#     during the run (a guest with too little RAM re-reads MariaDB's files from its disk).
# Each boot gets up to --tries tries; every failed try is logged with its reason. Exit status 0
# only if every boot came up and passed the checks.
#
# usage: boot-test-db.sh [--guest-dir DIR] [--ram-mb "512 256"] [--boots N] [--tries N]
#                        [--timeout SECONDS] [--time SECONDS] [--table-size N] [--accel tcg|kvm]
#                        [--log-dir DIR] [--append "ftvm.dbpool=32M ..."]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
qemu=${QEMU:-/usr/bin/qemu-system-x86_64}
guest_dir=
ram_sizes="512 256"
boots=1
tries=3
timeout_s=120
sb_time=10
table_size=1000
accel=tcg
log_dir=
extra_append=
marker=FTVM-GUEST-READY
db_user=sbtest
db_password=ftvm-sbtest

log() { echo "boot-test-db: $*" >&2; }
die() {
  echo "boot-test-db: error: $*" >&2
  exit 1
}

while (($#)); do
  case $1 in
    --guest-dir) guest_dir=$2; shift 2 ;;
    --ram-mb) ram_sizes=$2; shift 2 ;;
    --boots) boots=$2; shift 2 ;;
    --tries) tries=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --time) sb_time=$2; shift 2 ;;
    --table-size) table_size=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --append) extra_append=$2; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for n in "$boots" "$tries" "$timeout_s" "$sb_time" "$table_size" $ram_sizes; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"
done

for tool in sysbench mariadb; do
  command -v "$tool" >/dev/null || die "$tool is missing (bash real/host/install-deps.sh)"
done
[[ -x $qemu ]] || die "$qemu not found (apt-get install qemu-system-x86)"
if [[ -z $guest_dir ]]; then
  guest_dir=$(bash "$here/build-db.sh" | tail -n 1)
fi
for f in vmlinuz initrd.img cmdline disk.raw; do
  [[ -f $guest_dir/$f ]] || die "$guest_dir/$f missing (run build-db.sh)"
done
if [[ -z $log_dir ]]; then
  log_dir=$(mktemp -d /tmp/ftvm-boot-test-db.XXXXXX)
fi
mkdir -p "$log_dir"
ram_file=/dev/shm/ftvm-boot-test-db-$$.ram
disk=$log_dir/disk-$$.raw

qemu_pid=
stop_qemu() { # [signal]
  if [[ -n $qemu_pid ]]; then
    kill "-${1:-TERM}" "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=
  fi
}
cleanup() {
  stop_qemu KILL
  rm -f "$ram_file" "$disk"
}
trap cleanup EXIT

free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  die "no free local port found"
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Starts QEMU on the disk copy; sets qemu_pid. Args: ram_mb serial_log stderr_log port
start_qemu() {
  local ram_mb=$1 serial=$2 errlog=$3 port=$4
  rm -f "$ram_file" "$serial"
  # The small guest's command line (see README) plus the disk. The agents attach the disk from
  # their NBD export instead of a file (same virtio-blk-device, node name of their choice).
  "$qemu" -nodefaults -no-user-config -display none \
    -accel "$accel" -M microvm -cpu max -smp 1 -m "${ram_mb}M" \
    -object "memory-backend-file,id=mem,size=${ram_mb}M,mem-path=$ram_file,share=on" \
    -machine memory-backend=mem \
    -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.img" \
    -append "$(cat "$guest_dir/cmdline")${extra_append:+ $extra_append}" \
    -serial "file:$serial" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:3306" \
    -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56 \
    -blockdev "driver=file,node-name=disk0-file,filename=$disk" \
    -blockdev driver=raw,node-name=disk0,file=disk0-file \
    -device virtio-blk-device,drive=disk0 \
    -no-reboot \
    </dev/null >/dev/null 2>"$errlog" &
  qemu_pid=$!
}

# Waits for the marker. Sets result to "ready" or to the reason for failure.
wait_ready() {
  local serial=$1 errlog=$2 deadline=$(($(now_ms) + timeout_s * 1000)) st last
  while (($(now_ms) < deadline)); do
    if grep -q "$marker" "$serial" 2>/dev/null; then
      result=ready
      return 0
    fi
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
      wait "$qemu_pid" && st=0 || st=$?
      qemu_pid=
      result="QEMU exited with status $st: $(tail -c 300 "$errlog" | tr '\n' ' '); last console line: $(tail -n 1 "$serial" 2>/dev/null | tr -d '\r' | cut -c 1-160)"
      return 0
    fi
    sleep 0.05
  done
  last=$(tail -n 1 "$serial" 2>/dev/null | tr -d '\r' | cut -c 1-160)
  result="no $marker within ${timeout_s}s; last console line: ${last:-none}"
}

# Boots until ready (up to --tries). Args: ram_mb name. Sets port, boot_ms, guest_up or returns 1.
boot_guest() {
  local ram=$1 name=$2 t serial errlog start
  for t in $(seq "$tries"); do
    serial=$log_dir/$name-try$t.serial
    errlog=$log_dir/$name-try$t.stderr
    port=$(free_port)
    start=$(now_ms)
    start_qemu "$ram" "$serial" "$errlog" "$port"
    wait_ready "$serial" "$errlog"
    boot_ms=$(($(now_ms) - start))
    if [[ $result == ready ]]; then
      guest_up=$(grep -m 1 -o "$marker.*uptime=[0-9.]*" "$serial" | sed 's/.*uptime=//')
      # memtotal=... memavail=... mariadbd_rss=... (KiB) from the guest's own ready line.
      mem=$(grep -m 1 -o 'memtotal=[0-9]* memavail=[0-9]* mariadbd_rss=[0-9]*' "$serial" || true)
      log "ram=${ram}M $name try $t: ready after ${boot_ms} ms (guest uptime ${guest_up} s; KiB ${mem:-?})"
      return 0
    fi
    log "ram=${ram}M $name try $t FAILED after ${boot_ms} ms: $result (log $serial)"
    stop_qemu KILL
  done
  return 1
}

sql() { # port sql...
  local p=$1
  shift
  mariadb -h 127.0.0.1 -P "$p" -u "$db_user" -p"$db_password" --connect-timeout=20 -N -B -e "$*"
}

sb() { # port args...
  local p=$1
  shift
  sysbench oltp_read_write --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$p" \
    --mysql-user="$db_user" --mysql-password="$db_password" --mysql-db=sbtest \
    --tables=1 --table-size="$table_size" "$@"
}

failed=0
summary=()
for ram in $ram_sizes; do
  for b in $(seq "$boots"); do
    name=ram${ram}-boot$b
    rm -f "$disk"
    cp --sparse=always "$guest_dir/disk.raw" "$disk"
    chmod 0600 "$disk"
    if ! boot_guest "$ram" "$name"; then
      log "ram=${ram}M boot $b: no good boot in $tries tries"
      failed=$((failed + 1))
      summary+=("ram=${ram}M boot $b: FAILED to boot")
      continue
    fi
    first_boot_ms=$boot_ms
    problem=
    out=$(sql "$port" "SELECT CONCAT(VERSION(), ' pool=', @@innodb_buffer_pool_size DIV 1048576, 'M flush_at_commit=', @@innodb_flush_log_at_trx_commit)" 2>&1) ||
      problem="cannot query the server: $out"
    [[ -z $problem ]] && log "  server: $out"
    if [[ -z $problem ]]; then
      if ! out=$(sb "$port" prepare 2>&1); then
        problem="sysbench prepare failed: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
      elif ! rchar0=$(sed -n 's/^rchar: //p' "/proc/$qemu_pid/io") ||
        ! out=$(sb "$port" --time="$sb_time" --threads=1 run 2>&1); then
        problem="sysbench run failed: $(echo "$out" | tail -n 5 | tr '\n' ' ')"
      else
        echo "$out" >"$log_dir/$name.sysbench"
        tps=$(echo "$out" | sed -n 's/^ *transactions: *[0-9]* *(\([0-9.]*\) per sec.)/\1/p')
        p95=$(echo "$out" | sed -n 's/^ *95th percentile: *\([0-9.]*\)/\1/p')
        errs=$(echo "$out" | sed -n 's/^ *ignored errors: *\([0-9]*\).*/\1/p')
        # What QEMU read (the guest's disk reads, mostly): a guest whose page cache is too small
        # for MariaDB's binaries and data re-reads them all the time.
        read_mb=$((($(sed -n 's/^rchar: //p' "/proc/$qemu_pid/io") - rchar0) / 1048576))
        log "  sysbench oltp_read_write ${sb_time}s 1 thread: ${tps} tps, p95 ${p95} ms, ignored errors ${errs}; QEMU read ${read_mb} MiB meanwhile"
      fi
    fi
    touched_mb=$(($(du -k "$ram_file" | cut -f 1) / 1024))
    # Durability: commit rows with increasing ids (one transaction each, from one client), kill
    # the VM the moment the last COMMIT returned, boot again from the same disk: all must be there.
    if [[ -z $problem ]]; then
      inserts="CREATE TABLE IF NOT EXISTS ftvm.commits (id BIGINT PRIMARY KEY, at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB;"
      for _ in $(seq 20); do
        inserts+=" INSERT INTO ftvm.commits (id) SELECT COALESCE(MAX(id), 0) + 1 FROM ftvm.commits;"
      done
      if ! out=$(sql "$port" "$inserts SELECT CONCAT(COUNT(*), ' ', MAX(id)) FROM ftvm.commits" 2>&1); then
        problem="insert failed: $out"
      else
        want=$out
        stop_qemu KILL
        if ! boot_guest "$ram" "$name-after-kill"; then
          problem="no boot after the kill"
        elif ! got=$(sql "$port" "SELECT CONCAT(COUNT(*), ' ', MAX(id)) FROM ftvm.commits" 2>&1); then
          problem="reading back failed: $got"
        elif [[ $got != "$want" ]]; then
          problem="committed rows (count, max id) = $want, after kill -9 and reboot: '$got'"
        else
          log "  durability: ids 1..${want#* } committed (autocommit), QEMU killed, rebooted (ready after ${boot_ms} ms, InnoDB recovery included): all there"
        fi
      fi
    fi
    stop_qemu KILL
    if [[ -n $problem ]]; then
      log "ram=${ram}M boot $b CHECK FAILED: $problem (logs in $log_dir)"
      failed=$((failed + 1))
      summary+=("ram=${ram}M boot $b: FAILED: $problem")
      continue
    fi
    summary+=("ram=${ram}M boot $b: ready after ${first_boot_ms} ms (again after kill: ${boot_ms} ms); sysbench ${tps} tps, p95 ${p95} ms, ${read_mb} MiB read; guest RAM touched ${touched_mb} MiB; committed row survived kill -9")
  done
done

for s in "${summary[@]}"; do
  log "$s"
done
log "logs in $log_dir"
((failed == 0)) || die "$failed boot(s) failed"
log "ok"
