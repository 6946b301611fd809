#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for the launcher tests:
# munged + slurmctld + two slurmd (nodes n1 and n2, both 127.0.0.1, one port
# each). Needs root and the packages from install.sh (slurm-wlm, munge).
#
#   scripts/launchers/slurm.sh up       start it; waits (bounded) for both nodes idle
#   scripts/launchers/slurm.sh status   daemons + sinfo + squeue; exit 0 only if usable
#   scripts/launchers/slurm.sh down     cancel jobs, stop what `up` started (by PID),
#                                       remove the /etc/hosts line and the state dir
#   scripts/launchers/slurm.sh conf     print the slurm.conf path
#
# Every Slurm client command (srun, sbatch, squeue, sinfo...) needs
#   export SLURM_CONF=$DISTRUNTIME_LAUNCHER_DIR/slurm/slurm.conf
# BEFORE it runs: without it the client falls back to "configless" mode and
# does a DNS SRV lookup. `up` prints that line.
#
# Env:
#   DISTRUNTIME_LAUNCHER_DIR   state root (default /tmp/distruntime-launchers)
#   DRT_SLURMCTLD_PORT         slurmctld port (default 6827)
#   DRT_SLURMD_PORT            first slurmd port; n2 uses +1 (default 17021)
#   DRT_SLURM_UP_TIMEOUT       seconds `up` waits for idle nodes (default 30)
set -euo pipefail

D=${DISTRUNTIME_LAUNCHER_DIR:-/tmp/distruntime-launchers}
S=$D/slurm
export SLURM_CONF=$S/slurm.conf
CTLD_PORT=${DRT_SLURMCTLD_PORT:-6827}
SLURMD_PORT=${DRT_SLURMD_PORT:-17021}
UP_TIMEOUT=${DRT_SLURM_UP_TIMEOUT:-30}
NODES=(n1 n2)
HOSTS_TAG="# distruntime-slurm"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "slurm.sh: $*"; }
die() { echo "slurm.sh: ERROR: $*" >&2; exit 1; }
# bounded SECONDS CMD...: never let one command hang the script.
bounded() { local t=$1; shift; timeout --kill-after=5 -s TERM "$t" "$@"; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (daemons, /etc/hosts)"; }
need_tools() {
  local t
  for t in slurmctld slurmd srun sinfo squeue scancel munge unmunge; do
    command -v "$t" >/dev/null || die "$t not found: run scripts/launchers/install.sh"
  done
  [ -x /usr/sbin/munged ] || die "/usr/sbin/munged not found: run scripts/launchers/install.sh"
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { if [ -s "$1" ]; then tr -dc '0-9' < "$1"; fi; }

munge_ok() { bounded 5 munge -n 2>/dev/null | bounded 5 unmunge >/dev/null 2>&1; }

# stop_pids PID... : TERM them all at once, wait up to 10 s, then KILL.
stop_pids() {
  local pids=() p
  for p in "$@"; do alive "$p" && pids+=("$p"); done
  [ "${#pids[@]}" -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    local left=()
    for p in "${pids[@]}"; do alive "$p" && left+=("$p"); done
    [ "${#left[@]}" -eq 0 ] && { log "stopped pids ${pids[*]}"; return 0; }
    sleep 0.1
  done
  kill -KILL "${left[@]}" 2>/dev/null || true
  log "killed pids ${left[*]} after 10 s"
}

# slurmstepd processes started by OUR slurmd (they carry our SLURM_CONF in
# their environment) survive slurmd; find them by that, never by name alone.
our_stepds() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" && echo "${p#/proc/}"
  done
  return 0
}
descendants() {  # all descendants of the given PIDs, from one ps snapshot
  ps -e -o pid=,ppid= | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) s[r[i]] = 1 }
    { pp[$1] = $2 }
    END {
      do { changed = 0
        for (p in pp) if (!(p in s) && (pp[p] in s)) { s[p] = 1; out = out " " p; changed = 1 }
      } while (changed)
      print out
    }'
}

nodes_idle() {
  [ "$(bounded 5 sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' idle$')" = "${#NODES[@]}" ]
}

write_conf() {
  local host; host=$(hostname -s)
  cat > "$SLURM_CONF" <<EOF
# Written by scripts/launchers/slurm.sh; removed by 'slurm.sh down'.
ClusterName=drt
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
# no cgroups, no accounting database: nothing else to set up
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# trust CPUs=4 below although the host may have fewer cores
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
# keep finished job records 30 s so 'scontrol show job' can report the state
MinJobAge=30
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$SLURMD_PORT-$((SLURMD_PORT + 1))] CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  [ -s /etc/munge/munge.key ] || bounded 30 mungekey --create --force
  chown munge:munge /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
  if munge_ok; then
    log "munged already running; reusing it (will not stop it)"
    return 0
  fi
  install -d -o munge -g munge -m 755 /run/munge
  bounded 15 runuser -u munge -- /usr/sbin/munged </dev/null >>"$S/log/munged.out" 2>&1 9>&- \
    || die "munged failed to start: $(tail -n 5 /var/log/munge/munged.log 2>/dev/null)"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged started but munge -n | unmunge fails"
  cp /run/munge/munged.pid "$S/munged.pid"   # we started it, so `down` stops it
  log "started munged (pid $(pid_of "$S/munged.pid"))"
}

up() {
  need_root; need_tools
  local t0; t0=$(now)
  if [ -e "$S" ]; then log "previous state in $S: bringing it down first"; down_locked; fi
  mkdir -p "$S/state" "$S/log" "${NODES[@]/#/$S/spool/}"
  start_munge
  write_conf
  # Node names must resolve: jobs see SLURM_JOB_NODELIST=n[1-2] and workers
  # take MASTER_ADDR / rendezvous endpoints from it.
  grep -qF "$HOSTS_TAG" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_TAG" >> /etc/hosts

  # Both daemons fork into the background; stdio away from the caller's pipes.
  (cd "$S" && bounded 15 slurmctld -f "$SLURM_CONF" </dev/null >>"$S/log/slurmctld.out" 2>&1 9>&-) \
    || { tail -n 20 "$S"/log/slurmctld*; die "slurmctld failed to start"; }
  local n
  for n in "${NODES[@]}"; do
    (cd "$S" && bounded 15 slurmd -f "$SLURM_CONF" -N "$n" </dev/null >>"$S/log/slurmd-$n.out" 2>&1 9>&-) \
      || { tail -n 20 "$S"/log/slurmd-"$n"*; die "slurmd -N $n failed to start"; }
  done
  local deadline; deadline=$(( $(date +%s) + UP_TIMEOUT ))
  until nodes_idle; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      bounded 5 sinfo -N || true
      tail -n 20 "$S"/log/*.log || true
      die "nodes not idle after ${UP_TIMEOUT} s"
    fi
    sleep 0.2
  done
  bounded 5 sinfo -N
  log "up in $(since "$t0") s"
  echo "export SLURM_CONF=$SLURM_CONF"
}

down_locked() {
  local t0; t0=$(now)
  if [ -s "$S/slurmctld.pid" ] && alive "$(pid_of "$S/slurmctld.pid")"; then
    # cancel whatever still runs, so slurmstepd and the tasks go away cleanly
    bounded 10 scancel --full --quiet --partition debug 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(bounded 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  local n daemons=()
  for n in "${NODES[@]}"; do daemons+=("$(pid_of "$S/slurmd-$n.pid")"); done
  daemons+=("$(pid_of "$S/slurmctld.pid")")
  log "stopping slurmd n1, slurmd n2, slurmctld: pids ${daemons[*]}"
  stop_pids "${daemons[@]}"
  # leftovers of jobs: our slurmstepds and everything below them
  local steps; steps=$(our_stepds | tr "\n" " ")
  if [ -n "$steps" ]; then
    local kids
    # shellcheck disable=SC2086
    kids=$(descendants $steps)
    log "killing leftover slurmstepd $steps ${kids:+and tasks $kids}"
    # shellcheck disable=SC2086
    kill -TERM $steps $kids 2>/dev/null || true
    sleep 1
    # shellcheck disable=SC2086
    kill -KILL $steps $kids 2>/dev/null || true
  fi
  if [ -s "$S/munged.pid" ]; then
    log "stopping munged we started: pid $(pid_of "$S/munged.pid")"
    stop_pids "$(pid_of "$S/munged.pid")"
  fi
  sed -i "/$HOSTS_TAG/d" /etc/hosts
  rm -rf "$S"
  log "down in $(since "$t0") s"
}

down() { need_root; down_locked; }

status() {
  local rc=0 n
  echo "SLURM_CONF=$SLURM_CONF"
  [ -f "$SLURM_CONF" ] || { echo "no config: cluster is down"; return 1; }
  for n in slurmctld "${NODES[@]/#/slurmd-}"; do
    local pid; pid=$(pid_of "$S/$n.pid")
    if alive "$pid"; then echo "$n: running (pid $pid)"; else echo "$n: NOT running"; rc=1; fi
  done
  if munge_ok; then echo "munged: ok"; else echo "munged: NOT ok"; rc=1; fi
  bounded 5 sinfo -N || rc=1
  bounded 5 squeue || rc=1
  return $rc
}

# One `up`/`down` at a time (bounded wait for the lock).
lock() {
  mkdir -p "$D"
  exec 9>"$D/slurm.lock"
  flock -w 120 9 || die "could not lock $D/slurm.lock within 120 s"
}

case "${1:-}" in
  up) lock; up ;;
  down) lock; down ;;
  status) status ;;
  conf) echo "$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|status|conf" >&2; exit 2 ;;
esac
