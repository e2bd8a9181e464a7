#!/usr/bin/env bash
# Stop the local cluster started by start.sh: cancel jobs, then stop slurmd,
# slurmctld, slurmdbd, mariadb and munged (each by its pid file). Idempotent.
#   slurm/local/stop.sh           # keep $ABLATE_SLURM_DIR (logs, database)
#   slurm/local/stop.sh --purge   # and delete it
set -euo pipefail
source "$(dirname "$0")/common.sh"

stop_pid() {  # name pidfile
    local name=$1 pf=$2
    if pid_alive "$pf"; then
        local pid; pid=$(cat "$pf")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && { say "$name did not stop, killing $pid"; kill -9 "$pid" 2>/dev/null || true; }
        say "$name stopped"
    else
        say "$name not running"
    fi
    rm -f "$pf"
}

if [[ -f $SLURM_CONF ]] && pid_alive "$STATE/run/slurmctld.pid"; then
    scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
fi
for pf in "$STATE"/run/slurmd-*.pid; do [[ -e $pf ]] && stop_pid slurmd "$pf"; done
stop_pid slurmctld "$STATE/run/slurmctld.pid"
stop_pid slurmdbd "$STATE/run/slurmdbd.pid"
stop_pid mariadb "$STATE/run/mysqld.pid"
stop_pid munged "$STATE/run/munged.pid"
if [[ -L /run/munge/munge.socket.2 && $(readlink /run/munge/munge.socket.2) == "$MUNGE_SOCKET" ]]; then
    rm -f /run/munge/munge.socket.2
fi
if [[ ${1:-} == --purge ]]; then rm -rf "$STATE"; say "removed $STATE"; fi
