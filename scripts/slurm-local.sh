#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests (tests/test_slurm.py) and for trying
# `relkd bench accuracy --launcher slurm` without a cluster.
#
#   bash scripts/slurm-local.sh start    # munged + slurmctld + slurmd; returns when the node is idle
#   bash scripts/slurm-local.sh status   # exit 0 when the cluster answers and the node is up
#   bash scripts/slurm-local.sh stop     # stops the daemons this script started
#
# Needs root and Debian's `slurm-wlm` and `munge` packages (`apt-get install -y slurm-wlm munge`).
# It writes /etc/slurm/slurm.conf (the path every Slurm command reads) for this one node, with
# the CPUs and memory `slurmd -C` reports, one partition `local`, select/cons_tres, requeueing
# allowed, process tracking without cgroups (containers), no accounting database (relkd reads
# job states with squeue / scontrol, never sacct). An existing slurm.conf that this script did not
# write is left alone (start fails), so it never replaces a real cluster's configuration.
# State, spool and logs go to $RELKD_SLURM_DIR (default /var/tmp/relkd-slurm). start and stop
# are idempotent.
set -euo pipefail

DIR=${RELKD_SLURM_DIR:-/var/tmp/relkd-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by relkd scripts/slurm-local.sh"

die() { echo "slurm-local: $*" >&2; exit 1; }

node_idle() {
  # the node answers and takes jobs (idle, or mixed/allocated while jobs run)
  local st
  st=$(sinfo -h -N -o '%t' 2>/dev/null | head -n1) || return 1
  case "$st" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mkdir -p /etc/slurm "$DIR/state" "$DIR/spool"
  cat > "$CONF.tmp" <<CONF
$MARK
ClusterName=relkd-local
SlurmctldHost=$host
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after the requeue (Slurm's default: 120,
# its minimum 5); 5 here, so the tests' time-limit and preemption requeues resume at once.
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
# Scheduling passes every 1-2 s (defaults: 30 and 60 s): a job that became eligible (its
# dependency finished, its begin time after a requeue came) starts within seconds.
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to scontrol / squeue for 5 minutes.
MinJobAge=300
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or over its limit.
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  mv "$CONF.tmp" "$CONF"
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (it starts munged, slurmctld and slurmd)"
  for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurm-wlm munge"
  done
  if [ -f "$CONF" ] && ! head -n1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by this script; not replacing a real configuration"
  fi
  mkdir -p "$DIR"
  # one start at a time (two test workers may call it together)
  exec 9>"$DIR/start.lock"
  flock 9
  if node_idle; then echo "slurm-local: already running"; return 0; fi
  write_conf
  # munge: a key (the package usually made one) and the daemon, running as the munge user
  if [ ! -s /etc/munge/munge.key ]; then
    (umask 077; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null)
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged --force </dev/null >/dev/null 2>&1 9>&-
  fi
  pgrep -F "$DIR/slurmctld.pid" >/dev/null 2>&1 || slurmctld </dev/null >/dev/null 2>&1 9>&-
  pgrep -F "$DIR/slurmd.pid" >/dev/null 2>&1 || slurmd </dev/null >/dev/null 2>&1 9>&-
  for _ in $(seq 1 120); do
    if node_idle; then echo "slurm-local: node $(hostname -s) up (partition local)"; return 0; fi
    # a node left down / drained by an earlier session is resumed once it registered
    if sinfo -h -N -o '%t' 2>/dev/null | grep -Eq 'down|drain'; then
      scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true
    fi
    sleep 0.5
  done
  tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
  die "the node did not come up within 60 s (logs above)"
}

stop() {
  local f pid
  for f in slurmd slurmctld; do
    if [ -f "$DIR/$f.pid" ] && pid=$(cat "$DIR/$f.pid") && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$DIR/$f.pid"
  done
  if [ -f /run/munge/munged.pid ] && pid=$(cat /run/munge/munged.pid) && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
  fi
  echo "slurm-local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) node_idle && { sinfo; exit 0; } || { echo "slurm-local: not running" >&2; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
