#!/usr/bin/env bash
# Install what a one-node local SLURM cluster needs (Debian/Ubuntu, root).
# Idempotent: packages already present are not installed again.
#   SLURM_ACCOUNTING=0 slurm/local/install.sh   # skip mariadb + slurmdbd (sacct will not work)
set -euo pipefail
source "$(dirname "$0")/common.sh"

[[ $(id -u) == 0 ]] || die "must run as root (apt-get and daemons)"
command -v apt-get >/dev/null || die "apt-get not found: install slurmctld, slurmd, slurm-client and munge by hand"

pkgs=(slurmctld slurmd slurm-client munge)
if [[ $SLURM_ACCOUNTING == 1 ]]; then pkgs+=(slurmdbd mariadb-server); fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    say "already installed: ${pkgs[*]}"
    exit 0
fi
say "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The package scripts try to start services; in a container there is no init, so
# keep them from doing so (we start our own private daemons in start.sh).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
trap '[[ $created_policy == 1 ]] && rm -f "$policy"' EXIT
if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/ablate-slurm-apt.log 2>&1; then
    say "apt-get install failed; updating the package lists and retrying"
    apt-get update -q >>/tmp/ablate-slurm-apt.log 2>&1 || true
    apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/ablate-slurm-apt.log 2>&1 \
        || die "apt-get install failed, see /tmp/ablate-slurm-apt.log"
fi
say "installed: ${missing[*]}"
