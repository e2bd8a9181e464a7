"""Pre-flight of sweeps (hydra/sweeper=ablate, hydra_plugins/ablate_sweeper.py, the default
of ablate-train's multiruns) with Hydra's basic launcher: one bad point stops the whole
sweep before any job starts, with every problem listed next to the point's overrides; a
good sweep runs as usual. No test names the sweeper: these show it is the default."""

from __future__ import annotations

from tests.conftest import run_cli, train_args

FAST = ("train.max_steps=3", "eval.at_end=false", "logger=none")


def test_bad_points_stop_the_sweep_and_every_problem_is_listed(corpus, tmp_path):
    runs = tmp_path / "runs"
    res = run_cli(train_args(
        corpus, runs, *FAST, "encoder.image_size=32,30",
        # ffn=moe with 8 experts cannot be split over 3 expert-parallel ranks
        "ffn=dense,moe", "deepspeed.expert_parallel=1,3",
        # log_every stays out of the run directory's name: two points, one directory
        "train.log_every=1,2", multirun=True))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    err = res.stderr
    assert "nothing was launched" in err
    assert "[experiment=smoke" in err and "encoder.image_size=30 is not divisible by patch_size=8" in err
    assert "deepspeed.expert_parallel=3" in err
    assert "share the run directory" in err and "train.log_every=1" in err
    # 16 points; the 8 with image_size=30 are each listed
    assert err.count("encoder.image_size=30 is not divisible") == 8
    assert not runs.exists() or not any(runs.rglob("*.json")), list(runs.rglob("*"))
    assert "Launching" not in res.stdout + err


def test_good_sweep_passes_preflight_and_runs(corpus, tmp_path):
    runs = tmp_path / "runs"
    res = run_cli(train_args(corpus, runs, *FAST, "connector=mlp,avgpool", multirun=True))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert len(list(runs.rglob("results.json"))) == 2
