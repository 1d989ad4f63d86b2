#!/usr/bin/env bash
# netem-scripts/impair.sh - impair the links of trireme's namespace test hosts (loss,
# duplication, delay, jitter, reordering) with netem where the kernel has it and with
# iptables + the programs' own --faults where it does not, printing which mechanism is in
# force for each impairment. See --help.
set -euo pipefail

TRN_PROG=impair
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Prints the usage text.
usage() {
    cat <<EOF
Usage: impair.sh [--prefix P] apply HOST|all [--loss X] [--dup X] [--delay D] [--jitter D] [--reorder X]
       impair.sh [--prefix P] clear HOST|all
       impair.sh [--prefix P] probe

Impairs the traffic of the hosts made by 'hosts.sh up' (HOST = vl, c, s1..sN; all = every one).
X is a probability (5% or 0.05); D a duration (20ms, 1.5s, 500us; bare = ms).

  apply  replace HOST's impairments with the given ones
  clear  remove HOST's impairments
  probe  only report which mechanism each impairment would use here

Mechanisms, decided by probing (never assumed):
  - netem, if 'tc qdisc add ... netem' works on a throwaway veth: one netem qdisc on the
    router's end of HOST's link (everything delivered to HOST is lost/duplicated/delayed/
    reordered).
  - otherwise (the error is printed):
      loss     iptables '-m statistic --mode random --probability X -j DROP' on HOST's INPUT
      dup      iptables '-m statistic --mode random --probability X -j TEE --gateway <HOST IP>'
               in the router's mangle FORWARD for datagrams leaving towards HOST (the router
               delivers the original and a clone: what HOST receives is duplicated, the same
               direction as loss and netem)
      delay, jitter, reorder, and loss/dup if iptables cannot do them:
               the programs' own --faults (outgoing datagrams), stored for HOST and passed to
               processes started on HOST AFTER this (scenario.sh starts them afterwards)
    iptables is installed with apt-get if missing; the backend is the first of \$TRN_IPTABLES,
    iptables, iptables-nft, iptables-legacy that works inside a namespace (update-alternatives
    is never changed). Rules live only in the run's own namespaces (chain TRN_LOSS in each
    host, TRN_DUP_HOST in the router); nothing is added to the root namespace.
Every line printed names the mechanism actually in force.

Options: --prefix P (env TRN_PREFIX, default trn), --state-dir DIR (env TRN_STATE_DIR),
         -h/--help.
EOF
}

# Parses the command line and runs the command.
main() {
    local cmd="" target="" loss="" dup="" delay="" jitter="" reorder=""
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --prefix) TRN_PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
            --state-dir) TRN_STATE_DIR="${2:?--state-dir needs a value}"; shift 2 ;;
            --loss) loss="${2:?--loss needs a value}"; shift 2 ;;
            --dup) dup="${2:?--dup needs a value}"; shift 2 ;;
            --delay) delay="${2:?--delay needs a value}"; shift 2 ;;
            --jitter) jitter="${2:?--jitter needs a value}"; shift 2 ;;
            --reorder) reorder="${2:?--reorder needs a value}"; shift 2 ;;
            apply | clear) cmd="$1"; target="${2:?$1 needs HOST or all}"; shift 2 ;;
            probe) cmd="$1"; shift ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    [[ -n "$cmd" ]] || { usage >&2; exit 2; }
    trn_init
    [[ "$(id -u)" == 0 ]] || trn_die "needs root"
    local hosts=()
    if [[ "$cmd" != probe ]]; then
        if [[ "$target" == all ]]; then
            mapfile -t hosts < <(trn_hosts)
        else
            trn_hosts | grep -qx -- "$target" || trn_die "no host '$target' (hosts: $(trn_hosts | tr '\n' ' '))"
            hosts=("$target")
        fi
    fi
    case "$cmd" in
        probe)
            trn_probe_netem
            trn_probe_iptables
            trn_print_mechanisms
            ;;
        clear)
            local h
            for h in "${hosts[@]}"; do
                trn_impair_clear "$h"
                echo "$h: impairments cleared"
            done
            ;;
        apply)
            [[ -z "$loss" ]] || loss="$(trn_prob "$loss")"
            [[ -z "$dup" ]] || dup="$(trn_prob "$dup")"
            [[ -z "$reorder" ]] || reorder="$(trn_prob "$reorder")"
            [[ -z "$delay" ]] || delay="$(trn_dur "$delay")"
            [[ -z "$jitter" ]] || jitter="$(trn_dur "$jitter")"
            trn_probe_netem
            if ((!TRN_NETEM_OK)) && [[ -n "$loss$dup" ]]; then
                trn_probe_iptables
            else
                TRN_IPT="" TRN_IPT_ERR="not needed" TRN_STAT_OK=0 TRN_TEE_OK=0
            fi
            local h
            for h in "${hosts[@]}"; do
                trn_impair_apply "$h" "$loss" "$dup" "$delay" "$jitter" "$reorder"
            done
            ;;
    esac
}

main "$@"
