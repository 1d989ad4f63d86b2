# shellcheck shell=bash
# netem-scripts/lib.sh - shared functions for trireme's network-namespace test hosts.
#
# Sourced by hosts.sh, impair.sh and scenario.sh; not meant to be run by itself.
#
# Topology for prefix P (default "trn"): one namespace per host, each joined by a veth pair to
# a router namespace that forwards between them:
#
#     P-vl (view leader)  P-c (client)  P-s1 .. P-sN (servers)
#          \                  |                 /
#           +------------ P-r (router, ip_forward=1) ---+
#
# With a view-leader group (trn_up N M, M > 1), the other members get hosts of their own:
# P-vl2 .. P-vlM, linked to the router like every other host.
#
# The host end of each pair is named P-HOST (inside namespace P-HOST), the router end
# P-HOST-r (inside P-r). The veths are created directly inside the namespaces, so nothing is
# ever added to the root namespace: two runs with different prefixes cannot collide, and even
# equal subnets would not (each run has its own router). Subnets are still derived from the
# prefix (10.B.0.0/16, B from a checksum of the prefix, or --subnet-base 10.B) so that runs are
# easy to tell apart in captures. Host link i is 10.B.i.0/24: router .1, host .2; i = 1 for
# the view leader, 2 for the client, 1+m for view-leader member vlm (m = 2..5), 10+k for
# server sk.
#
# Run state (pid files, logs, the iptables backend chosen, per-host --faults specs, the data
# directories of view-leader group members) lives in $TRN_STATE_DIR, default
# /tmp/trireme-netem/P.

# Globals, set by trn_init: TRN_PREFIX TRN_STATE TRN_BIN_DIR TRN_BASE TRN_REPO.

TRN_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRN_REPO="$(cd "$TRN_LIB_DIR/.." && pwd)"

# Prints a message to stderr, prefixed with the program name.
trn_log() {
    printf '[%s] %s\n' "${TRN_PROG:-netem}" "$*" >&2
}

# Prints a message that must not be missed (a degraded mechanism) to stderr.
trn_loud() {
    printf '[%s] *** %s ***\n' "${TRN_PROG:-netem}" "$*" >&2
}

# Prints an error and exits 1.
trn_die() {
    printf '[%s] error: %s\n' "${TRN_PROG:-netem}" "$*" >&2
    exit 1
}

# Validates the prefix and sets the globals every command needs. Arguments: none; reads
# TRN_PREFIX, TRN_STATE_DIR, TRN_BIN_DIR, TRN_SUBNET_BASE from the environment/flags.
trn_init() {
    TRN_PREFIX="${TRN_PREFIX:-trn}"
    [[ "$TRN_PREFIX" =~ ^[a-z][a-z0-9]{0,7}$ ]] ||
        trn_die "prefix '$TRN_PREFIX' must be 1-8 characters [a-z0-9], starting with a letter (interface names are limited to 15 characters)"
    TRN_STATE="${TRN_STATE_DIR:-/tmp/trireme-netem/$TRN_PREFIX}"
    TRN_BIN_DIR="${TRN_BIN_DIR:-${TRIREME_BIN_DIR:-$TRN_REPO/target/debug}}"
    if [[ -n "${TRN_SUBNET_BASE:-}" ]]; then
        if ! [[ "$TRN_SUBNET_BASE" =~ ^10\.([0-9]{1,3})$ ]] || ((BASH_REMATCH[1] > 255)); then
            trn_die "subnet base '$TRN_SUBNET_BASE' must look like 10.B (B in 0..255)"
        fi
        TRN_BASE="$TRN_SUBNET_BASE"
    else
        local sum
        sum="$(printf '%s' "$TRN_PREFIX" | cksum | cut -d' ' -f1)"
        TRN_BASE="10.$((sum % 200 + 50))"
    fi
}

# Fails unless we are root and `ip netns` can add and delete a namespace.
trn_require_netns() {
    [[ "$(id -u)" == 0 ]] || trn_die "network namespaces need root (uid is $(id -u))"
    command -v ip >/dev/null || trn_die "the 'ip' command (iproute2) is missing"
    local probe="${TRN_PREFIX}-chk" err
    if ! err="$(ip netns add "$probe" 2>&1)"; then
        trn_die "cannot create a network namespace: $err"
    fi
    ip netns del "$probe"
}

# Prints the namespace name of HOST (vl, vl2..vl5, c, r, s1..s99).
trn_ns() { printf '%s-%s' "$TRN_PREFIX" "$1"; }

# Prints the link index of HOST (1 = view leader, 2 = client, 1+m = view-leader member vlm
# for m = 2..5, 10+k = server sk).
trn_host_index() {
    case "$1" in
        vl) echo 1 ;;
        c) echo 2 ;;
        vl[2-5]) echo $((1 + ${1#vl})) ;;
        s[1-9] | s[1-9][0-9]) echo $((10 + ${1#s})) ;;
        *) trn_die "unknown host '$1' (expected vl, vl2..vl5, c or s1..s99)" ;;
    esac
}

# Prints the view-leader hosts of a group of M members, one per line: vl, then vl2..vlM.
trn_vl_hosts() {
    local m="$1" i
    echo vl
    for ((i = 2; i <= m; i++)); do echo "vl$i"; done
}

# Prints HOST's own IP address (on its veth).
trn_host_ip() { printf '%s.%s.2' "$TRN_BASE" "$(trn_host_index "$1")"; }

# Prints the router's IP address on HOST's link (HOST's gateway).
trn_router_ip() { printf '%s.%s.1' "$TRN_BASE" "$(trn_host_index "$1")"; }

# Prints the hosts recorded by `up`, one per line (vl, [vl2..vlM,] c, s1..sN).
trn_hosts() {
    [[ -f "$TRN_STATE/hosts" ]] || trn_die "no hosts recorded in $TRN_STATE (run hosts.sh up first)"
    cat "$TRN_STATE/hosts"
}

# Runs a command inside HOST's namespace.
trn_in() {
    local host="$1"
    shift
    ip netns exec "$(trn_ns "$host")" "$@"
}

# Creates the router, the view leader, the client and N servers, and links them. Arguments:
# N, and optionally M (default 1), the view-leader hosts: with M > 1, also vl2..vlM (one per
# member of a view-leader group).
trn_up() {
    local n="$1" m="${2:-1}" host r
    [[ "$n" =~ ^[1-9][0-9]?$ ]] || trn_die "server count '$n' must be 1..99"
    [[ "$m" =~ ^[1-5]$ ]] || trn_die "view-leader host count '$m' must be 1..5"
    r="$(trn_ns r)"
    if ip netns list | grep -q "^$TRN_PREFIX-"; then
        trn_die "namespaces with prefix '$TRN_PREFIX-' already exist (run hosts.sh --prefix $TRN_PREFIX down first, or pick another prefix)"
    fi
    mkdir -p "$TRN_STATE/pids" "$TRN_STATE/logs" "$TRN_STATE/faults"
    : >"$TRN_STATE/hosts"
    ip netns add "$r"
    ip -n "$r" link set lo up
    ip netns exec "$r" sysctl -qw net.ipv4.ip_forward=1
    local hosts=()
    mapfile -t hosts < <(trn_vl_hosts "$m")
    hosts+=(c)
    local k
    for ((k = 1; k <= n; k++)); do hosts+=("s$k"); done
    for host in "${hosts[@]}"; do
        trn_add_host "$host"
        echo "$host" >>"$TRN_STATE/hosts"
    done
    trn_log "up: router $r, hosts ${hosts[*]} on $TRN_BASE.0.0/16 (state in $TRN_STATE)"
}

# Creates HOST's namespace and its veth pair to the router, addresses and routes.
trn_add_host() {
    local host="$1" ns r hif rif
    ns="$(trn_ns "$host")"
    r="$(trn_ns r)"
    hif="$TRN_PREFIX-$host"
    rif="$TRN_PREFIX-$host-r"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Both ends are created directly in their namespaces: the root namespace never sees them.
    ip link add name "$hif" netns "$ns" type veth peer name "$rif" netns "$r"
    ip -n "$ns" addr add "$(trn_host_ip "$host")/24" dev "$hif"
    ip -n "$r" addr add "$(trn_router_ip "$host")/24" dev "$rif"
    ip -n "$ns" link set "$hif" up
    ip -n "$r" link set "$rif" up
    ip -n "$ns" route add default via "$(trn_router_ip "$host")"
}

# Removes everything `up` and the scenario created for this prefix: processes (by the PIDs in
# the pid files, then any PID still inside one of our namespaces), namespaces (which takes
# their veths and iptables rules with them), any stray link with our prefix in the root
# namespace, and the state directory. Argument: 1 to keep the logs (state dir/logs), else 0.
trn_down() {
    local keep_logs="${1:-0}" f pid ns
    if [[ -d "$TRN_STATE/pids" ]]; then
        for f in "$TRN_STATE"/pids/*.pid; do
            [[ -e "$f" ]] || continue
            pid="$(cat "$f")"
            trn_stop_pid "$pid" "$(basename "$f" .pid)"
            rm -f "$f"
        done
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep "^$TRN_PREFIX-" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            trn_log "down: PID $pid still runs in $ns, stopping it"
            trn_stop_pid "$pid" "$ns"
        done
        ip netns del "$ns" || trn_log "down: could not delete namespace $ns"
    done
    # Only a run interrupted between creating a link and moving it could leave one here.
    local link
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$TRN_PREFIX-" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    # Only what the scripts put there: TRN_STATE_DIR may point at a directory with other files.
    rm -rf "$TRN_STATE/pids" "$TRN_STATE/faults" "$TRN_STATE/vl-data"
    rm -f "$TRN_STATE/hosts" "$TRN_STATE/iptables" "$TRN_STATE/client.out"
    if ((keep_logs)) && [[ -d "$TRN_STATE/logs" ]]; then
        trn_log "down: prefix '$TRN_PREFIX' removed (logs kept in $TRN_STATE/logs)"
    else
        rm -rf "$TRN_STATE/logs"
        rmdir "$TRN_STATE" 2>/dev/null || true
        trn_log "down: prefix '$TRN_PREFIX' removed"
    fi
}

# Prints the namespaces, addresses, impairments and processes of this prefix.
trn_status() {
    local ns host
    echo "prefix $TRN_PREFIX, subnets $TRN_BASE.0.0/16, state $TRN_STATE"
    for ns in $(ip netns list | awk '{print $1}' | grep "^$TRN_PREFIX-" | sort || true); do
        host="${ns#"$TRN_PREFIX"-}"
        printf '%-12s %s\n' "$ns" "$(ip -n "$ns" -o -4 addr show | awk '$2 != "lo" {printf "%s=%s ", $2, $4}')"
        local q
        q="$(ip netns exec "$ns" tc qdisc show 2>/dev/null | grep netem || true)"
        [[ -n "$q" ]] && printf '    netem: %s\n' "$q"
        if [[ -f "$TRN_STATE/iptables" ]]; then
            local ipt
            ipt="$(cat "$TRN_STATE/iptables")"
            ip netns exec "$ns" "$ipt" -w -S TRN_LOSS 2>/dev/null | grep -- '^-A' | sed 's/^/    iptables filter: /' || true
            ip netns exec "$ns" "$ipt" -w -t mangle -S 2>/dev/null | grep -- '^-A TRN_DUP' | sed 's/^/    iptables mangle: /' || true
            ip netns exec "$ns" "$ipt" -w -t nat -S 2>/dev/null | grep -- '^-A' | sed 's/^/    iptables nat: /' || true
        fi
        [[ -s "$TRN_STATE/faults/$host" ]] && printf '    --faults for new processes: %s\n' "$(cat "$TRN_STATE/faults/$host")"
        local pid
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            printf '    pid %s: %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
        done
    done
}

# Succeeds if PID is a running process (not gone, not a zombie awaiting its parent).
trn_alive() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

# Sends SIGTERM to PID, waits up to 5 s for it to exit, then SIGKILLs it; reaps it if it is
# our child. Arguments: PID, a name for the log.
trn_stop_pid() {
    local pid="$1" name="$2" deadline
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    if trn_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 5))
        while trn_alive "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
        if trn_alive "$pid"; then
            trn_log "$name (PID $pid) ignored SIGTERM for 5 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------
# Mechanism detection

# Tries netem on a throwaway veth pair in a throwaway namespace. Sets TRN_NETEM_OK (1/0) and
# TRN_NETEM_ERR (tc's error message when it failed).
trn_probe_netem() {
    local ns="${TRN_PREFIX}-probe"
    TRN_NETEM_OK=0
    TRN_NETEM_ERR=""
    command -v tc >/dev/null || {
        TRN_NETEM_ERR="the 'tc' command is missing"
        return 0
    }
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    ip -n "$ns" link add "$TRN_PREFIX-pa" type veth peer name "$TRN_PREFIX-pb"
    if TRN_NETEM_ERR="$(ip netns exec "$ns" tc qdisc add dev "$TRN_PREFIX-pa" root netem delay 1ms loss 1% 2>&1)"; then
        TRN_NETEM_OK=1
        TRN_NETEM_ERR=""
    else
        TRN_NETEM_ERR="$(echo "$TRN_NETEM_ERR" | head -1 | sed 's/^Error: //; s/\.$//')"
        [[ -n "$TRN_NETEM_ERR" ]] || TRN_NETEM_ERR="tc failed without a message"
    fi
    ip netns del "$ns"
}

# Installs iptables with apt-get if no iptables command exists (apt-get update first only if
# the plain install fails). Returns non-zero if it is still missing.
trn_ensure_iptables() {
    if command -v iptables >/dev/null || command -v iptables-legacy >/dev/null ||
        command -v iptables-nft >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || return 1
    trn_log "iptables is missing: installing it with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y iptables >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y iptables >&2; } ||
        return 1
    command -v iptables >/dev/null
}

# Finds an iptables backend that works inside a namespace here, trying $TRN_IPTABLES if set,
# else iptables (the update-alternatives choice), iptables-nft, iptables-legacy; never changes
# update-alternatives. Sets TRN_IPT (the command, empty if none works), TRN_IPT_ERR,
# TRN_STAT_OK/TRN_STAT_ERR (statistic match) and TRN_TEE_OK/TRN_TEE_ERR (TEE target).
trn_probe_iptables() {
    local ns="${TRN_PREFIX}-probe" cand err candidates
    TRN_IPT=""
    TRN_IPT_ERR=""
    TRN_STAT_OK=0
    TRN_STAT_ERR="no usable iptables"
    TRN_TEE_OK=0
    TRN_TEE_ERR="no usable iptables"
    if ! trn_ensure_iptables; then
        TRN_IPT_ERR="iptables is not installed and apt-get could not install it"
        return 0
    fi
    if [[ -n "${TRN_IPTABLES:-}" ]]; then
        candidates=("$TRN_IPTABLES")
    else
        candidates=(iptables iptables-nft iptables-legacy)
    fi
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    for cand in "${candidates[@]}"; do
        command -v "$cand" >/dev/null || continue
        if ! err="$(ip netns exec "$ns" "$cand" -w -L INPUT -n 2>&1)"; then
            TRN_IPT_ERR+="$cand: $(echo "$err" | head -1); "
            continue
        fi
        local stat_ok=0 stat_err tee_ok=0 tee_err
        if stat_err="$(ip netns exec "$ns" "$cand" -w -A INPUT -p udp -m statistic --mode random --probability 0.5 -j DROP 2>&1)"; then
            stat_ok=1
        fi
        if tee_err="$(ip netns exec "$ns" "$cand" -w -t mangle -A FORWARD -p udp -m statistic --mode random --probability 0.5 -j TEE --gateway 192.0.2.1 2>&1)"; then
            tee_ok=1
        fi
        # A backend with both wins at once; otherwise keep the first that works at all.
        if [[ -z "$TRN_IPT" ]] || ((stat_ok + tee_ok > TRN_STAT_OK + TRN_TEE_OK)); then
            TRN_IPT="$cand"
            TRN_STAT_OK=$stat_ok
            TRN_STAT_ERR="$(echo "$stat_err" | head -1)"
            TRN_TEE_OK=$tee_ok
            TRN_TEE_ERR="$(echo "$tee_err" | head -1)"
        fi
        ip netns exec "$ns" "$cand" -w -F INPUT 2>/dev/null || true
        ip netns exec "$ns" "$cand" -w -t mangle -F FORWARD 2>/dev/null || true
        ((stat_ok && tee_ok)) && break
    done
    ip netns del "$ns"
    [[ -n "$TRN_IPT" ]] || TRN_IPT_ERR="${TRN_IPT_ERR:-no iptables command found}"
}

# ---------------------------------------------------------------------------------------
# Impairments

# Converts a loss/dup/reorder amount ("5%", "0.05") to a probability on stdout.
trn_prob() {
    local v="$1"
    if [[ "$v" =~ ^([0-9]+(\.[0-9]+)?)%$ ]]; then
        awk -v p="${BASH_REMATCH[1]}" 'BEGIN { if (p > 100) exit 1; printf "%.6g\n", p / 100 }' ||
            trn_die "'$v' is over 100%"
    elif [[ "$v" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]]; then
        awk -v p="$v" 'BEGIN { printf "%.6g\n", p }'
    else
        trn_die "'$v' is not a probability (use 5% or 0.05)"
    fi
}

# Prints a probability as a percentage ("0.05" -> "5%").
trn_pct() { awk -v p="$1" 'BEGIN { printf "%g%%\n", p * 100 }'; }

# Checks a duration ("20ms", "1.5s", "500us", bare = ms) and prints it with a unit.
trn_dur() {
    local v="$1"
    [[ "$v" =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)?$ ]] || trn_die "'$v' is not a duration (e.g. 20ms)"
    [[ -n "${BASH_REMATCH[2]}" ]] && echo "$v" || echo "${v}ms"
}

# Removes HOST's impairments: its netem qdisc (on the router's end of its link), its iptables
# chains (TRN_LOSS in HOST, TRN_DUP_HOST in the router), and its --faults spec. Silent if there
# is nothing to remove.
trn_impair_clear() {
    local host="$1" r ipt=""
    r="$(trn_ns r)"
    ip netns exec "$r" tc qdisc del dev "$TRN_PREFIX-$host-r" root 2>/dev/null || true
    if [[ -f "$TRN_STATE/iptables" ]]; then ipt="$(cat "$TRN_STATE/iptables")"; fi
    if [[ -n "$ipt" ]]; then
        ip netns exec "$(trn_ns "$host")" "$ipt" -w -F TRN_LOSS 2>/dev/null || true
        ip netns exec "$r" "$ipt" -w -t mangle -F "TRN_DUP_$host" 2>/dev/null || true
    fi
    rm -f "$TRN_STATE/faults/$host"
}

# Prints why an iptables feature is unusable: ERR (the failed rule's message) if a backend was
# found, else why no backend was.
trn_ipt_why() {
    if [[ -n "$TRN_IPT" ]]; then echo "$TRN_IPT: $1"; else echo "$TRN_IPT_ERR"; fi
}

# Applies impairments to the traffic of HOST. Arguments: HOST LOSS DUP DELAY JITTER REORDER
# (probabilities as decimals, durations with units, "" = none). Where the kernel has netem,
# all of them go into one netem qdisc on the router's end of HOST's link (traffic delivered to
# HOST). Otherwise: loss = iptables statistic DROP on HOST's INPUT; dup = iptables TEE in the
# router's mangle FORWARD for datagrams leaving towards HOST, the clone sent to HOST's address
# as gateway (so, like loss and netem, it impairs what is delivered to HOST); delay, jitter,
# reorder (and loss/dup when iptables cannot) = the programs' own --faults,
# recorded in $TRN_STATE/faults/HOST and used by processes started on HOST afterwards.
# Prints one line per impairment naming the mechanism in force. Needs TRN_NETEM_* and
# TRN_IPT/TRN_STAT_*/TRN_TEE_* from the probes.
trn_impair_apply() {
    local host="$1" loss="$2" dup="$3" delay="$4" jitter="$5" reorder="$6"
    local ns r rif hif faults=() why
    ns="$(trn_ns "$host")"
    r="$(trn_ns r)"
    rif="$TRN_PREFIX-$host-r"
    hif="$TRN_PREFIX-$host"
    trn_impair_clear "$host"
    if [[ -n "$jitter" && -z "$delay" ]]; then
        trn_die "jitter needs a delay"
    fi

    if ((TRN_NETEM_OK)); then
        local args=()
        [[ -n "$delay" ]] && args+=(delay "$delay") && [[ -n "$jitter" ]] && args+=("$jitter")
        [[ -n "$loss" ]] && args+=(loss "$(trn_pct "$loss")")
        [[ -n "$dup" ]] && args+=(duplicate "$(trn_pct "$dup")")
        if [[ -n "$reorder" ]]; then
            # netem reorders only packets it delays: give it a delay if none was asked for.
            [[ -n "$delay" ]] || args+=(delay 10ms)
            args+=(reorder "$(trn_pct "$reorder")")
        fi
        ((${#args[@]})) || return 0
        ip netns exec "$r" tc qdisc add dev "$rif" root netem "${args[@]}" ||
            trn_die "$host: tc qdisc add dev $rif root netem ${args[*]} failed although the probe worked"
        local how="netem on $rif in $r (tc qdisc add dev $rif root netem ${args[*]}; traffic delivered to $host)"
        if [[ -n "$loss" ]]; then echo "$host: loss $(trn_pct "$loss"): $how"; fi
        if [[ -n "$dup" ]]; then echo "$host: dup $(trn_pct "$dup"): $how"; fi
        if [[ -n "$delay" ]]; then echo "$host: delay $delay${jitter:+ jitter $jitter}: $how"; fi
        if [[ -n "$reorder" ]]; then echo "$host: reorder $(trn_pct "$reorder"): $how"; fi
        return 0
    fi

    why="netem unavailable: $TRN_NETEM_ERR"
    [[ -n "$TRN_IPT" ]] && echo "$TRN_IPT" >"$TRN_STATE/iptables"
    if [[ -n "$loss" ]]; then
        if [[ -n "$TRN_IPT" ]] && ((TRN_STAT_OK)); then
            ip netns exec "$ns" "$TRN_IPT" -w -N TRN_LOSS 2>/dev/null || true
            ip netns exec "$ns" "$TRN_IPT" -w -C INPUT -i "$hif" -j TRN_LOSS 2>/dev/null ||
                ip netns exec "$ns" "$TRN_IPT" -w -A INPUT -i "$hif" -j TRN_LOSS
            ip netns exec "$ns" "$TRN_IPT" -w -A TRN_LOSS -p udp -m statistic --mode random \
                --probability "$loss" -j DROP
            echo "$host: loss $(trn_pct "$loss"): iptables statistic DROP on INPUT of $hif in $ns ($TRN_IPT; $why)"
        else
            trn_loud "LOSS NOT KERNEL-LEVEL on $host ($why; iptables statistic: $(trn_ipt_why "$TRN_STAT_ERR")): loss falls back to --faults loss=$loss"
            faults+=("loss=$loss")
            echo "$host: loss $(trn_pct "$loss"): trireme --faults loss=$loss on outgoing datagrams of processes started on $host (NOT kernel-level; $why; iptables statistic unavailable)"
        fi
    fi
    if [[ -n "$dup" ]]; then
        if [[ -n "$TRN_IPT" ]] && ((TRN_TEE_OK)); then
            local chain="TRN_DUP_$host"
            ip netns exec "$r" "$TRN_IPT" -w -t mangle -N "$chain" 2>/dev/null || true
            ip netns exec "$r" "$TRN_IPT" -w -t mangle -C FORWARD -o "$rif" -j "$chain" 2>/dev/null ||
                ip netns exec "$r" "$TRN_IPT" -w -t mangle -A FORWARD -o "$rif" -j "$chain"
            ip netns exec "$r" "$TRN_IPT" -w -t mangle -A "$chain" -p udp -m statistic --mode random \
                --probability "$dup" -j TEE --gateway "$(trn_host_ip "$host")"
            echo "$host: dup $(trn_pct "$dup"): iptables statistic + TEE --gateway $(trn_host_ip "$host") in mangle FORWARD -o $rif in $r (datagrams delivered to $host cloned; $TRN_IPT; $why)"
        else
            trn_loud "TEE UNAVAILABLE on $host ($why; iptables TEE: $(trn_ipt_why "$TRN_TEE_ERR")): duplication falls back to --faults dup=$dup"
            faults+=("dup=$dup")
            echo "$host: dup $(trn_pct "$dup"): trireme --faults dup=$dup on outgoing datagrams of processes started on $host (NOT kernel-level; $why; iptables TEE unavailable)"
        fi
    fi
    if [[ -n "$delay" ]]; then
        faults+=("delay=$delay")
        [[ -n "$jitter" ]] && faults+=("jitter=$jitter")
        echo "$host: delay $delay${jitter:+ jitter $jitter}: trireme --faults delay=$delay${jitter:+,jitter=$jitter} on outgoing datagrams of processes started on $host ($why)"
    fi
    if [[ -n "$reorder" ]]; then
        faults+=("reorder=$reorder")
        echo "$host: reorder $(trn_pct "$reorder"): trireme --faults reorder=$reorder on outgoing datagrams of processes started on $host ($why)"
    fi
    if ((${#faults[@]})); then
        local IFS=,
        echo "${faults[*]}" >"$TRN_STATE/faults/$host"
        if [[ -n "$(ip netns pids "$ns" 2>/dev/null)" ]]; then
            trn_loud "$host already runs processes: --faults ${faults[*]} applies only to processes started after this"
        fi
    fi
}

# Prints the probe results as human lines: which mechanism each impairment would use.
trn_print_mechanisms() {
    if ((TRN_NETEM_OK)); then
        echo "mechanisms: netem available (tc qdisc netem): loss, dup, delay, jitter, reorder all by netem"
        return 0
    fi
    echo "mechanisms: netem unavailable ($TRN_NETEM_ERR)"
    if [[ -n "$TRN_IPT" ]]; then
        echo "  iptables backend: $TRN_IPT ($(readlink -f "$(command -v "$TRN_IPT")"))"
        if ((TRN_STAT_OK)); then echo "  loss: iptables statistic match + DROP: available"; else echo "  loss: iptables statistic match UNAVAILABLE ($TRN_STAT_ERR): --faults loss= instead"; fi
        if ((TRN_TEE_OK)); then echo "  dup: iptables statistic + TEE target (in the router): available"; else echo "  dup: iptables TEE target UNAVAILABLE ($TRN_TEE_ERR): --faults dup= instead"; fi
    else
        echo "  iptables: UNAVAILABLE ($TRN_IPT_ERR): loss and dup by --faults instead"
    fi
    echo "  delay, jitter, reorder: the programs' own --faults"
}

# ---------------------------------------------------------------------------------------
# Processes

# Prints the --faults arguments for processes started on HOST (nothing if none).
trn_faults_args() {
    local f="$TRN_STATE/faults/$1"
    [[ -s "$f" ]] && printf -- '--faults\n%s\n' "$(cat "$f")"
    return 0
}

# Starts a long-running program on HOST in the background, records its PID in
# pids/NAME.pid and its output in logs/NAME.G.log (G = 1, 2, ... per start; path left in
# TRN_LAST_LOG), and waits (deadline 10 s) for its "listening on" line.
# Arguments: HOST NAME BINARY ARGS...
trn_start() {
    local host="$1" name="$2" bin="$3"
    shift 3
    local log gen=1 pid deadline fargs=()
    while [[ -e "$TRN_STATE/logs/$name.$gen.log" ]]; do gen=$((gen + 1)); done
    log="$TRN_STATE/logs/$name.$gen.log"
    # shellcheck disable=SC2034 # read by the scripts that source this file
    TRN_LAST_LOG="$log"
    mapfile -t fargs < <(trn_faults_args "$host")
    [[ -x "$TRN_BIN_DIR/$bin" ]] || trn_die "$TRN_BIN_DIR/$bin is not an executable (set TRIREME_BIN_DIR)"
    ip netns exec "$(trn_ns "$host")" "$TRN_BIN_DIR/$bin" "$@" "${fargs[@]}" >"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$TRN_STATE/pids/$name.pid"
    deadline=$((SECONDS + 10))
    until grep -q '^listening on' "$log" 2>/dev/null; do
        trn_alive "$pid" || trn_die "$name exited at start; its log ($log):$(echo; tail -5 "$log")"
        ((SECONDS < deadline)) || trn_die "$name printed no 'listening on' line within 10 s ($log)"
        sleep 0.05
    done
}

# Stops the program recorded as NAME (SIGTERM by PID, SIGKILL after 5 s).
trn_stop() {
    local name="$1" f="$TRN_STATE/pids/$1.pid"
    [[ -f "$f" ]] || trn_die "no pid file for $name"
    trn_stop_pid "$(cat "$f")" "$name"
    rm -f "$f"
}
