"""How ``ablate-lr fit`` shows a fit: the table it prints (``summary``) and the figure it
writes (``lr_law.png``), two panels:

- left: loss against peak lr (log axis), one curve per model size, the fitted parabola
  dashed over its window and the optimum as a star (an open star where the grid argmin
  was used); diverged runs as crosses on the top edge;
- right: best lr against N (log-log), the fitted law with its confidence band on the
  slope, MM1's published law for reference, and the held-out size's prediction.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ablate.files import atomic_write
from ablate.lr import MM1_LAW


def plot_law(sizes, fit, holdout: dict | None, path: str | Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, max(len(sizes), 1)))
    finite = [v for g in sizes for v in g.losses if math.isfinite(v)]
    top = max(finite) if finite else 1.0
    for g, c in zip(sizes, colours):
        lrs, losses = np.asarray(g.lrs), np.asarray(g.losses)
        ok = np.isfinite(losses)
        left.plot(lrs[ok], losses[ok], "o-", color=c, label=f"N = {g.n:,}")
        if (~ok).any():
            left.plot(lrs[~ok], [top] * int((~ok).sum()), "x", color=c, markersize=9)
        if g.quadratic:
            xs = np.linspace(math.log(g.window[0]), math.log(g.window[1]), 50)
            left.plot(np.exp(xs), np.polyval(g.quadratic, xs), "--", color=c, linewidth=1)
        if math.isfinite(g.best_lr):
            left.plot([g.best_lr], [g.best_loss], "*", markersize=15, color=c,
                      markerfacecolor=c if g.method == "quadratic" else "none", markeredgecolor="k")
    left.set_xscale("log")
    left.set_xlabel("peak learning rate")
    left.set_ylabel(metric)
    left.set_title("loss vs lr (star: optimum; open star: grid argmin)", fontsize="medium")
    left.legend(fontsize="small")

    ns = np.array([g.n for g in sizes if math.isfinite(g.best_lr)], dtype=float)
    best = np.array([g.best_lr for g in sizes if math.isfinite(g.best_lr)])
    lo, hi = ns.min() / 2, ns.max() * 2
    if holdout:
        lo, hi = min(lo, holdout["n"] / 2), max(hi, holdout["n"] * 2)
    grid = np.geomspace(lo, hi, 100)
    right.plot(ns, best, "o", color="k", label="best lr per size")
    label = f"fit: ln lr = {fit.a:.3f} ln N {'-' if fit.b < 0 else '+'} {abs(fit.b):.3f}"
    right.plot(grid, np.exp(fit.a * np.log(grid) + fit.b), "-", color="tab:blue", label=label)
    if fit.a_ci:
        # Band of the slope's interval, pivoting about the data's mean ln N.
        xm, ym = np.log(ns).mean(), np.log(best).mean()
        band = [np.exp(ym + a * (np.log(grid) - xm)) for a in fit.a_ci]
        right.fill_between(grid, np.minimum(*band), np.maximum(*band), color="tab:blue", alpha=0.15,
                           label=f"{int(100 * fit.confidence)}% CI of a")
    right.plot(grid, [MM1_LAW.lr(n) for n in grid], "--", color="tab:gray",
               label=f"MM1: ln lr = {MM1_LAW.a} ln N {MM1_LAW.b}")
    if holdout:
        right.plot([holdout["n"]], [holdout["predicted_lr"]], "s", markerfacecolor="none",
                   color="tab:red", markersize=9,
                   label=f"held out: predicted / measured = {holdout['ratio']:.2f}")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("N (decoder non-embedding parameters)")
    right.set_ylabel("best peak learning rate")
    right.set_title("learning-rate law", fontsize="medium")
    right.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def summary(report: dict) -> str:
    """What ``fit`` prints."""
    lines = [f"{'N':>12}  {'best lr':>10}  {'loss':>8}  method       grid (lr: {report['metric']})"]
    for g in report["sizes"]:
        grid = ", ".join(f"{lr:.3g}: {'diverged' if loss is None else f'{loss:.4g}'}"
                         for lr, loss in zip(g["lrs"], g["losses"]))
        best = "—" if g["best_lr"] is None else f"{g['best_lr']:.4g}"
        loss = "—" if g["best_loss"] is None else f"{g['best_loss']:.4g}"
        lines.append(f"{g['n']:>12,}  {best:>10}  {loss:>8}  {g['method']:<12} {grid}")
        if g["warning"]:
            lines.append(f"{'':>12}  warning: {g['warning']}")
    conf = int(round(100 * report["confidence"]))
    ci = (lambda c: f" ({conf}% CI {c[0]:.4f} .. {c[1]:.4f})" if c else " (no interval: 2 sizes)")
    lines.append(f"fit: ln(lr) = a ln(N) + b, a = {report['a']:.4f}{ci(report['a_ci'])}, "
                 f"b = {report['b']:.4f}{ci(report['b_ci'])}")
    lines.append(f"MM1: a = {MM1_LAW.a}, b = {MM1_LAW.b}")
    h = report.get("holdout")
    if h:
        pi = h["prediction_interval"]
        lines.append(f"holdout: largest N = {h['n']:,}: predicted lr {h['predicted_lr']:.4g} from the "
                     f"{len(h['fit_on'])} smaller sizes, measured {h['measured_lr']:.4g} "
                     f"({h['measured_method']}): ratio predicted/measured = {h['ratio']:.3f}"
                     + (f"; {conf}% prediction interval {pi[0]:.3g} .. {pi[1]:.3g}" if pi else ""))
    for s in report["skipped_runs"]:
        lines.append(f"skipped {s}")
    return "\n".join(lines)
