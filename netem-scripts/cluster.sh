# shellcheck shell=bash
# netem-scripts/cluster.sh - what the scenario scripts (scenario.sh, partition.sh) share: their
# common options, the setup of a cluster on the namespace hosts (hosts, impairments, view
# leader), the client wrapper, starting and stopping servers, waiting for a settled view,
# writing the keys, the key and bucket checks, the result table and the teardown.
#
# Sourced after lib.sh; not meant to be run by itself. The scripts keep their state in these
# globals: SERVERS KEYS KEEP DEAD_AFTER_MS HEARTBEAT_MS REPLICAS TIMEOUT_MS STEP_DEADLINE (the
# options), VL_MEMBERS (view-leader group members, one host each; 1 = a lone view leader on
# P-vl, the default; set by a script before scn_setup), VL_HOSTS (their hosts), VL_ADDR (their
# addresses, comma-separated: what servers and the client are given), CLIENT_FAULTS, LIVE
# (host -> 1 for the servers running), VALUES (key -> value written), ROWS (table rows),
# FAILED (failed steps), FAIL_NOTES (extra failure reasons for the verdict line), T_START,
# CL_OUT, EPOCH, KEYS_OK, KEYS_BAD, PLACEMENT. With SCN_TRACK_EPOCHS=1, every successful client
# answer that carries an epoch is noted (see scn_note_epoch).

VL_PORT=39000
SERVER_PORT=38000

# Sets the defaults of the common options.
scn_defaults() {
    SERVERS=3 KEYS=20 KEEP=0 DEAD_AFTER_MS=1000 HEARTBEAT_MS=200 REPLICAS=3
    TIMEOUT_MS=10000 STEP_DEADLINE=60 VL_MEMBERS=1
    IMP_LOSS="" IMP_DUP="" IMP_DELAY="" IMP_JITTER="" IMP_REORDER="" IMP_HOSTS=all
}

# Prints the usage lines of the common options (for the scripts' --help).
scn_usage_options() {
    cat <<EOF
  --prefix P             name prefix, 1-8 chars [a-z0-9] (env TRN_PREFIX, default trn)
  --subnet-base 10.B     address base (env TRN_SUBNET_BASE; default from the prefix)
  --servers N            servers (default 3)
  --keys K               keys written (default 20)
  --loss X  --dup X      kernel-level loss / duplication (5% or 0.05); see impair.sh --help
  --delay D --jitter D   delay (20ms), jitter
  --reorder X            reordering probability
  --impair HOSTS         hosts impaired: all (default) or a comma list of vl,c,s1..
  --dead-after-ms MS     view leader's --dead-after-ms (default 1000)
  --heartbeat-ms MS      servers' --heartbeat-interval-ms (default 200)
  --replicas N           view leader's --replicas (default 3)
  --timeout-ms MS        client --timeout-ms (default 10000)
  --step-deadline S      seconds a step may take to converge (default 60)
  --keep                 leave hosts and processes running at the end (hosts.sh down later)
  --state-dir DIR        pid files and logs (env TRN_STATE_DIR, default /tmp/trireme-netem/P)
  -h, --help             this text
EOF
}

# Parses one common option at the head of the arguments. Sets SCN_SHIFT to the number of
# arguments it consumed (0: not a common option).
scn_option() {
    SCN_SHIFT=2
    case "$1" in
        --prefix) TRN_PREFIX="${2:?}" ;;
        --subnet-base) TRN_SUBNET_BASE="${2:?}" ;;
        --state-dir) TRN_STATE_DIR="${2:?}" ;;
        --servers) SERVERS="${2:?}" ;;
        --keys) KEYS="${2:?}" ;;
        --loss) IMP_LOSS="${2:?}" ;;
        --dup) IMP_DUP="${2:?}" ;;
        --delay) IMP_DELAY="${2:?}" ;;
        --jitter) IMP_JITTER="${2:?}" ;;
        --reorder) IMP_REORDER="${2:?}" ;;
        --impair) IMP_HOSTS="${2:?}" ;;
        --dead-after-ms) DEAD_AFTER_MS="${2:?}" ;;
        --heartbeat-ms) HEARTBEAT_MS="${2:?}" ;;
        --replicas) REPLICAS="${2:?}" ;;
        --timeout-ms) TIMEOUT_MS="${2:?}" ;;
        --step-deadline) STEP_DEADLINE="${2:?}" ;;
        --keep) SCN_SHIFT=1 KEEP=1 ;;
        *) SCN_SHIFT=0 ;;
    esac
}

# Checks the numeric common options; exits 2 (usage error) on a bad one.
scn_validate() {
    local n
    for n in SERVERS KEYS DEAD_AFTER_MS HEARTBEAT_MS REPLICAS TIMEOUT_MS STEP_DEADLINE; do
        [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || { echo "--${n,,} must be a positive integer" >&2; exit 2; }
    done
    ((SERVERS <= 99)) || { echo "--servers must be at most 99" >&2; exit 2; }
}

# Everything before the first server: checks the tools and binaries, installs the traps,
# builds the hosts, applies the impairments (before any process starts, so that --faults
# fallbacks apply to all of them; the mechanism lines go to stdout), starts the view leader
# on P-vl (or, with VL_MEMBERS > 1, the group's members on P-vl, P-vl2, ...; see
# scn_start_group) and checks that the client reaches it. Sets VL_HOSTS, VL_ADDR,
# CLIENT_FAULTS, T_START, FAILED,
# ROWS, FAIL_NOTES, LIVE, VALUES, and TRN_IPT (the iptables backend, empty if none) with the
# other probe results.
scn_setup() {
    TRN_BIN_DIR="${TRIREME_BIN_DIR:-}"
    trn_init
    command -v jq >/dev/null || {
        trn_log "jq is missing: installing it with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y jq >&2 ||
            { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y jq >&2; } ||
            trn_die "jq is needed and could not be installed"
    }
    local b
    for b in viewleader server client; do
        [[ -x "$TRN_BIN_DIR/$b" ]] || trn_die "$TRN_BIN_DIR/$b is not an executable (set TRIREME_BIN_DIR)"
    done
    if [[ -n "${TRIREME_FAULTS:-}" ]]; then
        trn_loud "ignoring TRIREME_FAULTS=$TRIREME_FAULTS from the environment: impairments come only from this script's options"
        unset TRIREME_FAULTS
    fi
    trn_require_netns

    T_START="$(now)"
    FAILED=0
    ROWS=()
    FAIL_NOTES=()
    declare -gA LIVE=() VALUES=()
    trap cleanup EXIT
    trap 'trn_log "interrupted"; exit 130' INT
    trap 'trn_log "terminated"; exit 143' TERM

    trn_up "$SERVERS" "$VL_MEMBERS"
    mapfile -t VL_HOSTS < <(trn_vl_hosts "$VL_MEMBERS")
    VL_ADDR="$(trn_host_ip vl):$VL_PORT"

    local hosts=() h loss="" dup="" delay="" jitter="" reorder=""
    if [[ "$IMP_HOSTS" == all ]]; then
        mapfile -t hosts < <(trn_hosts)
    else
        IFS=, read -ra hosts <<<"$IMP_HOSTS"
        for h in "${hosts[@]}"; do trn_host_index "$h" >/dev/null; done
    fi
    [[ -z "$IMP_LOSS" ]] || loss="$(trn_prob "$IMP_LOSS")"
    [[ -z "$IMP_DUP" ]] || dup="$(trn_prob "$IMP_DUP")"
    [[ -z "$IMP_REORDER" ]] || reorder="$(trn_prob "$IMP_REORDER")"
    [[ -z "$IMP_DELAY" ]] || delay="$(trn_dur "$IMP_DELAY")"
    [[ -z "$IMP_JITTER" ]] || jitter="$(trn_dur "$IMP_JITTER")"
    trn_probe_netem
    trn_probe_iptables
    trn_print_mechanisms
    if [[ -n "$loss$dup$delay$jitter$reorder" ]]; then
        echo "impairments (hosts: ${hosts[*]}):"
        for h in "${hosts[@]}"; do
            trn_impair_apply "$h" "$loss" "$dup" "$delay" "$jitter" "$reorder" | sed 's/^/  /'
        done
    else
        echo "impairments: none"
    fi
    CLIENT_FAULTS=()
    mapfile -t CLIENT_FAULTS < <(trn_faults_args c)

    local reach_ms=2000
    if ((VL_MEMBERS > 1)); then
        scn_start_group
        # The group elects its first leader before it answers.
        reach_ms=5000
    else
        trn_start vl viewleader viewleader --bind "$VL_ADDR" --dead-after-ms "$DEAD_AFTER_MS" \
            --replicas "$REPLICAS"
        trn_log "view leader on $VL_ADDR"
    fi
    # Any answer proves the way there and back: a view leader started less than
    # --dead-after-ms ago answers query_servers with kind "rebalancing" (it may have restarted
    # and does not know its view yet).
    if ! TIMEOUT_MS="$reach_ms" cl query_servers &&
        [[ "$(jq -r '.kind // "none"' <<<"$CL_OUT" 2>/dev/null)" != rebalancing ]]; then
        trn_die "the client cannot reach the view leader: $CL_OUT"
    fi
}

# Prints the address view-leader host HOST (vl, vl2..vl5) binds and is reached at.
vl_member_addr() { echo "$(trn_host_ip "$1"):$VL_PORT"; }

# Starts a view-leader group of VL_MEMBERS members, one on each of VL_HOSTS (P-vl, P-vl2, ...),
# each bound to its host's address, all with the same --peers list (VL_ADDR, which it sets to
# the members' addresses) and each with its own --data-dir under the state directory.
scn_start_group() {
    local h member_addrs=()
    for h in "${VL_HOSTS[@]}"; do member_addrs+=("$(vl_member_addr "$h")"); done
    VL_ADDR="$(IFS=,; echo "${member_addrs[*]}")"
    mkdir -p "$TRN_STATE/vl-data"
    for h in "${VL_HOSTS[@]}"; do
        trn_start "$h" "viewleader-$h" viewleader --bind "$(vl_member_addr "$h")" \
            --peers "$VL_ADDR" --data-dir "$TRN_STATE/vl-data/$h" \
            --dead-after-ms "$DEAD_AFTER_MS" --replicas "$REPLICAS"
    done
    trn_log "view-leader group of ${#VL_HOSTS[@]} on ${VL_HOSTS[*]}: $VL_ADDR"
}

# Starts servers s1..sN, waits for the view, writes the keys and checks them: the step
# "start N", timed from T0. Exits (after the table) if the view does not settle or a key
# cannot be written. Argument: T0.
scn_start_cluster() {
    local t0="$1" k
    for ((k = 1; k <= SERVERS; k++)); do start_server "s$k"; done
    if ! wait_view; then
        ROWS+=("$(printf '| %-12s | %12s | %5s | %7s | %18s | %12s | %7s |' \
            "start $SERVERS" "$SERVERS" "?" "-" "-" "NO (view)" "$(elapsed "$t0" "$(now)")")")
        FAILED=1
        print_table
        exit 1
    fi
    if ! write_keys; then
        trn_log "could not write every key"
        FAILED=1
        print_table
        exit 1
    fi
    step_checks "start $SERVERS" "$t0" || { print_table; exit 1; }
}

# Runs the client in the client namespace with --json and the common flags. Arguments: the
# client's command and arguments. Sets CL_OUT (its stdout) and returns its exit status. The
# client runs in the background and is waited for, so a signal reaches our trap at once.
cl() {
    local out="$TRN_STATE/client.out" rc=0
    ip netns exec "$(trn_ns c)" "$TRN_BIN_DIR/client" --viewleader "$VL_ADDR" \
        --timeout-ms "$TIMEOUT_MS" --json "${CLIENT_FAULTS[@]}" "$@" \
        >"$out" 2>>"$TRN_STATE/logs/client.log" </dev/null &
    wait $! || rc=$?
    CL_OUT="$(cat "$out")"
    if [[ "${SCN_TRACK_EPOCHS:-0}" == 1 ]]; then scn_note_epoch "$1"; fi
    return "$rc"
}

# With SCN_TRACK_EPOCHS=1 (called by cl): if CL_OUT is a successful answer carrying an epoch,
# appends it to EPOCHS_SEEN ("phase:epoch", phase from EPOCH_PHASE) and, if it is lower than
# the highest epoch seen before, records the regression in EPOCH_REGRESSIONS. Answers that are
# errors carry no epoch and are skipped. Argument: the client command (for the log).
scn_note_epoch() {
    local e
    e="$(jq -r 'if .ok == true and (.epoch | type) == "number" then .epoch else empty end' \
        <<<"$CL_OUT" 2>/dev/null)" || return 0
    [[ -n "$e" ]] || return 0
    EPOCHS_SEEN+=("${EPOCH_PHASE:-?}:$e")
    if ((e < ${EPOCH_MAX:-0})); then
        EPOCH_REGRESSIONS+=("$1 in phase ${EPOCH_PHASE:-?} answered epoch $e after epoch $EPOCH_MAX had been seen")
        trn_log "CHECK FAILED: epoch went backwards: ${EPOCH_REGRESSIONS[-1]} ($CL_OUT)"
    else
        EPOCH_MAX="$e"
    fi
}

# Like cl, but retries up to 3 times when the command fails for a transient reason (kind
# timeout, unreachable, rebalancing, no_servers); for read-only commands only.
cl_read() {
    local attempt kind
    for attempt in 1 2 3 4; do
        if cl "$@"; then return 0; fi
        kind="$(jq -r '.kind // "none"' <<<"$CL_OUT" 2>/dev/null || echo unparsable)"
        case "$kind" in
            timeout | unreachable | rebalancing | no_servers) ;;
            *) return 1 ;;
        esac
        trn_log "client $* failed (attempt $attempt: $CL_OUT), retrying"
        sleep 0.2
    done
    return 1
}

# Prints the current time in seconds with microseconds.
now() { echo "$EPOCHREALTIME"; }

# Prints B - A in seconds with one decimal.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Prints the advertised address of server host sK.
server_addr() { echo "$(trn_host_ip "$1"):$SERVER_PORT"; }

# Starts a fresh server process on host sK (a new id each time).
start_server() {
    local host="$1"
    trn_start "$host" "$host" server --bind "0.0.0.0:$SERVER_PORT" \
        --advertise "$(server_addr "$host")" --viewleader "$VL_ADDR" \
        --heartbeat-interval-ms "$HEARTBEAT_MS"
    LIVE["$host"]=1
    trn_log "started server on $host ($(server_addr "$host")): $(head -1 "$TRN_LAST_LOG")"
}

# Stops the server process on host sK with SIGTERM (by PID).
kill_server() {
    local host="$1"
    trn_stop "$host"
    unset 'LIVE[$host]'
    trn_log "stopped server on $host ($(server_addr "$host"))"
}

# Prints the advertised addresses of the live servers, sorted, space-separated.
live_addrs() {
    local h
    for h in "${!LIVE[@]}"; do server_addr "$h"; done | sort | tr '\n' ' ' | sed 's/ $//'
}

# Polls query_servers until it lists exactly the live servers and rebalancing is false, or
# the step deadline passes. Sets EPOCH. Returns 1 on deadline.
wait_view() {
    local want deadline got reb
    want="$(live_addrs)"
    deadline=$((SECONDS + STEP_DEADLINE))
    while ((SECONDS < deadline)); do
        if cl query_servers; then
            got="$(jq -r '[.servers[].addr] | sort | join(" ")' <<<"$CL_OUT")"
            reb="$(jq -r '.rebalancing' <<<"$CL_OUT")"
            if [[ "$got" == "$want" && "$reb" == false ]]; then
                EPOCH="$(jq -r '.epoch' <<<"$CL_OUT")"
                return 0
            fi
        fi
        sleep 0.1
    done
    trn_log "view did not settle within ${STEP_DEADLINE}s: want [$want] not rebalancing, last answer $CL_OUT"
    return 1
}

# Writes the K keys with setr (a failed setr is retried up to 5 times: setr never retries on
# its own, and rewriting the same value is harmless). Fills VALUES. Returns 1 if a key could
# not be written.
write_keys() {
    local i key attempt
    for ((i = 1; i <= KEYS; i++)); do
        key="$(printf 'key%03d' "$i")"
        VALUES["$key"]="value-$i-$TRN_PREFIX-$RANDOM"
        for attempt in 1 2 3 4 5 6; do
            if cl setr "$key" "${VALUES[$key]}" && [[ "$(jq -r .ok <<<"$CL_OUT")" == true ]]; then
                break
            fi
            trn_log "setr $key failed (attempt $attempt): $CL_OUT"
            ((attempt < 6)) || return 1
            sleep 0.2
        done
    done
}

# Checks every key with getr and every live server's bucket against locate. Sets KEYS_OK,
# KEYS_BAD, PLACEMENT (yes/no). Details of every failure go to stderr.
check_all() {
    local key got addr h want have
    KEYS_OK=0
    KEYS_BAD=0
    PLACEMENT=yes
    declare -A expect=()
    for h in "${!LIVE[@]}"; do expect["$(server_addr "$h")"]=""; done
    for key in $(printf '%s\n' "${!VALUES[@]}" | sort); do
        if cl_read getr --wait "$key" && got="$(jq -r .value <<<"$CL_OUT")" &&
            [[ "$got" == "${VALUES[$key]}" ]]; then
            KEYS_OK=$((KEYS_OK + 1))
        else
            KEYS_BAD=$((KEYS_BAD + 1))
            trn_log "CHECK FAILED: getr $key: expected '${VALUES[$key]}', got $CL_OUT"
        fi
        if ! cl_read locate "$key"; then
            PLACEMENT=no
            trn_log "CHECK FAILED: locate $key: $CL_OUT"
            continue
        fi
        for addr in $(jq -r '.replicas[].addr' <<<"$CL_OUT"); do
            if [[ -z "${expect[$addr]+set}" ]]; then
                PLACEMENT=no
                trn_log "CHECK FAILED: locate $key names $addr, which is not a live server"
                continue
            fi
            expect["$addr"]+="$key "
        done
    done
    for addr in "${!expect[@]}"; do
        want="$(tr ' ' '\n' <<<"${expect[$addr]}" | grep -v '^$' | sort | tr '\n' ' ')"
        if ! cl_read --server "$addr" query_all_keys; then
            PLACEMENT=no
            trn_log "CHECK FAILED: query_all_keys on $addr: $CL_OUT"
            continue
        fi
        have="$(jq -r '.keys[]' <<<"$CL_OUT" | sort | tr '\n' ' ')"
        trn_log "  $addr holds $(wc -w <<<"$have") keys, is a replica of $(wc -w <<<"$want")"
        if [[ "$want" != "$have" ]]; then
            PLACEMENT=no
            trn_log "CHECK FAILED: $addr holds [$have], its replica keys are [$want]"
        fi
    done
}

# Runs the checks of one step, after the view settled; if the epoch changed meanwhile (a view
# change during the checks), settles and checks again (3 attempts). Appends a table row.
# Arguments: step name, step start time.
step_checks() {
    local name="$1" t0="$2" attempt epoch0 ok=1
    for attempt in 1 2 3; do
        if ! wait_view; then
            ROWS+=("$(printf '| %-12s | %12s | %5s | %7s | %18s | %12s | %7s |' \
                "$name" "${#LIVE[@]}" "?" "-" "-" "NO (view)" "$(elapsed "$t0" "$(now)")")")
            FAILED=$((FAILED + 1))
            return 1
        fi
        epoch0="$EPOCH"
        check_all
        if cl query_servers && [[ "$(jq -r .epoch <<<"$CL_OUT")" == "$epoch0" ]]; then
            break
        fi
        trn_log "$name: the view changed during the checks (epoch $epoch0 -> $(jq -r .epoch <<<"$CL_OUT" 2>/dev/null)); checking again"
        ((attempt < 3)) || ok=0
    done
    ((KEYS_BAD == 0)) && [[ "$PLACEMENT" == yes ]] || ok=0
    ((ok)) || FAILED=$((FAILED + 1))
    ROWS+=("$(printf '| %-12s | %12s | %5s | %7s | %18s | %12s | %7s |' \
        "$name" "${#LIVE[@]}" "$epoch0" "$KEYS_OK/$KEYS" "$KEYS_BAD" "$PLACEMENT" "$(elapsed "$t0" "$(now)")")")
    trn_log "${ROWS[-1]}"
    return 0
}

# Prints the result table and the verdict (with the reasons in FAIL_NOTES, if any).
print_table() {
    echo
    printf '| %-12s | %12s | %5s | %7s | %18s | %12s | %7s |\n' \
        step "live servers" epoch "keys ok" "keys missing/wrong" "placement ok" seconds
    printf '|%s|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" \
        "$(printf -- '-%.0s' {1..7})" "$(printf -- '-%.0s' {1..9})" "$(printf -- '-%.0s' {1..20})" \
        "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..9})"
    local row
    for row in "${ROWS[@]}"; do echo "$row"; done
    echo "total: $(elapsed "$T_START" "$(now)") s, prefix $TRN_PREFIX, $SERVERS servers, $KEYS keys"
    if ((FAILED == 0)); then
        echo "RESULT: PASS"
    else
        local note notes=""
        for note in "${FAIL_NOTES[@]}"; do notes+="; $note"; done
        echo "RESULT: FAIL ($FAILED step(s) failed$notes; logs in $TRN_STATE/logs)"
    fi
}

# EXIT trap: tears the hosts down (unless --keep), keeping the exit status.
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    rm -rf "$TRN_STATE/reads"
    if ((KEEP)); then
        trn_log "--keep: hosts left running; remove them with: hosts.sh --prefix $TRN_PREFIX down"
    else
        # Logs are kept when the run failed (their directory is named in the verdict).
        trn_down "$((rc != 0))"
    fi
    exit "$rc"
}
