"""Pre-flight validation: every problem of a composed config, named by its key,
before any process group, data loader or job starts.

Hydra's typed schema (``ablate.config``) already rejects unknown keys and wrong
types in the plain sections. This module adds what a schema cannot see:

- model slots (``encoder``, ``connector``, ``decoder``, ``ffn``) are checked against their
  ``_target_``'s constructor signature (unknown keys, type mismatches, derived
  arguments set by hand);
- the model is built on the meta device, so shape rules enforced by the modules
  themselves (patch size dividing the resolution, square token grids, head counts)
  surface here, with the slot prefixed to the argument the module names;
- cross-field rules: batch divisibility, sequence length vs image tokens, data
  paths, mixture weights, image splitting (``data.split``; an image then costs
  ``V`` views x the connector's tokens per view in the sequence), expert parallelism
  (``deepspeed.expert_parallel`` against the ranks, the experts, the MoE backend and the
  ZeRO stage);
- ``ablate.validate_rules``: keys added with ``+`` outside the schema, counts and
  intervals (checkpointing, seeds, AdamW, the preemption signal), the ``eval`` section
  (``ablate.eval.tasks.benchmark_problems``) and its shards, train shards per stream
  against the readers (ranks x data-loader workers), and ``train.init_from`` read by
  name and shape only.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import types
import typing
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ablate.build import DERIVED_ARGS, build_connector, build_decoder, build_encoder
from ablate.config import MODEL_SLOTS
from ablate.data import format as fmt
from ablate.data.splitting import Split, split_problems
from ablate.lr import optim_problems
from ablate.validate_rules import check_counts, check_eval, check_init_from, check_schema_keys, check_shards

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """A config with one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


def _import_target(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _type_ok(value, annotation) -> bool:
    """Whether a config value fits a constructor annotation (best effort)."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        args = typing.get_args(annotation)
        return not args or all(_type_ok(v, args[0]) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_slot(slot: str, node) -> list[str]:
    """Problems of one model slot against its target's constructor signature."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return [f"{slot}: must be a config node with a _target_ (choose one from conf/{slot}/)"]
    try:
        target = _import_target(node._target_)
    except (ImportError, AttributeError) as e:
        return [f"{slot}._target_: cannot import {node._target_!r} ({e})"]
    params = inspect.signature(target).parameters
    try:
        hints = typing.get_type_hints(target.__init__)
    except Exception:  # unresolvable annotations: fall back to no type checks
        hints = {}
    derived = DERIVED_ARGS.get(slot, ())  # ffn: nothing derived
    accepted = [p for p in params if p not in derived and p != "self"]
    problems = []
    for key in node:
        if key in HYDRA_KEYS:
            continue
        if key in derived:
            problems.append(f"{slot}.{key}: derived at run time from the other slots; remove it")
        elif key not in params:
            problems.append(
                f"{slot}.{key}: unknown key for {node._target_} (accepted: {', '.join(accepted)})"
            )
        else:
            value = OmegaConf.to_object(node[key]) if OmegaConf.is_config(node[key]) else node[key]
            ann = hints.get(key, params[key].annotation)
            if not _type_ok(value, ann):
                problems.append(
                    f"{slot}.{key}: expected {_type_name(ann)}, got {value!r} ({type(value).__name__})"
                )
    return problems


def tokenizer_vocab_size(cfg: DictConfig) -> int | None:
    """Vocabulary size of the corpus tokenizer under ``paths.data``, if there is one."""
    tok = Path(cfg.paths.data) / fmt.TOKENIZER_FILE
    if tok.exists():
        return len(json.loads(tok.read_text())["model"]["vocab"])
    return None


def _vocab_size(cfg: DictConfig) -> int:
    tokenizer_vocab = tokenizer_vocab_size(cfg)
    if cfg.decoder.get("vocab_size") is not None:
        return int(cfg.decoder.vocab_size)
    # Only shapes are checked on the meta device; the real size comes with the corpus.
    return tokenizer_vocab or 1024


def check_ffn(cfg: DictConfig) -> list[str]:
    """The ffn slot's own arguments (e.g. ``top_k`` vs ``num_experts``) and whether the
    decoder's depth leaves it any MoE layer; named ``ffn.<key>`` rather than blamed on
    the decoder that builds it."""
    node = cfg.get("ffn")
    if node is None:
        return []
    try:
        factory = instantiate(node)()
        n_layers = cfg.decoder.get("n_layers")
        if isinstance(n_layers, int) and n_layers > 0:
            factory.check_depth(n_layers)
    except (ValueError, TypeError) as e:
        return [f"ffn.{e}"]
    return []


def check_model(cfg: DictConfig) -> tuple[list[str], object]:
    """Build each slot on the meta device; constructor errors name their argument."""
    problems: list[str] = check_ffn(cfg)
    if problems:
        return problems, None
    with torch.device("meta"):
        try:
            encoder = build_encoder(cfg)
        except (ValueError, TypeError) as e:
            return [f"encoder.{e}"], None
        try:
            decoder = build_decoder(cfg, _vocab_size(cfg))
        except (ValueError, TypeError) as e:
            return [f"decoder.{e}"], None
        try:
            connector = build_connector(cfg, encoder, decoder)
        except (ValueError, TypeError) as e:
            return [f"connector.{e}"], None
    return problems, (encoder, connector, decoder)


def check_training(cfg: DictConfig, world_size: int, tokens_per_image: int | None) -> list[str]:
    problems = []
    t, d, o = cfg.train, cfg.data, cfg.optim
    per_step = t.micro_batch_size * world_size
    if t.micro_batch_size < 1:
        problems.append(f"train.micro_batch_size={t.micro_batch_size}: must be >= 1")
    elif t.global_batch_size < per_step or t.global_batch_size % per_step:
        why = "smaller than" if t.global_batch_size < per_step else "not divisible by"
        problems.append(
            f"train.global_batch_size={t.global_batch_size}: {why} "
            f"micro_batch_size x ranks = {t.micro_batch_size} x {world_size} = {per_step} "
            "(global = micro-batch x accumulation x ranks, accumulation >= 1)"
        )
    if t.max_steps < 1:
        problems.append(f"train.max_steps={t.max_steps}: must be >= 1")
    if not 0 <= o.warmup_steps < max(t.max_steps, 1):
        problems.append(f"optim.warmup_steps={o.warmup_steps}: must be in [0, train.max_steps)")
    if not 0 <= o.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: must be 0, 1, 2 or 3")
    if cfg.deepspeed.precision not in ("fp32", "bf16"):
        problems.append(f"deepspeed.precision={cfg.deepspeed.precision!r}: must be fp32 or bf16")
    if cfg.logger.backend not in ("wandb", "none"):
        problems.append(f"logger.backend={cfg.logger.backend!r}: must be wandb or none")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        problems.append(f"logger.mode={cfg.logger.mode!r}: must be offline, online or disabled")
    unknown = set(d.weights) - set(fmt.STREAMS)
    if unknown:
        problems.append(f"data.weights: unknown streams {sorted(unknown)} (streams: {list(fmt.STREAMS)})")
    if not all(math.isfinite(w) and w >= 0 for w in d.weights.values()) or sum(d.weights.values()) <= 0:
        problems.append(f"data.weights={dict(d.weights)}: must be finite, >= 0, with a positive sum")
    if tokens_per_image is not None and d.seq_len < tokens_per_image + 8:
        problems.append(
            f"data.seq_len={d.seq_len}: too short for one image ({tokens_per_image} tokens) plus text"
        )
    max_len = cfg.decoder.get("max_seq_len")
    if isinstance(max_len, int) and max_len < d.seq_len:
        problems.append(f"decoder.max_seq_len={max_len}: smaller than data.seq_len={d.seq_len}")
    if d.num_workers < 0:
        problems.append(f"data.num_workers={d.num_workers}: must be >= 0")
    return problems


def check_expert_parallel(cfg: DictConfig, world_size: int) -> list[str]:
    """``deepspeed.expert_parallel`` (P): P >= 1; for P > 1, P divides the ranks and
    ``ffn.num_experts``, the FFN is an MoE on the torch backend, and ZeRO is stage 0-2."""
    size = cfg.deepspeed.get("expert_parallel", 1)
    key = f"deepspeed.expert_parallel={size}"
    if size < 1:
        return [f"{key}: must be >= 1 (1 = no expert parallelism)"]
    if size == 1:
        return []
    problems = []
    if world_size % size:
        problems.append(f"{key}: does not divide the {world_size} rank(s) (expert-parallel groups are "
                        f"{size} consecutive ranks; the data-parallel size of the experts is ranks / {size})")
    ffn = cfg.get("ffn")
    experts = ffn.get("num_experts") if isinstance(ffn, DictConfig) else None
    if experts is None:
        problems.append(f"{key}: needs ffn=moe (the FFN has no experts to shard)")
        return problems
    if isinstance(experts, int) and experts % size:
        problems.append(f"ffn.num_experts={experts}: not divisible by {key} (each rank holds "
                        f"num_experts / expert_parallel experts)")
    if ffn.get("backend", "torch") != "torch":
        problems.append(f"ffn.backend={ffn.backend}: {key} is implemented for ffn.backend=torch only")
    if cfg.deepspeed.zero_stage == 3:
        problems.append(f"deepspeed.zero_stage=3: not supported with {key} (DeepSpeed's ZeRO-3 accepts "
                        "only its own AutoEP MoE layers); use deepspeed=zero1 or zero2")
    return problems


def check_data(cfg: DictConfig, need_train: bool = True) -> list[str]:
    root = Path(cfg.paths.data)
    if not (root / fmt.META_FILE).exists() or not (root / fmt.TOKENIZER_FILE).exists():
        return [f"paths.data={str(root)!r}: no corpus there (create one with `ablate-data --out {root}`)"]
    problems = []
    if need_train:
        for stream, w in cfg.data.weights.items():
            if w > 0 and stream in fmt.STREAMS and not fmt.list_shards(root, "train", stream):
                problems.append(f"data.weights.{stream}={w}: corpus {root} has no {stream} shards")
    return problems


def check_pretrained_path(cfg: DictConfig) -> list[str]:
    """The encoder's pretrained weights exist in a readable format (a bad
    ``pretrained_format`` itself is reported by the encoder's constructor)."""
    enc = cfg.get("encoder")
    if not isinstance(enc, DictConfig) or not enc.get("pretrained"):
        return []
    from models.encoders.convert import PRETRAINED_FORMATS, check_pretrained

    fmt_name = enc.get("pretrained_format", "auto")
    fmt_name = fmt_name if fmt_name in PRETRAINED_FORMATS else "auto"
    return [f"encoder.{p}" for p in check_pretrained(enc.pretrained, fmt_name)]


def validate(cfg: DictConfig, world_size: int = 1, check_paths: bool = True) -> dict:
    """Raise ``ConfigError`` listing every problem; return derived facts otherwise."""
    problems: list[str] = check_schema_keys(cfg)
    for slot in MODEL_SLOTS:
        problems += check_slot(slot, cfg.get(slot))
    parts = None
    if not problems:  # a meta build needs well-typed slots
        model_problems, parts = check_model(cfg)
        problems += model_problems
    image_size = parts[0].image_size if parts else None
    split, split_errors = cfg.data.get("split"), []
    if split is not None:
        grid = split.get("grid")
        grid = OmegaConf.to_object(grid) if OmegaConf.is_config(grid) else grid
        split_errors = split_problems(grid, split.get("overlap"), split.get("global_view"), image_size)
    problems += split_errors
    views = 1 if split_errors else Split.from_config(split).num_views
    tokens_per_image = per_view = None
    if parts:
        # What one image occupies in the text sequence: V views x the connector's tokens
        # in the sequence per view (``seq_tokens`` where that differs from ``num_tokens``).
        connector = parts[1]
        per_view = getattr(connector, "seq_tokens", connector.num_tokens)
        tokens_per_image = views * per_view
    problems += check_training(cfg, world_size, tokens_per_image)
    # optim.lr: a number or law[:file]; a law is evaluated at the decoder's non-embedding N.
    problems += optim_problems(cfg.optim, parts[2].num_params(non_embedding=True) if parts else None)
    problems += check_expert_parallel(cfg, world_size) + check_counts(cfg) + check_eval(cfg, check_paths)
    if check_paths:
        problems += check_data(cfg) + check_pretrained_path(cfg)
        problems += check_shards(cfg, world_size)
        # The meta model's vocabulary is the real one only with a tokenizer or a configured size.
        sized = cfg.decoder.get("vocab_size") is not None or tokenizer_vocab_size(cfg) is not None
        problems += check_init_from(cfg, parts if sized else None)
    configured, tokenizer_vocab = cfg.decoder.get("vocab_size"), tokenizer_vocab_size(cfg)
    if isinstance(configured, int) and tokenizer_vocab and configured < tokenizer_vocab:
        problems.append(f"decoder.vocab_size={configured}: smaller than the tokenizer's "
                        f"{tokenizer_vocab} ids under paths.data")
    if problems:
        raise ConfigError(problems)
    return {"tokens_per_image": tokens_per_image, "image_size": image_size, "views": views,
            "tokens_per_view": per_view}
