"""ablate-params and the seed presets: published sizes come out of the presets (within
2% of the figures in docs/param_counts.md), the CLI's last line is a JSON summary whose
parts add up, mistakes exit with code 2 naming the key, nothing is written to disk,
an MoE-style ``active_params`` lowers the active count, and the three ``tiny`` presets
train end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ablate.params import COMPONENTS, JSON_KEYS, ParamsError, active_params, count, param_report
from tests.conftest import REPO, compose, run_cli

# Published figures (docs/param_counts.md gives each one's source and what it counts).
QWEN2_7B = 7.616e9  # Qwen/Qwen2-7B safetensors count, embeddings + untied head included
QWEN2_7B_NON_EMB = 6.53e9  # Qwen2.5-7B model card (the same shape)
LLAMA2_7B = 6.74e9  # Llama 2 paper / meta-llama/Llama-2-7b-hf
LLAMA32_3B = 3.21e9  # meta-llama/Llama-3.2-3B model card
MOLMO_7B_D = 8.02e9  # allenai/Molmo-7B-D-0924 safetensors count
# open_clip docs/model_profile.csv, image tower (includes its projection / SigLIP's head).
OPEN_CLIP_IMAGE = {"vit_b16": 86.19e6, "vit_l14": 303.97e6, "vit_l14_336": 304.29e6,
                   "vit_h14": 632.08e6, "siglip_so400m": 428.23e6}
# What our towers never build (their outputs are patch tokens, not a pooled embedding):
# CLIP's projection to the joint space, SigLIP's attention-pooling (MAP) head.
W_SO = 1152  # so400m width; MLP 4304
SIGLIP_MAP_HEAD = (W_SO                                  # probe (query) vector
                   + 4 * W_SO * W_SO + 4 * W_SO          # multi-head attention q, k, v, out
                   + 2 * W_SO                            # LayerNorm
                   + 2 * W_SO * 4304 + 4304 + W_SO)      # MLP
NOT_BUILT = {"vit_b16": 768 * 512, "vit_l14": 1024 * 768, "vit_l14_336": 1024 * 768,
             "vit_h14": 1280 * 1024, "siglip_so400m": SIGLIP_MAP_HEAD}


def close(ours: float, published: float, tol: float = 0.02) -> bool:
    return abs(ours - published) <= tol * published


@pytest.fixture(scope="module")
def full():
    """Reports of the three published-size presets (meta device: no memory)."""
    return {e: param_report(compose(f"experiment={e}/full")) for e in ("mm1", "molmo", "owl3")}


def with_embeddings(report: dict) -> int:
    return report["decoder"]["total"] + report["embeddings"]["total"]


def test_full_presets_match_published_decoders(full):
    for e in ("molmo", "owl3"):  # both on Qwen2-7B (Owl3 trims the vocabulary to 151851)
        assert close(with_embeddings(full[e]), QWEN2_7B), (e, with_embeddings(full[e]))
        assert close(full[e]["decoder"]["total"], QWEN2_7B_NON_EMB)
    # MM1 publishes no decoder shape; the stand-in is Llama-3.2-3B's, tied embeddings.
    assert full["mm1"]["tied_embeddings"]
    assert close(with_embeddings(full["mm1"]), LLAMA32_3B)
    llama2 = param_report(compose("experiment=mm1/full", "decoder=llama2_7b"))
    assert close(with_embeddings(llama2), LLAMA2_7B)


@pytest.mark.parametrize("encoder", sorted(OPEN_CLIP_IMAGE))
def test_encoder_presets_match_published_towers(encoder):
    # The full tower (feature_layer=-1); presets read the penultimate block and so do not
    # build the last one (the "as used" counts in docs/param_counts.md).
    cfg = compose(f"encoder={encoder}", "encoder.feature_layer=-1", "connector=c_abstractor",
                  "+decoder.vocab_size=1000")
    ours = param_report(cfg)["encoder"]["total"]
    assert close(ours + NOT_BUILT[encoder], OPEN_CLIP_IMAGE[encoder]), (ours, encoder)
    if encoder != "siglip_so400m":  # the CLIP projection is <0.5%: also close without it
        assert close(ours, OPEN_CLIP_IMAGE[encoder])


def test_molmo_total_matches_published(full):
    assert close(full["molmo"]["total"]["total"], MOLMO_7B_D)


def test_full_presets_structure(full):
    for report in full.values():
        assert list(report) == list(JSON_KEYS)
        assert sum(report[c]["total"] for c in COMPONENTS) == report["total"]["total"]
        assert report["total"]["active"] == report["total"]["total"]  # dense
    mm1, molmo, owl3 = full["mm1"]["image"], full["molmo"]["image"], full["owl3"]["image"]
    assert (mm1["size"], mm1["views"], mm1["seq_tokens_per_image"]) == (378, 5, 720)
    assert (molmo["views"], molmo["tokens_per_view"], molmo["seq_tokens_per_image"]) == (13, 144, 1872)
    # Owl3: one placeholder per view in the sequence; its 27 x 27 patches are keys.
    assert (owl3["views"], owl3["tokens_per_view"], owl3["seq_tokens_per_image"]) == (5, 729, 5)
    cross = full["owl3"]["cross_attention"]
    assert cross["in"] == "connector" and 0 < cross["total"] < full["owl3"]["connector"]["total"]
    # Molmo's pooling attention is not cross-attention into the decoder.
    assert full["molmo"]["cross_attention"] == {"total": 0, "active": 0, "in": None}


class HalfActive(nn.Module):
    """Stands in for an MoE FFN: holds two 'experts', a token uses one."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.experts = nn.ModuleList([dense, type(dense)(*_shape(dense))])

    def active_params(self) -> int:
        return sum(p.numel() for p in self.experts[0].parameters())


def _shape(ffn: nn.Module) -> tuple[int, int]:
    return ffn.w1.in_features, ffn.w1.out_features


def test_active_params_hook_reports_fewer_active_than_total():
    from ablate.build import build_model

    cfg = compose("experiment=mm1/tiny", "+decoder.vocab_size=100")
    with torch.device("meta"):
        model = build_model(cfg, 100, image_token_id=0)
        dense = count(model)
        block = model.decoder.layers[0]
        block.ffn = HalfActive(block.ffn)
    moe = count(model)
    expert = sum(p.numel() for p in block.ffn.experts[1].parameters())
    assert moe["decoder"]["total"] == dense["decoder"]["total"] + expert
    assert moe["decoder"]["active"] == dense["decoder"]["active"]
    assert moe["total"]["active"] == moe["total"]["total"] - expert
    assert active_params(nn.Linear(4, 4)) == 20


def test_moe_decoder_reports_active_below_total(tmp_path):
    # conf/ffn/moe.yaml: 8 experts, top-2, in every layer; the tiny decoder: 2 layers,
    # width 64, experts of the dense FFN's width 192 (8/3 x 64, rounded up to 64).
    # paths.data: an empty directory, so no corpus tokenizer (e.g. a local data/synth
    # with more ids) outranks the configured vocabulary.
    report = param_report(compose("experiment=mm1/tiny", "ffn=moe", "+decoder.vocab_size=100",
                                  f"paths.data={tmp_path}"))
    idle_experts = 2 * (8 - 2)
    assert report["decoder"]["total"] - report["decoder"]["active"] == idle_experts * 3 * 64 * 192
    assert report["total"]["active"] < report["total"]["total"]


def test_cli_prints_table_and_json_last_line():
    res = run_cli(["-m", "ablate.params", "experiment=mm1/full", "encoder.image_size=336"], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["image"]["size"] == 336 and report["name"] == "mm1_full"
    assert sum(report[c]["total"] for c in COMPONENTS) == report["total"]["total"]
    assert any(line.startswith("decoder (non-embedding)") for line in lines)
    assert f"{report['total']['total']:,}" in res.stdout  # the table shows the same total


def test_cli_bad_override_exits_2_naming_the_key(tmp_path):
    # Run from an empty directory: Hydra must not leave outputs/, .hydra or a log there.
    res = subprocess.run([sys.executable, "-m", "ablate.params", "experiment=mm1/full",
                          "encoder.image_size=330"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "encoder.image_size=330" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_vocab_from_config_then_tokenizer_else_a_clear_error(corpus, tmp_path):
    assert param_report(compose("experiment=owl3/full"))["vocab_source"] == "config"
    report = param_report(compose("experiment=mm1/tiny", f"paths.data={corpus}"))
    assert report["vocab_source"] == "tokenizer" and report["vocab_size"] > 0
    with pytest.raises(ParamsError, match=r"decoder\.vocab_size"):
        param_report(compose("experiment=mm1/tiny", f"paths.data={tmp_path}"))


@pytest.mark.parametrize("preset", ["mm1", "molmo", "owl3"])
def test_tiny_preset_trains(preset, corpus, tmp_path):
    res = run_cli(["-m", "ablate.train", f"experiment={preset}/tiny", f"paths.data={corpus}",
                   f"paths.runs={tmp_path}", "train.max_steps=3", "train.ckpt_every=0",
                   "eval.max_caption=2", "eval.max_vqa=2", "eval.max_text=2", "logger=none"],
                  timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    results = [json.loads(p.read_text()) for p in tmp_path.rglob("results.json")]
    assert len(results) == 1 and results[0]["status"] == "complete"
    assert results[0]["step"] == 3 and math.isfinite(results[0]["metrics"]["train/loss"])
    assert "image views 5" in res.stdout  # splitting stayed on at tiny size
