"""Train-step overhead of the platform against a bare PyTorch loop, measured in one run.

Both sides train the same model (same config, same initial weights) on the same
micro-batch from the real pipeline:

- platform: ``DeepSpeedStrategy`` (DeepSpeed engine, scheduler, clipping, the
  grad-norm measurement) exactly as ``ablate-train`` drives it;
- baseline: ``torch.optim.AdamW`` + ``clip_grad_norm_`` + ``LambdaLR`` by hand, no
  DeepSpeed, no logging.

Steps alternate in rounds (A, B, A, B, ...) so drifts in machine load hit both sides
alike; the medians and their ratio are printed. Not a test: run it with ``make bench``.

    python bench/train_step.py                          # the demo model, one process
    python bench/train_step.py --steps 40 connector=mlp encoder.image_size=64
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ablate.train  # noqa: F401  registers schema and resolvers

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--data", default=None, help="corpus (default: a tiny one built in a temp dir)")
    p.add_argument("overrides", nargs="*", default=["connector=avgpool", "encoder.image_size=64"])
    args = p.parse_args()

    from ablate import dist
    from ablate.build import build_model
    from ablate.data.corpus import PRESETS, CorpusConfig, build_corpus
    from ablate.data.pipeline import build_train_loader
    from ablate.data.tokenizer import load_tokenizer
    from ablate.engine_setup import lr_lambda, param_groups
    from ablate.strategy import DeepSpeedStrategy, token_loss
    from ablate.validate import validate

    data = args.data or str(Path(tempfile.mkdtemp()) / "corpus")
    if args.data is None:
        build_corpus(CorpusConfig(out=data, **PRESETS["tiny"]), progress=False)
    cfg = compose(["experiment=demo", f"paths.data={data}", "logger=none", *args.overrides])
    facts = validate(cfg)
    dist.init(dist.detect())
    tok = load_tokenizer(data)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size, tok.image_id)
    bare = copy.deepcopy(model)
    batch = next(iter(build_train_loader(
        data, tok, weights=dict(cfg.data.weights), seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size, tokens_per_image=facts["tokens_per_image"],
        image_size=facts["image_size"], num_workers=0)))

    strategy = DeepSpeedStrategy(model, cfg, world_size=1)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(bare, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, cfg.train.max_steps,
                                                             o.min_lr_ratio))

    def platform_step():
        for _ in range(strategy.accum):
            strategy.micro_step(batch)

    def bare_step():
        out = bare(batch["input_ids"], batch["images"], positions_BT=batch["positions"],
                   doc_ids_BT=batch["doc_ids"])
        loss, _ = token_loss(out.logits, batch["labels"])
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    assert strategy.accum == 1, "benchmark one micro-batch per step (set global = micro batch)"
    times = {"platform": [], "bare": []}
    for i in range(args.warmup + args.steps):
        for name, fn in (("platform", platform_step), ("bare", bare_step)):
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    tokens = batch["input_ids"].numel()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {' '.join(args.overrides)}  micro-batch {tuple(batch['input_ids'].shape)}  "
          f"images {batch['images'].shape[0]}  tokens/image {facts['tokens_per_image']}")
    for k in ("bare", "platform"):
        q = statistics.quantiles(times[k], n=4)
        print(f"{k:9s} median {med[k]:7.1f} ms/step  (IQR {1000*q[0]:.1f}-{1000*q[2]:.1f})  "
              f"{tokens / med[k] * 1000:8.0f} tokens/s")
    print(f"ratio platform/bare: {med['platform'] / med['bare']:.3f}")


if __name__ == "__main__":
    main()
