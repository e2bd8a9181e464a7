"""Hugging Face decoders in and out (``ablate/hf.py``): a tiny random ``LlamaForCausalLM``
saved locally (single file, sharded, tied) imports as our decoder with the same logits;
upcycled and exported as Mixtral, ``MixtralForCausalLM.from_pretrained`` loads every
weight and gives our logits; what either side cannot express is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from ablate.hf import ConversionError, export_mixtral, import_llama, llama_decoder_config
from ablate.upcycle import main as upcycle_main
from ablate.upcycle import upcycle_state_dict, upcycled_ffn
from ablate.weights import read_state_dict
from models.decoder.transformer import Transformer
from models.moe.moe import MoEFFN
from tests.reference_libs import import_transformers

transformers = import_transformers()

V, D, F, LAYERS, HEADS, KV = 96, 32, 64, 2, 4, 2
RTOL = 1e-5  # of the largest logit; float32 on CPU lands near 1e-7


def llama_config(**overrides):
    kw = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
              rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**kw, **overrides})


@torch.no_grad()
def random_llama(tmp_path, name="llama", shard=None, **overrides):
    """A LlamaForCausalLM with random weights everywhere (norms too), saved to tmp."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(**overrides)).eval()
    for n, p in model.named_parameters():
        p.copy_(torch.rand_like(p) + 0.5 if n.endswith("norm.weight") else torch.randn_like(p) * 0.2)
    path = tmp_path / name
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model, path


def ids():
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def ours(state, decoder, ffn=None) -> Transformer:
    node = None if ffn is None else MoEFFN(**{k: v for k, v in ffn.items() if not k.startswith("_")})
    model = Transformer(**decoder, ffn=node).eval()
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def logits(model: Transformer) -> torch.Tensor:
    x = ids()
    return model(model.embed(x)).logits


def assert_close(a, b, rtol=RTOL):
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err < rtol, err


@pytest.mark.parametrize("variant", ["single", "sharded", "tied"])
def test_llama_import_gives_hf_logits(tmp_path, variant):
    hf, path = random_llama(tmp_path, shard="40KB" if variant == "sharded" else None,
                            tie_word_embeddings=variant == "tied")
    if variant == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
    state, decoder = import_llama(path)
    assert decoder == {"vocab_size": V, "dim": D, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV,
                       "ffn_hidden": F, "norm_eps": 1e-5, "rope_theta": 5e5, "max_seq_len": 64,
                       "tie_embeddings": variant == "tied"}
    with torch.no_grad():
        assert_close(logits(ours(state, decoder)), hf(ids()).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_upcycled_mixtral_export_loads_in_transformers_with_our_logits(tmp_path, tied):
    hf, path = random_llama(tmp_path, tie_word_embeddings=tied)
    state, decoder = import_llama(path)
    dense = logits(ours(state, decoder))
    for name, opts in {"copies": dict(num_experts=4, top_k=2),
                       "split": dict(num_experts=4, top_k=2, granularity=2)}.items():
        moe_state = upcycle_state_dict(state, **opts, seed=3)
        ffn = upcycled_ffn(F, **opts)
        moe = ours(moe_state, decoder, ffn)
        mine = logits(moe)
        assert_close(mine, dense)  # upcycling kept the function ...
        out = export_mixtral(moe_state, decoder, ffn, tmp_path / f"mixtral-{name}")
        mixtral, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        with torch.no_grad():
            theirs = mixtral.eval()(ids()).logits
        assert_close(theirs, mine)  # ... and Mixtral computes it too
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
        assert cfg["intermediate_size"] == F // opts.get("granularity", 1)
        assert cfg["tie_word_embeddings"] == tied


def test_trained_router_routes_the_same_in_mixtral(tmp_path):
    """Distinct experts and a non-degenerate router, as after training: routing and
    gate weights must agree, not just the copies' indifference to them."""
    _, path = random_llama(tmp_path)
    state, decoder = import_llama(path)
    opts = dict(num_experts=4, top_k=2)
    moe_state = upcycle_state_dict(state, **opts, noise=0.5, router_init=1.0, seed=1)
    ffn = upcycled_ffn(F, **opts)
    mine = logits(ours(moe_state, decoder, ffn))
    out = export_mixtral(moe_state, decoder, ffn, tmp_path / "mixtral")
    with torch.no_grad():
        theirs = transformers.MixtralForCausalLM.from_pretrained(out).eval()(ids()).logits
    assert_close(theirs, mine)


def test_upcycle_cli_from_hf_writes_decoder_weights_and_mixtral(tmp_path, capsys):
    _, path = random_llama(tmp_path)
    out = tmp_path / "up"
    assert upcycle_main([str(path), "--out", str(out), "--experts", "4", "--top-k", "2", "--mixtral"]) == 0
    printed = capsys.readouterr().out
    state = read_state_dict(out)
    assert all(k.startswith("decoder.") for k in state) and "decoder.layers.1.ffn.router.weight" in state
    spec = (out / "upcycled.yaml").read_text()
    assert "++decoder.dim=32" in spec and "ffn.num_experts=4" in spec and f"train.init_from={out}" in spec
    assert f"train.init_from={out}" in printed
    assert (out / "mixtral" / "config.json").is_file()
    # Exportability is checked before any work: MoE in every 2nd layer is not Mixtral.
    assert upcycle_main([str(path), "--out", str(tmp_path / "no"), "--every", "2", "--mixtral"]) == 2
    assert "every layer" in capsys.readouterr().err and not (tmp_path / "no").exists()


@pytest.mark.parametrize("overrides, words", [
    (dict(model_type="qwen2"), "q/k/v biases"),
    (dict(attention_bias=True), "no biases"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "no scaling"),
    (dict(head_dim=16), "head_dim=16"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(model_type="mixtral", num_local_experts=8), "mixture-of-experts"),
    (dict(model_type="gpt2"), "only llama, mistral"),
])
def test_import_refuses_what_our_decoder_cannot_compute(overrides, words):
    cfg = {**llama_config().to_dict(), **overrides}
    with pytest.raises(ConversionError, match=words):
        llama_decoder_config(cfg)


def test_llama3_rope_scaling_can_be_ignored_knowingly():
    cfg = {**llama_config().to_dict(), "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}
    assert llama_decoder_config(cfg, ignore_rope_scaling=True)["rope_theta"] == 5e5


def test_export_refuses_what_mixtral_cannot_express(tmp_path):
    _, path = random_llama(tmp_path)
    state, decoder = import_llama(path)
    cases = {"every": (dict(num_experts=4, top_k=2, every=2), "every layer"),
             "shared": (dict(num_experts=2, top_k=2, granularity=2, num_shared=1), "shared experts")}
    for opts, words in cases.values():
        moe_state = upcycle_state_dict(state, **opts)
        with pytest.raises(ConversionError, match=words):
            export_mixtral(moe_state, decoder, upcycled_ffn(F, **opts), tmp_path / "x")
    with pytest.raises(ConversionError, match="dense"):
        export_mixtral(state, decoder, {"_target_": "models.moe.DenseFFN"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
