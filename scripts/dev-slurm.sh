#!/usr/bin/env bash
# A real single-node Slurm (Debian 12, slurm 22.05) for the engine tests and development.
# Runs as root without systemd. Usage:
#   scripts/dev-slurm.sh up     # installs the Debian packages if missing, starts munge, slurmctld, slurmd
#   scripts/dev-slurm.sh down   # stops them by PID file
# Then: export SLURM_CONF=${SLURM_CI_DIR:-/tmp/slurm-ci}/slurm.conf for sbatch/squeue/scancel.
# Notes (measured here):
# - SchedulerParameters below matter: with Slurm's defaults 200 short jobs took ~260 s; with these ~6-11 s.
# - CPUs=64 with SlurmdParameters=config_overrides advertises more slots than the 2 real cores, so many
#   short jobs can run at once. The scheduler fills freed slots about once a second (backfill pass), so
#   the slot count caps short-job throughput: 16 slots gave 16 no-op jobs/s, 64 slots ~55/s.
# - Jobs must be submitted with plain --export=ALL: a variable list (--export=ALL,K=V) makes slurmd
#   build a login environment per job (bash -l ... slurmstepd getenv), 6x slower here.
# - No accounting daemon: sacct does not work; job state comes from squeue (MinJobAge keeps finished
#   jobs visible for an hour).
# - Killed daemons stay <defunct> (PID 1 does not reap them): check munge with `munge -n`, not pgrep.
# - RealMemory must be >= any --mem a job asks for, or sbatch refuses the job.
set -euo pipefail
D=${SLURM_CI_DIR:-/tmp/slurm-ci}
export SLURM_CONF=$D/slurm.conf

down() {
  scancel --user=root 2>/dev/null || true
  for f in slurmd slurmctld; do [ -f "$D/run/$f.pid" ] && kill "$(cat "$D/run/$f.pid")" 2>/dev/null || true; done
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  return 0
}

up() {
  if ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  if [ "$(sinfo -h -o %t 2>/dev/null | head -1)" = idle ] || [ "$(sinfo -h -o %t 2>/dev/null | head -1)" = mix ]; then
    echo "slurm already up"; return 0
  fi
  mkdir -p "$D"/{state,spool,log,run}
  cat > "$SLURM_CONF" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
MinJobAge=3600
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1,default_queue_depth=1000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
KillWait=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=64 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  [ -s /etc/munge/munge.key ] || { mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge
  munge -n >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null
  /usr/sbin/slurmctld
  /usr/sbin/slurmd -N localhost
  for _ in $(seq 150); do
    [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && { echo "slurm up"; return 0; }
    sleep 0.2
  done
  echo "slurm failed to come up"; tail -20 "$D"/log/*.log; return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
