# Shared settings for slurm/local/*.sh (sourced). Everything lives under one private
# state directory so that the cluster never touches /etc/slurm or /run/munge.
ABLATE_SLURM_DIR=${ABLATE_SLURM_DIR:-/tmp/ablate-slurm}
STATE=$ABLATE_SLURM_DIR
export SLURM_CONF=$STATE/slurm.conf
SLURM_HOST=${SLURM_HOST:-$(hostname -s)}
SLURM_CPUS=${SLURM_CPUS:-2}
SLURM_MEM_MB=${SLURM_MEM_MB:-4000}
SLURM_PARTITION=${SLURM_PARTITION:-debug}
SLURM_CTLD_PORT=${SLURM_CTLD_PORT:-6817}
SLURM_SLURMD_PORT=${SLURM_SLURMD_PORT:-6818}
SLURM_DBD_PORT=${SLURM_DBD_PORT:-6819}
# Accounting (mariadb + slurmdbd) makes sacct work, so submitit sees real job states.
SLURM_ACCOUNTING=${SLURM_ACCOUNTING:-1}
MUNGE_SOCKET=$STATE/munge/munge.socket

say() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
