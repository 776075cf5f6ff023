#!/usr/bin/env bash
# Boots the test guest under QEMU (microvm, RAM in a share=on file under /dev/shm, user-mode
# network with a forwarded port) and checks its service with curl: /incr gives 1, 2, 3 over one
# kept-alive connection, the dirtying knob works, a malformed request gets a 400 and the service
# lives on. Measures the time from QEMU's start to the ready marker on the serial console.
#
# TCG boots can hang: each boot gets up to --tries tries, and every failed try is logged with its
# reason (no marker in time, QEMU exited, checks failed) — never hidden. Exit status 0 only if
# every boot came up (possibly after retries) and passed the checks.
#
# usage: boot-test.sh [--guest-dir DIR] [--ram-mb "256 1024"] [--boots N] [--tries N]
#                     [--timeout SECONDS] [--accel tcg|kvm] [--log-dir DIR]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
qemu=${QEMU:-/usr/bin/qemu-system-x86_64}
guest_dir=
ram_sizes="256 1024"
boots=3
tries=3
timeout_s=60
accel=tcg
log_dir=
marker=FTVM-GUEST-READY

log() { echo "boot-test: $*" >&2; }
die() {
  echo "boot-test: error: $*" >&2
  exit 1
}

while (($#)); do
  case $1 in
    --guest-dir) guest_dir=$2; shift 2 ;;
    --ram-mb) ram_sizes=$2; shift 2 ;;
    --boots) boots=$2; shift 2 ;;
    --tries) tries=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    --log-dir) log_dir=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for n in "$boots" "$tries" "$timeout_s" $ram_sizes; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"
done

command -v curl >/dev/null || die "curl is missing (apt-get install curl)"
if [[ ! -x $qemu ]]; then
  log "waiting for $qemu (being installed?)"
  for _ in $(seq 600); do
    [[ -x $qemu ]] && break
    sleep 1
  done
  [[ -x $qemu ]] || die "$qemu not found (apt-get install qemu-system-x86)"
fi
if [[ -z $guest_dir ]]; then
  guest_dir=$(bash "$here/build.sh" | tail -n 1)
fi
for f in vmlinuz initrd.img cmdline; do
  [[ -f $guest_dir/$f ]] || die "$guest_dir/$f missing (run build.sh)"
done
if [[ -z $log_dir ]]; then
  log_dir=$(mktemp -d /tmp/ftvm-boot-test.XXXXXX)
fi
mkdir -p "$log_dir"
ram_file=/dev/shm/ftvm-boot-test-$$.ram

qemu_pid=
stop_qemu() {
  if [[ -n $qemu_pid ]]; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=
  fi
  rm -f "$ram_file"
}
trap stop_qemu EXIT

# A free local TCP port for the forwarded service port.
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

# Starts QEMU; sets qemu_pid. Args: ram_mb serial_log stderr_log port
start_qemu() {
  local ram_mb=$1 serial=$2 errlog=$3 port=$4
  rm -f "$ram_file" "$serial"
  # The command line the real executor reuses (with -netdev stream instead of user).
  "$qemu" -nodefaults -no-user-config -display none \
    -accel "$accel" -M microvm -cpu max -smp 1 -m "${ram_mb}M" \
    -object "memory-backend-file,id=mem,size=${ram_mb}M,mem-path=$ram_file,share=on" \
    -machine memory-backend=mem \
    -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.img" \
    -append "$(cat "$guest_dir/cmdline")" \
    -serial "file:$serial" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:80" \
    -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56 \
    -no-reboot \
    </dev/null >/dev/null 2>"$errlog" &
  qemu_pid=$!
}

# Waits for the marker. Sets result to "ready" or to the reason for failure.
wait_ready() {
  local serial=$1 errlog=$2 deadline=$(($(now_ms) + timeout_s * 1000)) st
  while (($(now_ms) < deadline)); do
    if grep -q "$marker" "$serial" 2>/dev/null; then
      result=ready
      return 0
    fi
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
      wait "$qemu_pid" && st=0 || st=$?
      qemu_pid=
      result="QEMU exited with status $st: $(tail -c 300 "$errlog" | tr '\n' ' ')"
      return 0
    fi
    sleep 0.02
  done
  local last
  last=$(tail -n 1 "$serial" 2>/dev/null | tr -d '\r' | cut -c 1-160)
  result="no $marker within ${timeout_s}s; last console line: ${last:-none (quiet kernel: hung before /init)}"
}

# Checks the service through the forwarded port. Prints nothing if fine, else the failure.
check_service() {
  local port=$1 base="http://127.0.0.1:$1" out body
  # Three /incr on one connection: curl reuses it (num_connects is 0 after the first).
  out=$(curl -sS --max-time 20 -w '|%{num_connects}\n' "$base/incr" "$base/incr" "$base/incr" 2>&1) ||
    { echo "curl /incr failed: $out"; return 0; }
  [[ $(echo "$out" | tr -d '\n') == "1|12|03|0" ]] ||
    { echo "/incr x3 on one connection gave '$(echo "$out" | tr '\n' ' ')', want 1 2 3 with one connect"; return 0; }
  body=$(curl -sS --max-time 10 "$base/get") || { echo "curl /get failed"; return 0; }
  [[ $body == 3 ]] || { echo "/get gave '$body', want 3"; return 0; }

  body=$(curl -sS --max-time 10 "$base/dirty?pages=2000") || { echo "curl /dirty?pages= failed"; return 0; }
  [[ $body == 2000 ]] || { echo "/dirty?pages=2000 gave '$body'"; return 0; }
  body=$(curl -sS --max-time 10 "$base/dirty") || { echo "curl /dirty failed"; return 0; }
  [[ $body == 2000 ]] || { echo "/dirty gave '$body', want 2000"; return 0; }
  local w0 w1 t0 t1
  out=$(curl -sS --max-time 10 "$base/status") || { echo "curl /status failed"; return 0; }
  w0=$(echo "$out" | sed -n 's/^dirty_written=//p')
  t0=$(echo "$out" | sed -n 's/^uptime=//p')
  sleep 2
  out=$(curl -sS --max-time 10 "$base/status") || { echo "curl /status failed"; return 0; }
  w1=$(echo "$out" | sed -n 's/^dirty_written=//p')
  t1=$(echo "$out" | sed -n 's/^uptime=//p')
  # 2000 pages/s for the guest's elapsed time. A starved vCPU may lag (the dirtier drops backlog
  # over 1 s) or catch up a backlog from before the first sample (at most 1 s = 2000 pages).
  local want
  want=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 2000 }')
  if ((w1 - w0 < want / 2 || w1 - w0 > want + 2000 + 50)); then
    echo "dirtier wrote $((w1 - w0)) pages in $t0..$t1 s of guest time, want ~$want"
    return 0
  fi
  log "  dirtier: $((w1 - w0)) pages in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s guest time at 2000/s"
  body=$(curl -sS --max-time 10 "$base/dirty?pages=0") || { echo "curl /dirty?pages=0 failed"; return 0; }
  [[ $body == 0 ]] || { echo "/dirty?pages=0 gave '$body'"; return 0; }

  # A malformed request gets a 400, and the service still counts.
  out=$(
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'NOT HTTP AT ALL\r\n\r\n' >&3
    timeout 10 head -n 1 <&3 | tr -d '\r'
  ) || true
  [[ $out == "HTTP/1.1 400 Bad Request" ]] || { echo "malformed request got '$out', want a 400"; return 0; }
  body=$(curl -sS --max-time 10 "$base/incr") || { echo "curl /incr after a bad request failed"; return 0; }
  [[ $body == 4 ]] || { echo "/incr after a bad request gave '$body', want 4"; return 0; }
}

failed=0
hung=0
total_tries=0
summary=()
for ram in $ram_sizes; do
  times=()
  for b in $(seq "$boots"); do
    ok=
    for t in $(seq "$tries"); do
      total_tries=$((total_tries + 1))
      name=ram${ram}-boot$b-try$t
      serial=$log_dir/$name.serial
      errlog=$log_dir/$name.stderr
      port=$(free_port)
      start=$(now_ms)
      start_qemu "$ram" "$serial" "$errlog" "$port"
      wait_ready "$serial" "$errlog"
      elapsed=$(($(now_ms) - start))
      if [[ $result != ready ]]; then
        [[ $result == no* ]] && hung=$((hung + 1))
        log "ram=${ram}M boot $b try $t FAILED after ${elapsed} ms: $result (log $serial)"
        stop_qemu
        continue
      fi
      cpu_ms=$(awk '{ print ($14 + $15) * 10 }' "/proc/$qemu_pid/stat" 2>/dev/null || echo '?')
      guest_up=$(grep -m 1 -o 'uptime=[0-9.]*' "$serial" | cut -d = -f 2)
      log "ram=${ram}M boot $b try $t: ready after ${elapsed} ms (guest uptime ${guest_up} s, QEMU CPU ${cpu_ms} ms)"
      problem=$(check_service "$port")
      stop_qemu
      if [[ -n $problem ]]; then
        log "ram=${ram}M boot $b try $t CHECK FAILED: $problem (log $serial)"
        continue
      fi
      times+=("$elapsed")
      ok=1
      break
    done
    if [[ -z $ok ]]; then
      log "ram=${ram}M boot $b: no good boot in $tries tries"
      failed=$((failed + 1))
    fi
  done
  if ((${#times[@]})); then
    sorted=$(printf '%s\n' "${times[@]}" | sort -n)
    n=${#times[@]}
    summary+=("ram=${ram}M: ${n}/${boots} boots ok; ready after min $(echo "$sorted" | head -n 1) ms, median $(echo "$sorted" | sed -n "$(((n + 1) / 2))p") ms, max $(echo "$sorted" | tail -n 1) ms")
  else
    summary+=("ram=${ram}M: 0/${boots} boots ok")
  fi
done

for s in "${summary[@]}"; do
  log "$s"
done
log "tries: $total_tries, hung (no marker in time): $hung; logs in $log_dir"
((failed == 0)) || die "$failed boot(s) failed every try"
log "ok"
