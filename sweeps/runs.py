"""Runs of a sweep, read from disk (or from wandb, ``sweeps/wandb_io.py``).

A sweep directory is a Hydra multirun directory whose job directories each hold
``.hydra/overrides.yaml`` (written by Hydra) and, once the run finished, ``results.json``
(schema_version 1, written at the end of training). A single run directory, or a parent
holding run directories up to three levels down, is accepted too. Problems with a run
become its status (``failed``, ``incomplete``) and reason, never an exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MAX_DEPTH = 3


@dataclass
class Run:
    """One job directory of a sweep."""

    name: str
    """Run name from results.json, else the directory's path relative to the sweep."""
    path: Path
    """The run directory."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Hydra overrides as key -> value strings (``+``/``++`` prefixes dropped)."""
    results: dict | None = None
    """Parsed results.json, None when absent or unreadable."""
    status: str = "incomplete"
    """``complete``, ``failed`` or ``incomplete``."""
    error: str | None = None
    """Why the run is not complete."""

    @property
    def complete(self) -> bool:
        return self.status == "complete"


# --- Collecting runs ---

def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["connector=mlp", "+x.y=1", "~z"]`` -> ``{"connector": "mlp", "x.y": "1", "z": "<deleted>"}``."""
    out: dict[str, str] = {}
    for item in items:
        item = str(item)
        if item.startswith("~"):
            out[item[1:].split("=", 1)[0]] = "<deleted>"
            continue
        key, sep, value = item.lstrip("+").partition("=")
        # hydra.* settings (launcher, run dir) are plumbing, not ablation axes.
        if sep and not key.startswith("hydra."):
            out[key] = value
    return out


def _is_run_dir(d: Path) -> bool:
    # config.yaml alone or an empty directory: a job that started (or was created)
    # but never got far enough to write anything else -- reported as incomplete.
    markers = (".hydra", "results.json", "FAILED", "config.yaml")
    try:
        return any((d / m).exists() for m in markers) or not any(d.iterdir())
    except OSError:
        return False


def _find_run_dirs(d: Path, depth: int) -> list[Path]:
    if _is_run_dir(d):
        return [d]
    if depth >= MAX_DEPTH:
        return []
    try:
        children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # an unreadable directory is skipped, not fatal
        return []
    return [run for child in children for run in _find_run_dirs(child, depth + 1)]


def _read_overrides(run_dir: Path, results: dict | None) -> dict[str, str]:
    # Prefer Hydra's own record; results.json carries a copy for runs moved without .hydra.
    try:
        items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        items = []
    if not items and results:
        items = results.get("overrides") or []
    return parse_overrides(items if isinstance(items, list) else [])


def _progress(run_dir: Path) -> str:
    """How far an unfinished run got, from its metrics.jsonl (written every log step)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return f"; metrics.jsonl reaches step {json.loads(lines[-1])['step']}" if lines else ""
    except (OSError, ValueError, KeyError, IndexError):
        return ""


def load_run(run_dir: Path, name: str) -> Run:
    """Read one run directory; problems become the run's status, never an exception."""
    run = Run(name=name, path=run_dir, error="incomplete/failed (no results.json" + _progress(run_dir) + ")")
    if (run_dir / "results.json").is_file():
        try:
            run.results = json.loads((run_dir / "results.json").read_text())
            if not isinstance(run.results, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            run.results, run.status, run.error = None, "failed", f"unreadable results.json: {exc}"
    run.overrides = _read_overrides(run_dir, run.results)

    if run.results is not None:
        run.name = str(run.results.get("run_name") or name)
        status = run.results.get("status", "complete")
        if status == "failed":
            run.status, run.error = "failed", str(run.results.get("error") or "failed")
        elif status != "complete":
            run.error = f"results.json has status {status!r}"
        elif not isinstance(run.results.get("metrics"), dict):
            run.error = "results.json has no metrics"
        else:
            run.status, run.error = "complete", None
    if not run.complete and (run_dir / "FAILED").is_file():
        # The last non-empty line of a traceback is the exception itself.
        lines = (run_dir / "FAILED").read_text(errors="replace").strip().splitlines()
        run.status, run.error = "failed", (lines[-1].strip() if lines else "FAILED marker present")
    return run


def collect_runs(path: str | os.PathLike) -> list[Run]:
    """All runs under ``path`` (itself a run, a sweep, or a parent of sweeps)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    runs = []
    for d in _find_run_dirs(root, 0):
        rel = d.relative_to(root).as_posix()
        runs.append(load_run(d, d.name if rel == "." else rel))
    return runs
