"""Sweeps and multi-task jobs through Hydra's submitit launcher against a real
one-node SLURM cluster on localhost (tests/slurm_cluster.py, slurm/local/).

Run with `make test-slurm` (root: the fixture installs and starts the cluster)."""

from __future__ import annotations

import json
import os
import shutil
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
    # The corrupt weights file passes the pre-flight (it exists, a known suffix); that
    # variant fails in its job, when the encoder loads it.
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    res = run_cli(train_args(corpus, runs, *COMMON, f"encoder.pretrained=null,{corrupt}", multirun=True),
                  timeout=280, env={**slurm_cluster, **JOB_ENV})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    got = results(runs / "smoke")
    by_point = {next(o for o in r["overrides"] if o.startswith("encoder.pretrained=")): r
                for r in got.values()}
    assert by_point["encoder.pretrained=null"]["status"] == "complete"
    assert by_point["encoder.pretrained=null"]["step"] == 4
    failed = by_point[f"encoder.pretrained={corrupt}"]
    assert failed["status"] == "failed" and "UnpicklingError" in failed["error"]
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


def submitted_job(sweep: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The SLURM id of the sweep's (single) job, once the launcher has submitted it."""
    deadline = time.time() + timeout
    while True:
        ids = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("*") if p.name[0].isdigit()}
        if ids:
            (job,) = ids
            return job
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)


def test_jobs_run_the_code_they_were_submitted_with(slurm_cluster, corpus, tmp_path):
    """Submit from a copy of the repository with the job held, then change that copy's
    code and configs: the released job runs the snapshot taken at submission."""
    repo = tmp_path / "repo"
    for top in ("ablate", "models", "sweeps", "hydra_plugins", "conf"):
        shutil.copytree(REPO / top, repo / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "submitted"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **slurm_cluster, **JOB_ENV}
    args = train_args(corpus, runs, *COMMON, "eval.at_end=false",
                      "+hydra.launcher.additional_parameters.hold=true", multirun=True)
    proc = subprocess.Popen([sys.executable, *args], cwd=repo, env=env,  # imports the copy
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep = runs / "smoke"
    job = submitted_job(sweep, proc)
    # Edits that would show: a print when the job imports ablate.preempt (not ablate.train:
    # run as `python -m`, it is __main__ and pickled by value), another log interval.
    module = repo / "ablate" / "preempt.py"
    module.write_text(module.read_text() + "\nprint('MODIFIED-CODE-RAN', flush=True)\n")
    smoke = repo / "conf" / "experiment" / "smoke.yaml"
    assert "  log_every: 1\n" in smoke.read_text()
    smoke.write_text(smoke.read_text().replace("  log_every: 1\n", "  log_every: 3\n"))
    subprocess.run(["scontrol", "release", job], env=env, check=True)
    out = proc.communicate(timeout=200)[0]
    assert proc.returncode == 0, out[-3000:]

    (run_dir,) = [p.parent for p in sweep.glob("*/results.json")]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "complete"
    logs = job_logs(sweep)
    assert "MODIFIED-CODE-RAN" not in logs + out
    (code,) = (sweep / ".code").iterdir()
    assert f"[ablate] code: snapshot {code}, git {head[:12]}\n" in logs, logs[-3000:]
    assert json.loads((code / "SNAPSHOT.json").read_text())["commit"] == head
    assert "train:\n" in (run_dir / "config.yaml").read_text()
    assert "  log_every: 1\n" in (run_dir / "config.yaml").read_text()  # the submitted config


def sbatch_train(env: dict, out: Path, ntasks: int, *overrides: str) -> str:
    """Submit slurm/train.sbatch (one node, ``ntasks`` ranks); returns the job id."""
    cmd = ["sbatch", "--parsable", f"--ntasks-per-node={ntasks}", "--cpus-per-task=1", "--time=10",
           f"--output={out}", f"--chdir={REPO}", str(REPO / "slurm" / "train.sbatch"), *overrides]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]


def wait_for_job(env: dict, job: str, timeout: float = 200) -> str:
    """Poll accounting until the job has ended; returns its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], env=env,
                             capture_output=True, text=True).stdout.split()
        if out and out[0] not in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED", "CONFIGURING"):
            return out[0]
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end in {timeout}s")


def test_sbatch_template_two_ranks_and_requeue_resumes(slurm_cluster, corpus, tmp_path):
    """slurm/train.sbatch without Hydra's launcher: two srun tasks are two ranks (rank and
    world size from SLURM_PROCID/SLURM_NTASKS, master from the node list). The same run
    signalled with USR2 mid-way requeues itself and finishes with the same losses."""
    from ablate.tracking import read_metrics

    def losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

    env = {**slurm_cluster, **JOB_ENV, "ABLATE_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    args = (f"paths.data={corpus}", "experiment=smoke", "deepspeed=zero1", "train.max_steps=12",
            "train.ckpt_every=0", "eval.at_end=false", "logger=none")
    straight, runs = tmp_path / "straight", tmp_path / "runs"
    job = sbatch_train(env, tmp_path / "straight.out", 2, *args, f"paths.runs={straight}")
    assert wait_for_job(env, job) == "COMPLETED", (tmp_path / "straight.out").read_text()[-3000:]
    log = (tmp_path / "straight.out").read_text()
    assert "2 task(s)" in log and "ranks 2  grad accumulation 1" in log, log[-3000:]
    (straight_dir,) = [p.parent for p in straight.rglob("results.json")]
    assert json.loads((straight_dir / "results.json").read_text())["step"] == 12
    (ckpt,) = [p for p in (straight_dir / "checkpoints").glob("step-*") if p.is_dir()]
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-1: one shard per rank

    out = tmp_path / "requeued.out"
    job = sbatch_train(env, out, 2, *args, f"paths.runs={runs}")
    deadline = time.time() + 150
    while not [p for p in runs.rglob("metrics.jsonl") if losses(p.parent)]:
        assert time.time() < deadline, out.read_text()[-3000:] if out.exists() else "no output"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
    assert wait_for_job(env, job) == "COMPLETED", out.read_text()[-3000:]
    log = out.read_text()
    assert f"job {job} restart 1" in log and "scontrol requeue" in log, log[-3000:]
    (run_dir,) = [p.parent for p in runs.rglob("results.json")]
    assert "resumed from step" in log and json.loads((run_dir / "results.json").read_text())["step"] == 12
    assert losses(run_dir) == losses(straight_dir)
