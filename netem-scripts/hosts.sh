#!/usr/bin/env bash
# netem-scripts/hosts.sh - build, inspect and tear down trireme's test hosts in network
# namespaces (a view leader, or the members of a view-leader group, N servers and a client,
# each joined by a veth pair to a router namespace). See --help; the topology is described
# at the top of lib.sh.
set -euo pipefail

TRN_PROG=hosts
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Prints the usage text.
usage() {
    cat <<EOF
Usage: hosts.sh [--prefix P] [--subnet-base 10.B] [--servers N] [--viewleaders M] [--keep-logs] up|down|status|exec HOST CMD...

Test hosts for trireme in network namespaces, joined through a router namespace:

  up       create P-r (router, IP forwarding on), P-vl (view leader), P-c (client) and
           P-s1..P-sN (servers); host HOST has address 10.B.i.2/24 on veth P-HOST, gateway
           10.B.i.1 on veth P-HOST-r in the router (i = 1 vl, 2 c, 10+k sk); with
           --viewleaders M > 1 also P-vl2..P-vlM, one host per member of a view-leader
           group (i = 1+m for vlm)
  down     remove everything made for prefix P: processes started by the scripts (by the
           PIDs in their pid files, then any PID left inside P-* namespaces), the namespaces
           with their veths and iptables rules, and the state directory; nothing else is
           touched
  status   list P's namespaces, addresses, impairments and processes
  exec     run CMD inside HOST's namespace (HOST = vl, vlM, c, sK or r; e.g. exec r ip route)

Options (each also from the environment):
  --prefix P          name prefix, 1-8 chars [a-z0-9] (env TRN_PREFIX, default trn); runs with
                      different prefixes never collide
  --subnet-base 10.B  address base (env TRN_SUBNET_BASE; default derived from the prefix)
  --servers N         servers for 'up' (default 3)
  --viewleaders M     view-leader hosts for 'up', 1..5 (default 1: P-vl only)
  --state-dir DIR     pid files, logs (env TRN_STATE_DIR, default /tmp/trireme-netem/P)
  --keep-logs         'down' keeps DIR/logs (by default it removes all it put in DIR)
  -h, --help          this text

Needs root and a kernel with network namespaces and veth.
EOF
}

# Parses the command line and runs the command.
main() {
    local servers=3 viewleaders=1 cmd="" keep_logs=0
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --prefix) TRN_PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
            --subnet-base) TRN_SUBNET_BASE="${2:?--subnet-base needs a value}"; shift 2 ;;
            --servers) servers="${2:?--servers needs a value}"; shift 2 ;;
            --viewleaders) viewleaders="${2:?--viewleaders needs a value}"; shift 2 ;;
            --state-dir) TRN_STATE_DIR="${2:?--state-dir needs a value}"; shift 2 ;;
            --keep-logs) keep_logs=1; shift ;;
            up | down | status | exec) cmd="$1"; shift; break ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    [[ -n "$cmd" ]] || { usage >&2; exit 2; }
    trn_init
    case "$cmd" in
        up) trn_require_netns; trn_up "$servers" "$viewleaders" ;;
        down) trn_down "$keep_logs" ;;
        status) trn_status ;;
        exec)
            (($# >= 2)) || { usage >&2; exit 2; }
            local host="$1"
            shift
            trn_in "$host" "$@"
            ;;
    esac
}

main "$@"
