"""A real one-node SLURM cluster on localhost for the `slurm`-marked tests.

`slurm_cluster` (session scope) installs the Debian packages if needed, starts the
cluster with slurm/local/start.sh in a private state directory and stops it at the
end of the session. It skips (with the reason) only when the machine cannot do that:
not root, or no apt-get. Set ABLATE_SLURM_KEEP=1 to leave the cluster running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"


def _sh(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL / script)], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start the local cluster; yields the environment (with SLURM_CONF) that jobs need."""
    have_bins = all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt-get install, daemons)")
    if not have_bins and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    state = os.environ.get("ABLATE_SLURM_DIR") or str(tmp_path_factory.mktemp("slurm-state"))
    env = {**os.environ, "ABLATE_SLURM_DIR": state}
    for script in ("install.sh", "start.sh"):
        r = _sh(script, env)
        if r.returncode != 0:
            pytest.fail(f"slurm/local/{script} failed:\n{r.stdout}\n{r.stderr}")
    env["SLURM_CONF"] = str(Path(state) / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # for submitit calls in this process
    try:
        yield env
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if os.environ.get("ABLATE_SLURM_KEEP") != "1":
            _sh("stop.sh", env)
