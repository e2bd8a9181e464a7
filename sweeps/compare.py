"""``ablate-compare``: turn a finished sweep into tables and plots, seeds averaged.

Runs come from a sweep directory (``sweeps/runs.py``: Hydra job directories with
``.hydra/overrides.yaml`` and ``results.json``) and/or wandb (``--wandb``, see
``sweeps/wandb_io.py``). The variants are told apart by their *swept axes*: the override
keys whose values differ between the complete runs, ``seed`` excepted; keys with one
value everywhere are printed once as ``fixed: ...``. The runs of one point of the axes
are its seeds: each metric is reported as mean ± sample std with the number of seeds
(``sweeps/stats.py``), and a point whose difference from its baseline (``--baseline
connector=mlp``; default the first point) passes Welch's t-test at p < ``--alpha``
(0.05) on the per-seed values is marked ``*`` and listed with its p-value.

Outputs, written atomically: ``compare.md`` (also printed), ``compare.csv`` (one row
per run, failed ones too), ``compare_groups.csv`` (one row per point: n, mean, std,
difference from the baseline and p per metric), ``compare.png`` (all points) and one
``compare_<axis>.png`` per swept axis. Failed and unfinished runs never stop the report:
they are listed with their reason, and the exit code is 1 only when no run completed.
``--wandb-report`` then plans a wandb workspace for the sweep, and saves it when online.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ablate.files import write_text
from sweeps.runs import Run, collect_runs
from sweeps.stats import (MISSING, SEED_KEYS, Group, ablation_axes, compare, group_runs, metric_value,
                          natural, parse_baseline, reference, swept_axes)

# Preferred column order; `step` etc. live at the top level of results.json, not in
# `metrics`, and are looked up there (see `metric_value`). Evaluation scores come first,
# each task with its 0/4/8-shot columns side by side (`caption/cider`,
# `caption/cider_4shot`, ...; ablate/eval/evaluate.py), then benchmarks and averages.
DEFAULT_METRICS = ("caption/cider", "vqa/accuracy", "text/loss", "text/ppl", "train/loss")
TOP_LEVEL_KEYS = ("step", "tokens_seen", "wall_time_s")
# A task's headline score at some shot count (per-question-type breakdowns are not).
HEADLINE = re.compile(r"^(?P<task>[^/]+)/(?P<metric>cider|accuracy|caption|vqa)(?:_(?P<k>\d+)shot)?$")


def _headline_order(key: str) -> tuple:
    m = HEADLINE.match(key)
    task = m["task"]
    rank = {"caption": 0, "vqa": 1}.get(task, 3 if task == "avg" else 2)
    return rank, task, m["metric"], int(m["k"] or 0)


def fixed_overrides(runs: Sequence[Run]) -> dict[str, str]:
    """Override keys with the same value in every run."""
    axes = set(swept_axes(runs))
    return {k: v for k, v in sorted(runs[0].overrides.items()) if k not in axes} if runs else {}


def available_metrics(runs: Sequence[Run]) -> list[str]:
    """Every metric any complete run reports: known ones first, then the rest sorted."""
    present = {k for r in runs if r.complete for k in (r.results.get("metrics") or {})}
    known = [m for m in DEFAULT_METRICS if m in present]
    return known + sorted(present - set(known))


def default_columns(runs: Sequence[Run]) -> list[str]:
    """Every task's headline score at every shot count, then the losses, then ``step``."""
    present = set(available_metrics(runs))
    scores = sorted((m for m in present if HEADLINE.match(m)), key=_headline_order)
    return scores + [m for m in DEFAULT_METRICS if m in present and m not in scores] + ["step"]


def fmt(value) -> str:
    """4 significant digits; integers, and floats from 1000 up, without exponent."""
    if value is None:
        return MISSING
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def trivial_baselines(runs: Sequence[Run]) -> dict[str, list[float]]:
    """metric -> the trivial-predictor values the runs report (results['baselines'])."""
    values: dict[str, list[float]] = {}
    for r in runs:
        for k, v in ((r.results or {}).get("baselines") or {}).items():
            if isinstance(v, (int, float)):
                values.setdefault(k, []).append(float(v))
    return values


def baselines_summary(runs: Sequence[Run]) -> dict[str, str]:
    """metric -> trivial baseline value, or ``lo–hi`` when runs disagree."""
    return {k: fmt(vs[0]) if min(vs) == max(vs) else f"{fmt(min(vs))}–{fmt(max(vs))}"
            for k, vs in trivial_baselines(runs).items()}


class Comparison:
    """Complete runs grouped by axis point, with the baseline each point is tested against."""

    def __init__(self, runs: Sequence[Run], metrics: Sequence[str] | None = None,
                 baseline: Sequence[str] | None = None, alpha: float = 0.05):
        self.runs = list(runs)
        self.done = [r for r in runs if r.complete]
        self.failed = [r for r in runs if not r.complete]
        self.metrics = list(metrics) if metrics else default_columns(self.done)
        self.axes = ablation_axes(self.done)
        self.groups = group_runs(self.done, self.axes)
        self.baseline = parse_baseline(baseline, self.groups)  # ValueError for a bad --baseline
        self.alpha = alpha

    def diff(self, g: Group, metric: str):
        return None if metric in TOP_LEVEL_KEYS else compare(
            g, reference(g, self.baseline, self.groups), metric, self.alpha)

    def cell(self, g: Group, metric: str) -> str:
        s = g.stat(metric)
        if s.mean is None:
            return MISSING
        text = fmt(s.mean) if s.std is None or metric in TOP_LEVEL_KEYS else f"{fmt(s.mean)} ± {fmt(s.std)}"
        d = self.diff(g, metric)
        return text + (" *" if d is not None and d.significant else "")

    def trivial(self) -> dict[str, float]:
        return {k: vs[0] for k, vs in trivial_baselines(self.done).items()}


def _run_label(g: Group) -> str:
    return g.runs[0].name if len(g.runs) == 1 else f"{len(g.runs)} runs"


def to_markdown(runs: Sequence[Run], metrics: Sequence[str] | None = None,
                baseline: Sequence[str] | None = None, alpha: float = 0.05) -> str:
    """The report: fixed overrides, seeds, baseline, table, differences, failures."""
    c = Comparison(runs, metrics, baseline, alpha)
    fixed = fixed_overrides(c.done)
    lines = ["fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items())] if fixed else []
    seeds = sorted({r.overrides.get(k) for r in c.done for k in SEED_KEYS} - {None}, key=natural)
    if seeds:
        lines.append(f"seeds: {', '.join(seeds)}; cells are mean ± std over a point's seeds "
                     "(sample std), n = seeds")
    if c.baseline:
        lines.append("baseline: " + ", ".join(f"{k}={v}" for k, v in c.baseline.items())
                     + f"; * = differs from it beyond seed noise (Welch's t-test, p < {alpha:g})")
    lines += [""] if lines else []
    keys = c.axes or ["run"]  # without swept axes, the run name tells rows apart
    lines.append("| " + " | ".join(keys + ["n"] + c.metrics) + " |")
    lines.append("|" + "|".join(["---"] * len(keys) + ["---:"] * (1 + len(c.metrics))) + "|")
    for g in c.groups:
        cells = [v if v is not None else MISSING for v in g.key] if c.axes else [_run_label(g)]
        cells += [str(len(g.runs))] + [c.cell(g, m) for m in c.metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *differences(c)]
    base = ", ".join(f"{k} {v}" for k, v in sorted(baselines_summary(c.done).items()))
    lines += ["", f"trivial baselines: {base or 'none reported'}", ""]
    lines.append(f"failed runs ({len(c.failed)}):" if c.failed else "failed runs: none")
    lines += [f"- {r.name}: {r.error}" for r in c.failed]
    return "\n".join(lines) + "\n"


def differences(c: Comparison) -> list[str]:
    """The lines listing every difference beyond seed noise, or why there are none."""
    found, tested = [], False
    for g in c.groups:
        ref = reference(g, c.baseline, c.groups)
        for m in c.metrics:
            d = c.diff(g, m)
            tested |= d is not None and d.p is not None
            if d is not None and d.significant:
                found.append(f"- {g.label()} vs {ref.label()}: {m} {fmt(g.stat(m).mean)} vs "
                             f"{fmt(ref.stat(m).mean)} ({'+' if d.diff >= 0 else ''}{fmt(d.diff)}, "
                             f"p = {d.p:.2g})")
    head = f"differences beyond seed noise (Welch's t-test, two-sided, p < {c.alpha:g}):"
    if found:
        return [head, *found]
    if not tested:
        return [head + " not testable (a point needs >= 2 seeds on both sides)"]
    return [head + " none"]


def write_csv(runs: Sequence[Run], path: str | os.PathLike) -> None:
    """One row per run (failed ones too): status, every override key, every metric."""
    done = [r for r in runs if r.complete]
    axes = ablation_axes(done)
    other_keys = sorted({k for r in runs for k in r.overrides} - set(axes))
    metrics = available_metrics(runs)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run", "path", "status", "error", *axes, *other_keys, *TOP_LEVEL_KEYS, *metrics])
    order = sorted(done, key=lambda r: ([natural(r.overrides.get(a)) for a in axes + ["seed"]], r.name))
    for r in order + [r for r in runs if not r.complete]:
        row = [r.name, str(r.path), r.status, r.error or ""]
        row += [r.overrides.get(k, "") for k in (*axes, *other_keys)]
        # Full precision in the CSV: it is for further analysis, not for reading.
        row += ["" if (v := metric_value(r, k)) is None else v for k in (*TOP_LEVEL_KEYS, *metrics)]
        writer.writerow(row)
    write_text(path, buf.getvalue())


def write_groups_csv(c: Comparison, path: str | os.PathLike) -> None:
    """One row per axis point: n, and per metric mean/std/n/diff/p/significant."""
    metrics = [m for m in available_metrics(c.done)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = ["mean", "std", "n", "diff_vs_baseline", "p_welch", "beyond_noise"]
    writer.writerow([*c.axes, "n", "is_baseline", *[f"{m}:{col}" for m in metrics for col in cols]])
    for g in c.groups:
        row = [v or "" for v in g.key] + [len(g.runs), reference(g, c.baseline, c.groups) is g]
        for m in metrics:
            s, d = g.stat(m), c.diff(g, m)
            row += ["" if s.mean is None else s.mean, "" if s.std is None else s.std, s.n,
                    "" if d is None else d.diff, "" if d is None or d.p is None else d.p,
                    "" if d is None else d.significant]
        writer.writerow(row)
    write_text(path, buf.getvalue())


def _report(args, c: Comparison) -> int:
    from sweeps import wandb_io

    parts = args.wandb.strip("/").split("/") if args.wandb and not Path(args.wandb).is_dir() else []
    entity = parts[0] if parts else args.entity
    project = parts[1] if parts else args.project
    group = parts[2] if len(parts) == 3 else Path(args.sweep_dir or args.wandb or ".").resolve().name
    plan = wandb_io.report_plan(group, c.axes, [m for m in c.metrics if m != "step"], entity, project)
    print(wandb_io.describe_plan(plan), file=sys.stderr)
    if not wandb_io.online():
        print("ablate-compare: wandb is offline (WANDB_MODE offline/disabled, or no API key): "
              "nothing created; run again with a wandb login to create it", file=sys.stderr)
        return 0
    try:
        print(f"ablate-compare: created {wandb_io.build_workspace(plan).url}", file=sys.stderr)
    except ImportError:
        print("ablate-compare: --wandb-report needs wandb-workspaces: pip install 'ablate[wandb-report]'",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ablate-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="Hydra multirun directory, one run, or a parent of runs")
    parser.add_argument("--wandb", help="also read wandb: a directory of offline runs, or ENTITY/PROJECT[/GROUP]")
    parser.add_argument("--out", help="directory for the outputs (default: sweep_dir)")
    parser.add_argument("--metrics", help="comma-separated columns, e.g. caption/cider,step")
    parser.add_argument("--baseline", nargs="+", metavar="AXIS=VALUE",
                        help="the point others are tested against (default: the first point)")
    parser.add_argument("--alpha", type=float, default=0.05, help="Welch's t-test level (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    parser.add_argument("--wandb-report", action="store_true", help="plan (offline) or create a wandb workspace")
    parser.add_argument("--project", default=os.environ.get("WANDB_PROJECT", "ablate"), help="for --wandb-report")
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="for --wandb-report")
    args = parser.parse_args(argv)

    if not args.sweep_dir and not args.wandb:
        parser.error("give a sweep directory, --wandb, or both")
    if args.sweep_dir and not Path(args.sweep_dir).is_dir():
        print(f"ablate-compare: not a directory: {args.sweep_dir}", file=sys.stderr)
        return 1
    runs = collect_runs(args.sweep_dir) if args.sweep_dir else []
    if args.wandb:
        from sweeps.wandb_io import read_wandb

        if Path(args.wandb).is_dir():
            print("ablate-compare: the wandb SDK has no reader for offline .wandb files; reading the "
                  "run directories they were written in (results.json, metrics.jsonl)", file=sys.stderr)
        try:
            seen = {r.path.resolve() for r in runs}
            runs += [r for r in read_wandb(args.wandb) if r.path.resolve() not in seen]
        except Exception as e:  # no login, no network, unknown project: say so, never a traceback
            print(f"ablate-compare: cannot read wandb runs from {args.wandb}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return 1
    source = args.sweep_dir or args.wandb
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if not any(r.complete for r in runs):
        print(f"ablate-compare: no complete runs in {source} "
              f"({len(runs)} run{'' if len(runs) == 1 else 's'} found)", file=sys.stderr)
        for r in runs:
            print(f"- {r.name}: {r.error}", file=sys.stderr)
        return 1
    try:
        c = Comparison(runs, metrics, args.baseline, args.alpha)
    except ValueError as e:
        print(f"ablate-compare: {e}", file=sys.stderr)
        return 2
    report = to_markdown(runs, metrics, args.baseline, args.alpha)
    print(report, end="")
    out = Path(args.out or (source if Path(source).is_dir() else "."))
    write_text(out / "compare.md", report)
    write_csv(runs, out / "compare.csv")
    write_groups_csv(c, out / "compare_groups.csv")
    written = ["compare.md", "compare.csv", "compare_groups.csv"]
    if not args.no_plot:
        from sweeps.plots import plot_all

        written += [p.name for p in plot_all(c.groups, c.metrics, out, c.baseline, c.trivial(), c.alpha)]
    # stderr, so that stdout is the markdown report alone and can be piped.
    print(f"wrote {out}/: {', '.join(written)}", file=sys.stderr)
    return _report(args, c) if args.wandb_report else 0


if __name__ == "__main__":
    sys.exit(main())
