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
from ablate.tracking import AuxWindow, Tracker, register_resolvers
from ablate.validate import ConfigError, validate

register_configs()
register_resolvers()

RESULTS = "results.json"
SCHEMA_VERSION = 1


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


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

    from ablate.data.pipeline import MixMeter, build_train_loader
    from ablate.data.splitting import Split
    from ablate.data.tokenizer import load_tokenizer
    from ablate.build import build_model
    from ablate.expert_parallel import apply_expert_parallel
    from ablate.preempt import Preemption
    from ablate.strategy import DeepSpeedStrategy
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

    loaded = strategy.load_latest(ckpt_dir)
    start_step, client = 0, {}
    if loaded is not None:
        start_step, client = loaded
        if "rng" in client:
            set_rng_state(client["rng"])
    # Realised data mix, summed over ranks; its totals continue across a resume.
    mix = MixMeter(dict(cfg.data.weights), client.get("data_mix"))
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
    bar = None
    if env.is_main and t.progress and start_step < t.max_steps:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=start_step, desc=run_dir.name[:40], unit="step",
                   dynamic_ncols=True, file=sys.stdout)

    preempt = Preemption(t.preempt_signal)  # a signal sets a flag; acted on below
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
            }
            record.update(mix.record())
            record.update(router.record(dist.reduce_over_ranks))
            tracker.log(record, step)
            window = {k: 0 if isinstance(v, int) else 0.0 for k, v in window.items()}
        stop, requeue = preempt.agreed() if step < t.max_steps else (False, False)
        if stop and not save_now:
            mix.sync(dist.reduce_over_ranks)
        if save_now or stop:
            client = {"step": step, "micro_batches": step * accum, "rng": rng_state(),
                      "data_mix": mix.state()}
            strategy.save(ckpt_dir, step, client, keep=t.keep_checkpoints)
        if stop:  # preempted or near the time limit: all ranks saved this step
            tracker.finish()
            preempt.exit(step, requeue, env.is_main)
    if bar is not None:
        bar.close()

    results = {
        "schema_version": SCHEMA_VERSION, "run_name": f"{cfg.name}/{run_dir.name}",
        "status": "complete", "step": t.max_steps, "tokens_seen": t.max_steps * tokens_per_step,
        "overrides": overrides, "metrics": {}, "baselines": {}, "counts": {},
        "params": params, "data_mix": mix.block(),
        "optim": {k.removeprefix("optim/"): v for k, v in optim.record().items()},
    }
    if last:
        results["metrics"]["train/loss"] = last["train/loss"]
    if cfg.eval.at_end:
        from ablate.eval.evaluate import evaluate

        if cfg.deepspeed.expert_parallel > 1:
            # Every rank gets all experts back: generation then needs no all-to-all, so
            # ranks whose greedy decoding stops at different steps cannot hang.
            from ablate.expert_parallel import gather_experts

            gather_experts(strategy.module)
        ev = evaluate(strategy.module, tok, cfg, device=strategy.device, dtype=strategy.dtype,
                      progress=env.is_main and t.progress)
        results["metrics"].update(ev["metrics"])
        results["baselines"] = ev["baselines"]
        results["counts"] = ev["counts"]
        tracker.log(ev["metrics"], t.max_steps)
        if env.is_main:
            write_json(run_dir / "samples.json", ev["samples"])
    if env.is_main:
        results["wall_time_s"] = time.time() - started
        write_json(results_path, results)
        tracker.summary(results["metrics"])
        print("[ablate] " + "  ".join(f"{k}={v:.4g}" for k, v in results["metrics"].items()), flush=True)
    tracker.finish()
    return results


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        train(cfg, run_dir, overrides)
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
