"""ablate-eval: evaluate a run's checkpoint and write its results.

    ablate-eval runs/demo/connector=avgpool-1a2b3c4d            # newest complete checkpoint
    ablate-eval RUN_DIR --step 100 --out /tmp/eval.json          # a chosen one, elsewhere
    ablate-eval RUN_DIR --set eval.max_vqa=1000                  # config overrides

The model is rebuilt from the run's resolved ``config.yaml`` and loaded from the
DeepSpeed checkpoint's module state (ZeRO stages 0-2 keep it whole in one file; stage 3
shards are consolidated with DeepSpeed's zero_to_fp32).
Images are preprocessed as in training, the run's ``data.split`` views included
(a config written before image splitting existed means no splitting).
Runs in one process, no process group needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ablate.strategy import DeepSpeedStrategy


def load_module_state(ckpt_dir: Path, step: int | None, zero_stage: int = 0) -> tuple[int, dict]:
    """(step, model state dict) of the newest (or the given) complete checkpoint."""
    tags = DeepSpeedStrategy.complete_tags(ckpt_dir)
    if step is not None:
        tags = [t for t in tags if t[0] == step]
    if not tags:
        have = [s for s, _ in DeepSpeedStrategy.complete_tags(ckpt_dir)]
        raise FileNotFoundError(
            f"no complete checkpoint{'' if step is None else f' for step {step}'} in {ckpt_dir} "
            f"(complete steps: {have or 'none'})"
        )
    step, tag = tags[-1]
    if zero_stage == 3:
        # Stage 3 shards the weights themselves; DeepSpeed's own consolidation joins them.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return step, get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    path = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete or not DeepSpeed's")
    state = torch.load(path, map_location="cpu", weights_only=False)
    # Under expert parallelism DeepSpeed's model file holds rank 0's experts only; the
    # other ranks' experts are in the per-rank shard files beside it.
    from ablate.expert_parallel import merge_expert_shards

    return step, merge_expert_shards(state["module"], ckpt_dir / tag)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ablate-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--out", type=Path, default=None, help="results file (default: RUN_DIR/results.json)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)

    from ablate.build import build_model
    from ablate.data.splitting import Split
    from ablate.data.tokenizer import load_tokenizer
    from ablate.eval.evaluate import evaluate
    from ablate.files import write_json
    from ablate.train import RESULTS, SCHEMA_VERSION

    cfg_path = args.run_dir / "config.yaml"
    if not cfg_path.exists():
        print(f"ablate-eval: {cfg_path} not found: is {args.run_dir} a run directory?", file=sys.stderr)
        return 2
    cfg = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(args.set))
    started = time.time()
    try:
        step, state = load_module_state(args.run_dir / "checkpoints", args.step,
                                        cfg.deepspeed.zero_stage)
    except FileNotFoundError as e:
        print(f"ablate-eval: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(cfg.paths.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok.vocab_size, tok.image_id)
    model.load_state_dict(state)
    split = Split.from_config(cfg.data.get("split"))
    print(f"step {step}: {split.num_views} view(s) per image x {model.tokens_per_image} tokens")
    ev = evaluate(model, tok, cfg, device=torch.device("cpu"), progress=True)
    out = args.out or args.run_dir / RESULTS
    previous = json.loads(out.read_text()) if out.exists() else {}
    results = {
        **previous, "schema_version": SCHEMA_VERSION, "status": "complete", "step": step,
        "metrics": {**previous.get("metrics", {}), **ev["metrics"]},
        "baselines": ev["baselines"], "counts": ev["counts"], "eval": ev["eval"],
        "eval_wall_time_s": time.time() - started,
    }
    results.setdefault("run_name", f"{cfg.name}/{args.run_dir.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    for k, v in sorted(ev["metrics"].items()):
        print(f"{k:32s} {v:.4f}")
    for k, v in sorted(ev["baselines"].items()):
        print(f"baseline {k:23s} {v:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
