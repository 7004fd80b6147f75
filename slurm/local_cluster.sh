#!/usr/bin/env bash
# A throw-away SLURM cluster on this host, for tests and trying the sbatch scripts: Debian's
# slurm-wlm 22.05 + munge, N simulated nodes n1..nN (one slurmd each), no systemd, no cgroups.
#
#   slurm/local_cluster.sh install   apt-get the packages (root; no-op when installed)
#   slurm/local_cluster.sh up        start munged, slurmctld, N x slurmd; wait until all idle
#   slurm/local_cluster.sh status    daemons by recorded PID, then sinfo / squeue
#   slurm/local_cluster.sh down      cancel all jobs, stop the daemons by recorded PID
#
# then: export SLURM_CONF=$SLURM_LOCAL_DIR/etc/slurm.conf; sbatch ...; squeue; scontrol ...
#
# Environment (same values for up, status and down):
#   SLURM_LOCAL_DIR   everything lives here; wiped by `up` (default /tmp/omni-ds-slurm); munged
#                     needs every parent directory searchable by all (o+x)
#   SLURM_LOCAL_PORT  slurmctld port; node i's slurmd listens on PORT+i (default 6817)
#   SLURM_NNODES      simulated nodes n1..nN (default 2); names must resolve, so `up` adds
#                     "127.0.0.1 n1 ..." to /etc/hosts when they do not (root)
#   SLURM_NODE_CPUS   CPUs advertised per node (default nproc)
#   SLURM_KILLWAIT    seconds from SIGTERM to SIGKILL on cancel/requeue/time limit (default 5)
#   SLURM_GRACETIME   preemption grace time of partition "debug" (default 10)
#
# Partitions: "debug" (default; its jobs are preempted and requeued) and "urgent" (higher
# priority tier: a job there preempts "debug" jobs). See shared notes slurm-local.md for the
# measurements behind each setting.
set -euo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/omni-ds-slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
N=${SLURM_NNODES:-2}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
export SLURM_CONF=$D/etc/slurm.conf
PACKAGES=(slurmd slurmctld slurm-client munge)
NODES=()
for i in $(seq 1 "$N"); do NODES+=("n$i"); done

alive() { kill -0 "$1" 2>/dev/null; }
elapsed() { echo "$(( $(date +%s%N) / 1000000 - $1 ))"; }
now_ms() { echo "$(( $(date +%s%N) / 1000000 ))"; }

installed() {
  local b
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/sbatch; do
    [ -x "$b" ] || return 1
  done
}

cmd_install() {
  installed && { echo "slurm and munge already installed"; return 0; }
  [ "$(id -u)" = 0 ] || { echo "installing ${PACKAGES[*]} needs root (apt-get)" >&2; return 1; }
  local t0; t0=$(now_ms)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The minimal set: slurm-wlm's other 35 dependencies (docs, X tools) are not needed.
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  echo "installed ${PACKAGES[*]} in $(elapsed "$t0") ms"
}

write_conf() {
  local user nodes="" i
  user=$(id -un)
  for i in $(seq 1 "$N"); do
    nodes+="NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS RealMemory=2048 State=UNKNOWN"$'\n'
  done
  cat >"$SLURM_CONF" <<EOF
ClusterName=omnids
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# Own munge socket. cred_expire is also how long a requeued job waits before it may start again
# (the default 120 s would dominate every requeue test).
AuthInfo=socket=$D/munge/munge.socket,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/state/slurmctld.pidfile
SlurmdPidFile=$D/spool/%n/slurmd.pidfile
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Requeued jobs otherwise wait for a backfill pass (up to ~10 s) after becoming eligible.
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=${SLURM_KILLWAIT:-5}
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
${nodes}PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Preempted jobs get their --signal (e.g. B:USR1) at once, then SIGTERM after GraceTime.
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=${SLURM_GRACETIME:-10}
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

ensure_hosts() {
  local n missing=()
  for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
  [ ${#missing[@]} = 0 ] && return 0
  if [ ! -w /etc/hosts ]; then
    echo "node names ${missing[*]} do not resolve: add '127.0.0.1 ${missing[*]}' to /etc/hosts" >&2
    return 1
  fi
  # torch's rendezvous resolves MASTER_ADDR=n1; unresolved, c10d retries for minutes.
  echo "127.0.0.1 ${missing[*]}  # omni-ds local slurm" >>/etc/hosts
}

start() {  # start NAME CMD...: own session (no stray terminal signals), PID recorded for `down`
  local name=$1; shift
  setsid "$@" >"$D/log/$name.out" 2>&1 &
  echo $! >"$D/pids/$name.pid"
}

cmd_up() {
  installed || { echo "slurm/munge not installed: run '$0 install' as root" >&2; return 1; }
  if ls "$D"/pids/*.pid >/dev/null 2>&1; then
    echo "a cluster is already running in $D; run '$0 down' first" >&2
    return 1
  fi
  local t0; t0=$(now_ms)
  ensure_hosts
  rm -rf "$D"
  mkdir -p "$D"/{etc,state,log,pids,munge,mungekey,out}
  local n
  for n in "${NODES[@]}"; do mkdir -p "$D/spool/$n"; done  # slurmd does not create it itself
  # munged refuses a socket directory without o+x and a key readable by others.
  chmod 755 "$D/munge"
  chmod 700 "$D/mungekey"
  dd if=/dev/urandom of="$D/mungekey/munge.key" bs=1024 count=1 status=none
  chmod 400 "$D/mungekey/munge.key"
  write_conf

  start munged /usr/sbin/munged -F --socket="$D/munge/munge.socket" \
    --key-file="$D/mungekey/munge.key" --pid-file="$D/munge/munged.pidfile" \
    --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
  local i
  for i in $(seq 1 100); do [ -S "$D/munge/munge.socket" ] && break; sleep 0.05; done
  if [ ! -S "$D/munge/munge.socket" ]; then
    # e.g. "execute permissions for all required": every parent of $D needs o+x
    echo "munged did not start:" >&2; cat "$D/log/munged.log" >&2; return 1
  fi
  munge -n -S "$D/munge/munge.socket" | unmunge -S "$D/munge/munge.socket" >/dev/null

  start slurmctld /usr/sbin/slurmctld -D -i -f "$SLURM_CONF"
  for n in "${NODES[@]}"; do start "slurmd-$n" /usr/sbin/slurmd -D -N "$n" -f "$SLURM_CONF"; done

  local idle=0
  for i in $(seq 1 150); do
    # one line per node and partition: sort -u; `|| true`: sinfo fails until slurmctld listens
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | awk '$2 == "idle"' | wc -l || true)
    [ "$idle" -eq "$N" ] && break
    sleep 0.2
  done
  if [ "$idle" -ne "$N" ]; then
    echo "only $idle of $N nodes idle after 30 s; logs in $D/log" >&2
    sinfo -N >&2 || true
    return 1
  fi
  echo "SLURM up: $N node(s) in $(elapsed "$t0") ms; export SLURM_CONF=$SLURM_CONF"
}

cmd_status() {
  local f p rc=0
  for f in "$D"/pids/*.pid; do
    [ -f "$f" ] || { echo "no cluster in $D"; return 1; }
    p=$(cat "$f")
    if alive "$p"; then echo "$(basename "$f" .pid) pid $p running"; else echo "$(basename "$f" .pid) pid $p DEAD"; rc=1; fi
  done
  sinfo -N || rc=1
  squeue || rc=1
  return $rc
}

stop_pids() {  # SIGTERM the recorded PIDs, wait up to 15 s, then SIGKILL what is left
  local f p pids=() i any
  for f in "$@"; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    alive "$p" && kill -TERM "$p" && pids+=("$p")
    rm -f "$f"
  done
  for i in $(seq 1 75); do
    any=0
    for p in "${pids[@]}"; do alive "$p" && any=1; done
    [ $any = 0 ] && return 0
    sleep 0.2
  done
  for p in "${pids[@]}"; do alive "$p" && { echo "SIGKILL $p" >&2; kill -KILL "$p"; }; done
  return 0
}

cmd_down() {
  local t0 ctld i; t0=$(now_ms)
  ctld=$(cat "$D/pids/slurmctld.pid" 2>/dev/null || true)
  if [ -n "$ctld" ] && alive "$ctld"; then
    # Job steps are re-parented to init, not children of slurmd: cancel them while slurmd runs.
    scancel --user="$(id -un)" 2>/dev/null || true
    for i in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null || true)" ] && break; sleep 0.2; done
  fi
  stop_pids "$D"/pids/slurmd-*.pid "$D/pids/slurmctld.pid"
  stop_pids "$D/pids/munged.pid"
  echo "SLURM down in $(elapsed "$t0") ms"
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) echo "usage: $0 install|up|status|down" >&2; exit 2 ;;
esac
