"""Preemption without SLURM: SIGUSR2 to a training process saves a complete checkpoint at
a step boundary and exits with the requeue status; a relaunch finishes with the losses
of an uninterrupted run. (The SLURM requeue itself: tests/test_slurm.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
