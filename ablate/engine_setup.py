"""What the DeepSpeed engine is given: optimizer groups, the learning-rate schedule and
its config dict (ablate/strategy.py builds the engine from them; the bare-PyTorch
baselines in bench/ and the expert-parallel tests reuse the same pieces).

- Weight decay applies to matrices only; norms, biases and position/gate vectors keep
  their scale.
- The schedule is linear warmup, then cosine to ``min_lr_ratio`` of the peak.
- Under expert parallelism with ZeRO 0 in fp32 the strategy clips itself
  (``clips_itself``): DeepSpeed's clipping norm there is the mean of the ranks' norms.
"""

from __future__ import annotations

import math

import torch

from ablate import expert_parallel as ep


def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step ``s`` (0-based)."""

    def fn(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = min(1.0, (s - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups; with sharded experts, each group's expert parameters move to a group
    of their own marked ``moe`` (DeepSpeed's split), which ZeRO partitions over the
    expert-data-parallel group instead of all ranks."""
    # Decay matrices only: norms, biases and position/gate vectors keep their scale.
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else keep).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": keep, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if ep.expert_parallel_layers(model):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def expert_parallel_size(cfg) -> int:
    return int(cfg.deepspeed.get("expert_parallel", 1))


def clips_itself(cfg) -> bool:
    """Whether the strategy, not DeepSpeed, clips: plain fp32 data parallel (ZeRO 0) with
    sharded experts, where DeepSpeed's clipping norm is the mean of the ranks' norms."""
    d = cfg.deepspeed
    return expert_parallel_size(cfg) > 1 and d.zero_stage == 0 and d.precision == "fp32"


def deepspeed_config(cfg, world_size: int) -> dict:
    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * world_size)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0 if clips_itself(cfg) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    ds.update(dict(cfg.deepspeed.extra))
    return ds
