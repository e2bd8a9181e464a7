"""Mixture-of-experts FFN: routing and its losses, the dropless torch backend against a
naive per-token loop and against the dense SwiGLU, the MegaBlocks weight mapping, the
``ffn`` config slot, parameter counts, and one short training run. GPU tests (marked
``gpu``) check the MegaBlocks backend against the torch backend."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ablate.strategy import aux_stats
from ablate.tracking import read_metrics
from ablate.validate import ConfigError, validate
from models.decoder.transformer import Transformer
from models.layers import SwiGLU
from models.moe import DenseFFN, MoE, MoEFFN, active_params, load_balance_loss, z_loss
from models.moe.megablocks import (
    INSTALL_HINT, experts_from_megablocks, experts_to_megablocks, from_megablocks_state,
    to_megablocks_state,
)
from models.utils import count_params
from tests.conftest import compose, run_cli, train_args

D, F_, E = 16, 8, 4  # model width, expert width, experts
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def moe(**kw) -> MoE:
    args = dict(dim=D, num_experts=E, top_k=2, expert_hidden=F_, lb_weight=0.01, z_weight=0.001)
    return MoE(**{**args, **kw})


def expert_fn(m: MoE, e: int, x):
    """Expert e as the plain SwiGLU formula of the documented layout."""
    ex = m.experts
    return (F.silu(x @ ex.w1[e].T) * (x @ ex.w3[e].T)) @ ex.w2[e].T


def naive(m: MoE, x_ND):
    """For each token on its own: sum of its top-k experts' outputs times its gate weights."""
    rows = []
    for x in x_ND:
        probs = (x.float() @ m.router.weight.float().T).softmax(-1)
        w, idx = probs.topk(m.top_k)
        if m.router.renormalize:
            w = w / w.sum()
        y = sum(w[j] * expert_fn(m, int(idx[j]), x) for j in range(m.top_k))
        if m.shared is not None:
            y = y + m.shared(x)
        rows.append(y)
    return torch.stack(rows)


# ---------------------------------------------------------------- equivalences


@pytest.mark.parametrize("renormalize", [True, False])
def test_one_expert_top1_equals_dense_swiglu(renormalize):
    dense = SwiGLU(D, F_)
    m = moe(num_experts=1, top_k=1, renormalize=renormalize)
    with torch.no_grad():
        m.experts.w1[0] = dense.w1.weight
        m.experts.w3[0] = dense.w3.weight
        m.experts.w2[0] = dense.w2.weight
    x = torch.randn(3, 5, D)
    y, aux_loss, aux = m(x)
    torch.testing.assert_close(y, dense(x))
    # One expert: the router is uniform and balanced by construction.
    assert float(aux["moe/layer0/lb_loss"]) == pytest.approx(1.0)
    assert float(aux["moe/layer0/imbalance"]) == pytest.approx(1.0)


@pytest.mark.parametrize("num_shared,renormalize", [(0, True), (0, False), (2, True), (2, False)])
def test_torch_backend_equals_naive_loop_outputs_and_gradients(num_shared, renormalize):
    m = moe(num_shared=num_shared, shared_hidden=6, renormalize=renormalize)
    x = torch.randn(24, D, requires_grad=True)
    params = [x, *m.parameters()]
    y, _, _ = m(x)
    y_ref = naive(m, x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
    assert grads[-1 if num_shared else 1].abs().sum() > 0  # the shared expert / router learn


@pytest.mark.parametrize("top_k", [1, 2])
def test_no_token_dropped_under_extreme_imbalance(top_k):
    m = moe(top_k=top_k)
    x = torch.randn(64, D).abs()  # positive features: a positive router row wins every token
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 2.0  # wins every token, yet softmax does not underflow the others
        m.router.weight[1] = 1.0
    y, _, aux = m(x)
    counts = aux["moe/layer0/tokens_per_expert"]
    assert counts.tolist() == ([64.0, 0, 0, 0] if top_k == 1 else [64.0, 64.0, 0, 0])
    assert float(aux["moe/layer0/imbalance"]) == pytest.approx(E / top_k)
    assert (y.abs().sum(-1) > 0).all()  # every token got its experts' output
    torch.testing.assert_close(y, naive(m, x))


# ---------------------------------------------------------------- losses and statistics


def test_lb_loss_is_one_when_uniform_and_grows_with_imbalance():
    m = moe(lb_weight=0.5, z_weight=0.0)
    x = torch.randn(32, D).abs()
    with torch.no_grad():
        m.router.weight.zero_()  # every probability 1/E
    _, aux_loss, aux = m(x)
    assert float(aux["moe/layer0/lb_loss"]) == pytest.approx(1.0)
    assert float(aux_loss.detach()) == pytest.approx(0.5)
    losses = []
    for scale in (0.0, 0.02, 0.05, 0.2, 1.0):
        with torch.no_grad():
            m.router.weight[0] = scale  # pull more and more probability to expert 0
        losses.append(float(m(x)[2]["moe/layer0/lb_loss"]))
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(E / m.top_k, rel=1e-3)  # all of it on expert 0 (+ one more)
    # The formula on a hand-made routing: E * sum_e f_e * P_e.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
    counts = torch.tensor([2, 1, 1, 0])  # top-2 of the two tokens
    f, P = counts / 4.0, probs.mean(0)
    assert float(load_balance_loss(probs, counts, top_k=2)) == pytest.approx(4 * float((f * P).sum()))


def test_z_loss_formula():
    logits = torch.randn(10, E, dtype=torch.float64) * 3
    by_hand = torch.log(torch.exp(logits).sum(-1)) ** 2
    assert float(z_loss(logits)) == pytest.approx(float(by_hand.mean()))
    m = moe(lb_weight=0.0, z_weight=0.25)
    x = torch.randn(12, D)
    _, aux_loss, aux = m(x)
    logits = x @ m.router.weight.T
    z = float((torch.logsumexp(logits, -1) ** 2).mean().detach())
    assert float(aux["moe/layer0/z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(aux_loss.detach()) == pytest.approx(0.25 * z, rel=1e-5)


def test_decoder_sums_layer_losses_and_keeps_stats_per_layer():
    ffn = MoEFFN(num_experts=E, top_k=2, expert_hidden=F_, every=2, offset=1, lb_weight=0.1, z_weight=0.01)
    dec = Transformer(97, dim=D, n_layers=4, n_heads=2, ffn=ffn)
    out = dec(torch.randn(2, 6, D))
    assert {k.split("/")[1] for k in out.aux} == {"layer1", "layer3"}
    expected = sum(0.1 * out.aux[f"moe/layer{i}/lb_loss"] + 0.01 * out.aux[f"moe/layer{i}/z_loss"]
                   for i in (1, 3))
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss.requires_grad and not any(v.requires_grad for v in out.aux.values())
    counts = out.aux["moe/layer1/tokens_per_expert"]
    assert counts.sum() == 2 * 6 * 2
    assert float(out.aux["moe/layer1/imbalance"]) == pytest.approx(float(counts.max() / counts.mean()))
    assert 0 < float(out.aux["moe/layer1/entropy"]) <= math.log(E) + 1e-6
    out.aux_loss.backward()  # the aux losses reach the routers
    assert dec.layers[1].ffn.router.weight.grad.abs().sum() > 0
    stats = aux_stats(out.aux)  # what the training loop receives
    assert isinstance(stats["moe/layer3/imbalance"], float)
    assert stats["moe/layer1/tokens_per_expert"] == counts.tolist()


# ---------------------------------------------------------------- decoder, layout, counts


def test_dense_ffn_keeps_parameter_names_and_init():
    torch.manual_seed(1)
    plain = Transformer(97, dim=32, n_layers=3, n_heads=4).state_dict()
    torch.manual_seed(1)
    dense = Transformer(97, dim=32, n_layers=3, n_heads=4, ffn=DenseFFN()).state_dict()
    assert list(plain) == list(dense)
    assert all(torch.equal(plain[k], dense[k]) for k in plain)


def test_one_expert_decoder_with_dense_weights_computes_the_dense_function():
    """The parameter layout upcycling relies on: dense ``ffn.w*.weight`` -> ``experts.w*[0]``."""
    dense = Transformer(97, dim=32, n_layers=2, n_heads=4)
    one = Transformer(97, dim=32, n_layers=2, n_heads=4,
                      ffn=MoEFFN(num_experts=1, top_k=1, lb_weight=0.0, z_weight=0.0))
    state = {}
    for k, v in dense.state_dict().items():
        if ".ffn.w" in k:  # layers.i.ffn.w1.weight -> layers.i.ffn.experts.w1
            k = k.replace(".ffn.", ".ffn.experts.").removesuffix(".weight")
            v = v[None]
        state[k] = v
    state.update({k: v for k, v in one.state_dict().items() if k.endswith("router.weight")})
    one.load_state_dict(state)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(one(x).logits, dense(x).logits)
    assert float(one(x).aux_loss.detach()) == 0.0


def test_every_and_offset_choose_the_moe_layers():
    assert MoEFFN(every=2, offset=1).moe_layers(6) == [1, 3, 5]  # MM1: every 2nd layer
    assert MoEFFN(every=4, offset=3).moe_layers(8) == [3, 7]
    assert MoEFFN().moe_layers(3) == [0, 1, 2]
    dec = Transformer(97, dim=D, n_layers=4, n_heads=2, ffn=MoEFFN(num_experts=2, top_k=1, every=2))
    assert [isinstance(b.ffn, MoE) for b in dec.layers] == [True, False, True, False]
    with pytest.raises(ValueError, match="^offset=4"):
        MoEFFN(offset=4).check_depth(4)


def test_parameter_counts_total_and_active():
    dim, n_layers, hidden, vocab = 32, 4, 64, 97
    Ex, k, Fe, S, Fs = 8, 2, 24, 2, 16
    ffn = MoEFFN(num_experts=Ex, top_k=k, expert_hidden=Fe, num_shared=S, shared_hidden=Fs, every=2, offset=1)
    dec = Transformer(vocab, dim=dim, n_layers=n_layers, n_heads=4, ffn_hidden=hidden, ffn=ffn)
    dense = Transformer(vocab, dim=dim, n_layers=n_layers, n_heads=4, ffn_hidden=hidden)
    moe_layer = Ex * dim + Ex * 3 * Fe * dim + 3 * dim * S * Fs  # router + experts + shared
    n_moe = 2
    assert count_params(dec) == count_params(dense) + n_moe * (moe_layer - 3 * dim * hidden)
    layer = dec.layers[1].ffn
    assert count_params(layer) == moe_layer
    assert layer.active_params() == Ex * dim + k * 3 * Fe * dim + 3 * dim * S * Fs
    assert active_params(dec) == count_params(dec) - n_moe * (Ex - k) * 3 * Fe * dim
    assert active_params(dense) == count_params(dense)
    with torch.device("meta"):  # parameter counting of big presets happens on meta
        meta = Transformer(vocab, dim=dim, n_layers=n_layers, n_heads=4, ffn_hidden=hidden, ffn=ffn)
    assert active_params(meta) == active_params(dec)


# ---------------------------------------------------------------- MegaBlocks mapping (CPU)


def test_megablocks_weight_mapping_round_trip_and_meaning():
    m = moe(num_shared=1, shared_hidden=4)
    ours = m.state_dict()
    theirs = to_megablocks_state(ours)
    assert set(theirs) == {"router.layer.weight", "experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2",
                           "shared.w1.weight", "shared.w3.weight", "shared.w2.weight"}
    assert all(theirs[f"experts.mlp.{n}"].shape == (E * F_, D) for n in ("w1", "v1", "w2"))
    back = from_megablocks_state(theirs)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # MegaBlocks' GLU on rows [e*F, (e+1)*F): silu(x w1_e^T) * (x v1_e^T), then times w2_e.
    w1, v1, w2 = experts_to_megablocks(m.experts.w1, m.experts.w2, m.experts.w3)
    x = torch.randn(5, D)
    for e in range(E):
        rows = slice(e * F_, (e + 1) * F_)
        y = (F.silu(x @ w1[rows].T) * (x @ v1[rows].T)) @ w2[rows]
        torch.testing.assert_close(y, expert_fn(m, e, x))
    again = experts_from_megablocks(w1, v1, w2, E)
    for got, want in zip(again, (m.experts.w1, m.experts.w2, m.experts.w3)):
        assert torch.equal(got, want)
    # The views carry gradients back to our parameters.
    w2.sum().backward()
    assert torch.equal(m.experts.w2.grad, torch.ones_like(m.experts.w2))


def test_megablocks_backend_builds_anywhere_and_explains_how_to_install():
    m = moe(backend="megablocks")  # construction never imports megablocks
    assert set(m.state_dict()) == set(moe().state_dict())
    try:
        import megablocks  # noqa: F401
    except (ImportError, OSError):
        with pytest.raises(ImportError, match="--no-deps --no-build-isolation"):
            m(torch.randn(4, D))
    else:
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="CUDA only"):
                m(torch.randn(4, D))


# ---------------------------------------------------------------- config slot


def test_ffn_moe_composes_and_validates():
    cfg = compose("ffn=moe", "ffn.num_shared=1", "ffn.every=2", "ffn.offset=1")
    validate(cfg, check_paths=False)
    assert cfg.ffn.top_k == 2 and cfg.ffn.backend == "torch"
    assert compose().ffn._target_ == "models.moe.DenseFFN"


BAD_FFN = [
    (["ffn.top_k=9"], "ffn.top_k=9"),
    (["ffn.num_experts=0"], "ffn.num_experts=0"),
    (["ffn.backend=cuda"], "ffn.backend='cuda'"),
    (["ffn.offset=4"], "ffn.offset=4"),  # the tiny decoder has layers 0-3
    (["ffn.lb_weight=-1"], "ffn.lb_weight=-1"),
    (["ffn.top_k=two"], "ffn.top_k: expected int"),
    (["+ffn.topk=2"], "ffn.topk: unknown key"),
]


@pytest.mark.parametrize("overrides,words", BAD_FFN, ids=[w.split(":")[0] for _, w in BAD_FFN])
def test_bad_ffn_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        validate(compose("ffn=moe", *overrides), check_paths=False)
    assert words in str(err.value), str(err.value)


# ---------------------------------------------------------------- end to end


def test_train_with_moe_adds_aux_loss_and_learns(corpus, tmp_path: Path):
    """``ffn=moe`` through ablate-train (two MoE layers): with a load-balancing weight of 1
    the first logged loss sits ~2 above the untrained LM loss (~ln V; each router starts
    near uniform, so its unweighted lb loss is ~1), and training brings the loss down."""
    runs = tmp_path / "runs"
    res = run_cli(train_args(corpus, runs, "ffn=moe", "ffn.num_experts=4", "ffn.lb_weight=1.0",
                             "train.max_steps=12", "train.ckpt_every=0", "eval.at_end=false"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    (metrics,) = runs.rglob("metrics.jsonl")
    records = [r for r in read_metrics(metrics.parent) if "train/loss" in r]
    vocab = len(json.loads((corpus / "tokenizer.json").read_text())["model"]["vocab"])
    first = records[0]["train/loss"]
    assert math.log(vocab) + 1.5 < first < math.log(vocab) + 2.6, (first, math.log(vocab))
    last = sum(r["train/loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    # The logged split: train/loss = lm_loss + aux_loss, and router statistics per MoE
    # layer (two layers of a 2-layer smoke decoder with every=1).
    r = records[0]
    assert r["train/loss"] == pytest.approx(r["train/lm_loss"] + r["train/aux_loss"], abs=1e-5)
    assert 0.9 < r["train/aux_loss"] < 2.6
    layers = sorted({k.split("/")[1] for k in r if k.startswith("moe/")})
    assert layers == ["layer0", "layer1"], layers
    for layer in layers:
        load = r[f"moe/{layer}/expert_load"]
        assert len(load) == 4 and sum(load) == pytest.approx(1.0)
        assert r[f"moe/{layer}/imbalance_window"] == pytest.approx(max(load) * 4)
        assert 0 < r[f"moe/{layer}/entropy"] <= math.log(4) + 1e-6
        assert r[f"moe/{layer}/imbalance"] >= 1.0


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@CUDA
def test_torch_backend_on_cuda_matches_cpu():
    m = moe(num_shared=1, shared_hidden=8)
    x = torch.randn(64, D)
    y_cpu, loss_cpu, _ = m(x)
    y_gpu, loss_gpu, _ = m.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("num_shared,renormalize", [(0, True), (2, False)])
def test_megablocks_matches_torch_backend(num_shared, renormalize):
    """Same weights and routing: outputs, losses, router statistics and every gradient of
    the megablocks backend agree with the torch backend within bf16 tolerance, and
    MegaBlocks' global loss list is empty after each forward, in training and eval."""
    pytest.importorskip("megablocks", reason=INSTALL_HINT)
    from megablocks.layers import moe as mb_moe

    dim, hidden, experts, top_k = 256, 256, 8, 2
    kw = dict(dim=dim, num_experts=experts, top_k=top_k, expert_hidden=hidden, num_shared=num_shared,
              shared_hidden=128, renormalize=renormalize, lb_weight=0.01, z_weight=0.001)
    ref = MoE(**kw, backend="torch").cuda().bfloat16()
    mb = MoE(**kw, backend="megablocks").cuda().bfloat16()
    mb.load_state_dict(ref.state_dict())
    x = torch.randn(4, 256, dim, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    results = []
    for model in (ref, mb):
        xi = x.clone().requires_grad_(True)
        y, aux_loss, aux = model(xi)
        assert mb_moe.get_load_balancing_loss() == []
        ((y.float() * g.float()).sum() + aux_loss).backward()
        results.append((y, aux_loss, aux, xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y0, l0, a0, gx0, gp0), (y1, l1, a1, gx1, gp1) = results
    assert rel_err(y1, y0) < 2e-2
    assert float(l1) == pytest.approx(float(l0), rel=2e-2)
    assert torch.equal(a1["moe/layer0/tokens_per_expert"], a0["moe/layer0/tokens_per_expert"])
    assert float(a1["moe/layer0/lb_loss"]) == pytest.approx(float(a0["moe/layer0/lb_loss"]), rel=1e-3)
    assert rel_err(gx1, gx0) < 2e-2
    for name in gp0:
        assert rel_err(gp1[name], gp0[name]) < 3e-2, name
    mb.eval()
    with torch.no_grad():
        y_eval = mb(x)[0]
    assert mb_moe.get_load_balancing_loss() == []
    assert rel_err(y_eval, ref.eval()(x)[0]) < 2e-2
