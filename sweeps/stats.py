"""Seed averaging and the seed-noise test behind ``ablate-compare``.

Runs are grouped by their swept axes (override keys whose value differs between the
complete runs), with ``seed`` never an axis: the runs of a group are its seeds. Each
group reports, per metric, the number of runs with a value (n), their mean and sample
standard deviation (n - 1).

A group is compared with its baseline group (``--baseline key=value ...``: the group with
those values on the named axes and the row's own values on the others; by default the
first value of every axis, i.e. the first row). A difference counts as beyond seed
noise when Welch's t-test (two-sided, unequal variances, ``scipy.stats.ttest_ind`` with
``equal_var=False``) on the per-seed values gives p < alpha (0.05 by default); that
needs at least 2 seeds on both sides, and with fewer no difference is marked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sweeps.runs import Run

SEED_KEYS = ("seed",)
MISSING = "—"


def swept_axes(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs between runs (a missing key counts as a value)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def ablation_axes(runs: Sequence[Run]) -> list[str]:
    """The swept axes without the seed."""
    return [a for a in swept_axes(runs) if a not in SEED_KEYS]


def natural(value: str | None) -> tuple:
    """Sort key: numbers numerically (32 < 224), strings alphabetically, missing last."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, value) if value is not None else (2, 0.0, "")


def metric_value(run: Run, key: str):
    """A metric from results['metrics'], or a top-level field such as ``step``."""
    metrics = (run.results or {}).get("metrics") or {}
    return metrics[key] if key in metrics else (run.results or {}).get(key)


@dataclass
class Stat:
    n: int
    mean: float | None
    std: float | None
    """Sample standard deviation over seeds; None for one seed."""
    values: list[float]


@dataclass
class Group:
    """The complete runs (seeds) of one point of the axes."""

    axes: tuple[str, ...]
    key: tuple[str | None, ...]
    runs: list[Run]

    def value(self, axis: str) -> str | None:
        return self.key[self.axes.index(axis)]

    def label(self) -> str:
        return ", ".join(f"{a}={v if v is not None else MISSING}" for a, v in zip(self.axes, self.key))

    def stat(self, metric: str) -> Stat:
        vals = [float(v) for r in self.runs
                if isinstance(v := metric_value(r, metric), (int, float)) and not isinstance(v, bool)]
        if not vals:
            return Stat(0, None, None, [])
        mean = sum(vals) / len(vals)
        std = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
               if len(vals) > 1 else None)
        return Stat(len(vals), mean, std, vals)


def group_runs(runs: Sequence[Run], axes: Sequence[str]) -> list[Group]:
    """Complete runs grouped by their values on ``axes``, groups in natural order."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.complete:
            groups.setdefault(tuple(r.overrides.get(a) for a in axes), []).append(r)
    keys = sorted(groups, key=lambda k: [natural(v) for v in k])
    return [Group(tuple(axes), k, sorted(groups[k], key=lambda r: natural(r.overrides.get("seed"))))
            for k in keys]


def parse_baseline(items: Sequence[str] | None, groups: Sequence[Group]) -> dict[str, str]:
    """``["connector=mlp"]`` -> ``{"connector": "mlp"}``, checked against the axes and
    their values; no items: the first group's value on every axis."""
    if not groups:
        return {}
    axes = groups[0].axes
    if not items:
        return {a: v for a, v in zip(axes, groups[0].key) if v is not None}
    out = {}
    for item in items:
        for part in str(item).split(","):
            key, sep, value = part.strip().lstrip("+").partition("=")
            if not sep:
                raise ValueError(f"--baseline {part!r}: want key=value")
            if key not in axes:
                raise ValueError(f"--baseline {part!r}: {key!r} is not a swept axis "
                                 f"(axes: {', '.join(axes) or 'none'})")
            values = {g.value(key) for g in groups}
            if value not in values:
                raise ValueError(f"--baseline {part!r}: no run has {key}={value} "
                                 f"(values: {', '.join(sorted(v for v in values if v is not None))})")
            out[key] = value
    return out


def reference(group: Group, baseline: dict[str, str], groups: Sequence[Group]) -> Group | None:
    """The group ``group`` is compared with: its own key with the baseline's values put in."""
    want = tuple(baseline.get(a, v) for a, v in zip(group.axes, group.key))
    return next((g for g in groups if g.key == want), None)


@dataclass
class Diff:
    diff: float
    """mean(group) - mean(baseline)."""
    p: float | None
    """Welch's t-test p-value; None with fewer than 2 seeds on a side."""
    significant: bool


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p of Welch's t-test; None when a side has < 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    if max(a) == min(a) and max(b) == min(b):  # no spread at all: any difference is exact
        return 1.0 if a[0] == b[0] else 0.0
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(group: Group, ref: Group | None, metric: str, alpha: float = 0.05) -> Diff | None:
    if ref is None or ref is group:
        return None
    s, r = group.stat(metric), ref.stat(metric)
    if s.mean is None or r.mean is None:
        return None
    p = welch(s.values, r.values)
    return Diff(diff=s.mean - r.mean, p=p, significant=p is not None and p < alpha)
