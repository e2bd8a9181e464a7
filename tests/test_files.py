"""Atomic writes: a reader sees the old content or the new, never a partial one, and a
writer that fails leaves the old content in place."""

from __future__ import annotations

import pytest

from ablate.files import atomic_dir, write_json


def test_failed_file_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # not serialisable: fails after the temp file exists
    assert path.read_text().strip().endswith("}") and '"v": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_atomic_dir_replaces_whole_and_survives_a_failed_writer(tmp_path):
    out = tmp_path / "export"

    def write(version):
        def run(tmp):
            (tmp / "a.txt").write_text(version)
            if version == "bad":
                raise RuntimeError("killed mid-write")
            (tmp / "b.txt").write_text(version)
        return run

    atomic_dir(out, write("v1"))
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(RuntimeError):
        atomic_dir(out, write("bad"))
    assert (out / "a.txt").read_text() == "v1" and (out / "b.txt").read_text() == "v1"
    atomic_dir(out, write("v2"))
    assert (out / "a.txt").read_text() == "v2"
    with pytest.raises(FileExistsError):
        atomic_dir(out, write("v3"), replace=False)
    assert (out / "a.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or old dirs left


def test_metrics_reader_and_resume_trim_survive_a_cut_line(tmp_path):
    """A process killed mid-write leaves half a line in metrics.jsonl: readers skip it and
    a resumed run's trim drops it, keeping one consistent history."""
    from omegaconf import OmegaConf

    from ablate.tracking import Tracker, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "tra')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    cfg = OmegaConf.create({"logger": {"backend": "none"}})
    Tracker(cfg, tmp_path, [], "g", enabled=True, resume_step=1)
    assert path.read_text() == '{"step": 1, "train/loss": 2.0}\n'
