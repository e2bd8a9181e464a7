#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost: munged (private socket), optionally
# mariadb + slurmdbd (accounting, so that sacct and submitit see job states),
# slurmctld and slurmd. State, logs and config live in $ABLATE_SLURM_DIR
# (default /tmp/ablate-slurm). Idempotent: running daemons are left alone.
#
#   slurm/local/install.sh && slurm/local/start.sh
#   export SLURM_CONF=/tmp/ablate-slurm/slurm.conf   # then sbatch/srun/squeue/sacct work
#   slurm/local/stop.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

[[ $(id -u) == 0 ]] || die "must run as root"
for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || die "$b not found: run slurm/local/install.sh first"
done
if [[ $SLURM_ACCOUNTING == 1 ]] && ! command -v slurmdbd >/dev/null; then
    say "slurmdbd not installed: starting without accounting (sacct will not work)"
    SLURM_ACCOUNTING=0
fi
t0=$(date +%s.%N)
mkdir -p "$STATE"/{munge,ctld,spool,run,log,mysql}
chmod 700 "$STATE" "$STATE/munge"

# --- munge -----------------------------------------------------------------------
if pid_alive "$STATE/run/munged.pid"; then
    say "munged already running"
else
    [[ -f $STATE/munge/munge.key ]] || { dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none; }
    chmod 600 "$STATE/munge/munge.key"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    say "munged started (socket $MUNGE_SOCKET)"
fi
# slurmdbd and some client paths use the default socket regardless of AuthInfo: point
# it at ours when nothing else owns it (stop.sh removes only a link it finds to ours).
if [[ ! -e /run/munge/munge.socket.2 ]]; then
    mkdir -p /run/munge && ln -sf "$MUNGE_SOCKET" /run/munge/munge.socket.2
fi

# --- config ----------------------------------------------------------------------
acct="AccountingStorageType=accounting_storage/none"
if [[ $SLURM_ACCOUNTING == 1 ]]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$SLURM_DBD_PORT"
fi
sed -e "s|@HOST@|$SLURM_HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@USER@|$(id -un)|g" \
    -e "s|@CPUS@|$SLURM_CPUS|g" -e "s|@MEM_MB@|$SLURM_MEM_MB|g" \
    -e "s|@PARTITION@|$SLURM_PARTITION|g" -e "s|@CTLD_PORT@|$SLURM_CTLD_PORT|g" \
    -e "s|@SLURMD_PORT@|$SLURM_SLURMD_PORT|g" \
    "$here/slurm.conf.in" | awk -v acct="$acct" '{ if ($0 == "@ACCOUNTING@") print acct; else print }' \
    >"$SLURM_CONF.new"
mv "$SLURM_CONF.new" "$SLURM_CONF"

# --- accounting: mariadb + slurmdbd ----------------------------------------------
if [[ $SLURM_ACCOUNTING == 1 ]]; then
    MYSQL_PORT=${SLURM_MYSQL_PORT:-3307}
    sock=$STATE/mysql.sock
    if pid_alive "$STATE/run/mysqld.pid"; then
        say "mariadb already running"
    else
        if [[ ! -d $STATE/mysql/mysql ]]; then
            mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
                >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $STATE/log/mariadb-install.log"
        fi
        (mariadbd --user=root --datadir="$STATE/mysql" --socket="$sock" --port="$MYSQL_PORT" \
            --bind-address=127.0.0.1 --pid-file="$STATE/run/mysqld.pid" --skip-log-bin \
            --innodb-buffer-pool-size=32M --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 &)
        for _ in $(seq 100); do mariadb -S "$sock" -e "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
        mariadb -S "$sock" -e "select 1" >/dev/null 2>&1 || die "mariadb did not start, see $STATE/log/mariadb.log"
        mariadb -S "$sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        say "mariadb started (port $MYSQL_PORT)"
    fi
    # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF.
    cat >"$STATE/slurmdbd.conf" <<DBD
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$SLURM_DBD_PORT
SlurmUser=$(id -un)
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
DBD
    chmod 600 "$STATE/slurmdbd.conf"
    if pid_alive "$STATE/run/slurmdbd.pid"; then
        say "slurmdbd already running"
    else
        slurmdbd 2>>"$STATE/log/slurmdbd.log" \
            || die "slurmdbd failed, see $STATE/log/slurmdbd.log"
        for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
        sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd did not come up, see $STATE/log/slurmdbd.log"
        say "slurmdbd started (port $SLURM_DBD_PORT)"
    fi
    sacctmgr -n list cluster format=cluster%40 | grep -qw ablate-local \
        || sacctmgr -i add cluster ablate-local >/dev/null
fi

# --- slurmctld + slurmd ------------------------------------------------------------
if pid_alive "$STATE/run/slurmctld.pid"; then
    say "slurmctld already running"
else
    slurmctld 2>>"$STATE/log/slurmctld.log" || die "slurmctld failed, see $STATE/log/slurmctld.log"
    say "slurmctld started"
fi
if pid_alive "$STATE/run/slurmd-$SLURM_HOST.pid"; then
    say "slurmd already running"
else
    slurmd 2>>"$STATE/log/slurmd.log" || die "slurmd failed, see $STATE/log/slurmd.log"
    say "slurmd started"
fi

for _ in $(seq 150); do
    st=$(sinfo -h -n "$SLURM_HOST" -o %T 2>/dev/null || true)
    [[ $st == idle* || $st == mixed* || $st == allocated* ]] && break
    sleep 0.2
done
[[ $st == idle* || $st == mixed* || $st == allocated* ]] || { scontrol update nodename="$SLURM_HOST" state=resume 2>/dev/null || true; }
st=$(sinfo -h -n "$SLURM_HOST" -o %T 2>/dev/null || true)
[[ $st == idle* || $st == mixed* || $st == allocated* ]] \
    || die "node $SLURM_HOST is '$st', not idle; see $STATE/log/slurmctld.log and slurmd.log"
say "cluster up in $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo 0)")s: node $SLURM_HOST ($SLURM_CPUS CPUs), partition $SLURM_PARTITION, accounting=$SLURM_ACCOUNTING"
say "export SLURM_CONF=$SLURM_CONF"
