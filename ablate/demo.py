"""The laptop demo behind ``make demo``: corpus -> sweep -> comparison.

1. Build the synthetic corpus (skipped when it is already there and up to date).
2. Train and evaluate a Hydra multirun over connector x resolution through the real
   ``ablate-train`` (DeepSpeed on CPU, webdataset shards, wandb offline).
3. Compare the variants with ``ablate-compare``: a markdown table, CSV and plot, with
   the trivial baselines printed beside them.

Every stage is resumable: rerunning skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SWEEP = ["connector=mlp,avgpool", "encoder.image_size=48,64"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ablate-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/synth", help="corpus directory")
    p.add_argument("--runs", default="runs", help="root of run directories (sweep: RUNS/demo)")
    p.add_argument("--preset", default="demo", help="corpus preset (demo or tiny)")
    p.add_argument("overrides", nargs="*", default=DEFAULT_SWEEP,
                   help="Hydra sweep overrides (default: %(default)s)")
    args = p.parse_args(argv)

    from ablate.data.cli import main as data_main

    timings = {}
    t0 = time.time()
    print("== 1/3 synthetic corpus", flush=True)
    if data_main(["--out", args.data, "--preset", args.preset]) not in (0, None):
        return 1
    timings["corpus_s"] = time.time() - t0

    t1 = time.time()
    print("== 2/3 training sweep: " + " ".join(args.overrides), flush=True)
    cmd = [sys.executable, "-m", "ablate.train", "-m", "experiment=demo",
           f"paths.data={args.data}", f"paths.runs={args.runs}", *args.overrides]
    rc = subprocess.call(cmd)
    timings["sweep_s"] = time.time() - t1
    if rc != 0:
        print(f"ablate-demo: training sweep exited with {rc}", file=sys.stderr)

    t2 = time.time()
    sweep_dir = Path(args.runs) / "demo"
    print(f"== 3/3 comparison of {sweep_dir}", flush=True)
    from sweeps.compare import main as compare_main

    crc = compare_main([str(sweep_dir)])
    timings["compare_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    (sweep_dir / "demo_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print("\n" + "  ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return rc or crc


if __name__ == "__main__":
    sys.exit(main())
