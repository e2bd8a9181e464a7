"""Tests for ablate-compare (sweeps/compare.py, stats.py, plots.py, wandb_io.py) on fake
sweep directories.

The fixtures below write the compare tool's input format (``.hydra/overrides.yaml``
and ``results.json`` per job directory) by hand.
"""

import csv
import json
import math
import sys
import types

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from scipy import stats

from sweeps.compare import collect_runs, fixed_overrides, main, swept_axes, to_markdown
from sweeps.wandb_io import api_runs, offline_runs

FIXED = ["experiment=demo", "decoder=tiny"]
# (connector, image_size) -> (cider, vqa accuracy, text loss)
VARIANTS = {
    ("mlp", "64"): (0.8123, 0.55, 2.1),
    ("avgpool", "64"): (0.6012, 0.4321, 2.25),
    ("mlp", "32"): (0.5, 0.3, 2.4),
    ("avgpool", "32"): (0.45678, 0.25, 2.5),
}


def make_run(d, overrides, results=None, failed=None):
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    if failed is not None:
        (d / "FAILED").write_text(failed)


def results(name, overrides, cider, acc, loss, baselines=None):
    return {
        "schema_version": 1, "run_name": name, "status": "complete", "step": 300,
        "tokens_seen": 123456,
        "metrics": {"text/loss": loss, "text/ppl": 2.718281828 ** loss,
                    "caption/cider": cider, "vqa/accuracy": acc, "train/loss": loss - 0.2},
        "baselines": baselines or {"caption/cider": 0.12, "vqa/accuracy": 0.21},
        "counts": {"caption": 300, "vqa": 500, "text": 200},
        "overrides": overrides, "wall_time_s": 123.4,
    }


def build_sweep(root):
    """4 complete runs (connector x image size), one failed run, one empty job dir."""
    for i, ((conn, size), (cider, acc, loss)) in enumerate(VARIANTS.items()):
        ov = [f"connector={conn}", f"encoder.image_size={size}", *FIXED]
        make_run(root / str(i), ov, results(f"demo-{conn}-{size}", ov, cider, acc, loss))
    # A run that crashed with an error recorded in results.json ...
    ov = ["connector=cabstractor", "encoder.image_size=64", *FIXED]
    make_run(root / "4", ov, {"schema_version": 1, "run_name": "demo-cabs", "status": "failed",
                              "error": "RuntimeError: CUDA out of memory", "overrides": ov})
    # ... and a job directory that never got as far as writing anything.
    (root / "5").mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


# Seeded sweep: connector x seed. CIDEr differs far beyond the seed spread, VQA does not.
SEEDED = {
    "mlp": {"cider": [0.50, 0.52, 0.51], "vqa": [0.30, 0.35, 0.25]},
    "avgpool": {"cider": [0.60, 0.61, 0.63], "vqa": [0.31, 0.26, 0.36]},
}


def build_seeded(root, sizes=("64",)):
    i = 0
    for size in sizes:
        shift = 0.1 if size == "32" else 0.0
        for conn, vals in SEEDED.items():
            for seed in range(3):
                ov = [f"connector={conn}", f"seed={seed}", *FIXED] + (
                    [f"encoder.image_size={size}"] if len(sizes) > 1 else [])
                make_run(root / str(i), ov, results(f"{conn}-{size}-s{seed}", ov, vals["cider"][seed] - shift,
                                                    vals["vqa"][seed], 2.0))
                i += 1
    return root


@pytest.fixture
def sweep(tmp_path):
    return build_sweep(tmp_path / "multirun")


def parse_table(md):
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    header, body = split[0], split[2:]
    return header, [dict(zip(header, r)) for r in body]


def test_collect_runs_statuses(sweep):
    runs = collect_runs(sweep)
    assert len(runs) == 6
    by_status = {}
    for r in runs:
        by_status.setdefault(r.status, []).append(r)
    assert len(by_status["complete"]) == 4
    (failed,) = by_status["failed"]
    assert failed.name == "demo-cabs" and "out of memory" in failed.error
    (empty,) = by_status["incomplete"]
    assert empty.name == "5" and "no results.json" in empty.error
    done = [r for r in runs if r.complete]
    assert swept_axes(done) == ["connector", "encoder.image_size"]
    assert fixed_overrides(done) == {"decoder": "tiny", "experiment": "demo"}


def test_markdown_table(sweep, capsys):
    assert main([str(sweep), "--no-plot"]) == 0
    md = capsys.readouterr().out
    header, rows = parse_table(md)
    assert header == ["connector", "encoder.image_size", "n", "caption/cider", "vqa/accuracy",
                      "text/loss", "text/ppl", "train/loss", "step"]
    assert "fixed: decoder=tiny, experiment=demo" in md
    # Sorted by axes, image size numerically.
    assert [(r["connector"], r["encoder.image_size"]) for r in rows] == [
        ("avgpool", "32"), ("avgpool", "64"), ("mlp", "32"), ("mlp", "64")]
    for r in rows:  # one seed each: the plain value, no spread, nothing testable
        cider, acc, loss = VARIANTS[(r["connector"], r["encoder.image_size"])]
        assert r["n"] == "1"
        assert r["caption/cider"] == f"{cider:.4g}"
        assert r["vqa/accuracy"] == f"{acc:.4g}"
        assert r["text/loss"] == f"{loss:.4g}"
        assert r["step"] == "300"
    assert rows[0]["caption/cider"] == "0.4568"
    assert "baseline: connector=avgpool, encoder.image_size=32" in md  # the first point
    assert "not testable (a point needs >= 2 seeds on both sides)" in md
    assert "trivial baselines: caption/cider 0.12, vqa/accuracy 0.21" in md
    assert "failed runs (2):" in md
    assert "- demo-cabs: RuntimeError: CUDA out of memory" in md
    assert "- 5: incomplete/failed (no results.json)" in md
    assert (sweep / "compare.md").read_text() in md


def test_csv_and_pngs(sweep, tmp_path):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert sorted(r["status"] for r in rows) == ["complete"] * 4 + ["failed", "incomplete"]
    mlp64 = next(r for r in rows if r["run"] == "demo-mlp-64")
    assert float(mlp64["caption/cider"]) == 0.8123
    assert float(mlp64["vqa/accuracy"]) == 0.55
    assert mlp64["connector"] == "mlp" and mlp64["experiment"] == "demo"
    # One PNG for all points, one per swept axis.
    for name in ("compare.png", "compare_connector.png", "compare_encoder.image_size.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000, name
    assert (out / "compare.md").is_file() and (out / "compare_groups.csv").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # The report directory must not be mistaken for a run on a second pass.
    assert len(collect_runs(tmp_path)) == 6


def test_metrics_option(sweep, capsys):
    assert main([str(sweep), "--metrics", "vqa/accuracy,step", "--no-plot"]) == 0
    header, rows = parse_table(capsys.readouterr().out)
    assert header == ["connector", "encoder.image_size", "n", "vqa/accuracy", "step"]
    assert len(rows) == 4


def test_no_complete_runs_exits_1(tmp_path, capsys):
    root = tmp_path / "sweep"
    make_run(root / "0", ["connector=mlp"], failed="Traceback ...\nKilled\n")
    (root / "1").mkdir()
    assert main([str(root)]) == 1
    err = capsys.readouterr().err
    assert "no complete runs" in err and "- 0: Killed" in err
    assert not (root / "compare.md").exists()
    assert main([str(tmp_path / "missing")]) == 1


def test_single_run_dir_and_nested(tmp_path, capsys):
    ov = ["connector=mlp", "encoder.image_size=64"]
    run_dir = tmp_path / "a" / "2024-01-01" / "0"
    make_run(run_dir, ov, results("solo", ov, 0.7, 0.5, 2.0))
    runs = collect_runs(run_dir)
    assert [r.name for r in runs] == ["solo"] and runs[0].complete
    assert [r.name for r in collect_runs(tmp_path)] == ["solo"]  # found at depth 3
    assert main([str(run_dir), "--no-plot"]) == 0
    header, rows = parse_table(capsys.readouterr().out)
    assert header[0] == "run" and rows[0]["run"] == "solo"


def test_baselines_range_when_runs_disagree(tmp_path):
    runs_dir = tmp_path / "sweep"
    for i, b in enumerate([0.2, 0.25]):
        ov = [f"connector=c{i}"]
        make_run(runs_dir / str(i), ov, results(f"r{i}", ov, 0.5, 0.5, 2.0,
                                                baselines={"vqa/accuracy": b}))
    md = to_markdown(collect_runs(runs_dir))
    assert "trivial baselines: vqa/accuracy 0.2–0.25" in md


# --- Seeds, averaging, noise ---

def test_seeds_are_averaged_and_noise_is_tested(tmp_path, capsys):
    root = build_seeded(tmp_path / "sweep")
    assert main([str(root), "--baseline", "connector=mlp", "--no-plot"]) == 0
    md = capsys.readouterr().out
    header, rows = parse_table(md)
    assert header[:2] == ["connector", "n"]  # seed is not an axis
    assert "seeds: 0, 1, 2" in md and "baseline: connector=mlp" in md
    by = {r["connector"]: r for r in rows}
    for conn, vals in SEEDED.items():
        c = np.array(vals["cider"])
        assert by[conn]["n"] == "3"
        assert by[conn]["caption/cider"].startswith(f"{c.mean():.4g} ± {c.std(ddof=1):.4g}")
    # CIDEr: avgpool beats mlp far beyond the seed spread; VQA: within it.
    assert by["avgpool"]["caption/cider"].endswith(" *")
    assert not by["avgpool"]["vqa/accuracy"].endswith("*")
    assert not by["mlp"]["caption/cider"].endswith("*")  # the baseline itself
    p = stats.ttest_ind(SEEDED["avgpool"]["cider"], SEEDED["mlp"]["cider"], equal_var=False).pvalue
    assert p < 0.05
    assert (f"- connector=avgpool vs connector=mlp: caption/cider 0.6133 vs 0.51 (+0.1033, "
            f"p = {p:.2g})") in md
    p_vqa = stats.ttest_ind(SEEDED["avgpool"]["vqa"], SEEDED["mlp"]["vqa"], equal_var=False).pvalue
    diffs = md.split("differences beyond")[1].split("trivial baselines")[0]
    assert p_vqa > 0.05 and "vqa/accuracy" not in diffs
    # The groups CSV carries the same numbers at full precision.
    with open(root / "compare_groups.csv", newline="") as f:
        groups = {r["connector"]: r for r in csv.DictReader(f)}
    avg = groups["avgpool"]
    assert math.isclose(float(avg["caption/cider:mean"]), np.mean(SEEDED["avgpool"]["cider"]))
    assert math.isclose(float(avg["caption/cider:std"]), np.std(SEEDED["avgpool"]["cider"], ddof=1))
    assert math.isclose(float(avg["caption/cider:p_welch"]), p)
    assert avg["caption/cider:beyond_noise"] == "True" and avg["vqa/accuracy:beyond_noise"] == "False"
    assert groups["mlp"]["is_baseline"] == "True" and groups["mlp"]["caption/cider:diff_vs_baseline"] == ""


def test_baseline_holds_the_other_axes(tmp_path, capsys):
    """With two axes, --baseline connector=mlp compares each point with mlp at its own size."""
    root = build_seeded(tmp_path / "sweep", sizes=("32", "64"))
    assert main([str(root), "--baseline", "connector=mlp", "--no-plot", "--metrics", "caption/cider"]) == 0
    md = capsys.readouterr().out
    diffs = md.split("differences beyond seed noise")[1].split("trivial")[0]
    assert "- connector=avgpool, encoder.image_size=32 vs connector=mlp, encoder.image_size=32" in diffs
    assert "- connector=avgpool, encoder.image_size=64 vs connector=mlp, encoder.image_size=64" in diffs
    assert diffs.count("\n- ") == 2
    # Default baseline: the first point (avgpool, 32) for everyone.
    assert main([str(root), "--no-plot", "--metrics", "caption/cider"]) == 0
    md = capsys.readouterr().out
    assert "baseline: connector=avgpool, encoder.image_size=32" in md
    assert "vs connector=avgpool, encoder.image_size=32" in md


def test_bad_baseline_is_named(tmp_path, capsys):
    root = build_seeded(tmp_path / "sweep")
    assert main([str(root), "--baseline", "connector=linear", "--no-plot"]) == 2
    assert "no run has connector=linear" in capsys.readouterr().err
    assert main([str(root), "--baseline", "seed=0", "--no-plot"]) == 2
    assert "'seed' is not a swept axis" in capsys.readouterr().err


# --- wandb ---

def add_offline_wandb(run_dir, run_id):
    d = run_dir / "wandb" / f"offline-run-20260101_000000-{run_id}"
    d.mkdir(parents=True)
    (d / f"run-{run_id}.wandb").write_bytes(b":W&B\x00\x00")


def test_wandb_offline_dir_reads_the_run_dirs(sweep, tmp_path, capsys):
    for i in range(4):
        add_offline_wandb(sweep / str(i), f"r{i}")
    add_offline_wandb(sweep / "0", "r0-resumed")  # a resumed run: two offline dirs, one run
    orphan = tmp_path / "copied" / "offline-run-20260101_000000-lost"
    orphan.mkdir(parents=True)
    (orphan / "run-lost.wandb").write_bytes(b":W&B")
    runs = offline_runs(tmp_path)
    assert sorted(r.name for r in runs if r.complete) == sorted(f"demo-{c}-{s}" for c, s in VARIANTS)
    (lost,) = [r for r in runs if not r.complete]
    assert "no reader for .wandb files" in lost.error and "wandb sync" in lost.error
    (sweep / "5" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 25, "train/loss": 3.0}\n')
    add_offline_wandb(sweep / "5", "r5")  # still running: no results.json yet
    assert main(["--wandb", str(sweep), "--out", str(tmp_path / "out"), "--no-plot"]) == 0
    out, err = capsys.readouterr()
    _, rows = parse_table(out)
    assert len(rows) == 4 and "no reader for offline .wandb files" in err
    assert "- 5: incomplete/failed (no results.json; metrics.jsonl reaches step 25)" in out


def test_wandb_report_offline_says_what_it_would_create(sweep, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(sweep), "--no-plot", "--wandb-report", "--project", "ablate"]) == 0
    err = capsys.readouterr().err
    assert "would create wandb workspace 'ablate sweep multirun' in <default entity>/ablate" in err
    assert "Metric('Group') == 'multirun'" in err
    assert "grouped by config: override.connector, override.encoder.image_size" in err
    assert "section 'caption/cider'" in err and "nothing created" in err


class FakeApiRun:
    def __init__(self, i, conn, state, cider):
        self.id, self.name, self.state = f"id{i}", f"demo/{conn}-{i}", state
        self.config = {"override.connector": conn, "override.seed": str(i), "optim.lr": 1e-3}
        self.tags = [f"connector={conn}"]
        self.summary_metrics = {"caption/cider": cider, "_step": 300, "_runtime": 5.0}


def test_wandb_api_runs_convert(capsys):
    calls = []

    class FakeApi:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return [FakeApiRun(0, "mlp", "finished", 0.5), FakeApiRun(1, "mlp", "finished", 0.52),
                    FakeApiRun(2, "avgpool", "crashed", None)]

    runs = api_runs("team/ablate/demo", api=FakeApi())
    assert calls == [("team/ablate", {"group": "demo"})]
    done = [r for r in runs if r.complete]
    assert [r.overrides for r in done] == [{"connector": "mlp", "seed": "0"}, {"connector": "mlp", "seed": "1"}]
    assert done[0].results["metrics"] == {"caption/cider": 0.5} and done[0].results["step"] == 300
    assert runs[2].status == "failed" and "crashed" in runs[2].error
    with pytest.raises(ValueError, match="ENTITY/PROJECT"):
        api_runs("just-a-name", api=FakeApi())


def test_tracker_puts_overrides_into_wandb_config(tmp_path, monkeypatch):
    """Runs carry group = sweep, tags = overrides and config keys override.<axis>."""
    from ablate.tracking import Tracker, override_config

    seen = {}
    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = OmegaConf.create({"name": "demo", "a": {"b": 1},
                            "logger": {"backend": "wandb", "project": "p", "entity": None, "group": None,
                                       "tags": [], "mode": "offline"}})
    ov = ["connector=mlp", "+encoder.image_size=64", "seed=1", "hydra.launcher=x"]
    Tracker(cfg, tmp_path, ov, "demo", enabled=True).finish()
    assert seen["group"] == "demo" and seen["tags"] == ov
    assert seen["config"]["a.b"] == 1
    assert {k: v for k, v in seen["config"].items() if k.startswith("override.")} == {
        "override.connector": "mlp", "override.encoder.image_size": "64", "override.seed": "1"}
    assert override_config(ov) == {k: v for k, v in seen["config"].items() if k.startswith("override.")}


def test_workspace_builds_from_the_plan():
    pytest.importorskip("wandb_workspaces")  # the optional [wandb-report] extra
    from sweeps.wandb_io import build_workspace, report_plan

    plan = report_plan("demo", ["connector"], ["caption/cider"], "me", "ablate")
    ws = build_workspace(plan, save=False)
    assert ws.name == "ablate sweep demo" and [s.name for s in ws.sections] == ["caption/cider", "training"]
    assert [g.name for g in ws.runset_settings.groupby] == ["override.connector"]


def test_shot_columns_side_by_side(tmp_path):
    """Few-shot scores get a column per shot count, each task's columns together,
    benchmarks and MM1 averages after the synthetic tasks, losses last."""
    extra = {"caption/cider_4shot": 0.9, "caption/cider_8shot": 1.0, "vqa/accuracy_8shot": 0.6,
             "vqa/accuracy_4shot": 0.5, "vqa/accuracy_count_4shot": 0.1, "coco/cider": 0.3,
             "coco/cider_4shot": 0.35, "avg/caption": 0.4, "avg/caption_4shot": 0.45}
    for i, conn in enumerate(["mlp", "avgpool"]):
        ov = [f"connector={conn}", *FIXED]
        r = results(f"r{i}", ov, 0.5 + i, 0.4, 2.0)
        r["metrics"].update({k: v + i for k, v in extra.items()})
        make_run(tmp_path / str(i), ov, r)
    header = next(line for line in to_markdown(collect_runs(tmp_path)).splitlines() if line.startswith("| connector"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[2:] == ["caption/cider", "caption/cider_4shot", "caption/cider_8shot", "vqa/accuracy",
                        "vqa/accuracy_4shot", "vqa/accuracy_8shot", "coco/cider", "coco/cider_4shot",
                        "avg/caption", "avg/caption_4shot", "text/loss", "text/ppl", "train/loss", "step"]
