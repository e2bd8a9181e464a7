"""The learning-rate law: the fit (sweeps/lr_law.py) on synthetic sweeps, the law in
training (ablate/lr.py: optim.lr=law[:file], the weight-decay rule), and one tiny real
sweep through ``ablate-lr sweep`` on the CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ablate.lr import MM1_LAW, LrLaw, parse_lr, resolve, torch_weight_decay
from ablate.validate import ConfigError, validate
from sweeps.lr_law import best_lr, collect, fit_law, fit_sweep, main, parse_grid
from tests.conftest import REPO, compose, run_cli, train_args

A, B = MM1_LAW.a, MM1_LAW.b
MM1_SIZES = [9e6, 85e6, 302e6, 1.2e9]


def test_mm1_law_gives_the_published_rates():
    # REFERENCES.md: 6.8e-4 at 9M, 2.6e-4 at 85M, 1.5e-4 at 302M, 8.6e-5 at 1.2B, 4.1e-5 at 7B.
    for n, lr in zip(MM1_SIZES + [7e9], [6.8e-4, 2.6e-4, 1.5e-4, 8.6e-5, 4.1e-5]):
        assert MM1_LAW.lr(n) == pytest.approx(lr, rel=0.03)


# --- The fit ---

def test_fit_recovers_exact_law():
    ns = np.geomspace(1e6, 1e9, 5)
    fit = fit_law(ns, [MM1_LAW.lr(n) for n in ns])
    assert fit.a == pytest.approx(A, abs=1e-10) and fit.b == pytest.approx(B, abs=1e-9)
    assert fit.a_stderr < 1e-9 and fit.dof == 3 and fit.r2 == pytest.approx(1.0)
    two = fit_law(ns[:2], [MM1_LAW.lr(n) for n in ns[:2]])  # a line through two points
    assert two.a == pytest.approx(A) and two.b == pytest.approx(B) and two.a_ci is None


def test_fit_with_noise_recovers_law_within_its_intervals():
    rng = np.random.default_rng(0)
    ns = np.geomspace(9e6, 1.2e9, 8)
    lrs = [MM1_LAW.lr(n) * math.exp(rng.normal(0, 0.1)) for n in ns]
    fit = fit_law(ns, lrs)
    assert fit.a_ci[0] < A < fit.a_ci[1] and fit.b_ci[0] < B < fit.b_ci[1]
    assert fit.a != A  # the noise really moved it
    # The 95% intervals are honest: over many noisy sweeps they hold the truth ~95% of the time.
    hits = 0
    for seed in range(400):
        r = np.random.default_rng(seed + 1)
        f = fit_law(ns, [MM1_LAW.lr(n) * math.exp(r.normal(0, 0.15)) for n in ns])
        hits += f.a_ci[0] < A < f.a_ci[1]
    assert 0.91 < hits / 400 < 0.99


def test_quadratic_interpolation_recovers_known_optimum():
    grid = parse_grid("1e-3:3.2e-2:6")
    assert grid == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2], rel=0.01)
    opt = 5.3e-3  # between grid points
    losses = [2.0 + 0.3 * (math.log(lr) - math.log(opt)) ** 2 for lr in grid]
    got = best_lr(grid, losses)
    assert got["method"] == "quadratic" and got["warning"] is None
    assert got["best_lr"] == pytest.approx(opt, rel=1e-9) and got["best_loss"] == pytest.approx(2.0)
    # A skewed (non-quadratic) curve: still close, far better than the grid's factor 2.
    skewed = [2.0 + 0.3 * (x := math.log(lr / opt)) ** 2 + 0.05 * x ** 3 for lr in grid]
    assert best_lr(grid, skewed)["best_lr"] == pytest.approx(opt, rel=0.1)


def test_minimum_at_grid_edge_falls_back_to_argmin_with_warning():
    grid = [1e-3, 2e-3, 4e-3, 8e-3]
    low = best_lr(grid, [3.0, 3.1, 3.2, 3.3])
    assert low["method"] == "grid argmin" and low["best_lr"] == 1e-3
    assert "lowest lr" in low["warning"] and "extend the grid" in low["warning"]
    high = best_lr(grid, [3.3, 3.2, 3.1, 3.0])
    assert high["best_lr"] == 8e-3 and "highest lr" in high["warning"]
    diverged = best_lr(grid, [3.3, 3.0, math.inf, 3.2])
    assert diverged["best_lr"] == 2e-3 and "diverged" in diverged["warning"]


def fake_sweep(root, sizes=MM1_SIZES, seeds=2, noise=0.0, lrs_per_size=7, rng=None):
    """Run directories as ablate-train writes them: loss quadratic in ln(lr) around MM1's law."""
    i = 0
    for n in sizes:
        opt = MM1_LAW.lr(n)
        for lr in np.geomspace(opt / 6, opt * 5, lrs_per_size):
            for seed in range(seeds):
                loss = 3.0 - 0.1 * math.log10(n) + 0.2 * math.log(lr / opt) ** 2
                loss += rng.normal(0, noise) if noise else 0.0
                d = root / f"run{i}"
                d.mkdir(parents=True)
                (d / "results.json").write_text(json.dumps({
                    "status": "complete", "run_name": f"lr_law/run{i}", "step": 10,
                    "overrides": [f"optim.lr={lr}", f"seed={seed}"], "metrics": {"text/loss": loss},
                    "params": {"total": int(n) * 2, "decoder_non_embedding": int(n)},
                    "optim": {"lr": lr, "weight_decay": 0.1}}))
                i += 1
    return root


def test_fit_sweep_writes_law_and_plot_and_holds_out_largest(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "sweep")
    (tmp_path / "sweep" / "broken").mkdir()  # a job that never wrote anything: listed, skipped
    assert main(["fit", str(sweep), "--holdout-largest"]) == 0
    out = capsys.readouterr().out
    law = json.loads((sweep / "lr_law.json").read_text())
    assert law["a"] == pytest.approx(A, abs=1e-6) and law["b"] == pytest.approx(B, abs=1e-5)
    assert [s["n"] for s in law["sizes"]] == [int(n) for n in MM1_SIZES]
    assert all(s["method"] == "quadratic" and s["seeds"] == [2] * 7 for s in law["sizes"])
    h = law["holdout"]
    assert h["n"] == int(1.2e9) and h["fit_on"] == [int(n) for n in MM1_SIZES[:3]]
    assert h["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert "ratio predicted/measured = 1.000" in out and "skipped broken" in out
    png = (sweep / "lr_law.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # The law file is what training reads back.
    fitted = parse_lr(f"law:{sweep / 'lr_law.json'}")
    assert isinstance(fitted, LrLaw) and fitted.lr(85e6) == pytest.approx(MM1_LAW.lr(85e6), rel=1e-4)


def test_noisy_sweep_fit_brackets_mm1_and_reports_edges(tmp_path, capsys):
    rng = np.random.default_rng(3)
    sizes = np.geomspace(9e6, 1.2e9, 6)
    sweep = fake_sweep(tmp_path / "sweep", sizes=sizes, seeds=3, noise=0.01, rng=rng)
    report = fit_sweep(sweep, plot=False)
    assert report["a_ci"][0] < A < report["a_ci"][1] and report["b_ci"][0] < B < report["b_ci"][1]
    # A size whose grid stops before its optimum: reported, argmin used, fit still written.
    edge = fake_sweep(tmp_path / "edge", sizes=[1e7, 1e8], seeds=1)
    for d in edge.iterdir():
        res = json.loads((d / "results.json").read_text())
        if res["params"]["decoder_non_embedding"] == int(1e8) and res["optim"]["lr"] > MM1_LAW.lr(1e8):
            (d / "results.json").unlink()  # the lrs above the optimum never finished
    assert main(["fit", str(edge), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "minimum at the grid's highest lr" in out and "grid argmin" in out
    sizes, skipped = collect(edge)
    assert len(skipped) == 3 and all("no results.json" in s for s in skipped)


# --- The law in training ---

def test_lr_spec_values_and_keyed_errors(corpus, tmp_path):
    cfg = compose("experiment=smoke", f"paths.data={corpus}", "optim.lr=law")
    validate(cfg)
    n = 98_624  # smoke decoder: dim 64, 2 layers (test_params checks the counting)
    s = resolve(cfg.optim, n)
    assert s.lr == pytest.approx(math.exp(A * math.log(n) + B)) and s.law is MM1_LAW
    assert s.weight_decay == 0.1 and s.record()["optim/lr_from_law"] == s.lr and s.record()["optim/N"] == n
    law = tmp_path / "lr_law.json"
    law.write_text(json.dumps({"a": -0.5, "b": -1.0}))
    cfg = compose("experiment=smoke", f"paths.data={corpus}", f"optim.lr=law:{law}")
    validate(cfg)
    assert resolve(cfg.optim, n).lr == pytest.approx(math.exp(-0.5 * math.log(n) - 1.0))
    assert resolve(compose("experiment=smoke", "optim.lr=1").optim, n).lr == 1.0  # an int is fine
    (tmp_path / "bad.json").write_text("{not json")
    for value, words in [("lawx", ["optim.lr='lawx'", "expected a number, 'law'"]),
                         (f"law:{tmp_path}/missing.json", ["optim.lr='law:", "no such file"]),
                         (f"law:{tmp_path}/bad.json", ["not an lr law file"]),
                         ("-0.001", ["optim.lr=-0.001", "must be > 0"]),
                         ("law:", ["'law:' needs a file"])]:
        with pytest.raises(ConfigError) as err:
            validate(compose("experiment=smoke", f"paths.data={corpus}", f"optim.lr={value}"))
        for w in words:
            assert w in str(err.value), (value, str(err.value))


def adamw_step(p0, g, lr, wd, betas=(0.9, 0.95), eps=1e-8):
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd, betas=betas, eps=eps)
    p.grad = g.clone()
    opt.step()
    return p.detach()


def test_weight_decay_rule_matches_mm1_decoupled_step_by_hand():
    """One AdamW step with torch weight_decay=0.1 equals MM1's decoupled update with
    lambda = 0.1 x eta, at the peak and at a scheduled lr_t = s_t x eta."""
    torch.manual_seed(0)
    p0, g = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    eta = MM1_LAW.lr(85e6)
    lam = 0.1 * eta  # MM1: decoupled decay, not multiplied by the lr
    b1, b2, eps = 0.9, 0.95, 1e-8
    # Adam's first step by hand: bias-corrected moments m_hat = g, v_hat = g^2.
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g * g / (1 - b2)
    step = m_hat / (v_hat.sqrt() + eps)
    for s in (1.0, 0.37):  # peak, and somewhere on the schedule
        by_hand = p0 - s * lam * p0 - s * eta * step
        torch_wd = torch_weight_decay(0.1, None, eta)
        assert torch_wd == 0.1
        assert torch.allclose(adamw_step(p0, g, s * eta, torch_wd), by_hand, rtol=0, atol=1e-15)
    # A value quoted in the decoupled convention converts to lambda / eta ...
    assert torch_weight_decay(0.1, lam, eta) == pytest.approx(0.1)
    lam2 = 3e-6
    assert torch.allclose(adamw_step(p0, g, eta, torch_weight_decay(0.1, lam2, eta)),
                          p0 - lam2 * p0 - eta * step, rtol=0, atol=1e-15)
    # ... while taking MM1's 0.1 x eta literally as torch's weight_decay decays eta times too little.
    wrong = adamw_step(p0, g, eta, lam)
    assert not torch.allclose(wrong, p0 - lam * p0 - eta * step, rtol=0, atol=1e-12)


def test_training_with_fitted_law_logs_it(corpus, tmp_path):
    law = tmp_path / "lr_law.json"
    law.write_text(json.dumps({"a": -0.4, "b": -0.9}))
    runs = tmp_path / "runs"
    res = run_cli(train_args(corpus, runs, f"optim.lr=law:{law}", "optim.decoupled_weight_decay=1e-4",
                             "train.max_steps=2", "optim.warmup_steps=0", "eval.at_end=false",
                             "logger=none"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    n = 98_624
    lr = math.exp(-0.4 * math.log(n) - 0.9)
    assert f"lr {lr:.4g} from ln(lr) = -0.4000 ln(N) - 0.9000 ({law}) at N=98,624" in res.stdout
    (run,) = runs.glob("smoke/*")
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["optim/lr_from_law"] == pytest.approx(lr) and first["optim/N"] == n
    assert first["optim/weight_decay"] == pytest.approx(1e-4 / lr)
    results = json.loads((run / "results.json").read_text())
    assert results["optim"]["lr"] == pytest.approx(lr) and results["optim"]["N"] == n
    assert results["optim"]["decoupled_weight_decay"] == pytest.approx(1e-4)
    bad = run_cli(train_args(corpus, tmp_path / "bad", "optim.lr=lawx"), timeout=120)
    assert bad.returncode != 0 and "optim.lr='lawx'" in bad.stderr
    assert "[ablate] params" not in bad.stdout  # nothing started, nothing written
    assert not list((tmp_path / "bad").rglob("checkpoints")) and not list((tmp_path / "bad").rglob("results.json"))


# --- A real sweep ---

def test_tiny_real_sweep_fits_law_and_skips_finished_runs(corpus, tmp_path):
    """ablate-lr sweep: 2 sizes x 3 lrs, a few CPU steps each, then the fit; a rerun
    trains nothing."""
    runs = tmp_path / "runs"
    args = ["-m", "sweeps.lr_law", "sweep", "--sizes", "lr_xs,lr_s", "--lrs", "3e-3,3e-2,3e-1",
            "--data", str(corpus), "--preset", "tiny", "--runs", str(runs),
            "train.max_steps=6", "optim.warmup_steps=1", "train.micro_batch_size=4",
            "train.global_batch_size=4", "eval.max_text=8", "logger=none"]
    res = run_cli(args, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    law = json.loads((runs / "lr_law" / "lr_law.json").read_text())
    assert [s["n"] for s in law["sizes"]] == [98_624, 304_800]  # the lr_xs / lr_s ladder
    assert all(s["lrs"] == [3e-3, 3e-2, 3e-1] for s in law["sizes"])
    assert all(math.isfinite(s["best_lr"]) and 3e-3 <= s["best_lr"] <= 3e-1 for s in law["sizes"])
    assert law["dof"] == 0 and law["a_ci"] is None  # two sizes: a line, no interval
    assert math.isfinite(law["a"]) and math.isfinite(law["b"])
    assert (runs / "lr_law" / "lr_law.png").read_bytes().startswith(b"\x89PNG")
    assert "fit: ln(lr) = a ln(N) + b" in res.stdout
    print(f"real sweep: a = {law['a']:.4f}, b = {law['b']:.4f}, best lr "
          + ", ".join(f"{s['n']}: {s['best_lr']:.4g} ({s['method']})" for s in law["sizes"]))
    again = run_cli(args + ["--no-fit"], timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("already finished; skipping") == 6 and "[ablate] params" not in again.stdout


def test_sweep_file_grid():
    import yaml

    params = yaml.safe_load((REPO / "conf" / "sweep" / "lr_law.yaml").read_text())["hydra"]["sweeper"]["params"]
    sizes = params["decoder"].split(",")
    lrs = [float(v) for v in str(params["optim.lr"]).split(",")]
    assert sizes == ["lr_xs", "lr_s", "lr_m", "lr_l"] and len(lrs) == 6
    assert np.allclose(np.diff(np.log(lrs)), math.log(2))  # log-spaced, factor 2


def test_predict_prints_the_law_at_n_and_for_a_config(capsys):
    assert main(["predict", "9e6", "1.2e9"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.0006747" in out and "lr = 8.583e-05" in out
    assert main(["predict", "experiment=mm1/full"]) == 0  # N of its decoder on the meta device
    assert "N =  2,818,747,392  lr = 5.989e-05" in capsys.readouterr().out
