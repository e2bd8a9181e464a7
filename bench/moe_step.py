"""MoE FFN step time against a dense SwiGLU FFN with the same active parameters.

For each expert configuration, two FFN layers see the same tokens ``N,D``:

- moe: ``models.moe.MoE`` on the ``torch`` backend (fp32 router, sort by expert, one
  matmul chain per expert, weighted combine, load-balancing and z-losses, stats);
- dense: ``models.layers.SwiGLU(D, H)`` with ``H = k * F + num_shared * F_shared``,
  i.e. the same matmul parameters per token as the MoE's active experts (the MoE
  also has its ``E x D`` router, shown in the table).

One step is forward + backward (``y.sum() + aux_loss``); gradients are dropped after
each step, no optimizer. Steps alternate (moe, dense, moe, ...) so drifts in machine
load hit both alike; medians, interquartile ranges and the ratio are printed as a
markdown table. Not a test.

    python bench/moe_step.py                      # CPU, default configurations
    python bench/moe_step.py --tokens 1024 --steps 10 --threads 1
    python bench/moe_step.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_name  # noqa: E402

# (experts E, top-k, expert hidden F, shared experts, shared hidden): coarse experts as in
# Mixtral / MM1 (each the size of a dense FFN slice), then fine-grained ones as in Aria.
CONFIGS = [
    (8, 2, 512, 0, 0),
    (64, 2, 512, 0, 0),
    (32, 4, 128, 0, 0),
    (64, 6, 64, 2, 64),
]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256, help="model width D")
    p.add_argument("--tokens", type=int, default=2048, help="tokens N per step")
    p.add_argument("--steps", type=int, default=15, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--backend", default="torch", help="MoE backend (torch | megablocks)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from models.layers import SwiGLU
    from models.moe import MoE
    from models.utils import count_params

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    D, N = args.dim, args.tokens
    machine = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"machine: {machine}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.device} {args.dtype}")
    print(f"tokens {N} x dim {D}, {args.steps} timed steps per side after {args.warmup} warm-up, "
          f"backend {args.backend}\n")
    print("| experts E | top-k | expert F | shared | dense H | active params (moe / dense) "
          "| dense ms | moe ms | moe/dense |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for E, k, Fe, S, Fs in CONFIGS:
        torch.manual_seed(0)
        H = k * Fe + S * Fs
        moe = MoE(D, E, k, Fe, num_shared=S, shared_hidden=Fs or None, backend=args.backend)
        dense = SwiGLU(D, H)
        moe, dense = moe.to(device, dtype), dense.to(device, dtype)
        x = torch.randn(N, D, device=device, dtype=dtype)

        def moe_step():
            y, aux_loss, _ = moe(x)
            (y.float().sum() + aux_loss).backward()
            moe.zero_grad(set_to_none=True)

        def dense_step():
            dense(x).float().sum().backward()
            dense.zero_grad(set_to_none=True)

        times = {"moe": [], "dense": []}
        for i in range(args.warmup + args.steps):
            for name, fn in (("moe", moe_step), ("dense", dense_step)):
                t = timed(fn, device)
                if i >= args.warmup:
                    times[name].append(t)
        med = {k_: 1000 * statistics.median(v) for k_, v in times.items()}
        iqr = {k_: [1000 * q for q in statistics.quantiles(v, n=4)[::2]] for k_, v in times.items()}
        shared = f"{S} x {Fs}" if S else "-"
        print(f"| {E} | {k} | {Fe} | {shared} | {H} | {moe.active_params():,} / {count_params(dense):,} "
              f"| {med['dense']:.1f} ({iqr['dense'][0]:.1f}-{iqr['dense'][1]:.1f}) "
              f"| {med['moe']:.1f} ({iqr['moe'][0]:.1f}-{iqr['moe'][1]:.1f}) "
              f"| {med['moe'] / med['dense']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
