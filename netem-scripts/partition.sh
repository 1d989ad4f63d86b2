#!/usr/bin/env bash
# netem-scripts/partition.sh - cut the view leader from every server across network
# namespaces for several times --dead-after-ms, heal, and check that every key comes back:
# build the hosts, impair the links, start a view leader and N servers, write K keys, check
# them; drop all traffic between the view leader and the servers with iptables inside the view
# leader's namespace (the client stays connected and watches the servers being declared dead);
# delete exactly those rules; time the recovery; check every key, every bucket and the epochs;
# print a result table; tear everything down (also on failure or a signal). See --help.
set -euo pipefail

TRN_PROG=partition
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=SCRIPTDIR/cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster.sh"

# Prints the usage text.
usage() {
    cat <<EOF
Usage: partition.sh [options]

Builds trireme test hosts in network namespaces and starts a view leader on P-vl and N
servers on P-s1..P-sN as scenario.sh does, writes K keys with 'client setr' from P-c and
checks them (step "start N"). Then cuts the view leader from every server: inside P-vl only,
'iptables -I INPUT -s <server IP> -j DROP' and 'iptables -I OUTPUT -d <server IP> -j DROP'
for each server (P-c stays connected). For --hold-ms (default 3 x --dead-after-ms) it polls
'client query_servers --json' and requires that the servers are declared dead (a view with
none of their ids from before the cut). It heals by deleting exactly those rules, then polls
(deadline --step-deadline) until every key reads back with 'client getr' with the value
written and the view lists exactly the N servers, not rebalancing; it prints the time from
the heal to every key readable. Then the checks of scenario.sh (every key with getr, every
bucket against locate; step "heal"). Every epoch answered (query_servers, locate, setr; error
answers carry none) is noted: none may be lower than one seen before it, and none after the
heal lower than the highest before the cut. A getr after the heal that answers a wrong value
or not_found fails the run (a key not yet reconciled must answer 'rebalancing').

Prints lines "cut: ...", "declared dead: yes|NO ...", "recovery: ...", "epochs: ...", the
table (step | live servers | epoch | keys ok | keys missing/wrong | placement ok | seconds)
and RESULT: PASS or RESULT: FAIL; exits 1 if any check failed. Everything is torn down at
exit (hosts.sh down), whatever happens, unless --keep; the logs (state dir/logs) are kept
only when the run failed.

Options:
$(scn_usage_options)
  --hold-ms MS           how long the cut lasts (default 3 x --dead-after-ms)

Binaries: \$TRIREME_BIN_DIR (directory holding viewleader, server, client), default
target/debug under the repository root. Needs root, network namespaces, iptables, jq.
Example: netem-scripts/partition.sh --servers 3 --keys 20 --loss 5% --dup 2%
EOF
}

# Runs iptables inside the view leader's namespace (never anywhere else).
vl_iptables() {
    ip netns exec "$(trn_ns vl)" "$TRN_IPT" -w "$@"
}

# Cuts the view leader from every server: one INPUT and one OUTPUT DROP rule per server,
# inserted first, in P-vl. Records the rules in CUT_RULES (as "CHAIN FLAG IP").
cut_servers() {
    local h ip
    CUT_RULES=()
    for h in $(printf '%s\n' "${!LIVE[@]}" | sort); do
        ip="$(trn_host_ip "$h")"
        vl_iptables -I INPUT -s "$ip" -j DROP
        CUT_RULES+=("INPUT -s $ip")
        vl_iptables -I OUTPUT -d "$ip" -j DROP
        CUT_RULES+=("OUTPUT -d $ip")
    done
}

# Deletes exactly the rules cut_servers inserted. Returns 1 if one could not be deleted.
heal_servers() {
    local rule chain flag ip rc=0
    for rule in "${CUT_RULES[@]}"; do
        read -r chain flag ip <<<"$rule"
        vl_iptables -D "$chain" "$flag" "$ip" -j DROP || {
            trn_log "could not delete the rule '$chain $flag $ip -j DROP' in $(trn_ns vl)"
            rc=1
        }
    done
    CUT_RULES=()
    return "$rc"
}

# Prints the ids in the view CL_OUT (a query_servers answer), sorted, one per line.
view_ids() { jq -r '.servers[].id' <<<"$CL_OUT" | sort; }

# Prints the epochs noted in phase PHASE (from EPOCHS_SEEN), one per line.
phase_epochs() {
    local p="$1" entry
    for entry in "${EPOCHS_SEEN[@]}"; do
        [[ "${entry%%:*}" == "$p" ]] && echo "${entry#*:}"
    done
    return 0
}

# Prints "MIN..MAX (N answers)" of the epochs noted in phase PHASE, or "none".
phase_range() {
    local e
    e="$(phase_epochs "$1" | sort -n)"
    if [[ -z "$e" ]]; then
        echo "none"
    else
        echo "$(head -1 <<<"$e")..$(tail -1 <<<"$e") ($(wc -l <<<"$e") answer(s))"
    fi
}

# Records a failed check: counts it and adds NOTE to the verdict.
fail() {
    FAILED=$((FAILED + 1))
    FAIL_NOTES+=("$1")
    trn_log "CHECK FAILED: $1"
}

# Holds the cut for HOLD_MS, polling query_servers. Sets DEAD_AT (seconds from the cut to the
# first view without any of OLD_IDS, empty if never), CUT_VIEW_N and CUT_EPOCH (the last view
# seen).
hold_cut() {
    local t_cut="$1" until ids
    until="$(awk -v t="$t_cut" -v h="$HOLD_MS" 'BEGIN { printf "%.6f", t + h / 1000 }')"
    DEAD_AT="" CUT_VIEW_N="?" CUT_EPOCH="?"
    while awk -v n="$(now)" -v u="$until" 'BEGIN { exit !(n < u) }'; do
        if TIMEOUT_MS=1000 cl query_servers; then
            ids="$(view_ids)"
            CUT_VIEW_N="$(jq -r '.servers | length' <<<"$CL_OUT")"
            CUT_EPOCH="$(jq -r .epoch <<<"$CL_OUT")"
            if [[ -z "$DEAD_AT" ]] && [[ -z "$(comm -12 <(echo "$OLD_IDS") <(echo "$ids") | grep -v '^$')" ]]; then
                DEAD_AT="$(elapsed "$t_cut" "$(now)")"
                trn_log "the servers were declared dead ${DEAD_AT} s after the cut: $CL_OUT"
            fi
        fi
        sleep "$(awk -v n="$(now)" -v u="$until" 'BEGIN { r = u - n; printf "%.3f", r < 0 ? 0 : (r < 0.2 ? r : 0.2) }')"
    done
}

# Prints the seconds from T0 to T1 (both $EPOCHREALTIME values), with one decimal, without
# starting a process (the recovery loop must not be slowed down by its own bookkeeping).
secs() {
    local a="${1/./}" b="${2/./}" d
    d=$((10#$b - 10#$a))
    ((d >= 0)) || d=0
    printf '%d.%d' $((d / 1000000)) $((d % 1000000 / 100000))
}

# Reads the keys given as arguments with 'client getr --json' (no --wait, --timeout-ms 3000),
# one client per key, all at once in P-c, and waits for them (by PID). Leaves each answer in
# $TRN_STATE/reads/KEY and the time it came in $TRN_STATE/reads/KEY.t.
read_keys() {
    local dir="$TRN_STATE/reads" key pid pids=()
    mkdir -p "$dir"
    for key in "$@"; do
        rm -f "$dir/$key" "$dir/$key.t"
        (
            ip netns exec "$(trn_ns c)" "$TRN_BIN_DIR/client" --viewleader "$VL_ADDR" \
                --timeout-ms 3000 --json "${CLIENT_FAULTS[@]}" getr "$key" \
                >"$dir/$key" 2>>"$TRN_STATE/logs/client.log" </dev/null
            echo "$EPOCHREALTIME" >"$dir/$key.t"
        ) &
        pids+=("$!")
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
}

# Polls after the heal until every key read back with its value and the view lists exactly
# the live servers, not rebalancing, or the deadline. Each round reads all keys not read back
# yet at once (read_keys); a key's time is when its successful getr returned. Sets
# READABLE_AT, FIRST_AT and SETTLED_AT (seconds from the heal, empty if never), NEW_IDS, and
# counts wrong answers (a wrong value, or not_found) in BAD_READS with details in
# BAD_READ_LOG.
recover() {
    local t_heal="$1" deadline key want t pending=() path ok value kind failure rounds=0
    local dir="$TRN_STATE/reads"
    local -A done_at=()
    deadline=$((SECONDS + STEP_DEADLINE))
    want="$(live_addrs)"
    READABLE_AT="" FIRST_AT="" SETTLED_AT="" NEW_IDS="" BAD_READS=0 BAD_READ_LOG=()
    while ((SECONDS < deadline)); do
        if [[ -z "$SETTLED_AT" ]] && TIMEOUT_MS=2000 cl query_servers &&
            [[ "$(jq -r '[.servers[].addr] | sort | join(" ")' <<<"$CL_OUT")" == "$want" &&
            "$(jq -r .rebalancing <<<"$CL_OUT")" == false ]]; then
            SETTLED_AT="$(secs "$t_heal" "$(now)")"
            NEW_IDS="$(view_ids)"
            trn_log "view settled ${SETTLED_AT} s after the heal: $CL_OUT"
        fi
        pending=()
        for key in $(printf '%s\n' "${!VALUES[@]}" | sort); do
            [[ -n "${done_at[$key]:-}" ]] || pending+=("$key")
        done
        if ((${#pending[@]})); then
            rounds=$((rounds + 1))
            read_keys "${pending[@]}"
            t="$(secs "$t_heal" "$(now)")"
            failure=""
            # One jq for the whole round: KEY-PATH, ok, value, kind per answer.
            while IFS=$'\t' read -r path ok value kind; do
                key="${path##*/}"
                if [[ "$ok" == true && "$value" == "${VALUES[$key]}" ]]; then
                    read -r t <"$dir/$key.t"
                    done_at["$key"]="$(secs "$t_heal" "$t")"
                elif [[ "$ok" == true || "$kind" == not_found ]]; then
                    BAD_READS=$((BAD_READS + 1))
                    BAD_READ_LOG+=("getr $key (expected '${VALUES[$key]}'): $(cat "$dir/$key")")
                    trn_log "CHECK FAILED: ${BAD_READ_LOG[-1]}"
                elif [[ -z "$failure" ]]; then
                    failure="$key: $(cat "$dir/$key")"
                fi
            done < <(cd "$dir" && jq -R -r '(fromjson? // {"ok": false, "kind": "unparsable"}) as $a
                | [input_filename, ($a.ok | tostring), ($a.value // ""), ($a.kind // "")] | @tsv' \
                "${pending[@]}")
            trn_log "round $rounds, $(secs "$t_heal" "$(now)") s after the heal: ${#done_at[@]}/$KEYS keys read back${failure:+ (one failure: $failure)}"
        fi
        if ((${#done_at[@]} == KEYS)) && [[ -n "$SETTLED_AT" ]]; then
            READABLE_AT="$(printf '%s\n' "${done_at[@]}" | sort -n | tail -1)"
            FIRST_AT="$(printf '%s\n' "${done_at[@]}" | sort -n | head -1)"
            return 0
        fi
        sleep 0.05
    done
    trn_log "recovery incomplete after ${STEP_DEADLINE}s: ${#done_at[@]}/$KEYS keys read back, view settled: ${SETTLED_AT:-no}; last answer $CL_OUT"
    if ((${#done_at[@]} == KEYS)); then
        READABLE_AT="$(printf '%s\n' "${done_at[@]}" | sort -n | tail -1)"
        FIRST_AT="$(printf '%s\n' "${done_at[@]}" | sort -n | head -1)"
    fi
    for key in $(printf '%s\n' "${!VALUES[@]}" | sort); do
        [[ -n "${done_at[$key]:-}" ]] || trn_log "  never read back after the heal: $key"
    done
    return 1
}

# Parses the command line and runs the scenario.
main() {
    scn_defaults
    HOLD_MS=""
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --hold-ms) HOLD_MS="${2:?}"; shift 2 ;;
            *)
                scn_option "$@"
                ((SCN_SHIFT)) || { echo "unknown argument: $1" >&2; usage >&2; exit 2; }
                shift "$SCN_SHIFT"
                ;;
        esac
    done
    scn_validate
    HOLD_MS="${HOLD_MS:-$((3 * DEAD_AFTER_MS))}"
    [[ "$HOLD_MS" =~ ^[1-9][0-9]*$ ]] || { echo "--hold-ms must be a positive integer" >&2; exit 2; }

    SCN_TRACK_EPOCHS=1 EPOCH_PHASE=setup EPOCH_MAX=0
    EPOCHS_SEEN=() EPOCH_REGRESSIONS=() CUT_RULES=()
    scn_setup
    [[ -n "$TRN_IPT" ]] || trn_die "the cut needs iptables inside the view leader's namespace: $TRN_IPT_ERR"

    EPOCH_PHASE=before
    scn_start_cluster "$(now)"
    if ! TIMEOUT_MS=2000 cl_read query_servers; then
        trn_die "query_servers before the cut failed: $CL_OUT"
    fi
    OLD_IDS="$(view_ids)"
    local epoch_before="$EPOCH_MAX" h addrs=""
    for h in $(printf '%s\n' "${!LIVE[@]}" | sort); do addrs+="$h=$(trn_host_ip "$h") "; done

    # The cut.
    local t_cut t_heal hold_s
    EPOCH_PHASE=cut
    cut_servers
    t_cut="$(now)"
    hold_s="$(awk -v h="$HOLD_MS" 'BEGIN { printf "%.1f", h / 1000 }')"
    trn_log "cut: the view leader no longer reaches ${addrs% } (for $hold_s s)"
    hold_cut "$t_cut"
    heal_servers || fail "the cut's rules could not all be deleted"
    t_heal="$(now)"
    EPOCH_PHASE=after
    echo "cut: view leader cut from ${addrs% } for $(elapsed "$t_cut" "$t_heal") s ($TRN_IPT in $(trn_ns vl): INPUT -s IP -j DROP, OUTPUT -d IP -j DROP per server; healed by deleting exactly those rules)"
    if [[ -n "$DEAD_AT" ]]; then
        echo "declared dead: yes, $DEAD_AT s after the cut (last view during the cut: epoch $CUT_EPOCH, $CUT_VIEW_N servers, none of the ids from before)"
    else
        echo "declared dead: NO (last view during the cut: epoch $CUT_EPOCH, $CUT_VIEW_N servers, still holding ids from before the cut)"
        fail "the servers were not declared dead during the ${hold_s} s cut"
    fi
    ROWS+=("$(printf '| %-12s | %12s | %5s | %7s | %18s | %12s | %7s |' \
        "cut ${hold_s}s" "$CUT_VIEW_N in view" "$CUT_EPOCH" "-" "-" "-" "$(elapsed "$t_cut" "$t_heal")")")

    # The recovery.
    if recover "$t_heal"; then
        echo "recovery: every key readable $READABLE_AT s after the heal (the first $FIRST_AT s); view settled (${#LIVE[@]} servers, not rebalancing) $SETTLED_AT s after the heal"
    else
        echo "recovery: INCOMPLETE after $STEP_DEADLINE s (every key readable: ${READABLE_AT:-no}; view settled: ${SETTLED_AT:-no})"
        fail "no full recovery within ${STEP_DEADLINE} s of the heal"
    fi
    if ((BAD_READS)); then
        echo "wrong reads after the heal: $BAD_READS"
        local line
        for line in "${BAD_READ_LOG[@]}"; do echo "  $line"; done
        fail "$BAD_READS getr answer(s) after the heal were a wrong value or not_found"
    fi
    if [[ -n "$NEW_IDS" ]]; then
        if [[ -z "$(comm -12 <(echo "$OLD_IDS") <(echo "$NEW_IDS") | grep -v '^$')" ]]; then
            echo "rejoined under fresh ids: yes"
        else
            echo "rejoined under fresh ids: no (ids from before the cut are in the view after it)"
        fi
    fi
    step_checks "heal" "$t_heal" || true

    # The epochs.
    local min_after ok_floor=yes ok_mono=yes
    min_after="$(phase_epochs after | sort -n | head -1)"
    if [[ -z "$min_after" ]]; then
        ok_floor="unknown (no epoch answered after the heal)"
        fail "no epoch was answered after the heal"
    elif ((min_after < epoch_before)); then
        ok_floor=NO
        fail "an epoch after the heal ($min_after) is lower than before the cut ($epoch_before)"
    fi
    if ((${#EPOCH_REGRESSIONS[@]})); then
        ok_mono=NO
        fail "epochs went backwards ${#EPOCH_REGRESSIONS[@]} time(s): ${EPOCH_REGRESSIONS[0]}"
    fi
    echo "epochs: before the cut $epoch_before, during the cut $(phase_range cut), after the heal $(phase_range after); never lower than before the cut: $ok_floor; never backwards: $ok_mono"

    print_table
    ((FAILED == 0))
}

main "$@"
