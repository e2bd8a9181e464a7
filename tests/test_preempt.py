"""Preemption without SLURM: SIGUSR2 to a training process saves a complete checkpoint at
a step boundary and exits with the requeue status; a relaunch finishes with the losses
of an uninterrupted run; the requeue cap reads SLURM_RESTART_COUNT. (The SLURM requeue
itself: tests/test_slurm.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ablate import preempt
from ablate.preempt import REQUEUE_EXIT
from ablate.strategy import DeepSpeedStrategy
from tests.conftest import REPO, run_cli, train_args
from tests.test_train import check, losses, only_run_dir

ARGS = ("train.max_steps=30", "train.ckpt_every=0", "eval.at_end=false", "logger=none")


def test_signal_saves_at_step_boundary_and_resume_matches(corpus, tmp_path):
    straight_runs, runs = tmp_path / "straight", tmp_path / "runs"
    check(run_cli(train_args(corpus, straight_runs, *ARGS)))
    straight = losses(only_run_dir(straight_runs))

    proc = subprocess.Popen([sys.executable, *train_args(corpus, runs, *ARGS)], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not list(runs.rglob("metrics.jsonl")) or not losses(only_run_dir(runs)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)  # training is past step 1
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == REQUEUE_EXIT, out[-3000:]
    run_dir = only_run_dir(runs)
    ((stopped, _),) = DeepSpeedStrategy.complete_tags(run_dir / "checkpoints")
    assert 1 <= stopped < 30 and f"stopped at step {stopped}" in out
    assert max(losses(run_dir)) == stopped  # nothing trained past the checkpoint
    assert not (run_dir / "results.json").exists()

    res = check(run_cli(train_args(corpus, runs, *ARGS)))
    assert f"resumed from step {stopped}" in res.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, 31))
    assert resumed == straight


@pytest.mark.parametrize("restarts,requeued", [(None, True), ("2", True), ("3", False), ("7", False)])
def test_requeue_cap_from_slurm_restart_count(monkeypatch, capsys, restarts, requeued):
    """Below train.max_requeues (3 here) the preempt signal requeues the job; at or past
    it the run still stops with the requeue status (its checkpoint is saved by then) but
    never calls scontrol, and says why."""
    calls = []
    monkeypatch.setattr(preempt.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if restarts is None:  # the job's first run: SLURM sets no restart count
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    p = preempt.Preemption("USR2", max_requeues=3)
    try:
        with pytest.raises(SystemExit) as exited:
            p.exit(step=12, requeue=True, is_main=True)
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert exited.value.code == REQUEUE_EXIT
    out = capsys.readouterr()
    if requeued:
        assert calls == [["scontrol", "requeue", "4242"]] and "requeued" in out.out
    else:
        assert calls == [] and "requeue cap reached" in out.out
        assert f"already requeued {restarts} times (train.max_requeues=3)" in out.err
        assert "submit the same command again to resume" in out.err
