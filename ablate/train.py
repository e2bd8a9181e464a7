"""ablate-train: train one variant, evaluate it, write results.json.

Reads top to bottom: validate -> distributed setup -> tokenizer and model -> DeepSpeed
engine -> resume -> loop -> final checkpoint -> evaluation. The same path runs in one
CPU process, in two gloo processes under torchrun, and on a GPU cluster.

    ablate-train experiment=demo connector=avgpool encoder.image_size=32
    ablate-train -m experiment=demo connector=mlp,avgpool encoder.image_size=32,64
    torchrun --nproc_per_node 2 -m ablate.train experiment=demo
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ablate import dist
from ablate.config import CONF_DIR, register_configs
from ablate.files import write_json
from ablate.lr import resolve as resolve_optim
from ablate.snapshot import expose_hydra_plugins
from ablate.tracking import AuxWindow, Tracker, register_resolvers
from ablate.validate import ConfigError, validate

register_configs()
register_resolvers()
expose_hydra_plugins()  # the ablate sweeper and launcher, from any working directory

RESULTS = "results.json"
SCHEMA_VERSION = 2  # 2: few-shot metrics and the `eval` block (docs/evaluation.md)


class TrainingHalted(RuntimeError):
    """The run stopped on purpose (repeated numerical faults, a checkpoint it could not
    write); results.json already says failed and why."""


def rng_state() -> dict:
    """Every generator the training process draws from. DataLoader workers hold none that
    matters: their streams are seeded from (seed, rank, virtual worker) (data/pipeline.py)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def train(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    started = time.time()
    env = dist.detect()
    derived = validate(cfg, world_size=env.world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / RESULTS
    if results_path.exists():
        done = json.loads(results_path.read_text())
        if done.get("status") == "complete" and done.get("step") == cfg.train.max_steps:
            if env.is_main:
                print(f"[ablate] {run_dir} already finished; skipping (delete results.json to redo)")
            return done

    from ablate.data.faults import FaultMeter
    from ablate.data.pipeline import MixMeter, build_train_loader
    from ablate.data.splitting import Split
    from ablate.data.tokenizer import load_tokenizer
    from ablate.build import build_model
    from ablate.expert_parallel import apply_expert_parallel
    from ablate.preempt import Preemption
    from ablate.strategy import CheckpointError, DeepSpeedStrategy
    from models.utils import count_params

    dist.init(env)
    seed_everything(cfg.seed, cfg.train.deterministic)
    tok = load_tokenizer(cfg.paths.data)
    model = build_model(cfg, tok.vocab_size, tok.image_id)
    ckpt_dir = run_dir / "checkpoints"
    if cfg.train.init_from and not DeepSpeedStrategy.complete_tags(ckpt_dir):
        # Weights only (e.g. an upcycled decoder), before ZeRO partitions them; a resumed
        # run has trained past them and loads its own checkpoint instead.
        from ablate.weights import load_init

        try:
            parts = load_init(model, cfg.train.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError([str(e)]) from None
        if env.is_main:
            print(f"[ablate] {', '.join(parts)} initialised from {cfg.train.init_from}", flush=True)
    # Counted before the engine exists: ZeRO-3 partitions the parameters away.
    params = {"total": count_params(model),
              "decoder_non_embedding": model.decoder.num_params(non_embedding=True)}
    # Derived here, passed to the optimizer through cfg: the peak lr (a number, or the law
    # at this decoder's N) and the weight decay in torch's AdamW convention (ablate/lr.py).
    optim = resolve_optim(cfg.optim, params["decoder_non_embedding"])
    cfg.optim.lr, cfg.optim.weight_decay = optim.lr, optim.weight_decay
    # Each rank keeps its slice of the experts (counted above in full, before sharding).
    apply_expert_parallel(model, cfg.deepspeed.expert_parallel)
    strategy = DeepSpeedStrategy(model, cfg, env.world_size)
    t, accum = cfg.train, strategy.accum
    seq_len = cfg.data.seq_len
    tokens_per_step = t.global_batch_size * seq_len

    def halt(reason: str, step: int) -> TrainingHalted:
        """Record the run as failed with ``reason`` and return the exception to raise."""
        if env.is_main:
            try:
                write_json(results_path, {
                    "schema_version": SCHEMA_VERSION, "run_name": f"{cfg.name}/{run_dir.name}",
                    "status": "failed", "error": reason, "step": step, "overrides": overrides,
                    "skipped_steps": skipped_steps})
            except OSError as e:  # the disk that refused the checkpoint may refuse this too
                print(f"[ablate] could not write {results_path}: {e}", file=sys.stderr, flush=True)
        return TrainingHalted(reason)

    skipped_steps = 0
    try:
        loaded = strategy.load_latest(ckpt_dir)
    except CheckpointError as e:
        raise halt(str(e), 0) from None
    start_step, client = 0, {}
    if loaded is not None:
        start_step, client = loaded
    skipped_steps, bad_run = client.get("skipped_steps", 0), client.get("bad_run", 0)
    # Realised data mix, summed over ranks; its totals continue across a resume.
    mix = MixMeter(dict(cfg.data.weights), client.get("data_mix"))
    faults = FaultMeter(client.get("data_faults"))  # bad data skipped/truncated (data/faults.py)
    if env.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        print(
            f"[ablate] run {run_dir}\n"
            f"[ablate] params: total {params['total']:,}  decoder non-embedding "
            f"{params['decoder_non_embedding']:,}\n"
            f"[ablate] image views {derived['views']}  image tokens/image {derived['tokens_per_image']} "
            f"({derived['views']} x {derived['tokens_per_view']})  resolution "
            f"{derived['image_size']}  ranks {env.world_size}  grad accumulation {accum}  "
            f"tokens/step {tokens_per_step:,}\n"
            + f"[ablate] {optim.describe()}\n"
            + (f"[ablate] resumed from step {start_step}\n" if start_step else ""),
            flush=True,
        )
    group = cfg.name
    tracker = Tracker(cfg, run_dir, overrides, group, enabled=env.is_main, resume_step=start_step)
    if start_step == 0:  # once per run: a resumed run's history already has it
        tracker.log(optim.record(), 0)
    tracker.summary(optim.record())

    loader = build_train_loader(
        cfg.paths.data, tok, weights=dict(cfg.data.weights), seq_len=seq_len,
        micro_batch_size=t.micro_batch_size, tokens_per_image=derived["tokens_per_image"],
        image_size=derived["image_size"], split=Split.from_config(cfg.data.split),
        rank=env.rank, world_size=env.world_size,
        seed=cfg.seed, num_workers=cfg.data.num_workers, start_batch=start_step * accum,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    batches = iter(loader)
    if "rng" in client:
        # After the loader's iterator exists: creating it draws from torch's generator
        # (worker seeds), which the uninterrupted run did before step 1, not here.
        set_rng_state(client["rng"])
    bar = None
    if env.is_main and t.progress and start_step < t.max_steps:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=start_step, desc=run_dir.name[:40], unit="step",
                   dynamic_ncols=True, file=sys.stdout)

    preempt = Preemption(t.preempt_signal, t.max_requeues)  # a signal sets a flag; acted on below
    strategy.engine.train()
    window = {"loss": 0.0, "lm_loss": 0.0, "data_s": 0.0, "step_s": 0.0, "steps": 0, "label_tokens": 0}
    router = AuxWindow()  # MoE router statistics; empty for a dense decoder
    last = {}
    for step in range(start_step + 1, t.max_steps + 1):
        t0 = time.perf_counter()
        data_s, loss_sum = 0.0, 0.0
        for _ in range(accum):
            d0 = time.perf_counter()
            batch = next(batches)
            data_s += time.perf_counter() - d0
            stats = strategy.micro_step(batch)
            loss_sum += stats["loss"] / accum
            window["lm_loss"] += stats["lm_loss"] / accum
            window["label_tokens"] += stats["tokens"]
            router.add(stats["aux"])
            mix.add(batch)
            faults.add(batch)
        if stats["skipped"]:
            skipped_steps, bad_run = skipped_steps + 1, bad_run + 1
            if env.is_main:
                print(f"[ablate] step {step}: non-finite loss or gradient norm (loss {loss_sum:.4g}, "
                      f"grad norm {stats['grad_norm']:.4g}); step skipped on all ranks "
                      f"({bad_run} in a row, {skipped_steps} in all)", file=sys.stderr, flush=True)
        else:
            bad_run = 0
        window["loss"] += loss_sum
        window["data_s"] += data_s
        window["step_s"] += time.perf_counter() - t0
        window["steps"] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
        log_now = step % t.log_every == 0 or step == t.max_steps
        save_now = (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps
        if log_now or save_now:
            mix.sync(dist.reduce_over_ranks)
            faults.sync(dist.reduce_over_ranks)
        if log_now:
            n = window["steps"]
            # Losses are averaged and token counts summed over ranks: the record describes
            # the global batch, not rank 0's share of it.
            loss, loss_window, lm_window, label_tokens = dist.reduce_over_ranks(
                [loss_sum, window["loss"], window["lm_loss"], window["label_tokens"]],
                mean=[True, True, True, False])
            last = {"train/loss": loss}
            record = {
                "train/loss": loss, "train/loss_avg": loss_window / n,
                # train/loss includes the MoE aux losses; compare dense and MoE on lm_loss.
                "train/lm_loss": lm_window / n, "train/aux_loss": (loss_window - lm_window) / n,
                "train/lr": stats["lr"], "train/grad_norm": stats["grad_norm"],
                "perf/tokens_per_s": tokens_per_step * n / window["step_s"],
                "perf/step_ms": 1000 * window["step_s"] / n,
                "perf/data_wait_ms": 1000 * window["data_s"] / n,
                "perf/label_tokens_per_step": label_tokens / n,
                "train/tokens_seen": step * tokens_per_step,
                "train/skipped_steps": skipped_steps,
            }
            record.update(mix.record())
            record.update(faults.record())
            record.update(router.record(dist.reduce_over_ranks))
            tracker.log(record, step)
            window = {k: 0 if isinstance(v, int) else 0.0 for k, v in window.items()}
        if t.max_bad_steps and bad_run >= t.max_bad_steps:
            intact = DeepSpeedStrategy.complete_tags(ckpt_dir)
            tracker.finish()
            raise halt(
                f"{bad_run} consecutive steps (to step {step}) had a non-finite loss or gradient norm "
                f"(train.max_bad_steps={t.max_bad_steps}); stopped without saving. The last good "
                f"checkpoint is {intact[-1][1] if intact else 'none (no checkpoint yet)'}: lower the lr, "
                f"check the data, or raise train.max_bad_steps, then relaunch to resume from it.", step)
        stop, requeue = preempt.agreed() if step < t.max_steps else (False, False)
        if stop and not save_now:
            mix.sync(dist.reduce_over_ranks)
            faults.sync(dist.reduce_over_ranks)
        if save_now or stop:
            client = {"step": step, "micro_batches": step * accum, "rng": rng_state(),
                      "data_mix": mix.state(), "data_faults": faults.state(),
                      "skipped_steps": skipped_steps, "bad_run": bad_run}
            try:
                strategy.save(ckpt_dir, step, client, keep=t.keep_checkpoints)
            except CheckpointError as e:
                tracker.finish()
                raise halt(str(e), step) from None
        if cfg.eval.every and step % cfg.eval.every == 0 and step < t.max_steps:
            run_eval(strategy, tok, cfg, tracker, step, env.is_main and t.progress)
        if stop:  # preempted or near the time limit: all ranks saved this step
            tracker.finish()
            preempt.exit(step, requeue, env.is_main)
    if bar is not None:
        bar.close()

    results = {
        "schema_version": SCHEMA_VERSION, "run_name": f"{cfg.name}/{run_dir.name}",
        "status": "complete", "step": t.max_steps, "tokens_seen": t.max_steps * tokens_per_step,
        "overrides": overrides, "metrics": {}, "baselines": {}, "counts": {},
        "params": params, "data_mix": mix.block(), "data_faults": faults.block(),
        "optim": {k.removeprefix("optim/"): v for k, v in optim.record().items()},
        "skipped_steps": skipped_steps,
    }
    if last:
        results["metrics"]["train/loss"] = last["train/loss"]
    if cfg.eval.at_end:
        from ablate.eval.evaluate import samples_json

        if cfg.deepspeed.expert_parallel > 1:
            # Every rank gets all experts back: generation then needs no all-to-all, so
            # ranks whose greedy decoding stops at different steps cannot hang.
            from ablate.expert_parallel import gather_experts

            gather_experts(strategy.module)
        ev = run_eval(strategy, tok, cfg, tracker, t.max_steps, env.is_main and t.progress)
        results["metrics"].update(ev["metrics"])
        results["baselines"] = ev["baselines"]
        results["counts"] = ev["counts"]
        results["eval"] = ev["eval"]
        if env.is_main:
            write_json(run_dir / "samples.json", samples_json(ev["samples"]))
    if env.is_main:
        results["wall_time_s"] = time.time() - started
        write_json(results_path, results)
        tracker.summary(results["metrics"])
        print("[ablate] " + "  ".join(f"{k}={v:.4g}" for k, v in results["metrics"].items()), flush=True)
    tracker.finish()
    return results


def run_eval(strategy, tok, cfg: DictConfig, tracker: Tracker, step: int, progress: bool) -> dict:
    """Evaluate on every rank (queries dealt among them), log the metrics and a table of
    sample predictions at ``step``; training resumes unchanged afterwards."""
    from ablate.eval.evaluate import evaluate, sample_table

    ev = evaluate(strategy.module, tok, cfg, device=strategy.device, dtype=strategy.dtype, progress=progress)
    tracker.log(ev["metrics"], step)
    tracker.table("eval/samples", *sample_table(ev["samples"]), step=step)
    return ev


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        train(cfg, run_dir, overrides)
    except TrainingHalted as e:  # results.json already records it
        print(f"ablate-train: stopped: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return
        sys.exit(1)
    except ConfigError as e:
        print(f"ablate-train: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            _record_failure(run_dir, overrides, str(e))
            return
        sys.exit(2)
    except Exception as e:
        # In a sweep, one failing variant must not take the others down: record the
        # failure where ablate-compare will list it, and go on.
        if hc.mode != RunMode.MULTIRUN or os.environ.get("ABLATE_RAISE"):
            raise
        traceback.print_exc()
        _record_failure(run_dir, overrides, f"{type(e).__name__}: {e}")


def _record_failure(run_dir: Path, overrides: list[str], error: str) -> None:
    if dist.detect().is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RESULTS, {
            "schema_version": SCHEMA_VERSION, "status": "failed", "error": error,
            "overrides": overrides, "run_name": run_dir.name,
        })


if __name__ == "__main__":
    main()
