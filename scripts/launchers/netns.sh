#!/usr/bin/env bash
# Two simulated nodes for multi-node torchrun: two network namespaces joined
# by a veth pair (inside each namespace the NIC is called eth0). Each node
# gets its own hostname (UTS namespace, set by `exec`) and its own /etc/hosts
# (`ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts):
#
#   namespace  hostname  address
#   drtn1      node1     $DRT_NETNS_PREFIX.1   (default 10.78.0.1/24)
#   drtn2      node2     $DRT_NETNS_PREFIX.2   (default 10.78.0.2/24)
#
# Traffic between them stays on the veth pair; it never leaves the host.
# Needs root, iproute2 and util-linux (unshare).
#
#   scripts/launchers/netns.sh up                 create (re-create) both namespaces
#   scripts/launchers/netns.sh exec NODE CMD...   run CMD on node NODE (1|2|node1|node2)
#                                                 with hostname nodeN; bounded by
#                                                 DRT_NETNS_EXEC_TIMEOUT s (default 600)
#   scripts/launchers/netns.sh status             namespaces, addresses, processes
#   scripts/launchers/netns.sh down               kill processes left inside (by PID),
#                                                 delete namespaces and /etc/netns dirs
set -euo pipefail

PREFIX=${DRT_NETNS_PREFIX:-10.78.0}
EXEC_TIMEOUT=${DRT_NETNS_EXEC_TIMEOUT:-600}
D=${DISTRUNTIME_LAUNCHER_DIR:-/tmp/distruntime-launchers}
NS=(drtn1 drtn2)
VETH=(drtv1 drtv2)

log() { echo "netns.sh: $*"; }
die() { echo "netns.sh: ERROR: $*" >&2; exit 1; }
bounded() { local t=$1; shift; timeout --kill-after=5 -s TERM "$t" "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces)"; }
need_tools() {
  command -v ip >/dev/null || die "ip not found: run scripts/launchers/install.sh (iproute2)"
  command -v unshare >/dev/null || die "unshare not found: run scripts/launchers/install.sh (util-linux)"
}
ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

hosts_file() {
  printf '127.0.0.1 localhost\n::1 localhost\n%s.1 node1\n%s.2 node2\n' "$PREFIX" "$PREFIX"
}

down_locked() {
  local ns pids left
  for ns in "${NS[@]}"; do
    if ns_exists "$ns"; then
      pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
      if [ -n "${pids// /}" ]; then
        log "killing processes left in $ns: $pids"
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 50); do
          left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
          [ -z "${left// /}" ] && break
          sleep 0.1
        done
        left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
        # shellcheck disable=SC2086
        [ -z "${left// /}" ] || { log "SIGKILL $left"; kill -KILL $left 2>/dev/null || true; }
      fi
      bounded 10 ip netns del "$ns" || log "warning: ip netns del $ns failed"
    fi
    rm -rf "/etc/netns/$ns"
  done
  # only left over if `up` failed between creating the pair and moving it
  local v
  for v in "${VETH[@]}"; do ip link del "$v" 2>/dev/null || true; done
}

up() {
  need_root; need_tools
  local t0 i ns; t0=$(now)
  down_locked
  bounded 10 ip link add "${VETH[0]}" type veth peer name "${VETH[1]}"
  for i in 1 2; do
    ns=${NS[$((i - 1))]}
    bounded 10 ip netns add "$ns"
    ip link set "${VETH[$((i - 1))]}" netns "$ns"
    ip -n "$ns" link set "${VETH[$((i - 1))]}" name eth0   # same NIC name on both nodes
    ip -n "$ns" addr add "$PREFIX.$i/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    mkdir -p "/etc/netns/$ns"
    hosts_file > "/etc/netns/$ns/hosts"
  done
  log "up in $(since "$t0") s: node1=$PREFIX.1 (ns ${NS[0]}), node2=$PREFIX.2 (ns ${NS[1]})"
}

status() {
  local rc=0 ns
  for ns in "${NS[@]}"; do
    if ns_exists "$ns"; then
      echo "$ns: $(ip -n "$ns" -brief addr show dev eth0 2>/dev/null)"
      echo "  pids: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    else
      echo "$ns: absent"; rc=1
    fi
  done
  return $rc
}

do_exec() {
  need_root
  [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."
  local node=$1; shift
  local i
  case "$node" in
    1|node1|drtn1) i=1 ;;
    2|node2|drtn2) i=2 ;;
    *) die "unknown node '$node' (use 1, 2, node1 or node2)" ;;
  esac
  ns_exists "${NS[$((i - 1))]}" || die "namespace ${NS[$((i - 1))]} missing: run '$0 up' first"
  # timeout: whole command bounded; unshare --uts: own hostname for this node.
  # shellcheck disable=SC2016  # $0/$@ expand in the inner sh, on purpose
  exec timeout --kill-after=5 -s TERM "$EXEC_TIMEOUT" \
    ip netns exec "${NS[$((i - 1))]}" unshare --uts -- \
    sh -c 'hostname "$0" && exec "$@"' "node$i" "$@"
}

lock() {
  mkdir -p "$D"
  exec 9>"$D/netns.lock"
  flock -w 60 9 || die "could not lock $D/netns.lock within 60 s"
}

case "${1:-}" in
  up) lock; up ;;
  down) need_root; lock; t0=$(now); down_locked; log "down in $(since "$t0") s" ;;
  status) status ;;
  exec) shift; do_exec "$@" ;;
  *) echo "usage: $0 up|down|status|exec NODE CMD..." >&2; exit 2 ;;
esac
