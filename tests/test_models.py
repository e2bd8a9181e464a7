"""Behaviour of the model pieces: shapes, parameter counts, masking equivalences,
image-token placement, argument validation, config instantiation and one learning step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.connectors.avgpool import AvgPoolConnector
from models.connectors.mlp import MLPConnector
from models.decoder.transformer import DecoderOutput, Transformer, default_ffn_hidden
from models.encoders.vit import ViT
from models.utils import count_params
from models.vlm import VLM

CONF = Path(__file__).resolve().parents[1] / "conf"
V = 97  # vocab for tests
IMG = 5  # image placeholder id


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_vit(**kw) -> ViT:
    args = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4)
    return ViT(**{**args, **kw})


def tiny_decoder(**kw) -> Transformer:
    args = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    return Transformer(**{**args, **kw})


def tiny_vlm(connector: str = "avgpool") -> VLM:
    enc, dec = tiny_vit(), tiny_decoder()
    if connector == "avgpool":
        conn = AvgPoolConnector(enc.embed_dim, dec.dim, enc.num_patches(), num_tokens=4)
    else:
        conn = MLPConnector(enc.embed_dim, dec.dim, enc.num_patches())
    return VLM(enc, conn, dec, image_token_id=IMG)


def vlm_batch(model: VLM, n_images: int = 2, prefix: int = 3):
    """Two sequences; sequence 0 holds image 0, sequence 1 holds image 1, after ``prefix`` text."""
    I = model.tokens_per_image
    ids = torch.randint(10, V, (2, prefix + I + 6))
    ids[:, prefix : prefix + I] = IMG
    images = torch.randn(n_images, 3, model.image_size, model.image_size)
    return ids, images


# ---------------------------------------------------------------- shapes and counts


def test_vit_shapes_and_resolution():
    vit = tiny_vit()
    assert (vit.embed_dim, vit.grid_size, vit.num_patches(), vit.num_patches(64)) == (32, 4, 16, 64)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    # Another resolution: position embeddings are interpolated to the new grid.
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)
    # Penultimate-layer features: the unused last block and the final norm are not built.
    vit2 = tiny_vit(feature_layer=-2)
    assert len(vit2.blocks) == 1 and isinstance(vit2.norm, torch.nn.Identity)
    assert vit2(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)


def test_vit_param_count_closed_form():
    W, L, P, C, image, ratio = 48, 3, 8, 3, 32, 4.0
    vit = ViT(image_size=image, patch_size=P, width=W, depth=L, heads=4, mlp_ratio=ratio, in_chans=C,
              feature_layer=-1)
    F_ = int(W * ratio)
    N = (image // P) ** 2
    patch = C * P * P * W + W  # conv weight + bias
    pos = N * W
    block = (
        2 * 2 * W  # two LayerNorms (weight + bias)
        + 3 * W * W + 3 * W  # qkv
        + W * W + W  # attention output projection
        + W * F_ + F_ + F_ * W + W  # MLP
    )
    final_norm = 2 * W
    assert count_params(vit) == patch + pos + L * block + final_norm
    # CLIP layout: class token and its position, ln_pre, no conv bias; mlp_dim overrides.
    clip = ViT(image_size=image, patch_size=P, width=W, depth=L, heads=4, in_chans=C, mlp_dim=F_,
               feature_layer=-1, class_token=True, pre_norm=True, patch_bias=False)
    assert count_params(clip) == count_params(vit) + 2 * W + 2 * W - W
    # Penultimate features (the default): the last block and the final norm are not built.
    assert count_params(ViT(image_size=image, patch_size=P, width=W, depth=L, heads=4, mlp_ratio=ratio,
                            in_chans=C)) == patch + pos + (L - 1) * block


def test_vit_feature_layer_list_concatenates_in_order():
    # Molmo-style: blocks 1 and 0 of a 4-block tower, concatenated in list order.
    vit = tiny_vit(depth=4, feature_layer=[-3, 0])
    assert len(vit.blocks) == 2 and vit.embed_dim == 64 and isinstance(vit.norm, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    first, second = vit(x).split(32, dim=-1)
    for feats, layer in ((first, 1), (second, 0)):
        single = tiny_vit(depth=4, feature_layer=layer)
        single.load_state_dict(vit.state_dict(), strict=False)  # block 1 is absent for layer 0
        torch.testing.assert_close(feats, single(x))
    assert not torch.allclose(first, second)


def test_connector_token_counts():
    feats = torch.randn(2, 64, 24)
    mlp = MLPConnector(in_dim=24, out_dim=40, num_patches=64)
    assert mlp.num_tokens == 64 and mlp(feats).shape == (2, 64, 40)
    pool = AvgPoolConnector(in_dim=24, out_dim=40, num_patches=64, num_tokens=16)
    assert pool.num_tokens == 16 and pool(feats).shape == (2, 16, 40)
    # MLP depth counts Linear layers.
    assert sum(isinstance(m, torch.nn.Linear) for m in MLPConnector(24, 40, 64, depth=3).modules()) == 3


def test_avgpool_pools_neighbouring_patches():
    # A 4x4 grid of scalars pooled to 2x2 averages each 2x2 quadrant of the grid.
    pool = AvgPoolConnector(in_dim=1, out_dim=1, num_patches=16, num_tokens=4, depth=1)
    with torch.no_grad():
        pool.proj[0].weight.fill_(1.0)
        pool.proj[0].bias.zero_()
    grid = torch.arange(16.0).reshape(1, 16, 1)
    expected = torch.tensor([[2.5], [4.5], [10.5], [12.5]])
    torch.testing.assert_close(pool(grid)[0], expected)


def test_decoder_shapes_and_non_embedding_count():
    D, L, H, K, Vv = 64, 3, 8, 2, 101
    dec = Transformer(vocab_size=Vv, dim=D, n_layers=L, n_heads=H, n_kv_heads=K)
    E, F_ = D // H, default_ffn_hidden(D)
    assert F_ % 64 == 0 and F_ >= 8 * D / 3
    per_layer = (
        D * H * E + 2 * D * K * E + H * E * D  # wq, wk, wv, wo
        + 3 * D * F_  # SwiGLU w1, w3, w2
        + 2 * D  # two RMSNorms
    )
    non_embedding = L * per_layer + D  # + final norm
    assert dec.num_params() == non_embedding
    assert dec.num_params(non_embedding=False) == non_embedding + 2 * Vv * D
    tied = Transformer(vocab_size=Vv, dim=D, n_layers=L, n_heads=H, n_kv_heads=K, tie_embeddings=True)
    assert tied.num_params() == non_embedding
    assert tied.num_params(non_embedding=False) == non_embedding + Vv * D
    out = dec(dec.embed(torch.randint(0, Vv, (2, 7))))
    assert isinstance(out, DecoderOutput)
    assert out.logits.shape == (2, 7, Vv) and out.aux_loss.shape == () and float(out.aux_loss) == 0.0


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny_decoder(n_heads=4, n_kv_heads=2)
    mha = tiny_decoder(n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    E = gqa.head_dim
    for key in list(state):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):
            # K heads -> H heads: each kv head serves n_heads / n_kv_heads query heads.
            state[key] = state[key].view(2, E, -1).repeat_interleave(2, dim=0).reshape(4 * E, -1)
    mha.load_state_dict(state)
    x = gqa.embed(torch.randint(0, V, (2, 9)))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits)
    assert tiny_decoder(n_heads=4, n_kv_heads=1)(x).logits.shape == (2, 9, V)


# ---------------------------------------------------------------- masking


def test_packed_docs_equal_separate_docs():
    dec = tiny_decoder()
    a, b = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    logits = dec(dec.embed(packed), positions_BT=positions, doc_ids_BT=doc_ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, :5], dec(dec.embed(a)).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[:, 5:], dec(dec.embed(b)).logits, atol=1e-5, rtol=1e-4)
    # Without the doc mask the second document would see the first.
    leaky = dec(dec.embed(packed), positions_BT=positions).logits
    assert not torch.allclose(leaky[:, 5:], logits[:, 5:], atol=1e-4)


def test_rope_uses_relative_positions():
    dec = tiny_decoder()
    x = dec.embed(torch.randint(0, V, (1, 8)))
    base = dec(x).logits
    # RoPE scores depend on position differences only: a uniform shift changes nothing...
    torch.testing.assert_close(dec(x, positions_BT=torch.arange(8)[None] + 100).logits, base,
                               atol=1e-4, rtol=1e-4)
    # ...while a gap in the middle changes every logit after it.
    gapped = dec(x, positions_BT=torch.tensor([[0, 1, 2, 3, 20, 21, 22, 23]])).logits
    torch.testing.assert_close(gapped[:, :4], base[:, :4])
    assert not torch.allclose(gapped[:, 4:], base[:, 4:], atol=1e-4)


def test_causal():
    dec = tiny_decoder()
    ids = torch.randint(0, V, (2, 10))
    ids2 = ids.clone()
    ids2[:, 6] = (ids2[:, 6] + 1) % V
    for doc_ids in (None, torch.zeros(2, 10, dtype=torch.long)):
        l1 = dec(dec.embed(ids), doc_ids_BT=doc_ids).logits
        l2 = dec(dec.embed(ids2), doc_ids_BT=doc_ids).logits
        torch.testing.assert_close(l1[:, :6], l2[:, :6])
        assert not torch.allclose(l1[:, 6:], l2[:, 6:])


# ---------------------------------------------------------------- VLM


@pytest.mark.parametrize("connector", ["avgpool", "mlp"])
def test_vlm_places_image_tokens(connector):
    model = tiny_vlm(connector)
    prefix = 3
    ids, images = vlm_batch(model, prefix=prefix)
    out = model(ids, images)
    assert out.logits.shape == (*ids.shape, V)
    images2 = images.clone()
    images2[1] += 1.0  # changes image 1 only, which lives in sequence 1
    out2 = model(ids, images2)
    torch.testing.assert_close(out.logits[0], out2.logits[0])  # sequence 0 untouched
    torch.testing.assert_close(out.logits[1, :prefix], out2.logits[1, :prefix])  # text before the image
    assert (out.logits[1, prefix:] - out2.logits[1, prefix:]).abs().amax(-1).gt(1e-6).all()
    # Image tokens are the connector output, spliced in order.
    img = model.encode_images(images)
    assert img.shape == (2, model.tokens_per_image, model.decoder.dim)


def test_vlm_placeholder_mismatch_raises():
    model = tiny_vlm()
    ids, images = vlm_batch(model)
    with pytest.raises(ValueError, match="placeholders"):
        model(ids, images[:1])
    with pytest.raises(ValueError, match="placeholders"):
        model(ids)  # placeholders but no images
    text = torch.randint(10, V, (2, 8))
    assert model(text).logits.shape == (2, 8, V)  # text-only batches need no images


def test_vlm_reuses_image_tokens_and_handles_empty_image_batches():
    model = tiny_vlm("mlp")
    ids, images = vlm_batch(model)
    reused = model(ids, image_tokens_NID=model.encode_images(images)).logits
    torch.testing.assert_close(reused, model(ids, images).logits)
    # A text-only micro-batch with an empty image tensor still touches every parameter.
    out = model(torch.randint(10, V, (2, 8)), torch.zeros(0, 3, model.image_size, model.image_size))
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradients_reach_encoder():
    model = tiny_vlm()
    ids, images = vlm_batch(model)
    model(ids, images).logits.square().mean().backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_frozen_encoder_gets_no_grad():
    enc = tiny_vit(frozen=True)
    assert count_params(enc, trainable_only=True) == 0 and count_params(enc) > 0
    assert not enc(torch.randn(1, 3, 32, 32, requires_grad=True)).requires_grad


def test_one_sgd_step_reduces_loss():
    model = tiny_vlm()
    ids, images = vlm_batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss_fn():
        logits = model(ids, images).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    before = loss_fn()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss_fn() < before.detach() - 1e-3


# ---------------------------------------------------------------- validation and construction


BAD_ARGS = [
    (ViT, dict(image_size=30, patch_size=16), "image_size"),
    (ViT, dict(width=100, heads=3), "width"),
    (ViT, dict(depth=3, feature_layer=3), "feature_layer"),
    (ViT, dict(depth=3, feature_layer=-4), "feature_layer"),
    (ViT, dict(depth=0), "depth"),
    (ViT, dict(mlp_ratio=-1.0), "mlp_ratio"),
    (ViT, dict(depth=3, feature_layer=[-1, 3]), "feature_layer"),
    (ViT, dict(feature_layer=[]), "feature_layer"),
    (ViT, dict(act="relu"), "act"),
    (ViT, dict(mlp_dim=0), "mlp_dim"),
    (ViT, dict(norm_eps=0.0), "norm_eps"),
    (ViT, dict(pretrained_format="openclip"), "pretrained_format"),
    (MLPConnector, dict(in_dim=8, out_dim=8, num_patches=16, depth=0), "depth"),
    (MLPConnector, dict(in_dim=0, out_dim=8, num_patches=16), "in_dim"),
    (MLPConnector, dict(in_dim=8, out_dim=8, num_patches=16, hidden_dim=-2), "hidden_dim"),
    (AvgPoolConnector, dict(in_dim=8, out_dim=8, num_patches=15, num_tokens=4), "num_patches"),
    (AvgPoolConnector, dict(in_dim=8, out_dim=8, num_patches=16, num_tokens=10), "num_tokens"),
    (AvgPoolConnector, dict(in_dim=8, out_dim=8, num_patches=16, num_tokens=25), "num_tokens"),
    (Transformer, dict(vocab_size=V, dim=64, n_heads=4, n_kv_heads=3), "n_heads"),
    (Transformer, dict(vocab_size=V, dim=30, n_heads=4), "dim"),
    (Transformer, dict(vocab_size=V, dim=24, n_heads=8), "dim"),  # odd head dim breaks RoPE
    (Transformer, dict(vocab_size=0), "vocab_size"),
    (Transformer, dict(vocab_size=V, n_layers=0), "n_layers"),
    (Transformer, dict(vocab_size=V, norm_eps=0.0), "norm_eps"),
    (Transformer, dict(vocab_size=V, init_std=-0.1), "init_std"),
]


@pytest.mark.parametrize("cls,kwargs,arg", BAD_ARGS, ids=[f"{c.__name__}-{a}" for c, _, a in BAD_ARGS])
def test_bad_argument_raises_with_its_name(cls, kwargs, arg):
    with torch.device("meta"), pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert str(err.value).startswith(f"{arg}="), str(err.value)


def test_vlm_checks_its_arguments():
    enc, dec = tiny_vit(), tiny_decoder()
    conn = MLPConnector(enc.embed_dim, dec.dim, enc.num_patches())
    with pytest.raises(ValueError, match="^image_token_id="):
        VLM(enc, conn, dec, image_token_id=V)
    with pytest.raises(ValueError, match="out_dim"):
        VLM(enc, MLPConnector(enc.embed_dim, dec.dim + 1, enc.num_patches()), dec, image_token_id=IMG)


def test_meta_device_construction_counts_like_real():
    def build():
        enc = ViT(image_size=224, patch_size=16, width=384, depth=12, heads=6)
        dec = Transformer(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4)
        conn = AvgPoolConnector(enc.embed_dim, dec.dim, enc.num_patches(), num_tokens=64)
        return VLM(enc, conn, dec, image_token_id=3)

    with torch.device("meta"):
        meta = build()
    assert all(p.is_meta for p in meta.parameters())
    assert meta.tokens_per_image == 64 and meta.image_size == 224
    small = tiny_vlm()
    with torch.device("meta"):
        small_meta = tiny_vlm()
    assert count_params(small_meta) == count_params(small)
    assert count_params(meta) > 30_000_000


def test_yaml_configs_instantiate():
    groups = {g: sorted((CONF / g).glob("*.yaml")) for g in ("encoder", "connector", "decoder")}
    assert all(groups.values())
    for path in [*groups["encoder"], *groups["connector"], *groups["decoder"]]:
        cfg = OmegaConf.load(path)
        assert cfg._partial_ is True and cfg._target_.startswith("models.")
        assert not {"in_dim", "out_dim", "num_patches", "decoder_layers"} & set(cfg), path
    # Every connector on every published-size encoder, joined into a VLM on the meta
    # device (cheap, real shapes); the tiny CPU pieces for real below.
    from ablate.build import build_model
    from tests.conftest import compose

    published = [p.stem for p in groups["encoder"] if p.stem not in ("vit_tiny", "vit_small")]
    assert len(published) >= 5
    with torch.device("meta"):
        for enc in published:
            for conn in groups["connector"]:
                cfg = compose(f"encoder={enc}", f"connector={conn.stem}", "decoder=small")
                model = build_model(cfg, vocab_size=1000, image_token_id=IMG)
                assert model.tokens_per_image >= 1

    enc = instantiate(OmegaConf.load(CONF / "encoder/vit_tiny.yaml"))()
    dec = instantiate(OmegaConf.load(CONF / "decoder/tiny.yaml"))(vocab_size=V)
    conn = instantiate(OmegaConf.load(CONF / "connector/avgpool.yaml"))(
        in_dim=enc.embed_dim, out_dim=dec.dim, num_patches=enc.num_patches()
    )
    model = VLM(enc, conn, dec, image_token_id=IMG)
    assert (enc.num_patches(), model.tokens_per_image, dec.dim, dec.n_kv_heads) == (64, 16, 128, 2)
    ids, images = vlm_batch(model, n_images=2)
    assert model(ids, images).logits.shape == (*ids.shape, V)
