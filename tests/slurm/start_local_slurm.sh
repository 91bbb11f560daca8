#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests and trying the SLURM launcher by hand.
#
#   tests/slurm/start_local_slurm.sh DIR    # start munged, slurmctld, slurmd; wait for the node
#   . DIR/env.sh                            # SLURM_CONF for sinfo/squeue/sbatch/scancel
#   python -m sclip_lab.run -m +sweep=table4 hydra/launcher=slurm hydra.launcher.gpus_per_node=0 ...
#   tests/slurm/stop_local_slurm.sh DIR     # stop the three daemons
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root: slurmd
# starts jobs. Nothing outside DIR is written or read but the packages themselves: the
# config, munge key and socket, state, spool, logs and pid files all live in DIR, on free
# ports, so that it runs beside a system SLURM. One partition "debug" (the default) holds
# the node with every CPU and ~90% of the memory; no cgroups, no systemd, no accounting
# (sacct has no slurmdbd to ask, as on small clusters).
#
# Exit status: 0 the node is idle and takes jobs; 3 SLURM cannot run here (the reason on
# stderr: packages missing, not root); 1 a daemon did not come up (its log's tail on stderr).
set -euo pipefail
dir=${1:?usage: start_local_slurm.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

cannot() { echo "local SLURM cannot start: $*" >&2; exit 3; }
for bin in munged slurmctld slurmd sinfo sbatch scontrol; do
  command -v "$bin" >/dev/null 2>&1 ||
    PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 ||
    cannot "$bin not found (apt-get install slurm-wlm munge)"
done
export PATH="$PATH:/usr/sbin:/sbin"
[ "$(id -u)" = 0 ] || cannot "slurmd must run as root to start jobs (run as root, e.g. in CI)"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

mkdir -p "$dir"/{munge,state,spool,log}
chmod 700 "$dir/munge"
key="$dir/munge/munge.key"
[ -s "$key" ] || { head -c 1024 /dev/urandom > "$key"; }
chmod 400 "$key"
socket="$dir/munge/munge.socket"
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
ctld_port=$(free_port)
slurmd_port=$(free_port)
while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done

cat > "$dir/slurm.conf" <<CONF
# Written by tests/slurm/start_local_slurm.sh: a single-node SLURM under $dir
ClusterName=sclip-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$dir/env.sh" <<ENV
export SLURM_CONF=$dir/slurm.conf
export PATH="\$PATH:/usr/sbin:/sbin"
ENV
export SLURM_CONF="$dir/slurm.conf"

fail() {
  echo "local SLURM did not start: $1" >&2
  for log in "$dir"/log/*.log; do [ -f "$log" ] && { echo "--- $log" >&2; tail -n 15 "$log" >&2; }; done
  "$(dirname "$0")/stop_local_slurm.sh" "$dir" >/dev/null 2>&1 || true
  exit 1
}

munged --force --socket="$socket" --key-file="$key" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" ||
  fail "munged exited with $?"
slurmctld -f "$dir/slurm.conf" -i || fail "slurmctld exited with $?"
slurmd -f "$dir/slurm.conf" || fail "slurmd exited with $?"

for _ in $(seq 1 120); do
  state=$(sinfo --noheader --format=%t 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle*) echo "local SLURM up: node $host ($cpus CPUs, ${mem_mb} MB), partition debug; SLURM_CONF=$dir/slurm.conf"
           exit 0 ;;
  esac
  sleep 0.5
done
fail "node not idle after 60 s (state: ${state:-none})"
