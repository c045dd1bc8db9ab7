#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (munge, slurmctld, slurmd), for tests
# and local trials of `finetrain submit`. Installs Debian's slurm-wlm and munge when
# missing. Idempotent: a cluster that already answers is left running as it is.
# Needs root. State and logs go to $FINETRAIN_SLURM_DIR (default /var/tmp/finetrain-slurm).
set -euo pipefail

state=${FINETRAIN_SLURM_DIR:-/var/tmp/finetrain-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by finetrain slurm/start-local-cluster.sh"

if [ "$(id -u)" != 0 ]; then
    echo "start-local-cluster.sh: needs root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

if [ -e "$conf" ] && ! grep -qF "$marker" "$conf"; then
    echo "start-local-cluster.sh: $conf exists and was not written by this script; refusing to replace it" >&2
    exit 1
fi

# munge: the key from the package, or a fresh one.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

host=$(hostname -s)
cpus=$(nproc --all)  # the machine's CPUs: plain nproc follows OMP_NUM_THREADS, which test runs set to 1
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$state/ctld" "$state/d" /etc/slurm
new_conf=$(cat <<CONF
$marker
ClusterName=finetrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits out the credential lifetime before it may start again (default 120 s).
AuthInfo=cred_expire=5
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# test pending jobs every second, not every 60 s: a requeued job starts as soon as it may
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
if [ "$(cat "$conf" 2>/dev/null)" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" > "$conf"
    changed=1
fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "${changed:-0}" = 1 ]; then
    # a changed config needs fresh daemons
    for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid"; do
        if alive "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    for _ in $(seq 50); do alive "$state/slurmctld.pid" || alive "$state/slurmd.pid" || break; sleep 0.1; done
fi
alive "$state/slurmctld.pid" || slurmctld
alive "$state/slurmd.pid" || slurmd

# Ready when the node takes jobs.
for _ in $(seq 150); do
    node_state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
    case "$node_state" in
        idle|mixed|allocated) echo "slurm: node $host ($cpus CPUs) is $node_state; logs in $state"; exit 0 ;;
    esac
    sleep 0.2
done
echo "start-local-cluster.sh: node $host did not become idle (state '${node_state:-none}'); see $state/slurmctld.log and $state/slurmd.log" >&2
exit 1
