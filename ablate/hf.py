"""Hugging Face checkpoints in and out of our decoder (``models.decoder.transformer``).

- ``import_llama(dir)``: a local Llama-family directory (``config.json`` plus
  ``model.safetensors``, or shards listed in ``model.safetensors.index.json``) becomes
  our ``Transformer`` state dict and its constructor arguments. Llama and Mistral
  (without a sliding window) map one-to-one: both use the rotate-half RoPE layout ours
  uses, so ``q_proj``/``k_proj`` load without a permutation. Refused, with the reason:
  models with attention or MLP biases (Qwen2's q/k/v biases: our attention has none,
  and dropping them would change the function), RoPE scaling (Llama 3.1+'s ``llama3``
  rope type: ours has no scaling; ``ignore_rope_scaling=True`` imports anyway,
  knowingly), a head dim other than ``hidden_size / heads``, partial rotary, sliding
  windows, activations other than SiLU, and MoE checkpoints.
- ``export_mixtral(state, decoder, ffn, dir)``: an (upcycled) MoE decoder becomes a
  Mixtral directory (``config.json`` + ``model.safetensors`` in the hub layout,
  ``block_sparse_moe.experts.<j>.w1/w2/w3``) that ``MixtralForCausalLM.from_pretrained``
  loads. Mixtral routes as our ``renormalize: true`` router does (softmax over all
  experts, top-k, renormalise), so logits agree. Only what Mixtral can express is
  exported: an MoE in every layer, no shared experts, renormalised routing; anything
  else is a ``ConversionError``. Mixtral has no router z-loss; its
  ``router_aux_loss_coef`` is set so that its load-balancing loss (averaged over
  layers and ``top_k`` times ours per layer) carries about our total weight.

Nothing here imports ``transformers``: configs are plain JSON, weights safetensors.
Shape legend: E experts, F expert hidden, D model dim.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ablate.files import atomic_dir

LLAMA_TYPES = ("llama", "mistral")
# HF Llama names -> ours (per layer ``i``; the ``model.`` prefix is optional).
LAYER_MAP = {
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_MAP = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight"}
IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved


class ConversionError(ValueError):
    """A checkpoint or model that cannot be converted, worded for the user."""


def read_config(path: str | os.PathLike) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ConversionError(f"{f} not found: not a Hugging Face model directory")
    return json.loads(f.read_text())


def load_safetensors_dir(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {path} "
                              "(only safetensors checkpoints are read)")
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return state


def _rope(cfg: dict) -> tuple[float, str]:
    """(theta, rope type) from a transformers 4 (``rope_theta``/``rope_scaling``) or 5
    (``rope_parameters``) config."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def llama_decoder_config(cfg: dict, ignore_rope_scaling: bool = False) -> dict:
    """Our ``Transformer`` arguments for a Llama-family ``config.json``; refuses what
    our decoder would compute differently (see the module docstring)."""
    kind = cfg.get("model_type")
    if kind == "qwen2":
        raise ConversionError("Qwen2 has q/k/v biases, which our attention does not have; importing "
                              "without them would change the model's outputs, so Qwen2 is not supported")
    if kind in ("mixtral", "qwen2_moe", "deepseek_v2", "olmoe") or cfg.get("num_local_experts"):
        raise ConversionError(f"model_type={kind!r} is a mixture-of-experts model; import takes a "
                              "dense decoder")
    if kind not in LLAMA_TYPES:
        raise ConversionError(f"model_type={kind!r}: only {', '.join(LLAMA_TYPES)} decoders are imported")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    problems = []
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias: our decoder has no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r}: our FFN is SwiGLU (silu)")
    if cfg.get("head_dim") not in (None, dim // heads):
        problems.append(f"head_dim={cfg['head_dim']}: ours is hidden_size / num_attention_heads = "
                        f"{dim // heads}")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={cfg['partial_rotary_factor']}: ours rotates every channel")
    window = cfg.get("sliding_window")
    if window is not None and window < cfg.get("max_position_embeddings", 0):
        problems.append(f"sliding_window={window}: our attention is full causal")
    theta, rope_type = _rope(cfg)
    if rope_type != "default" and not ignore_rope_scaling:
        problems.append(f"rope_type={rope_type!r}: our RoPE has no scaling (ignore_rope_scaling=True imports "
                        "it with plain RoPE, which changes the outputs)")
    if problems:
        raise ConversionError(f"cannot import this {kind} checkpoint: " + "; ".join(problems))
    return {"vocab_size": cfg["vocab_size"], "dim": dim, "n_layers": cfg["num_hidden_layers"],
            "n_heads": heads, "n_kv_heads": cfg.get("num_key_value_heads") or heads,
            "ffn_hidden": cfg["intermediate_size"], "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "rope_theta": theta, "max_seq_len": cfg.get("max_position_embeddings", 2048),
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", False))}


def import_llama(path: str | os.PathLike, ignore_rope_scaling: bool = False
                 ) -> tuple[dict[str, Tensor], dict]:
    """``(state_dict, decoder_kwargs)``: ``Transformer(**decoder_kwargs)`` loads the
    state dict with ``strict=True`` and computes what the Hugging Face model does."""
    decoder = llama_decoder_config(read_config(path), ignore_rope_scaling)
    hf = {k.removeprefix("model."): v for k, v in load_safetensors_dir(path).items() if not IGNORED.search(k)}
    out, unused = {}, set(hf)
    for src, dst in TOP_MAP.items():
        if src in hf:
            out[dst] = hf[src]
            unused.discard(src)
    for i in range(decoder["n_layers"]):
        for src, dst in LAYER_MAP.items():
            key = f"layers.{i}.{src}"
            if key in hf:
                out[f"layers.{i}.{dst}"] = hf[key]
                unused.discard(key)
    if "lm_head.weight" in hf:
        unused.discard("lm_head.weight")
        if not decoder["tie_embeddings"]:
            out["output.weight"] = hf["lm_head.weight"]
    if decoder["tie_embeddings"] and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    expected = {*TOP_MAP.values(), "output.weight",
                *(f"layers.{i}.{d}" for i in range(decoder["n_layers"]) for d in LAYER_MAP.values())}
    missing = sorted(expected - set(out))
    if missing or unused:
        raise ConversionError(f"{path}: the weights do not match its config.json"
                              + (f"; missing {missing[:4]}" if missing else "")
                              + (f"; unexpected {sorted(unused)[:4]}" if unused else ""))
    return out, decoder


# ------------------------------------------------------------------ Mixtral export


def check_mixtral_exportable(ffn: dict, n_layers: int | None = None) -> None:
    """Raise ``ConversionError`` unless Mixtral can express this ``ffn`` node."""
    problems = []
    if "MoEFFN" not in str(ffn.get("_target_", "MoEFFN")):
        problems.append("the decoder is dense (ffn is not MoE)")
    if ffn.get("every", 1) != 1 or ffn.get("offset", 0) != 0:
        problems.append(f"MoE in every={ffn.get('every')} layers from offset={ffn.get('offset')}: "
                        "Mixtral has an MoE in every layer (every=1, offset=0)")
    if ffn.get("num_shared", 0):
        problems.append(f"num_shared={ffn['num_shared']}: Mixtral has no shared experts")
    if not ffn.get("renormalize", True):
        problems.append("renormalize=false: Mixtral renormalises the top-k weights")
    if problems:
        raise ConversionError("cannot export as Mixtral: " + "; ".join(problems))


def mixtral_config(decoder: dict, ffn: dict, expert_hidden: int, vocab_size: int, dtype: torch.dtype) -> dict:
    """A Mixtral ``config.json`` for our decoder arguments and ``ffn`` node."""
    heads = decoder["n_heads"]
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": vocab_size, "hidden_size": decoder["dim"], "intermediate_size": expert_hidden,
        "num_hidden_layers": decoder["n_layers"], "num_attention_heads": heads,
        "num_key_value_heads": decoder.get("n_kv_heads") or heads, "head_dim": decoder["dim"] // heads,
        "hidden_act": "silu", "max_position_embeddings": decoder.get("max_seq_len", 2048),
        "rms_norm_eps": decoder.get("norm_eps", 1e-5), "rope_theta": decoder.get("rope_theta", 10000.0),
        "tie_word_embeddings": bool(decoder.get("tie_embeddings", False)),
        "num_local_experts": ffn["num_experts"], "num_experts_per_tok": ffn["top_k"],
        # Mixtral averages its loss over layers and counts top_k times ours per layer.
        "router_aux_loss_coef": ffn.get("lb_weight", 0.01) * decoder["n_layers"] / ffn["top_k"],
        "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None,
        "attention_dropout": 0.0, "initializer_range": decoder.get("init_std", 0.02), "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_mixtral_state_dict(state: dict[str, Tensor], n_layers: int, tie_embeddings: bool) -> dict[str, Tensor]:
    """Our MoE decoder's (unprefixed) state dict in Mixtral's hub layout."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    inverse = {v: k for k, v in LAYER_MAP.items() if not v.startswith("ffn.")}
    for i in range(n_layers):
        base = f"layers.{i}."
        if base + "ffn.router.weight" not in state:
            raise ConversionError(f"layer {i} has no MoE router: Mixtral needs an MoE in every layer")
        if any(k.startswith(base + "ffn.shared.") for k in state):
            raise ConversionError(f"layer {i} has shared experts, which Mixtral does not have")
        for ours, theirs in inverse.items():
            out[f"model.{base}{theirs}"] = state[base + ours]
        moe = f"model.{base}block_sparse_moe."
        out[moe + "gate.weight"] = state[base + "ffn.router.weight"]
        for name in ("w1", "w2", "w3"):  # Mixtral's names mean what ours do: gate, down, up
            for j, w in enumerate(state[f"{base}ffn.experts.{name}"].unbind(0)):
                out[f"{moe}experts.{j}.{name}.weight"] = w.contiguous()
    return out


def export_mixtral(state: dict[str, Tensor], decoder: dict, ffn: dict, out_dir: str | os.PathLike,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``out_dir`` (``config.json`` + ``model.safetensors``) through a temporary
    directory renamed into place. ``state``: our MoE decoder's state dict, keys with or
    without a ``decoder.`` prefix; ``decoder``: its ``Transformer`` arguments;
    ``ffn``: its ``ffn`` config node; ``dtype``: cast the weights (default: keep)."""
    from safetensors.torch import save_file

    check_mixtral_exportable(ffn)
    if any(k.startswith("decoder.") for k in state):
        state = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    n_layers = decoder["n_layers"]
    widths = {tuple(state[f"layers.{i}.ffn.experts.w1"].shape) for i in range(n_layers)
              if f"layers.{i}.ffn.experts.w1" in state}
    if len(widths) > 1:
        raise ConversionError(f"expert shapes differ between layers ({sorted(widths)}); Mixtral's are "
                              "uniform")
    hf = to_mixtral_state_dict(state, n_layers, bool(decoder.get("tie_embeddings", False)))
    dtype = dtype or state["tok_embeddings.weight"].dtype
    hf = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf.items()}
    expert_hidden = state["layers.0.ffn.experts.w1"].shape[1]
    vocab = state["tok_embeddings.weight"].shape[0]
    config = mixtral_config(decoder, ffn, expert_hidden, vocab, dtype)
    def write(tmp: Path) -> None:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return atomic_dir(out_dir, write)
