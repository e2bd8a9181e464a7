"""Hyper-attention (mPLUG-Owl3): images reach the decoder through gated cross-attention
in chosen blocks, never as tokens; a text position sees only earlier images of its own
document; everything trains through the real pipeline and DeepSpeed."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose, run_cli, train_args
from models.connectors.hyper_attention import HyperAttentionConnector
from models.decoder.transformer import Transformer
from models.encoders.vit import ViT
from models.vlm import VLM

V, IMG = 97, 5


def tiny(layers=None, **kw) -> VLM:
    torch.manual_seed(0)
    enc = ViT(image_size=32, patch_size=8, width=32, depth=2, heads=4, feature_layer=-1)
    dec = Transformer(vocab_size=V, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=128)
    conn = HyperAttentionConnector(enc.embed_dim, dec.dim, enc.num_patches(), dec.n_layers,
                                   layers=layers, heads=4, **kw)
    return VLM(enc, conn, dec, image_token_id=IMG)


def batch(T=12, image_at=(4,)):
    ids = torch.randint(10, V, (1, T))
    for t in image_at:
        ids[0, t] = IMG
    return ids, torch.randn(len(image_at), 3, 32, 32)


def test_one_placeholder_per_image_and_chosen_blocks():
    model = tiny()
    assert model.tokens_per_image == 1 and model.connector.num_tokens == 16
    assert model.connector.layers == [1]  # first=1, every=8 in a 3-block decoder
    assert tiny(layers=[0, -1]).connector.layers == [0, 2]
    c = HyperAttentionConnector(64, 256, 16, decoder_layers=28)
    assert c.layers == [1, 9, 17, 25]
    with pytest.raises(ValueError, match=r"layers=\[5\]"):
        tiny(layers=[5])


def test_text_before_the_image_is_not_affected_by_it():
    model = tiny(layers=[0, 1, 2]).eval()
    with torch.no_grad():  # a gate far from 0 so that images matter wherever they are seen
        for m in model.connector.cross.values():
            m.gate.bias.fill_(3.0)
    ids, images = batch(image_at=(4,))
    with torch.no_grad():
        a = model(ids, images).logits
        b = model(ids, torch.randn_like(images)).logits
    assert torch.equal(a[:, :4], b[:, :4])  # positions before the placeholder
    assert (a[:, 4:] - b[:, 4:]).abs().amax(-1).min() > 1e-4  # at and after it, all differ


def test_image_in_another_document_is_invisible():
    model = tiny(layers=[0, 1, 2]).eval()
    ids, images = batch(image_at=(2,))
    doc_ids = torch.tensor([[0] * 6 + [1] * 6])
    positions = torch.tensor([list(range(6)) * 2])
    with torch.no_grad():
        a = model(ids, images, positions_BT=positions, doc_ids_BT=doc_ids).logits
        b = model(ids, torch.randn_like(images), positions_BT=positions, doc_ids_BT=doc_ids).logits
    assert torch.equal(a[:, 6:], b[:, 6:])
    assert not torch.allclose(a[:, 2:6], b[:, 2:6])


def test_each_position_sees_exactly_the_images_before_it():
    """Cross-attention output equals attention to only the earlier images, computed apart."""
    model = tiny(layers=[0]).eval()
    ids, images = batch(T=14, image_at=(3, 8))
    with torch.no_grad():
        img_NPD = model.encode_images(images)
        branch = model.connector.attn_branches(img_NPD, ids == IMG, torch.arange(14)[None], None)[0]
        h = torch.randn(1, 14, 32)
        zero = torch.zeros_like(h)
        full = branch(h, zero)  # a + g (c - a) with a = 0: g * c
        for t in (3, 8, 13):
            visible = [0] if t < 8 else [0, 1]
            only = model.connector.attn_branches(img_NPD[visible], ids[:, : t + 1] == IMG,
                                                 torch.arange(t + 1)[None], None)[0]
            ref = only(h[:, : t + 1], zero[:, : t + 1])
            assert torch.allclose(full[:, t], ref[:, t], atol=1e-6)
        assert torch.equal(full[:, :3], zero[:, :3])  # nothing visible yet: self-attention kept


def test_gradients_reach_encoder_and_every_parameter():
    model = tiny()
    ids, images = batch(image_at=(2, 7))
    out = model(ids, images)
    out.logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    # A batch without images still gives every parameter a (zero) gradient.
    model.zero_grad()
    model(ids.masked_fill(ids == IMG, 11), torch.zeros(0, 3, 32, 32)).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_count():
    c = HyperAttentionConnector(48, 64, 16, decoder_layers=4, layers=[1, 3], heads=4)
    per_block = 4 * 64 * 64 + (64 * 64 + 64) + 2 * 64  # q k v o, gate, kv LayerNorm
    assert sum(p.numel() for p in c.parameters()) == 48 * 64 + 64 + 2 * per_block


def test_validate_counts_one_sequence_token_per_image(corpus):
    from ablate.validate import ConfigError, validate

    facts = validate(compose("experiment=smoke", f"paths.data={corpus}", "connector=hyper_attention",
                             "connector.heads=4"))
    assert facts["tokens_per_image"] == 1
    with pytest.raises(ConfigError, match=r"connector\.layers=\[7\]"):
        validate(compose("experiment=smoke", f"paths.data={corpus}", "connector=hyper_attention",
                         "connector.heads=4", "connector.layers=[7]"))
    with pytest.raises(ConfigError, match=r"connector\.decoder_layers.*derived"):
        validate(compose("experiment=smoke", f"paths.data={corpus}", "connector=hyper_attention",
                         "+connector.decoder_layers=3"))


def test_trains_end_to_end(corpus, tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(train_args(corpus, runs, "connector=hyper_attention", "connector.heads=4",
                              "train.max_steps=6", "logger.backend=none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list(runs.glob("smoke/*"))
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete" and "caption/cider" in json.dumps(results)
