#!/usr/bin/env bash
# Builds trireme, starts a local cluster (a view leader and 3 servers on loopback, default
# ports), and runs a few client commands against it. The cluster keeps running until Ctrl-C,
# unless --once is given (then it stops after the demo; CI uses that).
#
# Usage: tools/demo.sh [--once] [--debug]
set -euo pipefail

once=false
profile=release
for arg in "$@"; do
  case "$arg" in
    --once) once=true ;;
    --debug) profile=debug ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
if [ "$profile" = release ]; then cargo build --release --locked --quiet; else cargo build --locked --quiet; fi
bin="${CARGO_TARGET_DIR:-target}/$profile"
logs=$(mktemp -d)
pids=()

# Stops every process this script started, by PID.
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Starts a program in the background and waits for its "listening on" line.
start() {
  local name=$1; shift
  "$@" >"$logs/$name.out" 2>"$logs/$name.err" &
  pids+=($!)
  for _ in $(seq 100); do
    if grep -q "listening on" "$logs/$name.out" 2>/dev/null; then
      echo "$name: $(head -1 "$logs/$name.out")"
      return
    fi
    sleep 0.05
  done
  echo "$name did not start; its log:" >&2
  cat "$logs/$name.err" >&2
  exit 1
}

start viewleader "$bin/viewleader"
vl=$(awk '{print $3}' "$logs/viewleader.out")
for n in 1 2 3; do
  start "server$n" "$bin/server" --viewleader "$vl"
done
s1=$(awk '{print $3}' "$logs/server1.out")

# Waits until the view holds 3 servers.
for _ in $(seq 100); do
  if "$bin/client" --viewleader "$vl" --json query_servers | grep -o '"id"' | wc -l | grep -qx 3; then break; fi
  sleep 0.05
done

# Right after a view change a server may not have heard of the new epoch yet (its next
# heartbeat tells it), and setr refuses in that window: wait until a setr goes through.
for _ in $(seq 100); do
  if "$bin/client" -q --viewleader "$vl" setr demo-warm-up ok >/dev/null 2>&1; then break; fi
  sleep 0.05
done

run() { echo "\$ client $*"; "$bin/client" --viewleader "$vl" --server "$s1" "$@"; }
run query_servers
run setr greeting "hello, trireme"
run getr greeting
run locate greeting
run set raw-key "only on $s1"
run get raw-key
run query_all_keys
run lock_get demo-lock alice
run lock_release demo-lock alice
run --json query_servers

if $once; then
  echo "demo done; logs in $logs"
  exit 0
fi
echo
echo "The cluster is running (view leader $vl). In another terminal, try:"
echo "  $bin/client query_servers"
echo "  $bin/client --server $s1 get greeting"
echo "Ctrl-C stops it. Logs: $logs"
wait
