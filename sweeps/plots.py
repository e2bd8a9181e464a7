"""``ablate-compare``'s figures, written atomically:

- ``compare.png``: one panel per metric, a bar per group (mean over seeds, std as the
  error bar), the trivial baseline as a dashed line;
- ``compare_<axis>.png``, one per swept axis: one panel per metric, the axis' values on
  x, one line per combination of the other axes (mean, std error bars); a point whose
  difference from its baseline exceeds the seed noise is drawn as a star.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from ablate.files import atomic_write
from sweeps.stats import Group, compare, natural, reference


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, width: float):
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.6 * nrows), squeeze=False)
    for ax in list(axs.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axs.flat)[:n]


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def axis_filename(axis: str) -> str:
    return "compare_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", axis) + ".png"


def plot_overview(groups: Sequence[Group], metrics: Sequence[str], path, trivial: dict) -> None:
    plt = _pyplot()
    labels = [", ".join(str(v) for v in g.key) or "run" for g in groups]
    fig, panels = _grid(plt, len(metrics), max(4.0, 0.6 * len(groups) + 1.5))
    for ax, metric in zip(panels, metrics):
        stats = [g.stat(metric) for g in groups]
        means = [s.mean if s.mean is not None else math.nan for s in stats]
        errs = [s.std or 0.0 for s in stats]
        ax.bar(range(len(groups)), means, yerr=errs, capsize=3, color="tab:blue")
        if trivial.get(metric) is not None:
            ax.axhline(trivial[metric], color="tab:red", linestyle="--", linewidth=1, label="trivial baseline")
            ax.legend(fontsize="small")
        ax.set_title(metric)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize="small")
    if groups and groups[0].axes:
        fig.suptitle("variants: " + ", ".join(groups[0].axes) + " (mean ± std over seeds)", fontsize="medium")
    _save(plt, fig, path)


def plot_axis(axis: str, groups: Sequence[Group], metrics: Sequence[str], path,
              baseline: dict, trivial: dict, alpha: float) -> None:
    plt = _pyplot()
    axes = groups[0].axes
    values = sorted({g.value(axis) for g in groups}, key=natural)
    others = [a for a in axes if a != axis]
    series: dict[tuple, list[Group]] = {}
    for g in groups:
        series.setdefault(tuple(g.value(a) for a in others), []).append(g)
    fig, panels = _grid(plt, len(metrics), max(4.5, 0.8 * len(values) + 2))
    for ax, metric in zip(panels, metrics):
        for key, members in sorted(series.items(), key=lambda kv: [natural(v) for v in kv[0]]):
            by_value = {g.value(axis): g for g in members}
            xs = [i for i, v in enumerate(values) if v in by_value]
            stats = [by_value[values[i]].stat(metric) for i in xs]
            ys = [s.mean if s.mean is not None else math.nan for s in stats]
            label = ", ".join(f"{a}={v}" for a, v in zip(others, key)) or metric
            line = ax.errorbar(xs, ys, yerr=[s.std or 0.0 for s in stats], marker="o", capsize=3, label=label)
            for i, y in zip(xs, ys):
                g = by_value[values[i]]
                d = compare(g, reference(g, baseline, groups), metric, alpha)
                if d is not None and d.significant:
                    ax.plot([i], [y], "*", markersize=14, color=line[0].get_color(), markeredgecolor="k")
        if trivial.get(metric) is not None:
            ax.axhline(trivial[metric], color="tab:red", linestyle="--", linewidth=1, label="trivial baseline")
        ax.set_title(metric)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(v) for v in values], fontsize="small")
        ax.set_xlabel(axis)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"{axis}: mean ± std over seeds; * beyond seed noise vs baseline "
                 f"(Welch p < {alpha:g})", fontsize="medium")
    _save(plt, fig, path)


def plot_all(groups: Sequence[Group], metrics: Sequence[str], out: Path, baseline: dict,
             trivial: dict, alpha: float) -> list[Path]:
    """compare.png and one compare_<axis>.png per axis; the paths written."""
    metrics = [m for m in metrics if m != "step"] or ["step"]
    written = [out / "compare.png"]
    plot_overview(groups, metrics, written[0], trivial)
    for axis in (groups[0].axes if groups else ()):
        written.append(out / axis_filename(axis))
        plot_axis(axis, groups, metrics, written[-1], baseline, trivial, alpha)
    return written
