"""Tests for sweeps.compare on a fake Hydra multirun directory.

The fixtures below write the compare tool's input format (``.hydra/overrides.yaml``
and ``results.json`` per job directory) by hand.
"""

import csv
import json

import pytest
import yaml

from sweeps.compare import collect_runs, fixed_overrides, main, swept_axes, to_markdown

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
    assert header[:2] == ["connector", "encoder.image_size"]
    assert "experiment" not in header and "decoder" not in header
    assert header[2:] == ["caption/cider", "vqa/accuracy", "text/loss", "text/ppl", "train/loss", "step"]
    assert "fixed: decoder=tiny, experiment=demo" in md
    # Sorted by axes, image size numerically.
    assert [(r["connector"], r["encoder.image_size"]) for r in rows] == [
        ("avgpool", "32"), ("avgpool", "64"), ("mlp", "32"), ("mlp", "64")]
    for r in rows:
        cider, acc, loss = VARIANTS[(r["connector"], r["encoder.image_size"])]
        assert r["caption/cider"] == f"{cider:.4g}"
        assert r["vqa/accuracy"] == f"{acc:.4g}"
        assert r["text/loss"] == f"{loss:.4g}"
        assert r["step"] == "300"
    assert rows[0]["caption/cider"] == "0.4568"
    assert "trivial baselines: caption/cider 0.12, vqa/accuracy 0.21" in md
    assert "failed runs (2):" in md
    assert "- demo-cabs: RuntimeError: CUDA out of memory" in md
    assert "- 5: incomplete/failed (no results.json)" in md
    assert (sweep / "compare.md").read_text() in md


def test_csv_and_png(sweep, tmp_path):
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
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert (out / "compare.md").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # The report directory must not be mistaken for a run on a second pass.
    assert len(collect_runs(tmp_path)) == 6


def test_metrics_option(sweep, capsys):
    assert main([str(sweep), "--metrics", "vqa/accuracy,step", "--no-plot"]) == 0
    header, rows = parse_table(capsys.readouterr().out)
    assert header == ["connector", "encoder.image_size", "vqa/accuracy", "step"]
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
