"""Sparse upcycling: a dense decoder's state dict becomes a mixture-of-experts one that
computes the same function at step 0, and ``ablate-upcycle``, which does it to a
checkpoint on disk.

    ablate-upcycle runs/smoke/<run> --out upcycled/ --experts 8 --top-k 2
    ablate-upcycle runs/smoke/<run>/checkpoints/step-00000008 --out up/ --every 2 --offset 1
    ablate-upcycle /models/llama-hf --out up/ --experts 8 --top-k 2 --mixtral   # HF Llama in

``upcycle_state_dict`` is a pure function (the input is not modified; weights it does
not touch are shared with it, not copied). In every chosen layer (``offset, offset +
every, ...``, as ``conf/ffn/moe.yaml``) the dense SwiGLU ``w1, w3: F,D``, ``w2: D,F`` is
cut along its hidden units into ``granularity`` slices of width ``h = F / g``:

- the first ``num_shared`` slices become the shared experts (one SwiGLU of width
  ``num_shared * h``, the layout ``models.moe.MoE`` keeps them in);
- the other ``g_r = g - num_shared`` slices are copied ``num_experts / g_r`` times
  ("replicas"): expert ``e = j * g_r + q`` is slice ``q`` of replica ``j``, with its
  ``w2`` multiplied by ``g_r``;
- the router row of every expert of replica ``j`` is the same vector ``u_j``
  (normal(``router_init``), or zeros).

Why the output is unchanged (details in docs/upcycling.md): a SwiGLU is the sum of its
hidden-unit slices' outputs, ``y = sum_t y_t``. Experts of one replica tie, so a token's
top-k (a multiple of ``g_r``) takes whole replicas; the renormalised gates of the k chosen
experts sum to 1, so each routed slice gets total gate ``1/g_r`` and its ``g_r``-scaled
copies add up to ``y_q``. With the shared slices that is ``y``; with ``g = 1`` (full
copies) any routing gives ``y``. A zero router ties every expert and ``torch.topk`` then
picks an arbitrary set, so zeros are refused for split experts unless all are chosen.
``noise`` adds normal noise (that many stds of each dense matrix) to every expert copy.

``ablate-upcycle`` writes ``DIR/model.safetensors`` (the MoE state dict; full-model
keys for our runs, ``decoder.``-prefixed keys for a Hugging Face import) and
``DIR/upcycled.yaml`` (the options, the ``ffn`` node and the ``ablate-train`` overrides
that train it, ``train.init_from`` included) through a temporary directory renamed
into place. ``ablate.weights.load_init`` is what ``train.init_from`` calls.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from ablate.files import atomic_dir
from ablate.weights import STATE_FILE, save_state_dict
from models.moe.moe import MoEFFN

FFN_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.ffn\.(?P<name>w[123])\.weight$")
MOE_KEY = re.compile(r"layers\.\d+\.ffn\.(router\.weight|experts\.w[123]|shared\.w[123]\.weight)$")
SPEC_FILE = "upcycled.yaml"


class UpcycleError(ValueError):
    """Options or an input that cannot be upcycled, worded for the user."""


def router_std(router_init: float | str) -> float:
    """``router_init`` as a standard deviation: a number >= 0, or ``"zeros"`` (0)."""
    if isinstance(router_init, str):
        if router_init.lower() in ("zeros", "zero"):
            return 0.0
        try:
            router_init = float(router_init)
        except ValueError:
            raise UpcycleError(f"router_init={router_init!r} must be a std or 'zeros'") from None
    if not router_init >= 0:
        raise UpcycleError(f"router_init={router_init} must be >= 0 (0 = zeros)")
    return float(router_init)


def check_options(num_experts: int, top_k: int, granularity: int = 1, num_shared: int = 0,
                  every: int = 1, offset: int = 0, noise: float = 0.0,
                  router_init: float | str = 0.02) -> float:
    """Raise ``UpcycleError`` naming the first bad option; return the router's std."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("granularity", granularity),
                        ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UpcycleError(f"{name}={value} must be a positive integer")
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if offset < 0:
        raise UpcycleError(f"offset={offset} must be >= 0")
    if not 0 <= num_shared < granularity:
        raise UpcycleError(f"num_shared={num_shared} must be in [0, granularity={granularity}): the shared "
                           "experts take whole slices and at least one slice must stay routed")
    routed = granularity - num_shared
    if num_experts % routed:
        raise UpcycleError(f"num_experts={num_experts} must be a multiple of the {routed} routed slices "
                           f"(granularity - num_shared): each replica of the FFN holds one expert per slice")
    if top_k % routed:
        raise UpcycleError(f"top_k={top_k} must be a multiple of the {routed} routed slices, so that a token "
                           "picks whole replicas and the upcycled FFN equals the dense one at step 0")
    if not noise >= 0:
        raise UpcycleError(f"noise={noise} must be >= 0")
    std = router_std(router_init)
    if std == 0 and routed > 1 and top_k < num_experts:
        raise UpcycleError(
            f"router_init=zeros ties all {num_experts} experts, so top-{top_k} would pick arbitrary slices; "
            f"split experts need router_init > 0 (one row per replica) or top_k=num_experts")
    return std


def upcycled_ffn(dense_hidden: int, *, num_experts: int, top_k: int, granularity: int = 1,
                 num_shared: int = 0, every: int = 1, offset: int = 0, lb_weight: float = 0.01,
                 z_weight: float = 0.001, backend: str = "torch") -> dict:
    """The ``ffn`` config node (``conf/ffn/moe.yaml`` keys) of the upcycled model."""
    check_options(num_experts, top_k, granularity, num_shared, every, offset)
    if dense_hidden % granularity:
        raise UpcycleError(f"granularity={granularity} must divide the dense FFN width {dense_hidden}")
    width = dense_hidden // granularity
    node = {"num_experts": num_experts, "top_k": top_k, "expert_hidden": width, "num_shared": num_shared,
            "shared_hidden": None, "every": every, "offset": offset,
            "renormalize": True, "lb_weight": lb_weight, "z_weight": z_weight, "backend": backend}
    try:
        MoEFFN(**node)
    except ValueError as e:
        raise UpcycleError(str(e)) from None
    return {"_target_": "models.moe.MoEFFN", "_partial_": True, **node}


def dense_ffn_layers(state: dict[str, Tensor], prefix: str | None = None
                     ) -> tuple[str, dict[int, dict]]:
    """``(prefix, {layer: {"w1", "w2", "w3"}})`` of the dense decoder FFNs in ``state``;
    ``UpcycleError`` when there are none, when some are MoE already, or when more than
    one decoder is found and no ``prefix`` says which."""
    moe = sorted(k for k in state if MOE_KEY.search(k))
    if moe:
        raise UpcycleError(f"the state dict is a mixture-of-experts one already (e.g. {moe[0]}); "
                           "upcycling takes a dense decoder")
    found: dict[str, dict[int, dict]] = {}
    for key, value in state.items():
        m = FFN_KEY.match(key)
        if m and (prefix is None or m["prefix"] == prefix):
            found.setdefault(m["prefix"], {}).setdefault(int(m["layer"]), {})[m["name"]] = value
    if not found:
        raise UpcycleError("no dense decoder FFN weights (keys like 'layers.<i>.ffn.w1.weight'"
                           + (f" under prefix {prefix!r}" if prefix is not None else "")
                           + ") in the state dict")
    if len(found) > 1:
        raise UpcycleError(f"several decoders in the state dict (prefixes {sorted(found)}); pass prefix=")
    (prefix, layers), = found.items()
    for i, ws in sorted(layers.items()):
        if set(ws) != {"w1", "w2", "w3"}:
            raise UpcycleError(f"layer {i}: dense FFN has {sorted(ws)}, expected w1, w2 and w3")
    if sorted(layers) != list(range(len(layers))):
        raise UpcycleError(f"decoder layers {sorted(layers)} are not 0..{len(layers) - 1}")
    return prefix, layers


def _experts(w: Tensor, dim: int, slices: list[int], width: int, replicas: int, scale: float,
             noise: float, gen: torch.Generator) -> Tensor:
    """Stack ``replicas`` x ``slices`` copies of ``w``'s hidden-unit slices along a new dim 0."""
    std = float(w.float().std()) if noise else 0.0
    parts = [w.narrow(dim, t * width, width) for t in slices]
    out = []
    for _ in range(replicas):
        for part in parts:
            if noise or scale != 1:
                x = part.float()
                if noise:
                    x = x + noise * std * torch.randn(part.shape, generator=gen)
                part = (x * scale).to(w.dtype)
            out.append(part)
    return torch.stack(out)


def upcycle_state_dict(dense_sd: dict[str, Tensor], *, num_experts: int, top_k: int, every: int = 1,
                       offset: int = 0, granularity: int = 1, num_shared: int = 0, noise: float = 0.0,
                       router_init: float | str = 0.02, seed: int = 0, prefix: str | None = None,
                       progress: bool = False) -> dict[str, Tensor]:
    """The MoE state dict of ``dense_sd`` (see the module docstring for the construction).

    Args:
        dense_sd: a dense decoder's (or whole model's) state dict; the decoder is found
            by its ``layers.<i>.ffn.w1.weight`` keys, whatever comes before them.
        num_experts: routed experts per MoE layer.
        top_k: routed experts per token; a multiple of ``granularity - num_shared``.
        every, offset: MoE in layers ``offset, offset + every, ...``; others stay dense.
        granularity: slices each dense FFN is cut into (1 = experts are full copies).
        num_shared: of those slices, how many become shared (always-on) experts.
        noise: std of the noise added to each expert copy, relative to each matrix's std.
        router_init: std of the router rows (one per replica), or ``"zeros"``.
        seed: seeds the router and the noise.
        prefix: the decoder's key prefix when the state dict holds several.
        progress: show a progress bar over the layers.
    """
    std = check_options(num_experts, top_k, granularity, num_shared, every, offset, noise, router_init)
    prefix, layers = dense_ffn_layers(dense_sd, prefix)
    selector = MoEFFN(num_experts, top_k, every=every, offset=offset)
    chosen = selector.moe_layers(len(layers))
    if not chosen:
        raise UpcycleError(f"offset={offset} is past the last of the decoder's {len(layers)} layers")
    routed = granularity - num_shared
    replicas = num_experts // routed
    gen = torch.Generator().manual_seed(seed)
    out = dict(dense_sd)
    bar = chosen
    if progress:
        from tqdm import tqdm

        bar = tqdm(chosen, desc="upcycling", unit="layer", file=sys.stderr, dynamic_ncols=True)
    for i in bar:
        w = layers[i]
        hidden, dim = w["w1"].shape
        if hidden % granularity:
            raise UpcycleError(f"granularity={granularity} must divide the dense FFN width {hidden} "
                               f"(layer {i})")
        width = hidden // granularity
        base = f"{prefix}layers.{i}.ffn."
        for name in ("w1", "w2", "w3"):
            del out[f"{base}{name}.weight"]
        rows = torch.randn(replicas, dim, generator=gen) * std if std else torch.zeros(replicas, dim)
        out[base + "router.weight"] = rows.repeat_interleave(routed, dim=0).to(w["w1"].dtype)
        slices = list(range(num_shared, granularity))
        out[base + "experts.w1"] = _experts(w["w1"], 0, slices, width, replicas, 1.0, noise, gen)
        out[base + "experts.w3"] = _experts(w["w3"], 0, slices, width, replicas, 1.0, noise, gen)
        out[base + "experts.w2"] = _experts(w["w2"], 1, slices, width, replicas, float(routed), noise, gen)
        if num_shared:
            cut = num_shared * width
            out[base + "shared.w1.weight"] = w["w1"][:cut].clone()
            out[base + "shared.w3.weight"] = w["w3"][:cut].clone()
            out[base + "shared.w2.weight"] = w["w2"][:, :cut].clone()
    return out


# ------------------------------------------------------------------ ablate-upcycle

HYDRA_KEYS = ("_target_", "_partial_")


def _value(v) -> str:
    """A Hydra override value: YAML spelling, quoted when it holds grammar characters."""
    text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return text if re.fullmatch(r"[\w./:+@%-]+", text) else "'" + text.replace("'", "\\'") + "'"


def _read_source(source: Path, step: int | None, ignore_rope_scaling: bool) -> dict:
    """What the CLI needs from SOURCE: state, decoder arguments, overrides to keep, a label."""
    from omegaconf import OmegaConf

    if (source / "config.json").is_file() and not (source / "config.yaml").is_file():
        from ablate.hf import import_llama

        print(f"reading Hugging Face model {source}", file=sys.stderr)
        state, decoder = import_llama(source, ignore_rope_scaling)
        return {"state": {f"decoder.{k}": v for k, v in state.items()}, "decoder": decoder, "step": None,
                "keep": [f"++decoder.{k}={_value(v)}" for k, v in decoder.items()], "scope": "decoder"}
    if source.name.startswith("step-") and source.parent.name == "checkpoints":
        if step is not None and step != int(source.name.split("-")[1]):
            raise UpcycleError(f"--step {step} contradicts the checkpoint {source.name}")
        step, source = int(source.name.split("-")[1]), source.parent.parent
    if not (source / "config.yaml").is_file():
        raise UpcycleError(f"{source} is neither a run directory (config.yaml), a checkpoint "
                           "(<run>/checkpoints/step-N) nor a Hugging Face model directory (config.json)")
    from ablate.eval.cli import load_module_state

    cfg = OmegaConf.load(source / "config.yaml")
    target = str(OmegaConf.select(cfg, "ffn._target_", default="") or "")
    if "MoEFFN" in target:
        raise UpcycleError(f"{source} trained an MoE decoder (ffn={target}); upcycling takes a dense run")
    stage = int(OmegaConf.select(cfg, "deepspeed.zero_stage", default=0))
    print(f"reading {source} (ZeRO stage {stage})", file=sys.stderr)
    step, state = load_module_state(source / "checkpoints", step, stage)
    decoder = {k: v for k, v in OmegaConf.to_container(cfg.decoder, resolve=True).items()
               if k not in HYDRA_KEYS}
    if "decoder.tok_embeddings.weight" in state:  # the tokenizer's, when the config has none
        decoder["vocab_size"] = state["decoder.tok_embeddings.weight"].shape[0]
    saved = source / ".hydra" / "overrides.yaml"
    if saved.is_file():  # the run's own overrides: the new run composes the same model
        keep = [o for o in OmegaConf.to_container(OmegaConf.load(saved))
                if not re.match(r"^[+~]*(ffn|train\.init_from)([.=]|$)", o)]
    else:
        keep = [f"++decoder.{k}={_value(v)}" for k, v in decoder.items()]
    return {"state": state, "decoder": decoder, "step": step, "keep": keep, "scope": "model"}


def run(args: argparse.Namespace) -> Path:
    """The CLI's work; raises ``UpcycleError`` / ``ConversionError`` / ``FileNotFoundError``."""
    from omegaconf import OmegaConf

    opts = dict(num_experts=args.experts, top_k=args.top_k, every=args.every, offset=args.offset,
                granularity=args.granularity, num_shared=args.shared)
    check_options(**opts, noise=args.noise, router_init=args.router_init)
    if args.mixtral:
        from ablate.hf import check_mixtral_exportable

        check_mixtral_exportable({"_target_": "MoEFFN", **opts})
    out = args.out.resolve()
    if out.exists() and not args.force:
        raise UpcycleError(f"{out} exists; pass --force to replace it")
    src = _read_source(args.source, args.step, args.ignore_rope_scaling)
    prefix, layers = dense_ffn_layers(src["state"])
    ffn = upcycled_ffn(layers[0]["w1"].shape[0], **opts, lb_weight=args.lb_weight, z_weight=args.z_weight)
    moe = upcycle_state_dict(src["state"], **opts, noise=args.noise, router_init=args.router_init,
                             seed=args.seed, prefix=prefix, progress=True)
    overrides = [*src["keep"], "ffn=moe",
                 *(f"ffn.{k}={_value(v)}" for k, v in ffn.items() if k not in HYDRA_KEYS),
                 f"train.init_from={_value(str(out))}"]
    spec = {"source": str(args.source.resolve()), "step": src["step"], "scope": src["scope"],
            "options": {**opts, "noise": args.noise, "router_init": args.router_init, "seed": args.seed},
            "ffn": ffn, "decoder": src["decoder"], "overrides": overrides}

    def write(tmp: Path) -> None:
        print(f"writing {out / STATE_FILE}", file=sys.stderr)
        save_state_dict(moe, tmp / STATE_FILE)
        header = ("# Written by ablate-upcycle. Train the upcycled model with\n#   ablate-train "
                  + " ".join(overrides) + "\n")
        (tmp / SPEC_FILE).write_text(header + OmegaConf.to_yaml(OmegaConf.create(spec)))
        if args.mixtral:
            from ablate.hf import export_mixtral

            print(f"exporting Mixtral to {out / 'mixtral'}", file=sys.stderr)
            decoder_state = {k[len(prefix):]: v for k, v in moe.items() if k.startswith(prefix)}
            export_mixtral(decoder_state, src["decoder"], ffn, tmp / "mixtral")

    if out.exists() and not args.force:
        raise UpcycleError(f"{out} exists; pass --force to replace it")
    atomic_dir(out, write)
    chosen = [i for i in layers if i >= args.offset and (i - args.offset) % args.every == 0]
    print(f"upcycled layers {chosen} of {len(layers)}: {args.experts} experts of width "
          f"{ffn['expert_hidden']}, top-{args.top_k}" + (f", {args.shared} shared" if args.shared else ""))
    print(f"wrote {out}; train it with:\n  ablate-train " + " ".join(overrides))
    return out


# flag, type, default, help: the options of upcycle_state_dict / upcycled_ffn and the CLI's own
OPTIONS = [
    ("--experts", int, 8, "routed experts per MoE layer"),
    ("--top-k", int, 2, "routed experts per token"),
    ("--every", int, 1, "MoE in every N-th layer"),
    ("--offset", int, 0, "first MoE layer, 0-based"),
    ("--granularity", int, 1, "slices each dense FFN is cut into (1: experts are full copies)"),
    ("--shared", int, 0, "slices that become shared experts"),
    ("--noise", float, 0.0, "std of the noise on expert copies, relative to each matrix's std"),
    ("--router-init", str, "0.02", "std of the router rows, or 'zeros'"),
    ("--lb-weight", float, 0.01, "load-balancing loss weight of the MoE model"),
    ("--z-weight", float, 0.001, "router z-loss weight of the MoE model"),
    ("--seed", int, 0, "seed of the router and the noise"),
    ("--step", int, None, "checkpoint step of a run directory (default: the newest)"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ablate-upcycle", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="run directory, checkpoint directory (<run>/checkpoints/"
                   "step-N) or Hugging Face Llama-family directory (config.json + safetensors)")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    for flag, kind, default, text in OPTIONS:
        p.add_argument(flag, type=kind, default=default,
                       help=text if default is None else f"{text} (default {default})")
    p.add_argument("--mixtral", action="store_true", help="also export OUT/mixtral, a Hugging Face Mixtral")
    p.add_argument("--ignore-rope-scaling", action="store_true",
                   help="import a Hugging Face model with RoPE scaling as plain RoPE (changes its outputs)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    from ablate.hf import ConversionError

    try:
        run(args)
    except (UpcycleError, ConversionError, FileNotFoundError) as e:
        print(f"ablate-upcycle: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
