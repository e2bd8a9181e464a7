"""``ablate-data``: build the synthetic corpus from the command line.

A preset gives the sample counts ("demo" by default, "tiny" for tests); any count or
size given explicitly overrides the preset.

``ablate-data convert FORMAT ...`` instead converts a real evaluation benchmark
(COCO, NoCaps, TextCaps, VQAv2, OK-VQA, TextVQA, VizWiz, GQA) into eval shards; see
``benchmarks.py`` and docs/benchmarks.md. It is dispatched on the first argument
rather than as an argparse subcommand, so the corpus command line (``--out`` at the
top level) stays exactly as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    p = argparse.ArgumentParser(prog="ablate-data", description=__doc__.splitlines()[0],
                                epilog="To convert a real benchmark: ablate-data convert --help")
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


def parse_convert_args(argv) -> argparse.Namespace:
    from .benchmark_formats import FORMATS

    formats = "\n".join(f"  {name:<9} {spec.task:<8} {spec.files}" for name, spec in FORMATS.items())
    p = argparse.ArgumentParser(
        prog="ablate-data convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert one split of a real evaluation benchmark into webdataset eval shards.",
        epilog=f"formats (name, task, --annotations):\n{formats}")
    p.add_argument("format", metavar="FORMAT", help="benchmark format: " + ", ".join(FORMATS))
    p.add_argument("--out", required=True, help="benchmark directory (one per benchmark)")
    p.add_argument("--images", required=True, help="directory holding the benchmark's images")
    p.add_argument("--annotations", required=True, help="annotation JSON file")
    p.add_argument("--questions", default=None, help="questions JSON file (vqav2, okvqa)")
    p.add_argument("--split", default="query", help="query (scored) or support (few-shot examples)")
    p.add_argument("--limit", type=int, default=None, help="keep the first N samples by id")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--force", action="store_true", help="replace a split that is already converted")
    p.add_argument("--skip-missing", action="store_true", help="leave out samples whose image is missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def convert_main(argv) -> int:
    from .benchmarks import INFO_FILE, convert

    args = parse_convert_args(argv)
    start = time.perf_counter()
    try:
        entry = convert(args.format, args.out, args.images, args.annotations, questions=args.questions,
                        split=args.split, limit=args.limit, shard_size=args.shard_size, force=args.force,
                        skip_missing=args.skip_missing, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"ablate-data convert: {e}")
    elapsed = time.perf_counter() - start
    print(f"benchmark: {Path(args.out).resolve()}  ({args.format}, {elapsed:.1f} s)")
    print(f"  {args.split:<8} {entry['samples']:>7} samples  {entry['shards']:>3} shards")
    if entry["skipped_missing"]:
        print(f"  skipped {entry['skipped_missing']} samples whose image is missing")
    print(f"  described in {Path(args.out) / INFO_FILE}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "convert":
        return convert_main(argv[1:])
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
