#!/usr/bin/env bash
# A live one-node SLURM on localhost, for tests/test_slurm.py (and by hand):
#
#   bash tests/slurm/cluster.sh start DIR   # install slurm-wlm + munge if absent, start daemons
#   bash tests/slurm/cluster.sh stop DIR    # stop the daemons it started (by their pids)
#
# The node has every CPU of this machine, its memory less 1 GB, and one GPU slot (a count-only
# gres backed by /dev/null, so that the profile's --gres=gpu:1 requests are scheduled for real;
# jobs see no CUDA device and fit on the CPU). Partitions: "main" (the default) and "gpuq".
# Finished jobs stay in `scontrol show job` for an hour (MinJobAge), so the test can check
# each job's partition, GPU and limits after the run.
# State, logs and the munge key live in DIR; SLURM's tools read /etc/slurm/slurm.conf (jobs
# drop a custom SLURM_CONF), so start writes it there, marked as ours, and stop removes it.
# It refuses to touch a machine that already has a slurm.conf or a running slurmctld.
# Exit status 77: SLURM cannot be had here (the message says why); the test then skips.
set -euo pipefail

action=${1:?usage: cluster.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: cluster.sh start|stop DIR}" && cd "$2" && pwd)
conf=/etc/slurm/slurm.conf
marker="# written by poplds tests/slurm/cluster.sh"

skip() { echo "SLURM SKIPPED: $*" >&2; exit 77; }

stop() {
    for name in slurmd slurmctld munged; do
        if [[ -f "$dir/$name.pid" ]]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
    for f in "$conf" /etc/slurm/gres.conf; do
        if [[ -f "$f" ]] && head -n 1 "$f" | grep -qF "$marker"; then rm -f "$f"; fi
    done
}

if [[ $action == stop ]]; then stop; exit 0; fi
[[ $action == start ]] || { echo "usage: cluster.sh start|stop DIR" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    [[ $(id -u) == 0 ]] || skip "slurm-wlm/munge are not installed and installing needs root"
    command -v apt-get >/dev/null || skip "slurm-wlm/munge are not installed and there is no apt-get"
    echo "installing slurm-wlm and munge from Debian's packages" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurm-wlm munge >"$dir/apt.log" 2>&1 \
        || { apt-get update -q >>"$dir/apt.log" 2>&1 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                slurm-wlm munge >>"$dir/apt.log" 2>&1; }; }; then
        skip "apt-get install slurm-wlm munge failed: $(tail -n 2 "$dir/apt.log" | tr '\n' ' ')"
    fi
fi
[[ $(id -u) == 0 ]] || skip "starting slurmd needs root"
if [[ -f $conf ]] && ! head -n 1 "$conf" | grep -qF "$marker"; then
    skip "$conf exists (a real cluster's configuration): not touching it"
fi
if pgrep -x slurmctld >/dev/null; then skip "a slurmctld is already running"; fi

mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/log" /etc/slurm
if [[ ! -f $dir/munge.key ]]; then
    dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed" \
    || skip "munged would not start: $(tail -n 2 "$dir/log/munged.log" 2>/dev/null)"

cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
cat >"$conf" <<EOF
$marker (removed by its stop)
ClusterName=poplds-test
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
MpiDefault=none
SwitchType=switch/none
NodeName=localhost NodeHostname=$(hostname) CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpuq Nodes=localhost MaxTime=INFINITE State=UP
EOF
printf '%s\nName=gpu File=/dev/null\n' "$marker" >/etc/slurm/gres.conf

slurmctld || { tail -n 5 "$dir/log/slurmctld.log" >&2; stop; skip "slurmctld would not start"; }
slurmd -N localhost || { tail -n 5 "$dir/log/slurmd.log" >&2; stop; skip "slurmd would not start"; }
for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t -n localhost 2>/dev/null | head -n 1 || true)
    [[ $state == idle ]] && break
    sleep 0.5
done
if [[ $state != idle ]]; then
    tail -n 5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2
    stop
    skip "the node did not come up (state '${state}')"
fi
echo "SLURM up: 1 node, $cpus CPUs, $mem MB, partitions main (default) and gpuq" >&2
