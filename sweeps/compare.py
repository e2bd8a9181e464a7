"""``ablate-compare``: turn a finished sweep directory into a comparison table and plots.

A sweep directory is a Hydra multirun directory whose job directories each hold
``.hydra/overrides.yaml`` (written by Hydra) and, once the run finished, ``results.json``
(schema_version 1, written at the end of training). A single run directory, or a parent
holding run directories up to three levels down, is accepted too.

The variants are told apart by their *swept axes*: the override keys whose values differ
between the complete runs. Keys with one value everywhere are printed once above the
table as ``fixed: ...``. Rows are sorted by the axes, numbers compared as numbers.

Failed and unfinished runs never stop the report: they are listed with their reason at
the end, and the exit code is 1 only when not a single run completed. Output files
(``compare.md``, ``compare.csv``, ``compare.png``) are written atomically, so a reader
polling the sweep directory never sees half a file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ablate.files import atomic_write, write_text

# Preferred column order; `step` etc. live at the top level of results.json, not in
# `metrics`, and are looked up there (see `metric_value`).
DEFAULT_METRICS = ("caption/cider", "vqa/accuracy", "text/loss", "text/ppl", "train/loss")
TOP_LEVEL_KEYS = ("step", "tokens_seen", "wall_time_s")
MAX_DEPTH = 3
MISSING = "—"


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


def load_run(run_dir: Path, name: str) -> Run:
    """Read one run directory; problems become the run's status, never an exception."""
    run = Run(name=name, path=run_dir, error="incomplete/failed (no results.json)")
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


# --- Axes, values, formatting ---

def swept_axes(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs between runs (a missing key counts as a value)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def fixed_overrides(runs: Sequence[Run]) -> dict[str, str]:
    """Override keys with the same value in every run."""
    axes = set(swept_axes(runs))
    return {k: v for k, v in sorted(runs[0].overrides.items()) if k not in axes} if runs else {}


def _natural(value: str | None) -> tuple:
    # Numbers sort numerically (32 < 224), strings alphabetically, missing last.
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, value) if value is not None else (2, 0.0, "")


def sort_runs(runs: Sequence[Run], axes: Sequence[str]) -> list[Run]:
    return sorted(runs, key=lambda r: ([_natural(r.overrides.get(a)) for a in axes], r.name))


def metric_value(run: Run, key: str):
    """A metric from results['metrics'], or a top-level field such as ``step``."""
    metrics = (run.results or {}).get("metrics") or {}
    return metrics[key] if key in metrics else (run.results or {}).get(key)


def available_metrics(runs: Sequence[Run]) -> list[str]:
    """Every metric any complete run reports: known ones first, then the rest sorted."""
    present = {k for r in runs if r.complete for k in (r.results.get("metrics") or {})}
    known = [m for m in DEFAULT_METRICS if m in present]
    return known + sorted(present - set(known))


def default_columns(runs: Sequence[Run]) -> list[str]:
    present = set(available_metrics(runs))
    return [m for m in DEFAULT_METRICS if m in present] + ["step"]


def fmt(value) -> str:
    """4 significant digits; integers, and floats from 1000 up, without exponent."""
    if value is None:
        return MISSING
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def baselines_summary(runs: Sequence[Run]) -> dict[str, str]:
    """metric -> baseline value, or ``lo–hi`` when runs disagree."""
    values: dict[str, list[float]] = {}
    for r in runs:
        for k, v in ((r.results or {}).get("baselines") or {}).items():
            if isinstance(v, (int, float)):
                values.setdefault(k, []).append(v)
    return {
        k: fmt(vs[0]) if min(vs) == max(vs) else f"{fmt(min(vs))}–{fmt(max(vs))}"
        for k, vs in values.items()
    }


def baseline_value(runs: Sequence[Run], metric: str) -> float | None:
    """The baseline of ``metric`` from the first run that reports one."""
    for r in runs:
        v = ((r.results or {}).get("baselines") or {}).get(metric)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def variant_label(run: Run, axes: Sequence[str]) -> str:
    return ", ".join(str(run.overrides.get(a, MISSING)) for a in axes) if axes else run.name


# --- Outputs ---

def to_markdown(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> str:
    """The full report: fixed overrides, table of complete runs, baselines, failures."""
    done = [r for r in runs if r.complete]
    failed = [r for r in runs if not r.complete]
    metrics = list(metrics) if metrics else default_columns(done)
    axes = swept_axes(done)
    fixed = fixed_overrides(done)
    lines = ["fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()), ""] if fixed else []
    keys = axes or ["run"]  # without swept axes, the run name tells rows apart
    lines.append("| " + " | ".join(keys + metrics) + " |")
    lines.append("|" + "|".join(["---"] * len(keys) + ["---:"] * len(metrics)) + "|")
    for r in sort_runs(done, axes):
        cells = [r.overrides.get(a, MISSING) for a in axes] if axes else [r.name]
        cells += [fmt(metric_value(r, m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    base = ", ".join(f"{k} {v}" for k, v in sorted(baselines_summary(done).items()))
    lines += ["", f"trivial baselines: {base or 'none reported'}", ""]
    lines.append(f"failed runs ({len(failed)}):" if failed else "failed runs: none")
    lines += [f"- {r.name}: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def write_csv(runs: Sequence[Run], path: str | os.PathLike) -> None:
    """One row per run (failed ones too): status, every override key, every metric."""
    done = [r for r in runs if r.complete]
    axes = swept_axes(done)
    other_keys = sorted({k for r in runs for k in r.overrides} - set(axes))
    metrics = available_metrics(runs)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run", "path", "status", "error", *axes, *other_keys, *TOP_LEVEL_KEYS, *metrics])
    for r in sort_runs(done, axes) + [r for r in runs if not r.complete]:
        row = [r.name, str(r.path), r.status, r.error or ""]
        row += [r.overrides.get(k, "") for k in (*axes, *other_keys)]
        # Full precision in the CSV: it is for further analysis, not for reading.
        row += ["" if (v := metric_value(r, k)) is None else v for k in (*TOP_LEVEL_KEYS, *metrics)]
        writer.writerow(row)
    write_text(path, buf.getvalue())


def plot(runs: Sequence[Run], path: str | os.PathLike, metrics: Sequence[str] | None = None) -> None:
    """One bar chart per metric, a bar per complete variant, baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.complete]
    axes = swept_axes(done)
    ordered = sort_runs(done, axes)
    metrics = [m for m in (metrics or default_columns(done)) if m != "step"] or ["step"]
    labels = [variant_label(r, axes) for r in ordered]
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    width = max(4.0, 0.6 * len(ordered) + 1.5)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.6 * nrows), squeeze=False)
    for ax, metric in zip(grid.flat, metrics):
        heights = [v if isinstance(v := metric_value(r, metric), (int, float)) else math.nan
                   for r in ordered]
        ax.bar(range(len(ordered)), heights, color="tab:blue")
        baseline = baseline_value(done, metric)
        if baseline is not None:
            ax.axhline(baseline, color="tab:red", linestyle="--", linewidth=1, label="trivial baseline")
            ax.legend(fontsize="small")
        ax.set_title(metric)
        ax.set_xticks(range(len(ordered)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize="small")
    for ax in list(grid.flat)[len(metrics):]:
        ax.set_visible(False)
    if axes:
        fig.suptitle("variants: " + ", ".join(axes), fontsize="medium")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# --- CLI ---

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ablate-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="Hydra multirun directory, one run, or a parent of runs")
    parser.add_argument("--out", help="directory for compare.md/.csv/.png (default: sweep_dir)")
    parser.add_argument("--metrics", help="comma-separated columns, e.g. caption/cider,step")
    parser.add_argument("--no-plot", action="store_true", help="skip compare.png")
    args = parser.parse_args(argv)

    if not Path(args.sweep_dir).is_dir():
        print(f"ablate-compare: not a directory: {args.sweep_dir}", file=sys.stderr)
        return 1
    runs = collect_runs(args.sweep_dir)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if not any(r.complete for r in runs):
        print(f"ablate-compare: no complete runs under {args.sweep_dir} "
              f"({len(runs)} run director{'y' if len(runs) == 1 else 'ies'} found)", file=sys.stderr)
        for r in runs:
            print(f"- {r.name}: {r.error}", file=sys.stderr)
        return 1

    report = to_markdown(runs, metrics)
    print(report, end="")
    out = Path(args.out or args.sweep_dir)
    write_text(out / "compare.md", report)
    write_csv(runs, out / "compare.csv")
    if not args.no_plot:
        plot(runs, out / "compare.png", metrics)
    # stderr, so that stdout is the markdown report alone and can be piped.
    print(f"wrote {out / 'compare.md'}, compare.csv" + ("" if args.no_plot else ", compare.png"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
