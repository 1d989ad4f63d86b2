#!/usr/bin/env bash
# Compares trireme with etcd under equal loads, both measured by the same harness
# (`client bench`), and prints one table side by side: setr vs etcd put and getr vs etcd
# serializable get, at each concurrency and value size, plus the loopback UDP round trip
# measured in the same run (the floor under any request of either system). etcd is reached as
# its own clients reach it: through its native v3 gRPC API (the etcd-client crate, on tonic),
# one HTTP/2 connection per worker, so the client binary is built with `--features etcd-grpc`
# (which needs protoc: Debian's protobuf-compiler, installed if missing).
#
# Beside throughput and latency it gives the CPU each system spends per operation: the
# utime+stime of every process of the system under test (trireme: the view leader and the 3
# servers; etcd: its 3 members), read from /proc/PID/stat around each run, plus the bench
# client's own CPU over the measured run (`client_cpu_us`), divided by the operations. The
# cluster side of a getr run has the cost of its preload (every key written once, before
# measuring) taken off, measured by an equal write-only run just before.
#
# It starts, on loopback: a 3-member etcd cluster (data directories on tmpfs) and a trireme
# cluster of a view leader and 3 servers (release build, replicas 3). Every run is closed-loop
# (each worker sends when its previous operation finished) over keys bench-0..bench-(KEYS-1);
# reads run after the key space was written. Everything it started is stopped by PID on exit.
#
# etcd comes from Debian's packages (etcd-server, etcd-client; bookworm has 3.4.23), installed
# with apt-get if missing (root needed; on a systemd host the package also enables its own
# etcd service on the default ports 2379/2380, which this script does not use).
#
# Usage: tools/compare-etcd.sh [--duration SECS] [--concurrency "1 16 64"]
#                              [--sizes "100 4096"] [--keys N] [--etcd-port PORT] [--out DIR]
#   --duration SECS     length of each measured run (default 3; 24 runs plus preloads)
#   --concurrency LIST  worker counts (default "1 16 64")
#   --sizes LIST        value sizes in bytes (default "100 4096")
#   --keys N            key space size (default 1000)
#   --etcd-port PORT    first of the 6 loopback TCP ports etcd uses (default 23790)
#   --out DIR           keep the raw JSON results and logs there (default: a temporary dir)
#   -h, --help          this text
set -euo pipefail

duration=3
concurrency="1 16 64"
sizes="100 4096"
keys=1000
etcd_port=23790
out=""

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=${2:?--duration needs SECS}; shift 2 ;;
    --concurrency) concurrency=${2:?--concurrency needs a list}; shift 2 ;;
    --sizes) sizes=${2:?--sizes needs a list}; shift 2 ;;
    --keys) keys=${2:?--keys needs N}; shift 2 ;;
    --etcd-port) etcd_port=${2:?--etcd-port needs PORT}; shift 2 ;;
    --out) out=${2:?--out needs DIR}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."

# ---------------------------------------------------------------------------------------
# What this needs: etcd, etcdctl and jq from Debian's packages; trireme's release binaries,
# built with etcd's gRPC client (protoc from Debian's protobuf-compiler at build time).
# ---------------------------------------------------------------------------------------

# Installs Debian packages, running apt-get update first if the package lists are empty.
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "installing $* needs root (or sudo)" >&2; exit 1; }
    sudo=sudo
  fi
  local policy
  policy=$(apt-cache policy "$1" 2>/dev/null || true)
  if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
    $sudo apt-get update -q
  fi
  echo "installing $* from Debian's packages" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
}

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  apt_install etcd-server etcd-client
fi
command -v jq >/dev/null || apt_install jq
command -v protoc >/dev/null || apt_install protobuf-compiler

# etcd 3.4 refuses to start on architectures it does not support officially unless told.
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
case "$arch" in
  amd64|x86_64|ppc64el) ;;
  arm64|aarch64) export ETCD_UNSUPPORTED_ARCH=arm64 ;;
  armhf|armel) export ETCD_UNSUPPORTED_ARCH=arm ;;
  i386|i686) export ETCD_UNSUPPORTED_ARCH=386 ;;
  *) export ETCD_UNSUPPORTED_ARCH="$arch" ;;
esac

echo "building the release binaries (with etcd's gRPC client)" >&2
cargo build --release --locked --quiet --features etcd-grpc --bin viewleader --bin server --bin client
bin="${CARGO_TARGET_DIR:-target}/release"

# ---------------------------------------------------------------------------------------
# Processes, directories and cleanup.
# ---------------------------------------------------------------------------------------

if [ -z "$out" ]; then out=$(mktemp -d -t trireme-compare.XXXXXX); fi
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"
pids=()
etcd_pids=()
trireme_pids=()
data=""
mounted=false

# True while process $1 runs (an exited child stays a zombie until waited for).
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != Z* ]]
}

# Stops every process this script started, by PID (SIGTERM, then SIGKILL for any still alive
# 5 s later: an etcd leader whose peers are gone spends seconds trying to hand over
# leadership), and removes etcd's data directories.
cleanup() {
  local pid deadline=$((SECONDS + 5))
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$data" ]; then
    if $mounted; then umount "$data" 2>/dev/null || true; fi
    rm -rf "$data"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# etcd's data lives on tmpfs, so its fsyncs cost next to nothing: /dev/shm if it is a tmpfs,
# else a tmpfs mounted for the run.
if [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ]; then
  data=$(mktemp -d /dev/shm/trireme-etcd.XXXXXX)
  storage="tmpfs (/dev/shm)"
else
  data=$(mktemp -d -t trireme-etcd.XXXXXX)
  mount -t tmpfs -o size=2g tmpfs "$data" || { echo "cannot mount a tmpfs on $data (root needed)" >&2; exit 1; }
  mounted=true
  storage="tmpfs (mounted for the run)"
fi

# Fails if something already listens on TCP port $1 of loopback.
require_free_port() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "port $1 is in use; choose others with --etcd-port" >&2
    exit 1
  fi
}

# Polls command "$@" every 50 ms for up to 15 s; fails with the last output otherwise.
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + 15))
  until "$@" >"$out/wait.log" 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$what: not ready after 15 s; last attempt said:" >&2
      cat "$out/wait.log" >&2
      exit 1
    fi
    sleep 0.05
  done
}

# ---------------------------------------------------------------------------------------
# A 3-member etcd cluster on loopback.
# ---------------------------------------------------------------------------------------

cluster=""
client_urls=()
for i in 0 1 2; do
  require_free_port $((etcd_port + i))
  require_free_port $((etcd_port + 3 + i))
  cluster+="${cluster:+,}m$i=http://127.0.0.1:$((etcd_port + 3 + i))"
  client_urls+=("http://127.0.0.1:$((etcd_port + i))")
done
for i in 0 1 2; do
  etcd --name "m$i" --data-dir "$data/m$i" \
    --listen-client-urls "${client_urls[$i]}" --advertise-client-urls "${client_urls[$i]}" \
    --listen-peer-urls "http://127.0.0.1:$((etcd_port + 3 + i))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 3 + i))" \
    --initial-cluster "$cluster" --initial-cluster-token trireme-compare \
    --initial-cluster-state new --logger zap --log-outputs stderr \
    >"$out/etcd-m$i.log" 2>&1 &
  pids+=($!)
  etcd_pids+=($!)
done
endpoints=$(IFS=,; echo "${client_urls[*]}")
wait_for "etcd" etcdctl --endpoints="$endpoints" endpoint health
# The leader's URL first: workers take the endpoints in turn, so a single worker talks to the
# leader (etcd's best case: a follower forwards every put to the leader, one more hop) and
# more workers spread evenly over the members. Without this the 1-worker figures depend on
# which member the election happened to pick.
leader=$(etcdctl --endpoints="$endpoints" endpoint status -w json |
  jq -r 'map(select(.Status.header.member_id == .Status.leader)) | .[0].Endpoint // empty')
if [ -n "$leader" ]; then
  endpoints=$(printf '%s\n' "$leader" "${client_urls[@]}" | awk '!seen[$0]++' | paste -sd, -)
fi
etcd_version=$(etcd --version | sed -n 's/^etcd Version: //p')

# ---------------------------------------------------------------------------------------
# A trireme cluster: a view leader and 3 servers, on OS-chosen loopback ports.
# ---------------------------------------------------------------------------------------

# Starts a program in the background and waits for its "listening on" line.
start() {
  local name=$1; shift
  "$@" >"$out/$name.out" 2>"$out/$name.err" &
  pids+=($!)
  trireme_pids+=($!)
  wait_for "$name" grep -q "listening on" "$out/$name.out"
}

start viewleader "$bin/viewleader" --bind 127.0.0.1:0
vl=$(awk '{print $3; exit}' "$out/viewleader.out")
for n in 1 2 3; do start "server$n" "$bin/server" --bind 127.0.0.1:0 --viewleader "$vl"; done

# True once the view holds 3 servers, is not rebalancing, and a setr goes through (every
# server has learned the epoch).
trireme_ready() {
  "$bin/client" --viewleader "$vl" --json query_servers |
    jq -e '(.servers | length) == 3 and .rebalancing == false' >/dev/null &&
    "$bin/client" -q --viewleader "$vl" setr compare-warm-up ok >/dev/null
}
wait_for "trireme" trireme_ready

# ---------------------------------------------------------------------------------------
# The runs.
# ---------------------------------------------------------------------------------------

clk_tck=$(getconf CLK_TCK)

# Prints the CPU time (utime + stime, in µs) that processes "$@" have used so far, from
# /proc/PID/stat (0 for no process).
cpu_us() {
  local pid stat fields ticks=0
  for pid in "$@"; do
    stat=$(<"/proc/$pid/stat") || { echo "process $pid is gone" >&2; exit 1; }
    # The fields after the command name (which may hold spaces): state is the first, utime
    # the 12th and stime the 13th.
    read -ra fields <<<"${stat##*) }"
    ticks=$((ticks + fields[11] + fields[12]))
  done
  echo $((ticks * 1000000 / clk_tck))
}

# The PIDs of the processes of system $1 (none for the echo).
system_pids() {
  case "$1" in
    trireme) echo "${trireme_pids[*]}" ;;
    etcd) echo "${etcd_pids[*]}" ;;
  esac
}

# Prints the CPU (µs) system $1 spends on a getr run's preload: a write-only run of the same
# shape, every key written once by 16 workers (the preload's concurrency, PRELOAD_CONCURRENCY
# in src/cli/bench/mod.rs), with the target flags "${@:2}".
preload_cpu() {
  local system=$1; shift
  local -a cpu_pids
  read -ra cpu_pids <<<"$(system_pids "$system")"
  local before after
  before=$(cpu_us "${cpu_pids[@]}")
  "$bin/client" -q --viewleader "$vl" bench --op setr --ops "$keys" --concurrency 16 \
    --keys "$keys" --json "$@" >/dev/null 2>>"$out/bench.err" ||
    { echo "preload of $system $* failed" >&2; exit 1; }
  after=$(cpu_us "${cpu_pids[@]}")
  echo $((after - before))
}

# Runs `client bench --json` with "${@:3}" on system $1, reads around it the CPU of the
# system's processes (less $2 µs: the preload's share), appends its object (tagged with the
# system, the cluster's CPU and the CPU per operation, cluster's and client's) to the
# results, and echoes it.
bench() {
  local system=$1 preload=$2; shift 2
  local -a cpu_pids
  read -ra cpu_pids <<<"$(system_pids "$system")"
  local line before after cluster
  before=$(cpu_us "${cpu_pids[@]}")
  line=$("$bin/client" -q --viewleader "$vl" bench --duration "$duration" --keys "$keys" --json "$@" \
    2>>"$out/bench.err") || { echo "bench $* failed: $line" >&2; exit 1; }
  after=$(cpu_us "${cpu_pids[@]}")
  cluster=$((after - before - preload))
  if [ "$cluster" -lt 0 ]; then cluster=0; fi
  line=$(jq -c --arg system "$system" --argjson cluster "$cluster" --argjson preload "$preload" '
    . + {system: $system, cluster_cpu_us: $cluster, preload_cpu_us: $preload,
         cpu_us_per_op: (if .ops > 0 then ($cluster + (.client_cpu_us // 0)) / .ops else null end)}' <<<"$line")
  echo "$line" >>"$results"
  echo "$line"
}

# Other work on the machine distorts every figure: say so.
load_before=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load_before" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  echo "warning: load average $load_before on $(nproc) cores before measuring; other work will distort the figures" >&2
fi

runs=$(( $(wc -w <<<"$concurrency") * $(wc -w <<<"$sizes") * 4 + 1 ))
echo "measuring: $runs runs of $duration s (plus preloads, and for every getr run a preload-only" >&2
echo "  run to weigh its CPU); raw results in $results" >&2
echo "  loopback udp echo" >&2
echo_json=$(bench echo 0 --op udp-echo --concurrency 1)
for size in $sizes; do
  for conc in $concurrency; do
    for op in setr getr; do
      echo "  $op, $size B, concurrency $conc: trireme, then etcd" >&2
      tri_preload=0
      etcd_preload=0
      if [ "$op" = getr ]; then
        tri_preload=$(preload_cpu trireme --value-size "$size")
        etcd_preload=$(preload_cpu etcd --target etcd --etcd-api grpc \
          --etcd-endpoint "$endpoints" --value-size "$size")
      fi
      bench trireme "$tri_preload" --op "$op" --value-size "$size" --concurrency "$conc" >/dev/null
      bench etcd "$etcd_preload" --target etcd --etcd-api grpc --etcd-endpoint "$endpoints" \
        --op "$op" --value-size "$size" --concurrency "$conc" >/dev/null
    done
  done
done

# ---------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------

cpus=$(nproc)
echo
echo "trireme vs etcd $etcd_version, closed loop, $duration s per run, $keys keys, on $cpus cores shared by"
echo "load generator and clusters (1-minute load average before measuring: $load_before)."
echo "trireme: view leader + 3 servers, replicas 3, release build;"
echo "etcd: 3 members on 127.0.0.1, data directories on $storage, so fsync costs next to nothing;"
echo "client: \`client bench\` for both; etcd through its native gRPC API (etcd-client on tonic, one"
echo "HTTP/2 connection per worker, each driven by the worker's own current-thread tokio runtime),"
echo "workers spread over the 3 members, leader first, so 1 worker talks to the leader: etcd's best"
echo "case. setr = 2PC on 3 replicas vs etcd put; getr = read from one replica vs etcd serializable"
echo "get. Latencies in µs; ratios trireme/etcd."
echo "CPU/op (µs): utime+stime of the system's processes read from /proc around each run (connection"
echo "set-up included; a getr run's preload taken off, as measured by an equal write-only run), plus"
echo "the bench client's own CPU over the measured run, divided by the operations. Clock ticks of"
echo "$((1000 / clk_tck)) ms make short runs coarse."
jq -r '"loopback UDP round trip (udp echo, 1 worker): p50 \(.latency_us.p50), mean \(.latency_us.mean), p99 \(.latency_us.p99) µs.",
  "With the view cached (client bench keeps it), a getr makes 1 round trip (the read): \(.latency_us.mean | round) µs of bare loopback at the mean;",
  "a setr 3 (the prepares, the primary'"'"'s commit, the other commits): \(.latency_us.mean * 3 | round) µs."' <<<"$echo_json"
echo
jq -rs '
  def key: "\(.op) \(.value_size) \(.concurrency)";
  def fmt(w): tostring | (" " * ([w - length, 0] | max)) + .;
  def num(w): if . == null then "-" | fmt(w) else (. * 10 | round / 10 | tostring) | fmt(w) end;
  def int(w): if . == null then "-" | fmt(w) else (round | tostring) | fmt(w) end;
  def ratio(a; b): if a == null or b == null or b == 0 then "-" else (a / b * 100 | round / 100 | tostring) end;
  # Issue 18: setr >= 3x etcd put at every concurrency, getr >= 5x etcd serializable get.
  def target(op; conc): if op == "setr" then 3 else 5 end;
  def opname: if .op == "setr" then "setr/put" else "getr/get" end;
  (map(select(.system == "trireme")) | map({key: key, value: .}) | from_entries) as $t
  | (map(select(.system == "etcd")) | map({key: key, value: .}) | from_entries) as $e
  | (["op", "bytes", "conc", "tri ops/s", "p50", "p99", "err", "cpu/op", "etcd ops/s", "p50", "p99",
      "err", "cpu/op", "ops ×", "p50 ×", "cpu ×", "target"]
     | "\(.[0] | fmt(9)) \(.[1] | fmt(5)) \(.[2] | fmt(4)) | \(.[3] | fmt(9)) \(.[4] | fmt(7)) \(.[5] | fmt(7)) \(.[6] | fmt(3)) \(.[7] | fmt(6)) | \(.[8] | fmt(10)) \(.[9] | fmt(7)) \(.[10] | fmt(7)) \(.[11] | fmt(3)) \(.[12] | fmt(6)) | \(.[13] | fmt(6)) \(.[14] | fmt(6)) \(.[15] | fmt(6)) | \(.[16])"),
    (map(select(.system == "trireme")) | .[]
     | . as $tri | $e[key] as $etcd
     | ($tri.throughput / $etcd.throughput) as $ratio
     | target($tri.op; $tri.concurrency) as $goal
     | "\($tri | opname | fmt(9)) \($tri.value_size | int(5)) \($tri.concurrency | int(4)) | \($tri.throughput | int(9)) \($tri.latency_us.p50 | num(7)) \($tri.latency_us.p99 | num(7)) \($tri.failed | int(3)) \($tri.cpu_us_per_op | num(6)) | \($etcd.throughput | int(10)) \($etcd.latency_us.p50 | num(7)) \($etcd.latency_us.p99 | num(7)) \($etcd.failed | int(3)) \($etcd.cpu_us_per_op | num(6)) | \(ratio($tri.throughput; $etcd.throughput) | fmt(6)) \(ratio($tri.latency_us.p50; $etcd.latency_us.p50) | fmt(6)) \(ratio($tri.cpu_us_per_op; $etcd.cpu_us_per_op) | fmt(6)) | ≥\($goal)× \(if $ratio >= $goal then "met" else "missed" end)")
' "$results"
echo
echo "CPU per operation in µs, split into the cluster's processes and the bench client:"
jq -rs '
  def fmt(w): tostring | (" " * ([w - length, 0] | max)) + .;
  def key: "\(.op) \(.value_size) \(.concurrency)";
  def per(x): if .ops > 0 then (x / .ops * 10 | round / 10) else "-" end;
  def opname: if .op == "setr" then "setr/put" else "getr/get" end;
  (["op", "bytes", "conc", "tri cluster", "tri client", "etcd cluster", "etcd client"]
   | "\(.[0] | fmt(9)) \(.[1] | fmt(5)) \(.[2] | fmt(4)) | \(.[3] | fmt(11)) \(.[4] | fmt(10)) | \(.[5] | fmt(12)) \(.[6] | fmt(11))"),
  (map(select(.system == "etcd")) | map({key: key, value: .}) | from_entries) as $e
  | (map(select(.system == "trireme")) | .[] | . as $tri | $e[key] as $etcd
   | "\($tri | opname | fmt(9)) \($tri.value_size | fmt(5)) \($tri.concurrency | fmt(4)) | \($tri | per(.cluster_cpu_us) | fmt(11)) \($tri | per(.client_cpu_us // 0) | fmt(10)) | \($etcd | per(.cluster_cpu_us) | fmt(12)) \($etcd | per(.client_cpu_us // 0) | fmt(11))")
' "$results"
echo
echo "ops × = trireme throughput / etcd throughput (higher favours trireme); p50 × = trireme p50 /"
echo "etcd p50 and cpu × = trireme CPU/op / etcd CPU/op (lower favours trireme); target: issue 18's"
echo "throughput goal (setr ≥ 3× put, getr ≥ 5× get; its CPU goal, setr CPU/op ≤ 1/3 of put's at 64"
echo "workers, is the cpu × column). Raw results: $results"
