"""The DeepSpeed engine behind a small interface: setup, forward/backward, step,
save, load.

Notable choices:
- The optimizer is ``torch.optim.AdamW`` handed to DeepSpeed, not DeepSpeed's own
  ``"type": "AdamW"``, which JIT-compiles a fused op on first use (about a minute on
  a fresh CPU machine) and is no faster at this scale.
- The schedule (linear warmup, cosine to ``min_lr_ratio`` of the peak) is a
  ``LambdaLR`` that DeepSpeed steps at accumulation boundaries and checkpoints.
- Checkpoints are staged, described by a manifest written last, and renamed into place
  (``ablate/checkpoint.py``, docs/checkpoints.md): a ``step-N`` directory is always
  whole, and resume takes the newest one whose files match their manifest, passing over
  (with a warning) any that do not. A write that fails (a full disk) leaves the previous
  checkpoint as it was and stops the run with :class:`CheckpointError`.
- A step whose loss or gradient norm is not finite on any rank is skipped by every rank:
  no update, no scheduler step, gradients dropped (``micro_step``'s ``skipped``).
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
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ablate import checkpoint as ckpt
from ablate import expert_parallel as ep
from ablate.engine_setup import clips_itself, deepspeed_config, expert_parallel_size, lr_lambda, param_groups
from ablate.checkpoint import COMPLETE, CheckpointError  # noqa: F401  (re-exported)
from ablate.dist import reduce_over_ranks
from models.moe.megablocks import clear_megablocks_state

FAULT_STEPS_ENV = "ABLATE_FAULT_STEPS"
"""Test hook (fault injection): comma-separated optimizer steps whose loss is multiplied by
NaN, e.g. ``ABLATE_FAULT_STEPS=3,4``; ``ABLATE_FAULT_RANKS=1`` limits it to those ranks.
Only tests/test_faults.py sets it."""
def _int_set(value: str | None) -> frozenset[int]:
    return frozenset(int(v) for v in (value or "").replace(" ", "").split(",") if v)


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
        # Plain fp32 data parallel hands DeepSpeed the torch optimizer itself, which knows
        # nothing of skipped steps: the skip is done here. DeepSpeed's own optimizers (ZeRO,
        # bf16) skip a step with a non-finite gradient norm by themselves.
        self.own_skip = not (self.engine.zero_optimization() or self.engine.bfloat16_enabled())
        self._bad_loss = False
        self.fault_steps = _int_set(os.environ.get(FAULT_STEPS_ENV))
        self.fault_ranks = _int_set(os.environ.get("ABLATE_FAULT_RANKS"))
        self._writer = ckpt.GuardedWriter(self.engine.checkpoint_engine.save)
        self.engine.checkpoint_engine.save = self._writer
        self.layout = ckpt.Layout(world_size, int(cfg.deepspeed.zero_stage), self.ep_size,
                                  str(cfg.deepspeed.precision))
        self.config = ckpt.experiment_config(cfg)
        self.config_hash = ckpt.config_hash(self.config)
        self.checksum_max_bytes = float(cfg.train.get("checksum_max_mb", 1024)) * 2**20
        self.strict_resume = bool(cfg.train.get("strict_resume", True))

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
        update used, the global gradient norm before clipping, and ``skipped``: True when
        the step was dropped on every rank because a loss or the gradient norm was not
        finite somewhere (weights, optimizer state and schedule unchanged).
        """
        b = self.to_device(batch)
        clear_megablocks_state()  # MegaBlocks' global loss lists start every micro-batch empty
        out = self.engine(
            b["input_ids"], b["images"], positions_BT=b["positions"], doc_ids_BT=b["doc_ids"]
        )
        lm_loss, n = token_loss(out.logits, b["labels"])
        loss = lm_loss + out.aux_loss
        if self.fault_steps and self.engine.global_steps + 1 in self.fault_steps and (
                not self.fault_ranks or torch.distributed.get_rank() in self.fault_ranks):
            loss = loss * float("nan")  # the fault-injection hook (FAULT_STEPS_ENV)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            # NaN gradients then reach every rank through the gradient reduction, which is
            # how DeepSpeed's optimizers see the fault; the flag serves the plain one.
            self._bad_loss = True
            loss = loss * float("nan")
        self.engine.backward(loss)
        stats = {"loss": loss_value, "lm_loss": float(lm_loss.detach()), "tokens": n,
                 "aux": aux_stats(out.aux)}
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return stats
        stats["lr"] = self.scheduler.get_last_lr()[0]
        norm, bad = None, False
        if self.own_skip:
            # Plain fp32 data parallel clips without recording the norm; measure it here,
            # before clipping (gradients are already averaged over ranks at the boundary).
            if self.ep_size > 1:
                norm = ep.grad_norm(self.engine.module)  # every expert once, over all ranks
            else:
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            local = self._bad_loss or not bool(torch.isfinite(norm))
            bad = reduce_over_ranks([float(local)], mean=[False])[0] > 0  # all ranks skip together
            if bad:
                self._skip_next_update()
            elif self.clip > 0:
                self._clip(norm)
        self.engine.step()
        self._bad_loss = False
        if self.own_skip and bad:
            self.engine.optimizer.overflow = False  # read by the engine at every step
        if not self.own_skip:
            # DeepSpeed's optimizers agree on the overflow over the data-parallel group.
            bad = bool(getattr(self.engine.optimizer, "overflow", False))
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        stats["grad_norm"] = float(norm) if norm is not None else float("nan")
        stats["skipped"] = bad
        return stats

    def _skip_next_update(self) -> None:
        """Make the next ``optimizer.step()`` a no-op that reports an overflow: DeepSpeed's
        engine then leaves the scheduler alone, counts a skipped step and zeroes the
        gradients, exactly as for an fp16 overflow."""
        opt = self.engine.optimizer
        original = opt.step

        def skipped(closure=None):
            opt.step = original
            opt.overflow = True

        opt.step = skipped

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
        return ckpt.tag_of(step)

    @staticmethod
    def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
        """(step, tag) of every checkpoint in place, oldest first: a manifest whose files
        are all there with their sizes (checksums are checked when resuming), or a
        pre-manifest ``COMPLETE`` marker."""
        return ckpt.valid_tags(Path(ckpt_dir))

    def save(self, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> Path:
        """Stage, describe and publish the checkpoint of ``step`` (module docstring of
        ``ablate/checkpoint.py``), then keep the newest ``keep``. Collective. Raises
        :class:`CheckpointError` on every rank if any rank could not write its part; the
        staging directory is removed and earlier checkpoints are untouched."""
        import torch.distributed as dist

        ckpt_dir, rank = Path(ckpt_dir), dist.get_rank()
        tag = ckpt.tag_of(step)
        staging = ckpt_dir / (ckpt.STAGING_PREFIX + tag)
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        writer = self._writer
        writer.begin()
        entries: dict[str, dict] = {}
        try:
            self.engine.save_checkpoint(str(ckpt_dir), tag=staging.name, client_state=client_state,
                                        save_latest=False)
            if self.ep_size > 1 and writer.error is None:
                try:
                    shard = ep.save_expert_shards(self.engine.module, staging)  # one file per EP rank
                except RuntimeError as e:  # torch's zip writer on a full disk
                    raise OSError(str(e)) from e
                writer.written += [shard] if shard is not None else []
            for path in writer.written if writer.error is None else []:
                entries[str(path.relative_to(staging))] = ckpt.file_entry(path, self.checksum_max_bytes)
        except OSError as e:
            writer.error = writer.error or e
        self._abandon_if_failed(ckpt_dir, staging, step, writer.error)
        if dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, entries)
            entries = {k: v for part in gathered for k, v in part.items()}
        error = None
        if rank == 0:
            try:
                manifest = ckpt.build_manifest(staging, step, self.config, self.layout, entries,
                                               self.checksum_max_bytes)
                ckpt.publish(ckpt_dir, staging, manifest)
            except OSError as e:
                error = e
        self._abandon_if_failed(ckpt_dir, staging, step, error)
        if rank == 0:
            ckpt.prune(ckpt_dir, keep)
        dist.barrier()
        return ckpt_dir / tag

    def _abandon_if_failed(self, ckpt_dir: Path, staging: Path, step: int, error: Exception | None) -> None:
        """Agree over the ranks whether any failed; if so remove the staging directory and
        raise on every rank, naming the checkpoint a relaunch will resume from."""
        if reduce_over_ranks([float(error is not None)], mean=[False])[0] == 0:
            return
        import torch.distributed as dist

        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        intact = ckpt.valid_tags(ckpt_dir)
        previous = f"the previous checkpoint {intact[-1][1]} is intact" if intact else "there is no earlier checkpoint"
        cause = f"{type(error).__name__}: {error}" if error else "another rank could not write its part"
        with contextlib.suppress(OSError):
            cause += f"; {shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free there"
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {ckpt_dir} ({cause}). Nothing of it "
            f"was kept and {previous}; free space or fix the file system, then relaunch to resume.")

    def load_latest(self, ckpt_dir: Path) -> tuple[int, dict] | None:
        """Load the newest checkpoint that passes verification: (step, client_state), or
        None when there is none at all. Collective. Staging directories of a killed save
        are removed first. A checkpoint whose files do not match its manifest is passed
        over with a warning naming what is wrong; one written by an incompatible layout or
        (with ``train.strict_resume``) another experiment config raises
        :class:`CheckpointError`, as does a directory of checkpoints none of which is
        usable."""
        import torch.distributed as dist

        ckpt_dir, rank, world = Path(ckpt_dir), dist.get_rank(), dist.get_world_size()
        if rank == 0:
            for name in ckpt.clean_stale(ckpt_dir):
                print(f"[ablate] removed {ckpt_dir / name}, left by a save that did not finish",
                      file=sys.stderr, flush=True)
        dist.barrier()
        candidates = ckpt.checkpoint_tags(ckpt_dir)
        for step, tag in reversed(candidates):
            tag_dir = ckpt_dir / tag
            manifest = ckpt.read_manifest(tag_dir)
            legacy = manifest is None and ckpt.intact(tag_dir)
            if manifest is not None:
                problems = ckpt.check_files(tag_dir, manifest, hash_share=(rank, world))
                if manifest.get("tag") != tag:
                    problems.append(f"its manifest describes {manifest.get('tag')}")
            else:
                problems = [] if legacy else [f"{ckpt.MANIFEST} is missing or unreadable"]
            if reduce_over_ranks([float(len(problems))], mean=[False])[0] > 0:
                if problems:
                    who = f" (rank {rank})" if world > 1 else ""
                    print(f"[ablate] WARNING{who}: skipping checkpoint {tag_dir}: {'; '.join(problems)}",
                          file=sys.stderr, flush=True)
                continue
            if legacy and rank == 0:
                print(f"[ablate] WARNING: {tag_dir} predates manifests ({COMPLETE} marker only); "
                      "loading it unverified", file=sys.stderr, flush=True)
            if manifest is not None:
                self._check_compatible(tag_dir, manifest)
            return step, self._load(ckpt_dir, tag)
        if candidates:
            raise CheckpointError(f"none of the {len(candidates)} checkpoints in {ckpt_dir} is usable "
                                  "(warnings above); move them aside to start the run over")
        return None

    def _check_compatible(self, tag_dir: Path, manifest: dict) -> None:
        problems = self.layout.problems_loading(manifest)
        if problems:
            raise CheckpointError(f"{tag_dir} cannot be resumed by this job: {'; '.join(problems)}")
        if manifest.get("config_hash") == self.config_hash:
            return
        diff = ckpt.config_diff(manifest.get("config", {}), self.config)
        msg = (f"{tag_dir} was written with another experiment config ({len(diff)} key(s) differ: "
               f"{', '.join(diff[:12])}{', ...' if len(diff) > 12 else ''})")
        if self.strict_resume:
            raise CheckpointError(msg + "; relaunch with the original settings, or set "
                                  "train.strict_resume=false to resume anyway")
        import torch.distributed as dist

        if dist.get_rank() == 0:
            print(f"[ablate] WARNING: {msg}; resuming anyway (train.strict_resume=false)",
                  file=sys.stderr, flush=True)

    def _load(self, ckpt_dir: Path, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
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
        return client_state or {}
