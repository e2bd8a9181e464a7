"""The real training path, end to end, on the tiny corpus: ablate-train as a subprocess
(Hydra + DeepSpeed on CPU + webdataset + wandb offline), in one and two processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ablate.dist import free_port
from ablate.strategy import DeepSpeedStrategy
from ablate.tracking import read_metrics
from tests.conftest import run_cli, train_args


def only_run_dir(runs: Path) -> Path:
    dirs = [p.parent for p in runs.rglob("metrics.jsonl")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def check(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One single-process run long enough for the loss to fall, with evaluation."""
    runs = tmp_path_factory.mktemp("runs")
    res = check(run_cli(train_args(corpus, runs, "train.max_steps=40", "train.ckpt_every=20",
                                   "train.log_every=5", "data.num_workers=1")))
    return only_run_dir(runs), res


def test_loss_goes_down(trained):
    run_dir, _ = trained
    records = [r for r in read_metrics(run_dir) if "train/loss_avg" in r]
    first, last = records[0]["train/loss_avg"], records[-1]["train/loss_avg"]
    assert last < 0.7 * first, (first, last)
    for r in records:  # every logged quantity is a real number
        for k in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/data_wait_ms"):
            assert r[k] == r[k] and r[k] >= 0, (k, r)


def test_results_and_tracking_written(trained):
    run_dir, res = trained
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["step"] == 40
    for key in ("text/loss", "text/ppl", "caption/cider", "vqa/accuracy", "train/loss"):
        assert key in results["metrics"]
    assert {"caption/cider", "vqa/accuracy"} <= set(results["baselines"])
    assert results["counts"]["vqa"] == 8
    # lr follows warmup then cosine down to 10% of the peak.
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(run_dir) if "train/lr" in r}
    assert lrs[40] == pytest.approx(3e-3 * 0.1, rel=0.05)
    assert max(lrs.values()) <= 3e-3 + 1e-12
    # wandb offline run files; the same run id on every relaunch.
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert (run_dir / "config.yaml").exists()
    steps = [s for s, _ in DeepSpeedStrategy.complete_tags(run_dir / "checkpoints")]
    assert steps == [20, 40]


def test_finished_run_is_skipped_on_relaunch(trained, corpus):
    run_dir, _ = trained
    runs = run_dir.parents[1]
    before = (run_dir / "results.json").read_text()
    res = check(run_cli(train_args(corpus, runs, "train.max_steps=40", "train.ckpt_every=20",
                                   "train.log_every=5", "data.num_workers=1")))
    assert "already finished" in res.stdout
    assert (run_dir / "results.json").read_text() == before


def test_ablate_eval_reproduces_end_of_training_eval(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "eval.json"
    check(run_cli(["-m", "ablate.eval.cli", str(run_dir), "--out", str(out)]))
    got = json.loads(out.read_text())["metrics"]
    want = json.loads((run_dir / "results.json").read_text())["metrics"]
    for key in ("text/loss", "caption/cider", "vqa/accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_resume_reproduces_uninterrupted_losses(corpus, tmp_path):
    args = ("train.max_steps=8", "train.ckpt_every=4", "data.num_workers=2", "eval.at_end=false")
    runs = tmp_path / "runs"
    check(run_cli(train_args(corpus, runs, *args)))
    run_dir = only_run_dir(runs)
    straight = losses(run_dir)
    assert sorted(straight) == list(range(1, 9))
    # Roll back to the step-4 checkpoint, as if the job had died after it, and relaunch.
    shutil.rmtree(run_dir / "checkpoints" / DeepSpeedStrategy.tag(8))
    (run_dir / "results.json").unlink()
    res = check(run_cli(train_args(corpus, runs, *args)))
    assert "resumed from step 4" in res.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, 9))  # history trimmed and continued, no duplicates
    for step in range(5, 9):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


def test_two_process_gloo_run_trains(corpus, tmp_path):
    runs = tmp_path / "runs"
    res = check(run_cli(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         *train_args(corpus, runs, "deepspeed=zero1", "train.max_steps=12", "eval.at_end=false")],
        timeout=600))
    assert "ranks 2  grad accumulation 1" in res.stdout
    run_dir = only_run_dir(runs)
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, 13))
    assert steps[12] < steps[1]
    # ZeRO-1 shards the optimizer: one optimizer-state file per rank in the checkpoint.
    ckpt = run_dir / "checkpoints" / DeepSpeedStrategy.tag(12)
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2


def test_sweep_records_failed_variant_and_compares(corpus, tmp_path):
    # A variant that passes the sweep's pre-flight (the file exists, a known suffix) and
    # fails only when its job loads the corrupt weights.
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    runs = tmp_path / "runs"
    res = run_cli(train_args(corpus, runs, f"encoder.pretrained=null,{corrupt}", "train.max_steps=4",
                             "eval.max_caption=4", "eval.max_vqa=4", "logger=none", multirun=True))
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = runs / "smoke"
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.rglob("results.json"))
    assert statuses == ["complete", "failed"]
    cmp = run_cli(["-m", "sweeps.compare", str(sweep), "--no-plot"])
    assert cmp.returncode == 0, cmp.stderr
    assert "encoder.pretrained" in cmp.stdout and "failed runs (1)" in cmp.stdout
    assert "UnpicklingError" in cmp.stdout  # the failure's reason is shown


@pytest.mark.parametrize("stage,precision", [("zero0", "bf16"), ("zero2", "bf16"), ("zero3", "fp32")])
def test_stage_and_precision_train(corpus, tmp_path, stage, precision):
    runs = tmp_path / "runs"
    check(run_cli(train_args(corpus, runs, f"deepspeed={stage}", f"deepspeed.precision={precision}",
                             "train.max_steps=6", "eval.max_caption=4", "eval.max_vqa=4",
                             "logger=none")))
    run_dir = only_run_dir(runs)
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, 7)) and steps[6] < steps[1]
    results = json.loads((run_dir / "results.json").read_text())
    assert all(v == v for v in results["metrics"].values())  # no NaN anywhere
    norms = [r["train/grad_norm"] for r in read_metrics(run_dir) if "train/grad_norm" in r]
    assert all(0 < n < float("inf") for n in norms)


def test_zero3_checkpoint_evaluates_like_training(corpus, tmp_path):
    """ZeRO-3 shards the weights; ablate-eval consolidates them and gets the same numbers."""
    runs = tmp_path / "runs"
    check(run_cli(train_args(corpus, runs, "deepspeed=zero3", "train.max_steps=4",
                             "eval.max_caption=4", "eval.max_vqa=4", "logger=none")))
    run_dir = only_run_dir(runs)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["params"]["total"] > 100_000  # counted before ZeRO-3 partitions them
    out = tmp_path / "eval.json"
    check(run_cli(["-m", "ablate.eval.cli", str(run_dir), "--out", str(out)]))
    got = json.loads(out.read_text())["metrics"]
    for key in ("text/loss", "caption/cider", "vqa/accuracy"):
        assert got[key] == pytest.approx(results["metrics"][key], rel=1e-5, abs=1e-6), key
