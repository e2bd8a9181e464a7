"""MegaBlocks dMoE against the torch reference backend, on a GPU, at 8 / 32 / 64 experts.

Both backends hold the same parameters (``models/moe/``), so each configuration builds
one ``MoE`` layer on the ``torch`` backend, copies its state dict into a ``megablocks``
one, and times forward + backward (``y.sum() + aux_loss``) of the same tokens, steps
alternating between the two so that drifts in clock or load hit both alike. A dense
SwiGLU with the same active parameters runs in the same loop as the bare-PyTorch
baseline. Prints tokens/s (median), interquartile ranges of the step time and the
ratios as a markdown table for bench/RESULTS.md. Not a test.

    python bench/moe_backends.py                          # bf16, 16k tokens, D=1024
    python bench/moe_backends.py --tokens 32768 --dim 2048 --top-k 2

Needs CUDA and MegaBlocks (``pip install -e '.[gpu]'``, see README "On a cluster").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.moe_step import timed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024, help="model width D")
    p.add_argument("--hidden", type=int, default=1024, help="expert hidden width F")
    p.add_argument("--tokens", type=int, default=16384, help="tokens N per step")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("moe_backends: needs a CUDA GPU (MegaBlocks kernels are CUDA-only)", file=sys.stderr)
        return 2

    from models.layers import SwiGLU
    from models.moe import MoE

    device, dtype = torch.device("cuda"), torch.bfloat16
    D, F, N, k = args.dim, args.hidden, args.tokens, args.top_k
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, tokens {N}, "
          f"dim {D}, expert hidden {F}, top-{k}, {args.steps} timed steps after {args.warmup}\n")
    print("| experts | dense Mtok/s | torch Mtok/s | megablocks Mtok/s | megablocks/torch | torch/dense |")
    print("|---:|---:|---:|---:|---:|---:|")
    for E in args.experts:
        torch.manual_seed(0)
        ref = MoE(D, E, k, F, backend="torch").to(device, dtype)
        mb = MoE(D, E, k, F, backend="megablocks").to(device, dtype)
        mb.load_state_dict(ref.state_dict())
        dense = SwiGLU(D, k * F).to(device, dtype)
        x = torch.randn(N, D, device=device, dtype=dtype)

        def step(layer):
            def run():
                out = layer(x)
                y, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, 0.0)
                (y.float().sum() + aux).backward()
                layer.zero_grad(set_to_none=True)
            return run

        sides = {"dense": step(dense), "torch": step(ref), "megablocks": step(mb)}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.warmup + args.steps):
            for name, fn in sides.items():
                t = timed(fn, device)
                if i >= args.warmup:
                    times[name].append(t)
        rate = {name: N / statistics.median(v) / 1e6 for name, v in times.items()}
        print(f"| {E} | {rate['dense']:.2f} | {rate['torch']:.2f} | {rate['megablocks']:.2f} "
              f"| {rate['megablocks'] / rate['torch']:.2f} | {rate['torch'] / rate['dense']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
