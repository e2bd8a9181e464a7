"""Build DeepSpeed's CPU extensions once, at set-up time.

On a fresh machine DeepSpeed JIT-compiles a shared-memory communication op the first
time a process group starts (tens of seconds). ``make setup`` runs this module with
``TORCH_EXTENSIONS_DIR`` inside the virtual environment, so the demo, the tests and CI
pay that cost once per set-up instead of once per run.
"""

from __future__ import annotations

import os
import time

import torch


def main() -> None:
    from ablate import dist

    t0 = time.time()
    env = dist.detect()
    dist.init(env)
    import deepspeed

    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_batch_size": 1, "zero_optimization": {"stage": 1}},
    )
    loss = engine(torch.randn(1, 4)).sum()
    engine.backward(loss)
    engine.step()
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    print(f"[ablate] DeepSpeed ready in {time.time() - t0:.1f}s (extensions in {where})")


if __name__ == "__main__":
    main()
