"""The DeepSpeed engine behind a small interface: setup, forward/backward, step,
save, load.

Notable choices:
- The optimizer is ``torch.optim.AdamW`` handed to DeepSpeed, not DeepSpeed's own
  ``"type": "AdamW"``, which JIT-compiles a fused op on first use (about a minute on
  a fresh CPU machine) and is no faster at this scale.
- The schedule (linear warmup, cosine to ``min_lr_ratio`` of the peak) is a
  ``LambdaLR`` that DeepSpeed steps at accumulation boundaries and checkpoints.
- A checkpoint is complete only once every rank has written its part and rank 0
  has written ``COMPLETE`` into the tag directory; loading ignores tags without it,
  so a job killed mid-save resumes from the previous complete checkpoint.
- Expert parallelism (``deepspeed.expert_parallel`` > 1, ``ablate/expert_parallel.py``):
  the sharded expert parameters get optimizer groups of their own (DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer``), the engine is told the model
  has MoE layers so that it reduces them over the expert-data-parallel group only, and
  every checkpoint also holds one expert-shard file per EP rank, put back on load. With
  ZeRO 0 in fp32 the gradient norm and clipping are done here over all experts
  (DeepSpeed's own clipping there averages the per-rank norms instead).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ablate import expert_parallel as ep
from ablate.files import write_json
from models.moe.megablocks import clear_megablocks_state

COMPLETE = "COMPLETE"


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


def token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over labelled positions; 0 (not NaN) when there are none."""
    n = int((labels_BT != -100).sum())
    total = F.cross_entropy(
        logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / max(n, 1), n


def aux_stats(aux: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
    """The decoder's detached statistics (MoE router stats, ``moe/layer<i>/<name>``) as
    Python numbers: scalars as floats, vectors (tokens per expert) as lists; one
    device-to-host copy for all of them."""
    if not aux:
        return {}
    flat = torch.cat([v.detach().float().flatten() for v in aux.values()]).tolist()
    out, i = {}, 0
    for key, value in aux.items():
        n = value.numel()
        out[key] = flat[i] if value.dim() == 0 else flat[i:i + n]
        i += n
    return out


class DeepSpeedStrategy:
    def __init__(self, model: torch.nn.Module, cfg, world_size: int):
        import deepspeed

        o = cfg.optim
        optimizer = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio)
        )
        self.config = deepspeed_config(cfg, world_size)
        self.ep_size = expert_parallel_size(cfg)
        sharded = bool(ep.expert_parallel_layers(model))
        if sharded != (self.ep_size > 1):
            raise ValueError(f"deepspeed.expert_parallel={self.ep_size} but the model's experts are "
                             f"{'' if sharded else 'not '}sharded (apply ablate.expert_parallel first)")
        with ep.moe_engine() if sharded else contextlib.nullcontext():
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
            )
        self.accum = self.config["gradient_accumulation_steps"]
        self.dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
        self.clip = cfg.optim.grad_clip if clips_itself(cfg) else 0.0

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                out[k] = v.to(self.dtype) if v.is_floating_point() else v
            else:
                out[k] = v
        return out

    def micro_step(self, batch: dict) -> dict:
        """Forward and backward one micro-batch, then ``engine.step()``.

        ``stats["aux"]`` holds the decoder's statistics for this micro-batch (per MoE
        layer: ``moe/layer<i>/imbalance``, ``entropy``, ``lb_loss``, ``z_loss`` as floats,
        ``tokens_per_expert`` as a list); empty for a dense decoder.

        DeepSpeed wants ``step()`` after every micro-batch and applies the update only
        at the accumulation boundary; there the returned dict also holds the lr the
        update used and the global gradient norm before clipping.
        """
        b = self.to_device(batch)
        clear_megablocks_state()  # MegaBlocks' global loss lists start every micro-batch empty
        out = self.engine(
            b["input_ids"], b["images"], positions_BT=b["positions"], doc_ids_BT=b["doc_ids"]
        )
        lm_loss, n = token_loss(out.logits, b["labels"])
        loss = lm_loss + out.aux_loss
        self.engine.backward(loss)
        stats = {"loss": float(loss.detach()), "lm_loss": float(lm_loss.detach()), "tokens": n,
                 "aux": aux_stats(out.aux)}
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return stats
        stats["lr"] = self.scheduler.get_last_lr()[0]
        norm = None
        if not (self.engine.zero_optimization() or self.engine.bfloat16_enabled()):
            # Plain fp32 data parallel clips without recording the norm; measure it here,
            # before clipping (gradients are already averaged over ranks at the boundary).
            if self.ep_size > 1:
                norm = ep.grad_norm(self.engine.module)  # every expert once, over all ranks
                if self.clip > 0:
                    self._clip(norm)
            else:
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        stats["grad_norm"] = float(norm) if norm is not None else float("nan")
        return stats

    @torch.no_grad()
    def _clip(self, norm: torch.Tensor) -> None:
        # The formula of DeepSpeed's and torch's clip_grad_norm_.
        coef = (self.clip / (norm + 1e-6)).clamp(max=1.0)
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))

    # --- checkpoints -----------------------------------------------------------
    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    @staticmethod
    def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
        """(step, tag) of every complete checkpoint, oldest first."""
        if not ckpt_dir.is_dir():
            return []
        found = []
        for d in ckpt_dir.iterdir():
            if d.name.startswith("step-") and (d / COMPLETE).exists():
                found.append((int(d.name.split("-")[1]), d.name))
        return sorted(found)

    def save(self, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> Path:
        import torch.distributed as dist

        tag = self.tag(step)
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
        if self.ep_size > 1:
            ep.save_expert_shards(self.engine.module, ckpt_dir / tag)  # one file per EP rank
        dist.barrier()  # every rank's files are on disk before the marker
        if dist.get_rank() == 0:
            write_json(ckpt_dir / tag / COMPLETE, {"step": step, "time": time.time()})
            for _, old in self.complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        dist.barrier()
        return ckpt_dir / tag

    def load_latest(self, ckpt_dir: Path) -> tuple[int, dict] | None:
        """Load the newest complete checkpoint; (step, client_state) or None."""
        tags = self.complete_tags(ckpt_dir)
        if not tags:
            return None
        step, tag = tags[-1]
        _, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if self.ep_size > 1:
            # DeepSpeed's model file is rank 0's: it gave every rank rank 0's experts. The
            # shards put each rank's own back. ZeRO 1/2 restored their fp32 master copies from
            # the per-rank files; those must agree with the shards, or the next step would
            # overwrite the experts with someone else's.
            ep.load_expert_shards(self.engine.module, ckpt_dir / tag)
            diff = ep.master_weight_mismatch(self.engine.module)
            if diff > 0:
                raise RuntimeError(f"{ckpt_dir / tag}: the optimizer's master weights of the experts differ "
                                   f"from the saved expert shards (max abs difference {diff:.3g})")
        return step, client_state or {}
