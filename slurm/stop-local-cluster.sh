#!/usr/bin/env bash
# Stop the one-node cluster started by start-local-cluster.sh (slurmd, slurmctld, munged).
set -uo pipefail

state=${FINETRAIN_SLURM_DIR:-/var/tmp/finetrain-slurm}

stop() {  # stop the daemon whose pid is in $1
    [ -s "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
stop "$state/slurmd.pid"
stop "$state/slurmctld.pid"
stop /run/munge/munged.pid
echo "slurm: local cluster stopped"
