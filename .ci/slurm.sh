#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost for the `@pytest.mark.slurm` tests and CI.
#
#   bash .ci/slurm.sh up      install (Debian packages, when missing) and start munge, MariaDB,
#                             slurmdbd, slurmctld, slurmd; wait until the node is idle
#   bash .ci/slurm.sh down    cancel every job, stop the daemons this script started (by pid file)
#   bash .ci/slurm.sh env     print the `export SLURM_CONF=...` line clients need
#
# Run as root (CI does). No systemd is needed: the daemons fork into the background themselves.
# Environment: SLURM_BASE (state, config and logs; default /tmp/scaletrain-slurm).
# Clients (sbatch, sacct, submitit, the tests) need SLURM_CONF=$SLURM_BASE/etc/slurm.conf.
#
# What the cluster has, and why:
# - accounting (slurmdbd + MariaDB): submitit polls `sacct`; without it a job that dies without
#   writing its result is never noticed (the client waits forever);
# - partitions `debug` (default, PriorityTier=1, GraceTime=20) and `high` (PriorityTier=10): a job on
#   `high` preempts one on `debug` with REQUEUE, and `preempt_send_user_signal` delivers the job's
#   --signal (USR2) instead of SIGTERM, as large clusters do;
# - cred_expire=5 and 2-second scheduler intervals: a requeued job restarts in seconds, not minutes.
# Not here: cgroups (proctrack/linuxproc, task/none), GPUs (no gres), more than one node.
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/scaletrain-slurm}
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF
PKGS="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"

log() { echo "slurm.sh: $*" >&2; }

install_packages() {
  local missing=() p
  for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_slurm_conf() {
  local ncpu mem
  ncpu=$(nproc)
  mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))
  mkdir -p "$BASE/etc" "$BASE/state/ctld" "$BASE/state/d" "$BASE/log"
  cat >"$CONF" <<EOF
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/state/slurmctld.pid
SlurmdPidFile=$BASE/state/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=20
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  # slurmdbd finds its config next to SLURM_CONF; it refuses a file others can read (it holds a password)
  cat >"$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/state/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"
}

# A pid file whose process is alive; a zombie counts as gone (PID 1 may reap stopped daemons late).
running() {
  local pid state
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] || return 1  # the daemon may delete it as we read
  state=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll every 0.1 s
  local secs=$1 what=$2 i
  shift 2
  for ((i = 0; i < secs * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "timed out after ${secs}s waiting for $what; logs in $BASE/log"
  return 1
}

start_munge() {
  running /run/munge/munged.pid && return 0
  if [ ! -s /etc/munge/munge.key ]; then  # Debian's postinst normally creates it
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge  # systemd's RuntimeDirectory would create it
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged sh -c 'munge -n </dev/null | unmunge'
}

start_accounting() {
  if ! running /run/mysqld/mysqld.pid; then
    # mariadbd cannot write a pid file outside /run/mysqld (permission denied as user mysql)
    install -d -o mysql -g root /run/mysqld
    nohup /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mysqld.pid \
      >"$BASE/log/mariadb.log" 2>&1 &
    wait_for 30 mariadb mariadb -e 'select 1'
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  fi
  if [ "$1" = fresh ]; then
    # a new state folder numbers jobs from 1 again: old records with the same ids would answer sacct
    # (submitit then takes a requeued job for an old cancelled one)
    mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db;"
  fi
  if ! running "$BASE/state/slurmdbd.pid"; then
    /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster localci >/dev/null 2>&1 || true  # already there on a second `up`
  fi
}

node_idle() { sinfo -h -o %t | grep -qx idle; }

up() {
  local t0=$SECONDS
  [ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }
  install_packages
  local fresh=fresh
  [ -d "$BASE/state/ctld" ] && fresh=no
  write_slurm_conf
  start_munge
  start_accounting $fresh
  running "$BASE/state/slurmctld.pid" || /usr/sbin/slurmctld
  running "$BASE/state/slurmd.pid" || /usr/sbin/slurmd -N localhost  # node name independent of hostname
  wait_for 30 "node idle" node_idle
  log "cluster up in $((SECONDS - t0)) s"
  sinfo >&2
  env_line
}

stop_pidfile() {
  local pid i
  running "$1" || return 0
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do running "$1" || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  if [ -f "$CONF" ] && running "$BASE/state/slurmctld.pid"; then
    scancel --user=root 2>/dev/null || true  # no slurmstepd may outlive slurmd
    wait_for 10 "jobs to end" sh -c '[ -z "$(squeue -h 2>/dev/null)" ]' || true
  fi
  stop_pidfile "$BASE/state/slurmd.pid"
  stop_pidfile "$BASE/state/slurmctld.pid"
  stop_pidfile "$BASE/state/slurmdbd.pid"
  stop_pidfile /run/mysqld/mysqld.pid
  stop_pidfile /run/munge/munged.pid
  log "cluster down"
}

env_line() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) env_line ;;
  *) echo "usage: $0 up|down|env   (SLURM_BASE=${BASE})" >&2; exit 2 ;;
esac
