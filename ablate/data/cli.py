"""``ablate-data``: build the synthetic corpus from the command line.

A preset gives the sample counts ("demo" by default, "tiny" for tests); any count or
size given explicitly overrides the preset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import format as fmt
from .corpus import PRESETS, CorpusConfig, build_corpus

# (flag, config field, help) for the integer options that override a preset.
_INT_OPTIONS = [
    ("--num-caption", "num_caption", "training image/caption pairs"),
    ("--num-interleaved", "num_interleaved", "training interleaved documents"),
    ("--num-text", "num_text", "training text-only samples"),
    ("--num-eval-caption", "num_eval_caption", "evaluation captioning images"),
    ("--num-eval-vqa", "num_eval_vqa", "evaluation question/answer samples"),
    ("--num-eval-text", "num_eval_text", "evaluation text-only samples"),
    ("--shard-size", "shard_size", "samples per tar shard"),
    ("--render-size", "render_size", "image side in pixels"),
    ("--vocab-size", "vocab_size", "maximum BPE vocabulary size"),
    ("--images-per-doc-min", "images_per_doc_min", "fewest images per interleaved document"),
    ("--images-per-doc-max", "images_per_doc_max", "most images per interleaved document"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ablate-data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument("--seed", type=int, default=0, help="root random seed")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="sample counts to start from")
    for flag, field, help_ in _INT_OPTIONS:
        p.add_argument(flag, dest=field, type=int, default=None, help=f"{help_} (overrides the preset)")
    p.add_argument("--force", action="store_true", help="replace a corpus built with another config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> CorpusConfig:
    fields = dict(PRESETS[args.preset])
    fields.update({f: getattr(args, f) for _, f, _ in _INT_OPTIONS if getattr(args, f) is not None})
    return CorpusConfig(out=args.out, seed=args.seed, **fields)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"ablate-data: {e}")
    start = time.perf_counter()
    try:
        out = build_corpus(cfg, progress=not args.no_progress, force=args.force)
    except FileExistsError as e:
        raise SystemExit(f"ablate-data: {e}")
    elapsed = time.perf_counter() - start
    meta = json.loads((Path(out) / fmt.META_FILE).read_text())
    print(f"corpus: {Path(out).resolve()}  ({elapsed:.1f} s)")
    names = [f"train/{s}" for s in fmt.STREAMS] + [f"eval/{s}" for s in fmt.EVAL_SPLITS]
    for name in names:
        print(f"  {name:<18} {meta['counts'][name]:>7} samples  {meta['shards'][name]:>3} shards")
    print(f"  images {meta['render_size']} px, vocabulary {meta['vocab_size']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
