"""Behaviour of the vision-language connectors (linear, attnpool, c_abstractor,
d_abstractor, molmo): token counts, gradients, closed-form parameter counts at test
and published sizes, one training step through the full model from the composed
config, other resolutions, and each variant's own maths (deformable sampling,
pooling checks, odd grids)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ablate.validate import ConfigError, validate
from models.connectors.attnpool import AttnPoolConnector
from models.connectors.c_abstractor import CAbstractor
from models.connectors.d_abstractor import DAbstractor, DeformableCrossAttention
from models.connectors.linear import LinearConnector
from models.connectors.molmo import MolmoConnector
from models.utils import count_params
from tests.conftest import compose

CONF = Path(__file__).resolve().parents[1] / "conf" / "connector"
D, M, G = 16, 24, 6  # encoder width, decoder width, patch-grid side of the unit tests
N = G * G


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- closed-form counts


def mlp_count(i: int, h: int, o: int, depth: int) -> int:
    """Linear layers i -> h -> ... -> h -> o (``models.layers.mlp``, the readouts)."""
    if depth == 1:
        return i * o + o
    return i * h + h + (depth - 2) * (h * h + h) + h * o + o


def attention_count(q: int, kv: int, inner: int, out: int) -> int:
    return (q * inner + inner) + 2 * (kv * inner + inner) + (inner * out + out)


def linear_count(d, m, n) -> int:
    return d * m + m


def attnpool_count(d, m, n, num_tokens, heads, depth) -> int:
    return num_tokens * d + 2 * d + attention_count(d, d, d, d) + mlp_count(d, m, m, depth)


def bottleneck_count(ci: int, c: int, se_ratio: float) -> int:
    """1x1 conv + LN, depthwise 3x3 + LN, SE (two biased 1x1), 1x1 conv + LN, shortcut."""
    n = (ci * c + 2 * c) + (9 * c + 2 * c) + (c * c + 2 * c)
    se = round(ci * se_ratio)
    if se:
        n += (c * se + se) + (se * c + c)
    if ci != c:
        n += ci * c + 2 * c
    return n


def c_abstractor_count(d, m, n, num_tokens, hidden_dim, depth, mlp_depth, se_ratio) -> int:
    c = hidden_dim
    blocks = bottleneck_count(d, c, se_ratio) + (2 * depth - 1) * bottleneck_count(c, c, se_ratio)
    readout = c * m + m + (mlp_depth - 1) * (m * m + m)
    return n * d + blocks + readout  # position embedding first


def d_abstractor_count(d, m, n, num_tokens, hidden_dim, layers, heads, points, ffn_dim) -> int:
    c, f, hp = hidden_dim, ffn_dim or 4 * hidden_dim, heads * points
    deformable = (c * c + c) + (c * 2 * hp + 2 * hp) + (c * hp + hp) + (c * c + c)
    layer = 3 * 2 * c + attention_count(c, c, c, c) + deformable + mlp_count(c, f, c, 2)
    stem = (d * c + c + 2 * c) + num_tokens * c + 2 * num_tokens  # input proj, queries, refs
    return stem + layers * layer + 2 * c + c * m + m


def molmo_count(d, m, n, encoder_layers, heads, hidden_dim) -> int:
    a = d // len(encoder_layers)
    return attention_count(d, d, a, a) + 2 * a * hidden_dim + hidden_dim * m


# ---------------------------------------------------------------- the variants

# name: (class, small kwargs, closed form, tokens at G=6, tokens at G=8, full-model overrides)
CASES = {
    "linear": (LinearConnector, {}, linear_count, 36, 64, []),
    "attnpool": (AttnPoolConnector, dict(num_tokens=5, heads=2, depth=2), attnpool_count, 5, 5,
                 ["connector.num_tokens=8", "connector.heads=2"]),
    "c_abstractor": (CAbstractor, dict(num_tokens=9, hidden_dim=8, depth=2, mlp_depth=2, se_ratio=0.25),
                     c_abstractor_count, 9, 9,
                     ["connector.num_tokens=4", "connector.hidden_dim=32", "connector.depth=1"]),
    "d_abstractor": (DAbstractor, dict(num_tokens=9, hidden_dim=8, layers=2, heads=2, points=3, ffn_dim=12),
                     d_abstractor_count, 9, 9,
                     ["connector.num_tokens=4", "connector.hidden_dim=32", "connector.layers=2",
                      "connector.heads=2", "connector.points=2"]),
    # in_dim = 2 x D: two encoder layers concatenated.
    "molmo": (MolmoConnector, dict(encoder_layers=[-1, -2], heads=2, hidden_dim=20), molmo_count, 9, 16,
              ["connector.encoder_layers=[-1,-2]", "connector.heads=2", "connector.hidden_dim=32"]),
}
NAMES = list(CASES)


def small(name: str, in_dim: int | None = None, num_patches: int = N):
    cls, kwargs, *_ = CASES[name]
    in_dim = in_dim or (2 * D if name == "molmo" else D)
    return cls(in_dim, M, num_patches, **kwargs), in_dim


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_token_count(name):
    conn, in_dim = small(name)
    out = conn(torch.randn(3, N, in_dim))
    assert conn.num_tokens == CASES[name][3]
    assert out.shape == (3, conn.num_tokens, M) and torch.isfinite(out).all()
    assert (conn.in_dim, conn.out_dim) == (in_dim, M)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_features(name):
    conn, in_dim = small(name)
    feats = torch.randn(2, N, in_dim, requires_grad=True)
    out = conn(feats)
    (out[0] * torch.randn_like(out[0])).sum().backward()
    assert feats.grad is not None and feats.grad[0].abs().sum() > 0
    # Image 0's tokens depend on image 0 only: no mixing across the batch.
    assert torch.equal(feats.grad[1], torch.zeros_like(feats.grad[1]))


@pytest.mark.parametrize("name", NAMES)
def test_param_count_closed_form(name):
    conn, in_dim = small(name)
    _, kwargs, formula, *_ = CASES[name]
    assert count_params(conn) == formula(in_dim, M, N, **kwargs)


def yaml_connector(name: str, in_dim: int, out_dim: int, num_patches: int):
    with torch.device("meta"):
        return instantiate(OmegaConf.load(CONF / f"{name}.yaml"))(
            in_dim=in_dim, out_dim=out_dim, num_patches=num_patches)


@pytest.mark.parametrize("name", NAMES)
def test_param_count_at_published_size(name):
    """CLIP ViT-L/14-336 features (1024 wide, 24x24 patches; Molmo's two layers give
    2048) into a 4096-wide decoder, with the yaml defaults."""
    in_dim = 2048 if name == "molmo" else 1024
    conn = yaml_connector(name, in_dim, 4096, 576)
    kwargs = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")).items()
              if not k.startswith("_")}
    if name == "molmo":
        kwargs["hidden_dim"] = kwargs["hidden_dim"] or 64 * math.ceil(8 * 4096 / 3 / 64)
    assert count_params(conn) == CASES[name][2](in_dim, 4096, 576, **kwargs)
    expected_tokens = {"linear": 576, "attnpool": 144, "c_abstractor": 144, "d_abstractor": 144, "molmo": 144}
    assert conn.num_tokens == expected_tokens[name]


@pytest.mark.parametrize("name", NAMES)
def test_other_resolution(name):
    """Built for a 6x6 grid, run on 8x8: pooled connectors keep their token count;
    linear and molmo follow the grid (documented in their modules)."""
    conn, in_dim = small(name)
    out = conn(torch.randn(2, 64, in_dim))
    assert out.shape == (2, CASES[name][4], M) and torch.isfinite(out).all()


# ---------------------------------------------------------------- full model, one step


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_through_the_model(name, corpus):
    from ablate.build import build_model
    from ablate.data.pipeline import build_train_loader
    from ablate.data.tokenizer import load_tokenizer
    from ablate.strategy import token_loss

    cfg = compose("experiment=smoke", f"paths.data={corpus}", f"connector={name}", *CASES[name][5])
    facts = validate(cfg)
    tok = load_tokenizer(corpus)
    model = build_model(cfg, tok.vocab_size, tok.image_id)
    assert facts["tokens_per_image"] == model.connector.num_tokens == model.tokens_per_image
    grid = (cfg.encoder.image_size // cfg.encoder.patch_size) ** 2
    expected = {"linear": grid, "molmo": math.ceil(math.isqrt(grid) / 2) ** 2}
    assert model.connector.num_tokens == expected.get(name, cfg.connector.get("num_tokens"))
    if name == "molmo":  # the encoder concatenates the two layers the connector asked for
        assert model.encoder.embed_dim == model.connector.in_dim == 2 * cfg.encoder.width

    batch = next(build_train_loader(
        corpus, tok, weights=dict(cfg.data.weights), seq_len=cfg.data.seq_len, micro_batch_size=2,
        tokens_per_image=facts["tokens_per_image"], image_size=facts["image_size"], num_workers=0,
        shuffle_buffer=cfg.data.shuffle_buffer))
    assert batch["images"].shape[0] > 0

    def loss_fn():
        out = model(batch["input_ids"], batch["images"], positions_BT=batch["positions"],
                    doc_ids_BT=batch["doc_ids"])
        return token_loss(out.logits, batch["labels"])[0] + out.aux_loss

    model.train()
    loss = loss_fn()
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient (unused parameter)"
            assert torch.isfinite(p.grad).all(), pname
    # Every connector tensor is actually used, not just reached by a zero gradient;
    # except, at step 0, the d_abstractor's norm2, whose only consumers (offset and
    # point-weight projections) start with zero weights, as in Deformable DETR.
    silent = [n for n, p in model.connector.named_parameters() if not p.grad.abs().sum() > 0]
    assert all(".norm2." in n for n in silent) and (name == "d_abstractor" or not silent), silent
    before = {n: p.detach().clone() for n, p in model.connector.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=3e-3).step()
    changed = [not torch.equal(before[n], p) for n, p in model.connector.named_parameters() if n not in silent]
    assert all(changed)
    with torch.no_grad():
        assert loss_fn() < loss.detach()


# ---------------------------------------------------------------- variant-specific maths


def test_deformable_zero_offsets_read_the_patch_under_the_reference():
    """With zero offsets every point samples the reference point; on a patch centre
    bilinear sampling returns exactly that patch's value projection."""
    C, h, P, g = 8, 2, 3, 5
    attn = DeformableCrossAttention(C, h, P).double()
    with torch.no_grad():
        attn.offsets.weight.zero_()
        attn.offsets.bias.zero_()
        attn.out.weight.copy_(torch.eye(C))
        attn.out.bias.zero_()
    value_BNC = torch.randn(2, g * g, C, dtype=torch.float64)
    q_BTC = torch.randn(2, 3, C, dtype=torch.float64)  # point weights vary, the read does not
    cells = [(0, 0), (1, 3), (4, 2)]  # (row, col) of each query's patch
    ref_BT2 = torch.tensor([[(c + 0.5) / g, (r + 0.5) / g] for r, c in cells], dtype=torch.float64)
    out = attn(q_BTC, ref_BT2.expand(2, -1, -1), value_BNC)
    expected = attn.value(value_BNC)[:, [r * g + c for r, c in cells]]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    # Half-way between two horizontal neighbours: their mean; offsets are in patch units.
    ref_mid = torch.tensor([[[(2 + 1.0) / g, (1 + 0.5) / g]]], dtype=torch.float64)
    mid = attn(q_BTC[:1, :1], ref_mid, value_BNC[:1])
    v = attn.value(value_BNC[:1])
    torch.testing.assert_close(mid[0, 0], (v[0, 1 * g + 2] + v[0, 1 * g + 3]) / 2, rtol=0, atol=1e-12)
    with torch.no_grad():
        attn.offsets.bias.fill_(-0.5)  # every point one half patch left and up
    shifted = attn(q_BTC[:1, :1], torch.tensor([[[2.0 / g, 2.0 / g]]], dtype=torch.float64), value_BNC[:1])
    torch.testing.assert_close(shifted[0, 0], v[0, 1 * g + 1], rtol=0, atol=1e-12)


def test_d_abstractor_reference_points_start_on_the_pooled_grid():
    conn, _ = small("d_abstractor")
    ref = conn.reference_points()
    centres = [(k + 0.5) / 3 for k in range(3)]
    expected = torch.tensor([[x, y] for y in centres for x in centres])
    torch.testing.assert_close(ref, expected)


@pytest.mark.parametrize("cls", [CAbstractor, DAbstractor])
@pytest.mark.parametrize("kwargs,arg", [
    (dict(num_patches=36, num_tokens=10), "num_tokens=10"),  # not a square
    (dict(num_patches=36, num_tokens=49), "num_tokens=49"),  # more than the patches
    (dict(num_patches=35, num_tokens=9), "num_patches=35"),
])
def test_pooling_connectors_reject_bad_token_grids(cls, kwargs, arg):
    with torch.device("meta"), pytest.raises(ValueError) as err:
        cls(in_dim=D, out_dim=M, **kwargs)
    assert str(err.value).startswith(arg), str(err.value)


def test_validate_names_the_connector_key(corpus):
    cfg = compose("experiment=smoke", f"paths.data={corpus}", "connector=c_abstractor",
                  "connector.num_tokens=25")  # the smoke grid has 16 patches
    with pytest.raises(ConfigError, match=r"connector\.num_tokens=25 exceeds num_patches=16"):
        validate(cfg)


@pytest.mark.parametrize("cls,kwargs,arg", [
    (AttnPoolConnector, dict(in_dim=D, out_dim=M, num_patches=N, heads=3), "heads=3"),
    (DAbstractor, dict(in_dim=D, out_dim=M, num_patches=N, num_tokens=9, hidden_dim=8, heads=3), "heads=3"),
    (CAbstractor, dict(in_dim=D, out_dim=M, num_patches=N, num_tokens=9, se_ratio=2.0), "se_ratio=2.0"),
    (MolmoConnector, dict(in_dim=33, out_dim=M, num_patches=N), "in_dim=33"),
    (MolmoConnector, dict(in_dim=32, out_dim=M, num_patches=N, heads=3), "heads=3"),
    (MolmoConnector, dict(in_dim=32, out_dim=M, num_patches=35, heads=2), "num_patches=35"),
    (MolmoConnector, dict(in_dim=32, out_dim=M, num_patches=N, encoder_layers=[]), "encoder_layers=[]"),
    (LinearConnector, dict(in_dim=0, out_dim=M, num_patches=N), "in_dim=0"),
])
def test_bad_arguments_raise_with_their_name(cls, kwargs, arg):
    with torch.device("meta"), pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert str(err.value).startswith(arg), str(err.value)


def test_molmo_odd_grid_pools_valid_patches_only():
    """A 5x5 grid is padded to 6x6: 9 windows; each token equals attention pooling over
    the window's real patches (mean query), as if the padding did not exist."""
    conn, in_dim = small("molmo", num_patches=25)
    assert conn.num_tokens == 9 and conn.encoder_layers == [-1, -2]
    feats = torch.randn(2, 25, in_dim)
    out = conn(feats)
    assert out.shape == (2, 9, M)
    grid = feats.view(2, 5, 5, in_dim)
    for t in range(9):
        r, c = divmod(t, 3)
        kv = grid[:, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2].reshape(2, -1, in_dim)  # 1, 2 or 4 patches
        pooled = conn.pool(kv.mean(1, keepdim=True), kv)
        torch.testing.assert_close(out[:, t], conn.proj(pooled)[:, 0])
