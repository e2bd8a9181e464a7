"""Numerical faults, injected for real through the strategy's test hook
(``ABLATE_FAULT_STEPS``: the loss of those steps is multiplied by NaN): the steps are
skipped on every rank (no update, no scheduler step), counted, and training goes on;
more consecutive bad steps than ``train.max_bad_steps`` stop the run with its last good
checkpoint, which a relaunch resumes from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ablate.dist import free_port
from ablate.strategy import DeepSpeedStrategy
from ablate.tracking import read_metrics
from tests.conftest import run_cli, train_args
from tests.test_train import check, losses, only_run_dir

ARGS = ("eval.at_end=false", "logger=none", "train.deterministic=true")


def module_and_optimizer(ckpt_dir, step: int) -> tuple[dict, dict]:
    state = torch.load(ckpt_dir / DeepSpeedStrategy.tag(step) / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    return state["module"], state["optimizer"]["state"]


def test_nonfinite_steps_are_skipped_and_training_goes_on(corpus, tmp_path):
    runs = tmp_path / "runs"
    res = check(run_cli(train_args(corpus, runs, *ARGS, "train.max_steps=12", "train.ckpt_every=2",
                                   "train.keep_checkpoints=0"), env={"ABLATE_FAULT_STEPS": "3,4"}))
    assert "step 3: non-finite loss" in res.stderr and "step skipped on all ranks" in res.stderr
    run_dir = only_run_dir(runs)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["skipped_steps"] == 2
    records = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert [records[s]["train/skipped_steps"] for s in (2, 3, 4, 5, 12)] == [0, 1, 2, 2, 2]
    assert math.isnan(records[3]["train/loss"]) and math.isnan(records[4]["train/loss"])
    # No scheduler step on a skipped step: steps 3, 4 and 5 are offered the same lr.
    assert records[3]["train/lr"] == records[4]["train/lr"] == records[5]["train/lr"]
    # No update either: weights and AdamW moments after step 4 are those after step 2.
    (w2, o2), (w4, o4) = (module_and_optimizer(run_dir / "checkpoints", s) for s in (2, 4))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)
    assert all(torch.equal(o2[i][k], o4[i][k]) for i in o2 for k in o2[i] if torch.is_tensor(o2[i][k]))
    w6, _ = module_and_optimizer(run_dir / "checkpoints", 6)
    assert not all(torch.equal(w4[k], w6[k]) for k in w4)  # and then training resumes
    clean = [records[s]["train/loss"] for s in sorted(records) if s not in (3, 4)]
    assert all(math.isfinite(v) for v in clean) and clean[-1] < clean[0]


def test_too_many_bad_steps_stop_the_run_with_its_last_good_checkpoint(corpus, tmp_path):
    runs = tmp_path / "runs"
    args = (*ARGS, "train.max_steps=8", "train.ckpt_every=4", "train.max_bad_steps=3")
    res = run_cli(train_args(corpus, runs, *args), env={"ABLATE_FAULT_STEPS": "5,6,7,8"})
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "3 consecutive steps (to step 7) had a non-finite loss or gradient norm" in res.stderr
    assert "The last good checkpoint is step-00000004" in res.stderr
    run_dir = only_run_dir(runs)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "train.max_bad_steps=3" in results["error"]
    assert results["skipped_steps"] == 3 and results["step"] == 7
    assert DeepSpeedStrategy.complete_tags(run_dir / "checkpoints") == [(4, "step-00000004")]
    # With the fault gone, a relaunch resumes from that checkpoint and finishes.
    res = check(run_cli(train_args(corpus, runs, *args)))
    assert "resumed from step 4" in res.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in losses(run_dir).values())


@pytest.mark.parametrize("stage", ["zero0", "zero1"])
def test_fault_on_one_rank_is_skipped_by_both(corpus, tmp_path, stage):
    """Rank 1's loss is NaN at step 2; rank 0's is fine. Both skip (zero0: our flag's
    all-reduce; zero1: DeepSpeed's overflow check), neither hangs, the run finishes."""
    runs = tmp_path / "runs"
    res = check(run_cli(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         *train_args(corpus, runs, *ARGS, f"deepspeed={stage}", "train.max_steps=4", "train.ckpt_every=0")],
        env={"ABLATE_FAULT_STEPS": "2", "ABLATE_FAULT_RANKS": "1"}, timeout=300))
    assert "ranks 2" in res.stdout
    run_dir = only_run_dir(runs)
    assert json.loads((run_dir / "results.json").read_text())["skipped_steps"] == 1
    records = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert [records[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert records[2]["train/lr"] == records[3]["train/lr"]  # the schedule waited on both ranks
    assert math.isfinite(records[4]["train/loss"])
