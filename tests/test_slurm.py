"""Sweeps and multi-task jobs through Hydra's submitit launcher against a real
one-node SLURM cluster on localhost (tests/slurm_cluster.py, slurm/local/).

Run with `make test-slurm` (root: the fixture installs and starts the cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, train_args
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

# Small jobs: one CPU per task (the cluster has 2), no wandb, a short eval.
COMMON = ("hydra/launcher=slurm", "hydra.launcher.timeout_min=10", "train.max_steps=4",
          "eval.max_caption=4", "eval.max_vqa=4", "logger=none")
JOB_ENV = {"OMP_NUM_THREADS": "1"}


def results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def job_logs(sweep: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((sweep / ".submitit").rglob("*_log.out")))


def sacct_states(env: dict, sweep: Path) -> list[str]:
    """Final states of the sweep's jobs, from SLURM accounting (allocations only)."""
    ids = sorted({p.name.split("_")[0] for p in (sweep / ".submitit").iterdir()
                  if p.name.split("_")[0].isdigit()})
    for _ in range(50):  # accounting records the end a moment after the job exits
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                             env=env, capture_output=True, text=True, check=True).stdout
        states = [line.split("|")[1] for line in out.splitlines() if line]
        if states and not any(s in ("RUNNING", "PENDING", "COMPLETING") for s in states):
            return states
        time.sleep(0.2)
    return states


def test_sweep_of_two_variants_completes(slurm_cluster, corpus, tmp_path):
    runs = tmp_path / "runs"
    res = run_cli(train_args(corpus, runs, *COMMON, "connector=mlp,avgpool", multirun=True),
                  timeout=280, env={**slurm_cluster, **JOB_ENV})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Submitit 'slurm' sweep" in res.stdout + res.stderr
    sweep = runs / "smoke"
    got = results(sweep)
    assert len(got) == 2, sorted(got)
    connectors = sorted(o for r in got.values() for o in r["overrides"] if o.startswith("connector="))
    assert connectors == ["connector=avgpool", "connector=mlp"]
    for name, r in got.items():
        assert r["status"] == "complete" and r["step"] == 4, (name, r.get("error"))
    # Two array tasks ran as SLURM jobs and accounting saw them finish.
    assert sacct_states(slurm_cluster, sweep) == ["COMPLETED", "COMPLETED"]


def test_failing_variant_does_not_stop_the_sweep(slurm_cluster, corpus, tmp_path):
    runs = tmp_path / "runs"
    # image_size=30 is not divisible by the patch size: that variant fails at setup.
    res = run_cli(train_args(corpus, runs, *COMMON, "encoder.image_size=32,30", multirun=True),
                  timeout=280, env={**slurm_cluster, **JOB_ENV})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    got = results(runs / "smoke")
    by_size = {next(o for o in r["overrides"] if o.startswith("encoder.image_size=")): r
               for r in got.values()}
    assert by_size["encoder.image_size=32"]["status"] == "complete"
    assert by_size["encoder.image_size=32"]["step"] == 4
    failed = by_size["encoder.image_size=30"]
    assert failed["status"] == "failed" and "patch" in failed["error"]
    cmp = run_cli(["-m", "sweeps.compare", str(runs / "smoke"), "--no-plot"])
    assert cmp.returncode == 0, cmp.stderr
    assert "failed runs (1)" in cmp.stdout


def test_two_task_job_trains_with_two_ranks(slurm_cluster, corpus, tmp_path):
    runs = tmp_path / "runs"
    res = run_cli(train_args(corpus, runs, *COMMON, "hydra.launcher.tasks_per_node=2",
                             "deepspeed=zero1", "eval.at_end=false", multirun=True),
                  timeout=280, env={**slurm_cluster, **JOB_ENV})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    sweep = runs / "smoke"
    got = results(sweep)
    assert len(got) == 1 and next(iter(got.values()))["status"] == "complete"
    # Both tasks ran the job; rank 0 reports 2 ranks (rank/world size from SLURM_PROCID/NTASKS).
    logs = job_logs(sweep)
    assert "ranks 2  grad accumulation 1" in logs, logs[-3000:]
    assert len(list((sweep / ".submitit").rglob("*_log.out"))) == 2
    # ZeRO-1 over gloo: one optimizer-state shard per rank in the final checkpoint.
    (run_dir,) = [p.parent for p in sweep.glob("*/results.json")]
    (ckpt,) = [p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()]
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2


def test_signal_requeues_and_resumes_with_uninterrupted_losses(slurm_cluster, corpus, tmp_path):
    from ablate.tracking import read_metrics

    def losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

    args = ("train.max_steps=30", "train.ckpt_every=0", "eval.at_end=false")
    straight_runs, runs = tmp_path / "straight", tmp_path / "runs"
    res = run_cli(train_args(corpus, straight_runs, *args, "logger=none"), env=JOB_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    (straight_dir,) = [p.parent for p in straight_runs.rglob("metrics.jsonl")]

    # wandb offline: the requeued job must continue the same wandb run.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **slurm_cluster, **JOB_ENV, "WANDB_MODE": "offline"}
    sweep_args = [a for a in train_args(corpus, runs, *COMMON, *args, multirun=True) if a != "logger=none"]
    proc = subprocess.Popen([sys.executable, *sweep_args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep = runs / "smoke"
    deadline = time.time() + 200
    while not [p for p in sweep.glob("*/metrics.jsonl") if losses(p.parent)]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    (job,) = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()}
    subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
    out = proc.communicate(timeout=250)[0]
    assert proc.returncode == 0, out[-3000:]

    (run_dir,) = [p.parent for p in sweep.glob("*/results.json")]
    result = json.loads((run_dir / "results.json").read_text())
    assert result["status"] == "complete" and result["step"] == 30
    logs = job_logs(sweep)
    assert "requeued" in logs and "resumed from step" in logs, logs[-3000:]
    assert losses(run_dir) == losses(straight_dir)
    # One wandb run, resumed: a single run id directory under the run's wandb folder.
    wandb_runs = [p for p in run_dir.rglob("offline-run-*") if p.is_dir()]
    assert len(wandb_runs) == 2 and len({p.name.split("-")[-1] for p in wandb_runs}) == 1, wandb_runs
