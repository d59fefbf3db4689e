#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (Debian's packages), for the launcher's tests and for trying
# `python -m nemo_pixellm.launch cluster=local_slurm` by hand. Idempotent: installs what is missing,
# (re)writes slurm.conf for this host, starts munged / slurmctld / slurmd if they are not running and
# waits until the node is idle. Needs root (CI and the dev machines are root).
#   scripts/slurm_up.sh            # then: sinfo, squeue, python -m nemo_pixellm.launch ...
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "[slurm_up] installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
fi

HOST="$(hostname -s)"
CPUS="$(nproc)"
CONF=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
# Containers without systemd or cgroup delegation: track processes through /proc and bind nothing.
# Daemons run as root so that root can submit (this is a throwaway test cluster).
cat > "$CONF.new" <<EOF
ClusterName=pixellm-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits for its old step credentials to expire (Slurm's default: 120 s; starting it earlier
# fails with "Job credential revoked"): 15 s keeps the preemption test short.
AuthInfo=cred_expire=15
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if ! cmp -s "$CONF.new" "$CONF"; then mv "$CONF.new" "$CONF"; changed=1; else rm "$CONF.new"; fi

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --force
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if ! running /run/munge/munged.pid; then
  echo "[slurm_up] starting munged"
  runuser -u munge -- /usr/sbin/munged
fi

if (( changed )) && running /run/slurmctld.pid; then
  echo "[slurm_up] slurm.conf changed: restarting the daemons"
  kill "$(cat /run/slurmd.pid)" "$(cat /run/slurmctld.pid)" 2>/dev/null || true
  sleep 2
fi
if ! running /run/slurmctld.pid; then
  echo "[slurm_up] starting slurmctld"
  /usr/sbin/slurmctld
fi
if ! running /run/slurmd.pid; then
  echo "[slurm_up] starting slurmd"
  /usr/sbin/slurmd
fi

for _ in $(seq 60); do
  state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)"
  if [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]; then
    echo "[slurm_up] node $HOST is $state ($CPUS CPUs)"
    exit 0
  fi
  if [[ "$state" == down* || "$state" == drain* ]]; then
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  fi
  sleep 1
done
echo "[slurm_up] the node did not become idle; logs: /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log" >&2
sinfo -N -l >&2 || true
exit 1
