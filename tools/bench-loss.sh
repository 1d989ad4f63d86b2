#!/usr/bin/env bash
# Measures trireme under datagram loss against the same cluster without it, with `client
# bench`, and prints one table: throughput and p50/p99 latency of setr and getr, lossy / clean.
# Every process (view leader, 3 servers, the load generator) injects the loss on its own
# outgoing datagrams (--faults), so requests, responses and acks are all lost alike.
# With --key the second cluster is not lossy but keyed: every process runs with
# --cluster-key-file, and the table shows what the MACs cost.
set -euo pipefail

duration=3
loss=0.1
concurrency="1 16"
mode=loss

usage() {
  cat <<'EOF'
Usage: tools/bench-loss.sh [--duration SECS] [--loss P] [--concurrency "1 16"] [--key]
  --duration SECS     length of each measured run (default 3)
  --loss P            loss probability injected by every process (default 0.1)
  --concurrency LIST  worker counts (default "1 16")
  --key               compare with a clean cluster using a cluster key instead of a lossy one
  -h, --help          this text
Starts two clusters on loopback (release build): one clean, one where every process runs
with --faults loss=P; runs `client bench` setr and getr against each; prints p50 and
latencies side by side with the ratios the performance issue sets targets for (one worker:
lossy throughput at least 50% of clean; 16 workers: lossy p99 at most 3x the clean p99).
TRIREME_BIN_DIR=DIR uses the binaries in DIR instead of building them (to compare builds).
Stops what it started by PID.
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --loss) loss=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --key) mode=key; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "jq is needed (apt-get install jq)" >&2; exit 1; }
if [ -n "${TRIREME_BIN_DIR:-}" ]; then
  bin=$TRIREME_BIN_DIR
else
  cargo build --release --locked --quiet --bin viewleader --bin server --bin client
  bin="${CARGO_TARGET_DIR:-target}/release"
fi
out=$(mktemp -d -t trireme-loss.XXXXXX)
pids=()

# Stops every process this script started, by PID, and removes the scratch directory.
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls command "$@" every 50 ms for up to 20 s; fails otherwise.
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + 20))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then echo "$what: not ready after 20 s" >&2; exit 1; fi
    sleep 0.05
  done
}

# The flags of the second cluster's processes: the loss, or the cluster key.
if [ "$mode" = key ]; then
  head -c 32 /dev/urandom | base64 >"$out/cluster.key"
  variant=(--cluster-key-file "$out/cluster.key")
  label=keyed
else
  variant=(--faults "loss=$loss")
  label=lossy
fi

# Starts a cluster named $1 whose processes take the flags "${@:2}" (maybe none) and sets
# CLUSTER_VL to its view leader's address. (Not called in a command substitution: that would
# run it in a subshell, whose PIDs the cleanup would never see.)
cluster() {
  local name=$1; shift
  local args=("$@")
  "$bin/viewleader" --bind 127.0.0.1:0 "${args[@]}" >"$out/$name-vl.out" 2>/dev/null &
  pids+=($!)
  wait_for "$name view leader" grep -q "listening on" "$out/$name-vl.out"
  local vl
  vl=$(awk '{print $3; exit}' "$out/$name-vl.out")
  for n in 1 2 3; do
    "$bin/server" --bind 127.0.0.1:0 --viewleader "$vl" "${args[@]}" \
      >"$out/$name-s$n.out" 2>/dev/null &
    pids+=($!)
  done
  local flags=""
  [ ${#args[@]} -gt 0 ] && flags=$(printf " '%s'" "${args[@]}")
  wait_for "$name cluster" sh -c "'$bin/client'$flags --viewleader $vl --json query_servers |
    jq -e '(.servers | length) == 3 and .rebalancing == false' &&
    '$bin/client'$flags -q --viewleader $vl setr warm-up ok"
  CLUSTER_VL=$vl
}

cluster clean
clean_vl=$CLUSTER_VL
cluster "$label" "${variant[@]}"
lossy_vl=$CLUSTER_VL

# Runs one bench against view leader $1 with options "${@:2}", the second cluster's flags
# first if $1 is that cluster; prints its JSON.
bench() {
  local vl=$1; shift
  local args=()
  [ "$vl" = "$lossy_vl" ] && args=("${variant[@]}")
  "$bin/client" -q --viewleader "$vl" --timeout-ms 10000 "${args[@]}" \
    bench --duration "$duration" --keys 1000 --json "$@"
}

printf '%-5s %5s | %10s %7s %7s | %10s %7s %7s | %6s %6s | %s\n' \
  op conc "clean op/s" "p50 µs" "p99 µs" "$label op/s" "p50 µs" "p99 µs" "ops ×" "p99 ×" \
  "$([ "$mode" = loss ] && echo "target (1 worker: ops ≥ 0.5×; 16: p99 ≤ 3×)")"
for conc in $concurrency; do
  for op in setr getr; do
    clean=$(bench "$clean_vl" --op "$op" --concurrency "$conc")
    lossy=$(bench "$lossy_vl" --op "$op" --concurrency "$conc")
    jq -rn --argjson c "$clean" --argjson l "$lossy" --arg op "$op" --arg conc "$conc" \
      --arg mode "$mode" '
      ($l.latency_us.p99 / $c.latency_us.p99) as $p |
      ($l.throughput / $c.throughput) as $t |
      (if $mode == "key" then ""
       elif ($conc | tonumber) == 1 then (if $t >= 0.5 then "met" else "missed" end)
       else (if $p <= 3 then "met" else "missed" end) end) as $verdict |
      [$op, $conc, ($c.throughput | round), $c.latency_us.p50, $c.latency_us.p99,
       ($l.throughput | round), $l.latency_us.p50, $l.latency_us.p99,
       ($t * 100 | round / 100), ($p * 100 | round / 100), $verdict,
       ($l.failed | tostring) + " failed"] |
      "\(.[0]|.[0:5]) \(.[1]) | \(.[2]) \(.[3]) \(.[4]) | \(.[5]) \(.[6]) \(.[7]) | \(.[8]) \(.[9]) | \(.[10]) (\(.[11]))"'
  done
done
if [ "$mode" = key ]; then
  echo "second cluster: every process with --cluster-key-file; $duration s per run; 3 servers, replicas 3."
else
  echo "loss=$loss on every process's outgoing datagrams; $duration s per run; 3 servers, replicas 3."
fi
