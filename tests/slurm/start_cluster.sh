#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm.py (and CI): munged, slurmctld
# and slurmd from Debian's packages, configured under a state directory of its own.
#
#   tests/slurm/start_cluster.sh STATE_DIR    # prints the SLURM_CONF to export
#   tests/slurm/start_cluster.sh --stop STATE_DIR
# Needs root (slurmd runs jobs as their user) and the packages slurmctld slurmd slurm-client munge.
# The node has FAKE_GPUS GPUs (default 8, what launch/slurm_train.sbatch asks for): generic
# resources backed by device files that are not GPUs. Jobs can ask for GPUs and get Slurm's
# CUDA_VISIBLE_DEVICES, though no CUDA device is behind them.
set -euo pipefail
if [ "${1:-}" = "--stop" ]; then
  state=$2
  for pid in "$state"/slurmd.pid "$state"/slurmctld.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  exit 0
fi
state=$(realpath -m "$1")
mkdir -p "$state"/{spool,ctld}
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
gpus=${FAKE_GPUS:-8}
: > "$state/gres.conf"
for i in $(seq 0 $((gpus - 1))); do
  # A character device (a copy of /dev/null): what gres.conf accepts as a GPU file.
  [ -c "$state/fake_gpu$i" ] || mknod "$state/fake_gpu$i" c 1 3
  echo "Name=gpu File=$state/fake_gpu$i" >> "$state/gres.conf"
done
cat > "$state/slurm.conf" <<CONF
ClusterName=u2moe-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldPort=$(( 26817 ))
SlurmdPort=$(( 26818 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$state/slurm.conf"
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  [ -f /etc/munge/munge.key ] || (mungekey --create 2>/dev/null || create-munge-key -f)
  runuser -u munge -- munged 2>/dev/null || munged --force
fi
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "slurm did not come up; logs in $state" >&2
tail -n 20 "$state"/slurmctld.log "$state"/slurmd.log >&2 || true
exit 1
