#!/usr/bin/env bash
# netem-scripts/group-partition.sh - isolate the leader of a view-leader group across network
# namespaces (issue 16): build the hosts (three group members each on a host of its own, N
# servers, a client), impair the links, write K keys and check them; find the group's leader;
# drop all its traffic to and from every other host with iptables inside its namespace; require
# that the two others elect a new leader, that replicated writes and reads go on through them
# within a bound, and that no server is declared dead; heal (delete exactly those rules); require
# that the old leader rejoins as a follower and that every key (old and new) reads back with its
# value, placement exact; print a result table; tear everything down (also on failure or a
# signal). See --help.
set -euo pipefail

TRN_PROG=group-partition
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=SCRIPTDIR/cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster.sh"

# Prints the usage text.
usage() {
    cat <<EOF
Usage: group-partition.sh [options]

Builds trireme test hosts in network namespaces with a view-leader group of --members M
(default 3) members, one per host (P-vl, P-vl2, P-vl3: each 'viewleader --bind <its address>
--peers <all members> --data-dir ...'), N servers on P-s1..P-sN and a client on P-c (servers
and client are given every member), impairs every link as scenario.sh does, writes K keys with
'client setr' and checks them (step "start N"). 'client query_servers --json' asked of each
member in turn must name the same leader. Then the leader is isolated: inside its namespace
only, 'iptables -I INPUT -s <IP> -j DROP' and 'iptables -I OUTPUT -d <IP> -j DROP' for every
other host (the other members, the servers, the client). From the cut on, polling with a
deadline (5 x --failover-bound-ms):
  - new leader: query_servers asked of a surviving member (a background watcher asks them in
    turn for the whole cut) names another member as leader; the time printed is the election
    as the new leader's log stamps it ("leads the view-leader group"), and when a survivor
    first named it;
  - first setr: 'client setr' (given every member) of a new key succeeds; the time from the
    cut must be under --failover-bound-ms (default 3/4 of --dead-after-ms: well under
    --dead-after-ms plus an election, which takes up to 0.57 s);
  - the remaining --new-keys keys are written with setr and read back with getr (step "cut");
  - no server is declared dead: every view answered during the cut (held --hold-ms, default
    3 x --dead-after-ms, and at least 2 x --dead-after-ms after the new leader) holds every
    server id of the view before the cut.
It heals by deleting exactly those rules, then requires (deadline --step-deadline) that
query_servers asked of the old leader names the leader the survivors name, and that it is not
the old leader itself (step "rejoin"); then the checks of scenario.sh on every key, old and new
(getr with the value written, every bucket against locate; step "heal"), and that the servers
kept the ids they had before the cut. Every epoch answered is noted (query_servers, locate,
setr): none may be lower than one seen before it.

Prints lines "leader: ...", "cut: ...", "new leader: ...", "first setr: ...", "declared dead:
...", "rejoin: ...", "server ids: ...", "epochs: ...", the table (step | live servers | epoch |
keys ok | keys missing/wrong | placement ok | seconds; "new leader" and "first setr" count
seconds from the cut, "rejoin" from the heal, "never" if it did not happen) and RESULT: PASS or
RESULT: FAIL; exits 1 if any check failed. Everything is torn down at exit (hosts.sh down),
whatever happens, unless --keep; the logs (state dir/logs) are kept only when the run failed.

Options:
$(scn_usage_options)
  --members M            view-leader group members, 3 or 5 (default 3)
  --new-keys K           keys written during the cut (default 10)
  --hold-ms MS           how long the cut lasts at least (default 3 x --dead-after-ms)
  --failover-bound-ms MS bound on the time from the cut to the first setr (default 3/4 of
                         --dead-after-ms)
Here --dead-after-ms defaults to 2000, the view leader's own default.

Binaries: \$TRIREME_BIN_DIR (directory holding viewleader, server, client), default
target/debug under the repository root. Needs root, network namespaces, iptables, jq.
Example: netem-scripts/group-partition.sh --servers 3 --keys 20 --loss 5% --dup 2%
EOF
}

# Runs iptables inside the isolated leader's namespace (never anywhere else).
leader_iptables() {
    ip netns exec "$(trn_ns "$OLD_LEADER_HOST")" "$TRN_IPT" -w "$@"
}

# Isolates the leader: one INPUT and one OUTPUT DROP rule for every other host, inserted first,
# in the leader's namespace. Records the rules in CUT_RULES (as "CHAIN FLAG IP") and the hosts
# cut off in CUT_HOSTS.
isolate_leader() {
    local h ip
    CUT_RULES=() CUT_HOSTS=()
    for h in $(trn_hosts); do
        [[ "$h" != "$OLD_LEADER_HOST" ]] || continue
        ip="$(trn_host_ip "$h")"
        leader_iptables -I INPUT -s "$ip" -j DROP
        CUT_RULES+=("INPUT -s $ip")
        leader_iptables -I OUTPUT -d "$ip" -j DROP
        CUT_RULES+=("OUTPUT -d $ip")
        CUT_HOSTS+=("$h")
    done
}

# Deletes exactly the rules isolate_leader inserted. Returns 1 if one could not be deleted.
heal_leader() {
    local rule chain flag ip rc=0
    for rule in "${CUT_RULES[@]}"; do
        read -r chain flag ip <<<"$rule"
        leader_iptables -D "$chain" "$flag" "$ip" -j DROP || {
            trn_log "could not delete the rule '$chain $flag $ip -j DROP' in $(trn_ns "$OLD_LEADER_HOST")"
            rc=1
        }
    done
    CUT_RULES=()
    return "$rc"
}

# Prints the view-leader host whose member address is ADDR, or "?" if none is.
vl_host_of() {
    local h
    for h in "${VL_HOSTS[@]}"; do
        if [[ "$(vl_member_addr "$h")" == "$1" ]]; then
            echo "$h"
            return 0
        fi
    done
    echo "?"
}

# Runs the client (as cl does) with only member ADDR as --viewleader. Arguments: ADDR, then
# the client's command and arguments.
ask_member() {
    local addr="$1"
    shift
    VL_ADDR="$addr" cl "$@"
}

# Prints the ids in the view CL_OUT (a query_servers answer), sorted, one per line.
view_ids() { jq -r '.servers[].id' <<<"$CL_OUT" | sort; }

# Prints the epochs noted in phase PHASE (from EPOCHS_SEEN), one per line.
phase_epochs() {
    local p="$1" entry
    for entry in "${EPOCHS_SEEN[@]}"; do
        if [[ "${entry%%:*}" == "$p" ]]; then echo "${entry#*:}"; fi
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

# Prints the seconds from T0 to T1 (both $EPOCHREALTIME values), with one decimal, without
# starting a process.
secs() {
    local a="${1/./}" b="${2/./}" d
    d=$((10#$b - 10#$a))
    ((d >= 0)) || d=0
    printf '%d.%d' $((d / 1000000)) $((d % 1000000 / 100000))
}

# Prints the instant T (an $EPOCHREALTIME value) plus MS milliseconds (a deadline for
# `before`). Arguments: T MS.
plus_ms() {
    local t="${1/./}"
    t=$((10#$t + $2 * 1000))
    printf '%d.%06d' $((t / 1000000)) $((t % 1000000))
}

# Succeeds while $EPOCHREALTIME is before the instant T (an $EPOCHREALTIME-like value).
before() {
    [[ "$1" =~ ^[0-9]+\.[0-9]{6}$ ]] || trn_die "before: '$1' is not an instant"
    local n="${EPOCHREALTIME/./}" u="${1/./}"
    ((10#$n < 10#$u))
}

# Prints the seconds from the cut to the first line of view-leader host HOST's log that
# contains TEXT and is stamped at or after the cut (one decimal; the log's timestamps are the
# same wall clock as $EPOCHREALTIME), or nothing if there is none. Arguments: HOST TEXT.
logged_after_cut() {
    local host="$1" text="$2" stamp at log
    log="$TRN_STATE/logs/viewleader-$host.1.log"
    [[ -e "$log" ]] || return 0
    while read -r stamp _; do
        at="$(date -u -d "$stamp" +%s.%6N 2>/dev/null)" || continue
        if ((10#${at/./} >= 10#${T_CUT/./})); then
            secs "$T_CUT" "$at"
            echo
            return 0
        fi
    done < <(grep -F -- "$text" "$log" || true)
}

# Notes a view a survivor answered during the cut: its epoch (in EPOCHS_SEEN, phase "cut";
# one lower than the view before it, or than the epoch before the cut, is an
# EPOCH_REGRESSIONS entry), how many of the ids from before the cut it holds (MIN_KEPT, the
# least over all answers), its epoch (CUT_EPOCH), and, the first time an id is missing,
# DEAD_SEEN (when, the ids missing, the answer). The first view naming a leader other than the
# old one sets NEW_LEADER_AT, NEW_LEADER_ADDR, NEW_LEADER_VIEW, NEW_LEADER_EPOCH. Arguments:
# seconds from the cut, the member that answered, epoch, leader, number of servers, their ids
# (space-separated), the answer.
note_cut_view() {
    local at="$1" member="$2" epoch="$3" leader="$4" n="$5" ids="$6" answer="$7" id missing=""
    CUT_VIEWS=$((CUT_VIEWS + 1))
    CUT_EPOCH="$epoch"
    EPOCHS_SEEN+=("cut:$epoch")
    if ((epoch < WATCHED_MAX)); then
        EPOCH_REGRESSIONS+=("query_servers asked of $member during the cut answered epoch $epoch after epoch $WATCHED_MAX had been seen")
        trn_log "CHECK FAILED: epoch went backwards: ${EPOCH_REGRESSIONS[-1]} ($answer)"
    else
        WATCHED_MAX="$epoch"
    fi
    for id in "${OLD_ID_LIST[@]}"; do
        [[ " $ids " == *" $id "* ]] || missing+="$id "
    done
    if [[ -n "$missing" ]]; then
        local kept=$((SERVERS - $(wc -w <<<"$missing")))
        ((kept >= MIN_KEPT)) || MIN_KEPT="$kept"
        if [[ -z "$DEAD_SEEN" ]]; then
            DEAD_SEEN="$at s after the cut, missing ${missing}in $answer"
            trn_log "CHECK FAILED: a server was declared dead during the cut: $DEAD_SEEN"
        fi
    fi
    if [[ -z "$NEW_LEADER_AT" && -n "$leader" && "$leader" != "$OLD_LEADER_ADDR" ]]; then
        NEW_LEADER_AT="$at" NEW_LEADER_ADDR="$leader" NEW_LEADER_EPOCH="$epoch" NEW_LEADER_VIEW="$n"
        trn_log "new leader named by $member $at s after the cut: $answer"
    fi
}

# Runs in the background from the cut on: asks the surviving members in turn (query_servers,
# --timeout-ms 400, only that member as --viewleader) and appends every successful answer to
# FILE as "SECONDS<TAB>MEMBER<TAB>ANSWER" (seconds from the cut), until the file STOP exists or
# the deadline (an $EPOCHREALTIME value). Arguments: the cut's instant, the deadline, FILE, STOP.
watch_cut() {
    local t_cut="$1" until="$2" file="$3" stop="$4" i=0 addr ans
    while before "$until" && [[ ! -e "$stop" ]]; do
        addr="${SURVIVOR_ADDRS[i % ${#SURVIVOR_ADDRS[@]}]}"
        i=$((i + 1))
        if ans="$(ip netns exec "$(trn_ns c)" "$TRN_BIN_DIR/client" --viewleader "$addr" \
            --timeout-ms 400 --json "${CLIENT_FAULTS[@]}" query_servers \
            2>>"$TRN_STATE/logs/client.log" </dev/null)" && [[ -n "$ans" ]]; then
            printf '%s\t%s\t%s\n' "$(secs "$t_cut" "$EPOCHREALTIME")" "$addr" "$ans" >>"$file"
        fi
        sleep 0.1
    done
}

# Notes with note_cut_view, in the order they came, the complete lines watch_cut appended to
# FILE that were not read yet (WATCHED_LINES counts the lines read so far). One jq for all of
# them.
read_watched() {
    local file="$1" total at member epoch leader n ids answer
    [[ -e "$file" ]] || return 0
    total="$(wc -l <"$file")"
    ((total > WATCHED_LINES)) || return 0
    # Fields joined by the unit separator (\x1f), which, unlike a tab, is no IFS white space:
    # empty fields (no leader named, no server in the view) keep their place.
    while IFS=$'\x1f' read -r at member epoch leader n ids answer; do
        note_cut_view "$at" "$member" "$epoch" "$leader" "$n" "$ids" "$answer"
    done < <(sed -n "$((WATCHED_LINES + 1)),${total}p" "$file" | jq -R -r 'split("\t") as $f
        | ($f[2] | fromjson? // {}) as $a | select($a.ok == true and ($a.epoch | type) == "number")
        | [$f[0], $f[1], ($a.epoch | tostring), ($a.leader // ""), ($a.servers | length | tostring),
           ([$a.servers[].id] | sort | join(" ")), $f[2]] | join("\u001f")')
    WATCHED_LINES="$total"
}

# Stops the background watcher (by PID), if it runs.
stop_watcher() {
    if [[ -n "${WATCHER_PID:-}" ]]; then
        kill "$WATCHER_PID" 2>/dev/null || true
        wait "$WATCHER_PID" 2>/dev/null || true
        WATCHER_PID=""
    fi
}

# EXIT trap: stops the watcher, then tears down as cluster.sh's cleanup does, keeping the exit
# status.
group_cleanup() {
    local rc=$?
    set +e
    stop_watcher
    (exit "$rc")
    cleanup
}

# Writes one key with setr through the group (the client given every member), retried up to 5
# times as write_keys does; records it in VALUES. Arguments: KEY VALUE.
write_key() {
    local key="$1" value="$2" attempt
    VALUES["$key"]="$value"
    for attempt in 1 2 3 4 5 6; do
        if cl setr "$key" "$value" && [[ "$(jq -r .ok <<<"$CL_OUT")" == true ]]; then
            return 0
        fi
        trn_log "setr $key failed (attempt $attempt): $CL_OUT"
        sleep 0.2
    done
    return 1
}

# The cut, from T_CUT until the heal: starts watch_cut in the background (the survivors' views
# for the whole cut); tries setr of the first new key (the client given every member, each try
# bounded by 2 s) until it succeeds or FAILOVER_WAIT passes (FIRST_SETR_AT, FIRST_SETR_EPOCH);
# if it did, writes the other new keys (the first that cannot be written ends the writing) and
# reads every key written back with getr (NEW_OK; NEW_BAD counts the others; a key whose setr
# failed leaves VALUES); holds the cut at least HOLD_MS from the cut, at least 2 x
# --dead-after-ms after the new leader, and until a new leader is named or FAILOVER_WAIT
# passes; then stops the watcher and notes every view it saw (note_cut_view).
during_cut() {
    local until file="$TRN_STATE/cut-views" stop="$TRN_STATE/cut-views.stop" key value i got
    local hold_until
    until="$(plus_ms "$T_CUT" "$FAILOVER_WAIT_MS")"
    FIRST_SETR_AT="" FIRST_SETR_EPOCH="?" NEW_LEADER_AT="" NEW_LEADER_ADDR="" WATCHED_LINES=0
    WATCHED_MAX="$EPOCH_MAX" NEW_OK=0 NEW_BAD=0
    rm -f "$file" "$stop"
    watch_cut "$T_CUT" "$(plus_ms "$T_CUT" $((2 * STEP_DEADLINE * 1000)))" "$file" "$stop" &
    WATCHER_PID=$!

    key="new001"
    value="value-new-1-$TRN_PREFIX-$RANDOM"
    while before "$until"; do
        if TIMEOUT_MS=2000 cl setr "$key" "$value" && [[ "$(jq -r .ok <<<"$CL_OUT")" == true ]]; then
            FIRST_SETR_AT="$(secs "$T_CUT" "$(now)")"
            FIRST_SETR_EPOCH="$(jq -r .epoch <<<"$CL_OUT")"
            VALUES["$key"]="$value"
            trn_log "first setr after the cut: $FIRST_SETR_AT s ($CL_OUT)"
            break
        fi
        trn_log "setr $key during the failover: $CL_OUT"
        sleep 0.05
    done

    if [[ -z "$FIRST_SETR_AT" ]]; then
        trn_log "CHECK FAILED: no setr succeeded within $((FAILOVER_WAIT_MS / 1000)) s of the cut (last answer $CL_OUT): no other key is written during the cut"
    else
        for ((i = 2; i <= NEW_KEYS; i++)); do
            key="$(printf 'new%03d' "$i")"
            if ! TIMEOUT_MS=3000 write_key "$key" "value-new-$i-$TRN_PREFIX-$RANDOM"; then
                unset 'VALUES[$key]'
                trn_log "CHECK FAILED: setr $key during the cut: $CL_OUT; no other key is written during the cut"
                break
            fi
        done
    fi
    for ((i = 1; i <= NEW_KEYS; i++)); do
        key="$(printf 'new%03d' "$i")"
        [[ -n "${VALUES[$key]+set}" ]] || continue
        if TIMEOUT_MS=3000 cl_read getr --wait "$key" && got="$(jq -r .value <<<"$CL_OUT")" &&
            [[ "$got" == "${VALUES[$key]}" ]]; then
            NEW_OK=$((NEW_OK + 1))
        else
            trn_log "CHECK FAILED: getr $key during the cut: expected '${VALUES[$key]}', got $CL_OUT"
        fi
    done
    NEW_BAD=$((NEW_KEYS - NEW_OK))

    # The hold: the watcher keeps asking the survivors meanwhile.
    hold_until="$(awk -v t="$T_CUT" -v h="$HOLD_MS" 'BEGIN { printf "%.6f", t + h / 1000 }')"
    while :; do
        read_watched "$file"
        if [[ -n "$NEW_LEADER_AT" ]]; then
            hold_until="$(awk -v t="$T_CUT" -v a="$NEW_LEADER_AT" -v d="$DEAD_AFTER_MS" -v u="$hold_until" \
                'BEGIN { m = t + a + 2 * d / 1000; printf "%.6f", (m > u ? m : u) }')"
            before "$hold_until" || break
        elif ! before "$hold_until" && ! before "$until"; then
            break
        fi
        sleep 0.1
    done
    touch "$stop"
    wait "$WATCHER_PID" || true
    WATCHER_PID=""
    read_watched "$file"
    rm -f "$file" "$stop"
}

# After the heal at T_HEAL: polls (deadline --step-deadline) until query_servers asked of the
# old leader names the leader a survivor names. Sets REJOIN_AT (seconds from the heal, empty if
# never), REJOIN_LEADER, REJOIN_VIEW, REJOIN_EPOCH.
rejoin() {
    local deadline old_says surv_says i=0
    deadline=$((SECONDS + STEP_DEADLINE))
    REJOIN_AT="" REJOIN_LEADER="" REJOIN_VIEW="?" REJOIN_EPOCH="?"
    while ((SECONDS < deadline)); do
        if TIMEOUT_MS=1000 ask_member "$OLD_LEADER_ADDR" query_servers; then
            old_says="$(jq -r '.leader // empty' <<<"$CL_OUT")"
            REJOIN_VIEW="$(jq -r '.servers | length' <<<"$CL_OUT")"
            REJOIN_EPOCH="$(jq -r .epoch <<<"$CL_OUT")"
            if TIMEOUT_MS=1000 ask_member "${SURVIVOR_ADDRS[i % ${#SURVIVOR_ADDRS[@]}]}" query_servers; then
                surv_says="$(jq -r '.leader // empty' <<<"$CL_OUT")"
                if [[ -n "$old_says" && "$old_says" == "$surv_says" ]]; then
                    REJOIN_AT="$(secs "$T_HEAL" "$(now)")"
                    REJOIN_LEADER="$old_says"
                    return 0
                fi
                trn_log "after the heal: the old leader names '$old_says', $(vl_host_of "${SURVIVOR_ADDRS[i % ${#SURVIVOR_ADDRS[@]}]}") names '$surv_says'"
            fi
        fi
        i=$((i + 1))
        sleep 0.1
    done
    trn_log "the old leader did not agree with the survivors on a leader within ${STEP_DEADLINE}s; last answer $CL_OUT"
    return 1
}

# Appends a table row. Arguments: step, live servers, epoch, keys ok, keys missing/wrong,
# placement ok, seconds.
row() {
    ROWS+=("$(printf '| %-12s | %12s | %5s | %7s | %18s | %12s | %7s |' "$@")")
    trn_log "${ROWS[-1]}"
}

# Finds the leader before the cut: polls (deadline --step-deadline) until every member, asked
# alone, names the same leader, a member of the group. Sets OLD_LEADER_ADDR and
# OLD_LEADER_HOST; exits (after the table) if they never agree.
find_leader() {
    local deadline h says named
    deadline=$((SECONDS + STEP_DEADLINE))
    while ((SECONDS < deadline)); do
        named=()
        for h in "${VL_HOSTS[@]}"; do
            TIMEOUT_MS=2000 ask_member "$(vl_member_addr "$h")" query_servers || break
            says="$(jq -r '.leader // empty' <<<"$CL_OUT")"
            [[ -n "$says" ]] || break
            named+=("$says")
        done
        if ((${#named[@]} == ${#VL_HOSTS[@]})) &&
            (($(printf '%s\n' "${named[@]}" | sort -u | wc -l) == 1)) &&
            [[ "$(vl_host_of "${named[0]}")" != "?" ]]; then
            OLD_LEADER_ADDR="${named[0]}"
            OLD_LEADER_HOST="$(vl_host_of "$OLD_LEADER_ADDR")"
            return 0
        fi
        trn_log "the members do not agree on a leader yet: ${named[*]}"
        sleep 0.1
    done
    fail "the members did not agree on a leader within ${STEP_DEADLINE}s (last answer $CL_OUT)"
    print_table
    exit 1
}

# Prints the new-keys cell: "OK/NEW_KEYS".
new_keys_cell() { echo "$1/$NEW_KEYS"; }

# Parses the command line and runs the scenario.
main() {
    scn_defaults
    VL_MEMBERS=3 DEAD_AFTER_MS=2000
    HOLD_MS="" NEW_KEYS=10 FAILOVER_BOUND_MS=""
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --members) VL_MEMBERS="${2:?}"; shift 2 ;;
            --new-keys) NEW_KEYS="${2:?}"; shift 2 ;;
            --hold-ms) HOLD_MS="${2:?}"; shift 2 ;;
            --failover-bound-ms) FAILOVER_BOUND_MS="${2:?}"; shift 2 ;;
            *)
                scn_option "$@"
                ((SCN_SHIFT)) || { echo "unknown argument: $1" >&2; usage >&2; exit 2; }
                shift "$SCN_SHIFT"
                ;;
        esac
    done
    scn_validate
    [[ "$VL_MEMBERS" == 3 || "$VL_MEMBERS" == 5 ]] || { echo "--members must be 3 or 5" >&2; exit 2; }
    HOLD_MS="${HOLD_MS:-$((3 * DEAD_AFTER_MS))}"
    FAILOVER_BOUND_MS="${FAILOVER_BOUND_MS:-$((3 * DEAD_AFTER_MS / 4))}"
    # How long the cut waits for a new leader and a first setr before it calls them missing.
    FAILOVER_WAIT_MS=$((5 * FAILOVER_BOUND_MS))
    local n
    for n in NEW_KEYS HOLD_MS FAILOVER_BOUND_MS; do
        [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || { echo "--${n,,} must be a positive integer" >&2; exit 2; }
    done
    ((NEW_KEYS <= 999)) || { echo "--new-keys must be at most 999" >&2; exit 2; }

    SCN_TRACK_EPOCHS=1 EPOCH_PHASE=setup EPOCH_MAX=0
    EPOCHS_SEEN=() EPOCH_REGRESSIONS=() CUT_RULES=() CUT_HOSTS=() WATCHER_PID=""
    scn_setup
    trap group_cleanup EXIT
    [[ -n "$TRN_IPT" ]] || trn_die "the cut needs iptables inside the leader's namespace: $TRN_IPT_ERR"

    EPOCH_PHASE=before
    scn_start_cluster "$(now)"
    find_leader
    if ! TIMEOUT_MS=2000 cl_read query_servers; then
        trn_die "query_servers before the cut failed: $CL_OUT"
    fi
    OLD_IDS="$(view_ids)"
    mapfile -t OLD_ID_LIST <<<"$OLD_IDS"
    local epoch_before="$EPOCH_MAX" h
    SURVIVOR_ADDRS=()
    for h in "${VL_HOSTS[@]}"; do
        [[ "$h" == "$OLD_LEADER_HOST" ]] || SURVIVOR_ADDRS+=("$(vl_member_addr "$h")")
    done
    echo "leader: $OLD_LEADER_HOST ($OLD_LEADER_ADDR), named by every member of ${VL_HOSTS[*]}; servers $(tr '\n' ' ' <<<"$OLD_IDS")at epoch $epoch_before"

    # The cut.
    EPOCH_PHASE=cut CUT_VIEWS=0 MIN_KEPT="$SERVERS" DEAD_SEEN="" CUT_EPOCH="?"
    isolate_leader
    T_CUT="$(now)"
    trn_log "cut: $OLD_LEADER_HOST isolated from ${CUT_HOSTS[*]}"
    during_cut
    heal_leader || fail "the cut's rules could not all be deleted"
    T_HEAL="$(now)"
    EPOCH_PHASE=after
    local cut_s
    cut_s="$(secs "$T_CUT" "$T_HEAL")"
    echo "cut: leader $OLD_LEADER_HOST isolated from ${CUT_HOSTS[*]} for $cut_s s ($TRN_IPT in $(trn_ns "$OLD_LEADER_HOST"): INPUT -s IP -j DROP, OUTPUT -d IP -j DROP per host; healed by deleting exactly those rules)"

    local new_host="" bound_s ok_bound=NO elected_at="" stepped_down_at=""
    bound_s="$(awk -v b="$FAILOVER_BOUND_MS" 'BEGIN { printf "%.1f", b / 1000 }')"
    if [[ -n "$NEW_LEADER_AT" ]]; then
        new_host="$(vl_host_of "$NEW_LEADER_ADDR")"
        if [[ "$new_host" == "?" ]]; then
            echo "new leader: NO (a survivor named $NEW_LEADER_ADDR, which is no member)"
            fail "a survivor named $NEW_LEADER_ADDR as leader, which is no member of the group"
        else
            elected_at="$(logged_after_cut "$new_host" "leads the view-leader group")"
            stepped_down_at="$(logged_after_cut "$OLD_LEADER_HOST" "no longer leads")"
            echo "new leader: yes, $new_host ($NEW_LEADER_ADDR), elected ${elected_at:-?} s after the cut (its log), named by a survivor $NEW_LEADER_AT s after the cut; $OLD_LEADER_HOST stepped down ${stepped_down_at:-?} s after the cut (its log)"
        fi
        row "new leader" "$NEW_LEADER_VIEW in view" "$NEW_LEADER_EPOCH" - - - "${elected_at:-$NEW_LEADER_AT}"
    else
        echo "new leader: NO (no survivor named another leader during the $cut_s s cut)"
        fail "the survivors elected no new leader during the $cut_s s cut"
        row "new leader" "?" "?" - - - never
    fi
    if [[ -n "$FIRST_SETR_AT" ]]; then
        if awk -v t="$FIRST_SETR_AT" -v b="$FAILOVER_BOUND_MS" 'BEGIN { exit !(t * 1000 < b) }'; then
            ok_bound=yes
        else
            fail "the first setr after the cut took $FIRST_SETR_AT s, over the bound of $bound_s s"
        fi
        echo "first setr: $FIRST_SETR_AT s after the cut (bound $bound_s s; --dead-after-ms $DEAD_AFTER_MS plus an election would be $(awk -v d="$DEAD_AFTER_MS" 'BEGIN { printf "%.1f", d / 1000 + 0.57 }') s); within the bound: $ok_bound"
        row "first setr" "${NEW_LEADER_VIEW:-?} in view" "$FIRST_SETR_EPOCH" 1/1 0 - "$FIRST_SETR_AT"
    else
        echo "first setr: NO setr succeeded within $((FAILOVER_WAIT_MS / 1000)) s of the cut; within the bound: NO"
        fail "no setr succeeded after the cut"
        row "first setr" "?" "?" 0/1 1 - never
    fi
    if ((NEW_BAD)); then fail "$NEW_BAD of the $NEW_KEYS keys written during the cut did not read back"; fi
    local kept_cell="?"
    ((CUT_VIEWS == 0)) || kept_cell="$MIN_KEPT in view"
    row "cut ${cut_s}s" "$kept_cell" "$CUT_EPOCH" "$(new_keys_cell "$NEW_OK")" "$NEW_BAD" - "$cut_s"
    if [[ -z "$DEAD_SEEN" ]] && ((CUT_VIEWS > 0)); then
        echo "declared dead: none ($CUT_VIEWS view(s) answered by the survivors during the cut, each holding all $SERVERS server ids from before it)"
    elif [[ -z "$DEAD_SEEN" ]]; then
        echo "declared dead: unknown (no view answered during the cut)"
        fail "the survivors answered no query_servers during the cut"
    else
        echo "declared dead: YES, $DEAD_SEEN"
        fail "a server was declared dead during the cut"
    fi

    # The rejoin.
    if rejoin; then
        if [[ "$REJOIN_LEADER" == "$OLD_LEADER_ADDR" ]]; then
            echo "rejoin: NO, $OLD_LEADER_HOST leads again ($REJOIN_AT s after the heal every member asked names it)"
            fail "the old leader did not rejoin as a follower: it leads again"
            row rejoin "$REJOIN_VIEW" "$REJOIN_EPOCH" - - - never
        else
            echo "rejoin: yes, $OLD_LEADER_HOST follows $(vl_host_of "$REJOIN_LEADER") ($REJOIN_LEADER) $REJOIN_AT s after the heal (query_servers asked of it names the leader the survivors name)"
            row rejoin "$REJOIN_VIEW" "$REJOIN_EPOCH" - - - "$REJOIN_AT"
        fi
    else
        echo "rejoin: NO ($OLD_LEADER_HOST did not name the survivors' leader within ${STEP_DEADLINE} s of the heal)"
        fail "the old leader did not rejoin within ${STEP_DEADLINE} s"
        row rejoin "$REJOIN_VIEW" "$REJOIN_EPOCH" - - - never
    fi

    # Every key, old and new, and the placement.
    # The keys written: the old ones and every new one whose setr succeeded.
    KEYS="${#VALUES[@]}"
    step_checks "heal" "$T_HEAL" || true
    if TIMEOUT_MS=2000 cl_read query_servers; then
        if [[ "$(view_ids)" == "$OLD_IDS" ]]; then
            echo "server ids: kept (the view after the heal holds exactly the $SERVERS ids from before the cut)"
        else
            echo "server ids: CHANGED (before the cut: $(tr '\n' ' ' <<<"$OLD_IDS")after the heal: $(view_ids | tr '\n' ' '))"
            fail "the servers' ids changed across the failover (a server was declared dead and rejoined)"
        fi
    else
        echo "server ids: unknown (query_servers after the heal failed: $CL_OUT)"
        fail "query_servers after the heal failed"
    fi

    # The epochs.
    local min_after ok_floor=yes ok_mono=yes
    min_after="$(phase_epochs after | sort -n | head -1)"
    if [[ -z "$min_after" ]]; then
        ok_floor="unknown (no epoch was answered after the heal)"
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
