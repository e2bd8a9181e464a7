"""``ablate-lr``: the learning-rate scaling law, end to end.

    ablate-lr sweep [--sizes lr_xs,lr_s] [--lrs 1e-3:3.2e-2:6] [HYDRA_OVERRIDES ...]
    ablate-lr fit SWEEP_DIR [--metric text/loss] [--holdout-largest]
    ablate-lr predict 9e6 85e6 [--law lr_law.json]      (or: predict experiment=mm1/full)

``sweep`` runs ``conf/sweep/lr_law.yaml`` (model sizes x log-spaced peak learning rates)
through ``ablate-train -m``, locally or through any Hydra launcher given as an override;
finished runs are skipped by the training script itself. It then fits.

``fit`` reads every complete run under SWEEP_DIR: N from ``results.json``
(``params.decoder_non_embedding``, the decoder's non-embedding parameters), the peak lr
the run used (``optim.lr`` in results.json, else its ``optim.lr=`` override) and the
final eval loss (``--metric``, default ``text/loss``: the token-weighted next-token loss
on the corpus's held-out text documents). Seeds at the same (N, lr) are averaged.
Per size, the best lr is the vertex of a parabola fitted to loss against ln(lr) over
the grid minimum and its neighbours (``--window`` on each side); when the minimum sits
on the grid's edge, a neighbour diverged or the points are not convex, the grid argmin
is used instead and the output says so. Then ``ln(lr*) = a ln(N) + b`` by least squares
(``scipy.stats.linregress``) with two-sided t-intervals on a and b (n - 2 degrees of
freedom; none with two sizes). Writes ``lr_law.json`` (readable by
``optim.lr=law:/path/lr_law.json``) and ``lr_law.png``, both atomically.

``--holdout-largest`` fits on every size but the largest, predicts the largest size's
lr and reports predicted / measured (with the 95% prediction interval when the
smaller sizes leave degrees of freedom).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ablate.files import write_json
from ablate.lr import MM1_LAW, LrLaw, load_law
from sweeps.runs import collect_runs

DEFAULT_METRIC = "text/loss"
CONFIDENCE = 0.95


# --- Collecting ---

@dataclass
class SizeGrid:
    """The loss-vs-lr curve of one model size (seeds averaged) and its optimum."""

    n: int
    """Decoder non-embedding parameters."""
    lrs: list[float]
    """Peak learning rates, ascending."""
    losses: list[float]
    """Mean loss per lr over its seeds (inf where a run diverged)."""
    seeds: list[int]
    """Runs averaged per lr."""
    best_lr: float = math.nan
    best_loss: float = math.nan
    method: str = ""
    """``quadratic`` or ``grid argmin``."""
    warning: str | None = None
    """Why the grid argmin was used, if it was."""
    quadratic: list[float] | None = None
    """Parabola coefficients in ln(lr), highest power first (for the plot)."""
    window: list[float] | None = None
    """The lr range the parabola was fitted over."""


def collect(sweep_dir: str | Path, metric: str = DEFAULT_METRIC) -> tuple[list[SizeGrid], list[str]]:
    """Complete runs grouped by N; and a line for every run left out, with the reason."""
    by_point: dict[tuple[int, float], list[float]] = defaultdict(list)
    skipped = []
    for run in collect_runs(sweep_dir):
        if not run.complete:
            skipped.append(f"{run.name}: {run.error}")
            continue
        res = run.results
        n = (res.get("params") or {}).get("decoder_non_embedding")
        lr = (res.get("optim") or {}).get("lr")
        if lr is None:
            try:
                lr = float(run.overrides.get("optim.lr", "nan"))
            except ValueError:
                lr = math.nan
        loss = (res.get("metrics") or {}).get(metric)
        if not isinstance(n, int) or not (isinstance(lr, (int, float)) and lr > 0):
            skipped.append(f"{run.name}: no N (params.decoder_non_embedding) or numeric lr")
            continue
        if not isinstance(loss, (int, float)):
            skipped.append(f"{run.name}: no {metric} in results.json")
            continue
        # A diverged run is the worst point on its curve, not a missing one.
        by_point[(n, float(lr))].append(float(loss) if math.isfinite(loss) else math.inf)
    sizes: dict[int, SizeGrid] = {}
    for (n, lr), losses in sorted(by_point.items()):
        g = sizes.setdefault(n, SizeGrid(n=n, lrs=[], losses=[], seeds=[]))
        g.lrs.append(lr)
        g.losses.append(float(np.mean(losses)))
        g.seeds.append(len(losses))
    return [sizes[n] for n in sorted(sizes)], skipped


# --- Best lr per size ---

def best_lr(lrs: Sequence[float], losses: Sequence[float], window: int = 1) -> dict:
    """The optimum of one size's curve: ``best_lr``, ``best_loss``, ``method``, ``warning``,
    ``quadratic``, ``window`` (see ``SizeGrid``)."""
    order = np.argsort(np.asarray(lrs, dtype=float))
    lr = np.asarray(lrs, dtype=float)[order]
    x, y = np.log(lr), np.asarray(losses, dtype=float)[order]
    finite = np.isfinite(y)
    if not finite.any():
        return {"best_lr": math.nan, "best_loss": math.nan, "method": "none",
                "warning": "every run diverged", "quadratic": None, "window": None}
    i = int(np.argmin(np.where(finite, y, np.inf)))
    argmin = {"best_lr": float(lr[i]), "best_loss": float(y[i]), "method": "grid argmin",
              "quadratic": None, "window": None}
    if len(x) < 3:
        return {**argmin, "warning": f"only {len(x)} learning rate(s): grid argmin"}
    if i in (0, len(x) - 1):
        edge = "lowest" if i == 0 else "highest"
        return {**argmin, "warning": f"minimum at the grid's {edge} lr ({lr[i]:.3g}): "
                                     "grid argmin used; extend the grid past it"}
    w = max(1, min(window, i, len(x) - 1 - i))
    xs, ys = x[i - w:i + w + 1], y[i - w:i + w + 1]
    if not np.isfinite(ys).all():
        return {**argmin, "warning": "a neighbour of the minimum diverged: grid argmin used"}
    c2, c1, c0 = np.polyfit(xs, ys, 2)
    if c2 <= 0:
        return {**argmin, "warning": "loss is not convex around the minimum: grid argmin used"}
    # Vertex, kept between the minimum's neighbours (exact 3-point fits always are).
    xv = float(np.clip(-c1 / (2 * c2), x[i - 1], x[i + 1]))
    return {"best_lr": math.exp(xv), "best_loss": float(np.polyval([c2, c1, c0], xv)),
            "method": "quadratic", "warning": None, "quadratic": [float(c2), float(c1), float(c0)],
            "window": [float(lr[i - w]), float(lr[i + w])]}


def find_optima(sizes: list[SizeGrid], window: int = 1) -> list[SizeGrid]:
    for g in sizes:
        for k, v in best_lr(g.lrs, g.losses, window).items():
            setattr(g, k, v)
    return sizes


# --- The law ---

@dataclass
class LawFit:
    """``ln(lr) = a ln(N) + b`` fitted by least squares."""

    a: float
    b: float
    a_stderr: float | None
    b_stderr: float | None
    a_ci: list[float] | None
    """Two-sided ``confidence`` t-interval; None without degrees of freedom."""
    b_ci: list[float] | None
    dof: int
    r2: float | None
    confidence: float = CONFIDENCE
    ns: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    @property
    def law(self) -> LrLaw:
        return LrLaw(a=self.a, b=self.b, source="ablate-lr fit")

    def prediction_interval(self, n: float) -> list[float] | None:
        """``confidence`` prediction interval of the best lr of a new size N."""
        if self.dof < 1:
            return None
        from scipy import stats

        x, y = np.log(self.ns), np.log(self.lrs)
        resid = y - (self.a * x + self.b)
        s = math.sqrt(float(resid @ resid) / self.dof)
        sxx = float(((x - x.mean()) ** 2).sum())
        se = s * math.sqrt(1 + 1 / len(x) + (math.log(n) - x.mean()) ** 2 / sxx)
        t = stats.t.ppf(0.5 + self.confidence / 2, self.dof)
        centre = self.a * math.log(n) + self.b
        return [math.exp(centre - t * se), math.exp(centre + t * se)]


def fit_law(ns: Sequence[float], lrs: Sequence[float], confidence: float = CONFIDENCE) -> LawFit:
    """Least squares in log space; needs two sizes, gives intervals from three."""
    from scipy import stats

    if len(ns) != len(lrs) or len(set(ns)) < 2:
        raise ValueError(f"need best learning rates at >= 2 distinct sizes, got N = {list(ns)}")
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(lrs, float))
    dof = len(x) - 2
    if dof == 0:  # a line through two points: no residuals, no intervals
        a = float((y[1] - y[0]) / (x[1] - x[0]))
        return LawFit(a=a, b=float(y[0] - a * x[0]), a_stderr=None, b_stderr=None, a_ci=None,
                      b_ci=None, dof=0, r2=None, confidence=confidence, ns=list(ns), lrs=list(lrs))
    res = stats.linregress(x, y)
    t = stats.t.ppf(0.5 + confidence / 2, dof)
    a, b, sa, sb = float(res.slope), float(res.intercept), float(res.stderr), float(res.intercept_stderr)
    return LawFit(a=a, b=b, a_stderr=sa, b_stderr=sb, a_ci=[a - t * sa, a + t * sa],
                  b_ci=[b - t * sb, b + t * sb], dof=dof, r2=float(res.rvalue ** 2),
                  confidence=confidence, ns=[int(n) for n in ns], lrs=[float(v) for v in lrs])


def holdout_largest(sizes: list[SizeGrid], confidence: float = CONFIDENCE) -> dict:
    """Fit on all sizes but the largest; predict the largest one's best lr."""
    usable = [g for g in sizes if math.isfinite(g.best_lr)]
    if len(usable) < 3:
        raise ValueError(f"--holdout-largest needs >= 3 sizes with a best lr, got {len(usable)}")
    *small, big = usable
    fit = fit_law([g.n for g in small], [g.best_lr for g in small], confidence)
    predicted = fit.law.lr(big.n)
    return {"n": big.n, "predicted_lr": predicted, "measured_lr": big.best_lr,
            "ratio": predicted / big.best_lr, "measured_method": big.method,
            "prediction_interval": fit.prediction_interval(big.n),
            "fit_on": [g.n for g in small], "a": fit.a, "b": fit.b}


# --- Running it all ---

def fit_sweep(sweep_dir: str | Path, metric: str = DEFAULT_METRIC, window: int = 1,
              holdout: bool = False, out: str | Path | None = None, plot: bool = True) -> dict:
    """collect -> best lr per size -> law (-> holdout) -> lr_law.json + lr_law.png."""
    sizes, skipped = collect(sweep_dir, metric)
    find_optima(sizes, window)
    usable = [g for g in sizes if math.isfinite(g.best_lr)]
    fit = fit_law([g.n for g in usable], [g.best_lr for g in usable])
    report = {
        "schema_version": 1, "law": "ln(lr) = a ln(N) + b", "N": "decoder non-embedding parameters",
        "a": fit.a, "b": fit.b, "a_stderr": fit.a_stderr, "b_stderr": fit.b_stderr,
        "a_ci": fit.a_ci, "b_ci": fit.b_ci, "confidence": fit.confidence, "dof": fit.dof,
        "r2": fit.r2, "metric": metric, "sweep_dir": str(sweep_dir), "skipped_runs": skipped,
        "sizes": [asdict(g) for g in sizes],
        "reference": {"a": MM1_LAW.a, "b": MM1_LAW.b, "source": MM1_LAW.source},
        "holdout": holdout_largest(sizes) if holdout else None,
    }
    out_dir = Path(out or sweep_dir)
    write_json(out_dir / "lr_law.json", _json_safe(report))
    if plot:
        from sweeps.lr_plot import plot_law

        plot_law(sizes, fit, report["holdout"], out_dir / "lr_law.png", metric)
    return report


def _json_safe(obj):
    """inf/nan -> None: strict JSON readers reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def parse_grid(text: str) -> list[float]:
    """``1e-3,4e-3`` (a list) or ``1e-3:3.2e-2:6`` (6 log-spaced values, ends included)."""
    if ":" in text:
        lo, hi, k = text.split(":")
        if float(lo) <= 0 or float(hi) <= float(lo) or int(k) < 2:
            raise ValueError(f"--lrs {text}: want MIN:MAX:POINTS with 0 < MIN < MAX, POINTS >= 2")
        return [float(f"{v:.3g}") for v in np.geomspace(float(lo), float(hi), int(k))]
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise ValueError(f"--lrs {text}: want positive learning rates")
    return values


def sweep_command(args) -> list[str]:
    """The ``ablate-train -m`` command line ``ablate-lr sweep`` runs."""
    cmd = [sys.executable, "-m", "ablate.train", "-m", f"experiment={args.experiment}",
           "+sweep=lr_law", f"paths.data={args.data}", f"paths.runs={args.runs}"]
    if args.sizes:
        cmd.append(f"decoder={args.sizes}")
    if args.lrs:
        cmd.append("optim.lr=" + ",".join(f"{v:g}" for v in parse_grid(args.lrs)))
    return cmd + list(args.overrides)


def _compose(overrides: list[str]):
    """conf/train.yaml composed with ``overrides``, as ablate-train would."""
    from hydra import compose, initialize_config_dir

    from ablate.config import CONF_DIR, register_configs
    from ablate.tracking import register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _sweep_dir(args) -> Path:
    """RUNS/<name>: where Hydra puts the sweep's runs (conf/train.yaml's hydra.sweep.dir)."""
    name = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("name=")), None)
    return Path(args.runs) / (name or _compose([f"experiment={args.experiment}"]).name)


def _predict(args) -> int:
    law = load_law(args.law) if args.law else MM1_LAW
    overrides = [v for v in args.values if "=" in v]
    ns = [float(v) for v in args.values if "=" not in v]
    if overrides:  # N of a configured decoder, built on the meta device
        from ablate.validate import check_model

        problems, parts = check_model(_compose(overrides))
        if problems:
            print("ablate-lr: " + "; ".join(problems), file=sys.stderr)
            return 2
        ns.append(parts[2].num_params(non_embedding=True))
    print(f"law: {law.describe()}")
    for n in ns:
        print(f"N = {n:>14,.0f}  lr = {law.lr(n):.4g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ablate-lr", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="run sizes x learning rates (conf/sweep/lr_law.yaml), then fit")
    s.add_argument("--experiment", default="lr_tiny", help="base experiment (default: %(default)s)")
    s.add_argument("--sizes", help="decoder configs, comma-separated (default: the sweep file's)")
    s.add_argument("--lrs", help="1e-3,4e-3,... or MIN:MAX:POINTS log-spaced (default: the sweep file's)")
    s.add_argument("--data", default="data/synth", help="corpus directory (built if missing)")
    s.add_argument("--preset", default="demo", help="corpus preset when building it (demo, tiny)")
    s.add_argument("--runs", default="runs", help="runs root; the sweep lands in RUNS/<name>")
    s.add_argument("--no-fit", action="store_true", help="only train")
    s.add_argument("--holdout-largest", action="store_true")
    s.add_argument("overrides", nargs="*", help="more Hydra overrides (hydra/launcher=..., seed=0,1)")
    f = sub.add_parser("fit", help="best lr per size, then ln(lr) = a ln(N) + b")
    f.add_argument("sweep_dir")
    f.add_argument("--metric", default=DEFAULT_METRIC, help="loss to minimise (default: %(default)s)")
    f.add_argument("--window", type=int, default=1, help="grid points each side of the minimum in the parabola")
    f.add_argument("--holdout-largest", action="store_true", help="predict the largest size from the others")
    f.add_argument("--out", help="directory for lr_law.json / lr_law.png (default: SWEEP_DIR)")
    f.add_argument("--no-plot", action="store_true")
    q = sub.add_parser("predict", help="lr for N (numbers) or for a config (Hydra overrides)")
    q.add_argument("values", nargs="+", help="N values, or overrides such as experiment=mm1/full")
    q.add_argument("--law", help="lr_law.json (default: MM1's published law)")
    args = p.parse_args(argv)

    if args.cmd == "predict":
        return _predict(args)
    if args.cmd == "sweep":
        try:
            cmd = sweep_command(args)
        except ValueError as e:
            print(f"ablate-lr: {e}", file=sys.stderr)
            return 2
        from ablate.data.cli import main as data_main

        if data_main(["--out", args.data, "--preset", args.preset]) not in (0, None):
            return 1
        print("ablate-lr: " + " ".join(cmd[1:]), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0 or args.no_fit:
            return rc
        args.sweep_dir, args.metric, args.window, args.out, args.no_plot = _sweep_dir(args), DEFAULT_METRIC, 1, None, False
    if not Path(args.sweep_dir).is_dir():
        print(f"ablate-lr: not a directory: {args.sweep_dir}", file=sys.stderr)
        return 1
    try:
        report = fit_sweep(args.sweep_dir, args.metric, args.window, args.holdout_largest,
                           args.out, plot=not args.no_plot)
    except ValueError as e:
        print(f"ablate-lr: {e}", file=sys.stderr)
        return 1
    from sweeps.lr_plot import summary

    print(summary(_json_safe(report)))
    out = Path(args.out or args.sweep_dir)
    print(f"wrote {out / 'lr_law.json'}" + ("" if args.no_plot else f", {out / 'lr_law.png'}"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
