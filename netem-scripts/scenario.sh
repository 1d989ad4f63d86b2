#!/usr/bin/env bash
# netem-scripts/scenario.sh - run the assignment's membership scenario across network
# namespaces: build the hosts, impair the links, start a view leader and N servers, write K
# keys, kill servers one by one down to one and start fresh ones back up to N, checking every
# key and every server's bucket after each step; print a result table; tear everything down
# (also on failure or a signal). See --help.
set -euo pipefail

TRN_PROG=scenario
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=SCRIPTDIR/cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster.sh"

# Prints the usage text.
usage() {
    cat <<EOF
Usage: scenario.sh [options]

Builds trireme test hosts in network namespaces (hosts.sh up), impairs their links
(impair.sh apply), starts a view leader on P-vl and N servers on P-s1..P-sN (bound to
0.0.0.0:$SERVER_PORT, --advertise <veth IP>:$SERVER_PORT), writes K keys with 'client setr' from P-c,
then kills servers one by one (SIGTERM by PID, s_N first) down to one and starts fresh
servers one at a time back up to N. After each step it waits (polling, with a deadline) until
'client query_servers --json' shows exactly the live servers and "rebalancing":false, then
checks every key with 'client getr --json --wait' (the value must be the one written) and
every live server's 'query_all_keys' against the keys whose replicas ('client locate --json')
include it. Prints a table (step | live servers | epoch | keys ok | keys missing/wrong |
placement ok | seconds) and RESULT: PASS or RESULT: FAIL; exits 1 if any check failed.
Everything is torn down at exit (hosts.sh down), whatever happens, unless --keep; the logs
(state dir/logs) are kept only when the run failed.

Options:
$(scn_usage_options)

Binaries: \$TRIREME_BIN_DIR (directory holding viewleader, server, client), default
target/debug under the repository root. Needs root, network namespaces, jq.
Example: netem-scripts/scenario.sh --servers 3 --keys 20 --loss 5% --dup 2%
EOF
}

# Parses the command line and runs the scenario.
main() {
    scn_defaults
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            *)
                scn_option "$@"
                ((SCN_SHIFT)) || { echo "unknown argument: $1" >&2; usage >&2; exit 2; }
                shift "$SCN_SHIFT"
                ;;
        esac
    done
    scn_validate
    scn_setup

    scn_start_cluster "$(now)"
    local k t0
    for ((k = SERVERS; k >= 2; k--)); do
        t0="$(now)"
        kill_server "s$k"
        step_checks "kill s$k" "$t0" || { print_table; exit 1; }
    done
    for ((k = 2; k <= SERVERS; k++)); do
        t0="$(now)"
        start_server "s$k"
        step_checks "start s$k" "$t0" || { print_table; exit 1; }
    done
    print_table
    ((FAILED == 0))
}

main "$@"
