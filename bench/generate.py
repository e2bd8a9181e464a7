"""Greedy generation: KV cache against full recomputation per new token.

A tiny VLM (decoder 256 wide x 4 layers, 8 query / 4 key-value heads, random init;
a 2-block ViT with an MLP connector that text-only prompts never run) generates from
random text prompts of several lengths with ``ablate.eval.generate.generate``:

- cache: ``use_cache=True`` (one prefill, then one token per row per step);
- full: ``use_cache=False``, the whole sequence recomputed per new token (the bare
  PyTorch baseline: no cache, same model, same process).

Per prompt length and side, one repeat times ``generate`` with ``max_new_tokens=1``
(the prefill: one forward over the prompt) and with ``max_new_tokens=N`` (no stop
ids, so exactly N tokens); ``(t_N - t_1) / (N - 1)`` is the time per further new
token. Repeats alternate the two sides so drifts in machine load hit both alike;
medians (interquartile ranges in brackets) and the full/cache ratio are printed as a
markdown table. Not a test.

    python bench/generate.py                # prompt lengths 64, 256, 1024; 32 new tokens
    python bench/generate.py --quick        # 64 and 256, 8 new tokens, 2 repeats
    python bench/generate.py --lengths 128 512 --new 16 --batch 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_name  # noqa: E402


def build(vocab: int, max_seq_len: int, dim: int, layers: int):
    from models.connectors.mlp import MLPConnector
    from models.decoder.transformer import Transformer
    from models.encoders.vit import ViT
    from models.vlm import VLM

    enc = ViT(image_size=32, patch_size=8, width=32, depth=2, heads=2)
    dec = Transformer(vocab, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=4, max_seq_len=max_seq_len,
                      init_std=0.1)
    return VLM(enc, MLPConnector(enc.embed_dim, dim, enc.num_patches()), dec, image_token_id=5).eval()


def fmt(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{1000 * statistics.median(values):.2f} ({1000 * q[0]:.2f}-{1000 * q[2]:.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], help="prompt lengths")
    p.add_argument("--new", type=int, default=32, help="new tokens N per generation")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side")
    p.add_argument("--batch", type=int, default=1, help="prompts per generate call")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="lengths 64 256, 8 new tokens, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.new, args.repeats = [64, 256], 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from ablate.eval.generate import generate

    V = 512
    torch.manual_seed(0)
    model = build(V, max(args.lengths) + args.new, args.dim, args.layers)
    tok = types.SimpleNamespace(pad_id=0, image_id=5)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpu fp32")
    print(f"decoder {args.dim} x {args.layers} layers (8 heads, 4 kv heads), vocab {V}, batch {args.batch}, "
          f"{args.new} new tokens, {args.repeats} repeats per side after 1 warm-up\n")
    print("| prompt | cache prefill ms | cache ms/token | full prefill ms | full ms/token | full/cache per token |")
    print("|---:|---:|---:|---:|---:|---:|")
    for L in args.lengths:
        prompts = [torch.randint(10, V, (L,)).tolist() for _ in range(args.batch)]
        times: dict[str, dict[str, list[float]]] = {s: {"prefill": [], "token": []} for s in ("cache", "full")}
        for r in range(args.repeats + 1):
            for side in ("cache", "full"):
                def run(n: int) -> float:
                    t0 = time.perf_counter()
                    out = generate(model, tok, prompts, None, n, set(), use_cache=side == "cache")
                    assert all(len(o) == n for o in out)
                    return time.perf_counter() - t0

                t1, tn = run(1), run(args.new)
                if r > 0:  # the first round warms up
                    times[side]["prefill"].append(t1)
                    times[side]["token"].append((tn - t1) / (args.new - 1))
        ratio = statistics.median(times["full"]["token"]) / statistics.median(times["cache"]["token"])
        print(f"| {L} | {fmt(times['cache']['prefill'])} | {fmt(times['cache']['token'])} "
              f"| {fmt(times['full']['prefill'])} | {fmt(times['full']['token'])} | {ratio:.1f} |", flush=True)


if __name__ == "__main__":
    main()
