#!/usr/bin/env bash
# Stop what tests/slurm/start_local_slurm.sh DIR started: cancel the cluster's jobs (so
# that no job step outlives its slurmd), then stop slurmd, slurmctld and munged by the
# pids they left in DIR.
set -uo pipefail
dir=${1:?usage: stop_local_slurm.sh DIR}
export PATH="$PATH:/usr/sbin:/sbin"
if [ -s "$dir/slurmctld.pid" ] && [ -f "$dir/slurm.conf" ]; then
  export SLURM_CONF="$dir/slurm.conf"   # this cluster only: every job on it is a test's
  scancel --user="$(id -un)" >/dev/null 2>&1 || true
  for _ in $(seq 1 40); do
    [ -z "$(squeue --noheader --states=RUNNING,COMPLETING,SUSPENDED,STOPPED 2>/dev/null)" ] && break
    sleep 0.5
  done
fi
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || { rm -f "$pidfile"; continue; }
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
done
