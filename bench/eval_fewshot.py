"""Few-shot evaluation speed: VQA queries at k shots on the demo model, on the CPU.

The model is ``experiment=demo`` (ViT-tiny at 64 px, the 4-layer 128-wide decoder) with
the given connector, random init. The cost of a query does not depend on what the model
learned except through when it stops: the bench removes the stop ids, so every answer
runs to ``eval.max_answer_tokens`` (the worst case; a trained model stops earlier). A corpus with enough VQA queries is built
under ``--data`` when missing.

Two sides, measured in the same run:

- ablate: ``ablate.eval.evaluate.evaluate`` over ``--samples`` queries (KV cache, images
  encoded once per task);
- baseline: the same call with ``eval.kv_cache=false`` (every new token recomputes the
  whole prompt: the plain PyTorch loop) over ``--baseline-samples`` queries, since it is
  slow; compared per query.

Prints wall time, ms per query and the ratio. Not a test.

    python bench/eval_fewshot.py                               # 1000 queries at 8 shots
    python bench/eval_fewshot.py --quick                       # 100 queries, baseline on 20
    python bench/eval_fewshot.py --connector mlp --max-seq-len 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def corpus(path: Path, n: int) -> Path:
    from ablate.data.corpus import CorpusConfig, build_corpus

    import json

    meta = path / "meta.json"
    if not meta.exists() or json.loads(meta.read_text())["counts"]["eval/vqa"] < n:
        build_corpus(CorpusConfig(out=str(path), num_caption=300, num_interleaved=150, num_text=100,
                                  num_eval_caption=16, num_eval_vqa=n, num_eval_text=8, shard_size=500),
                     progress=False, force=True)
    return path


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ablate.train  # noqa: F401  registers the schema

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


GENERATED = {"tokens": 0}


def worst_case_generate():
    """Wrap the harness's generate: no stop ids (every answer runs to its limit, what an
    untrained model's cost would otherwise hide), and count the tokens generated."""
    import ablate.eval.evaluate as ev_mod
    from ablate.eval.generate import generate

    def counting(model, tok, prompts, images, max_new, stop_ids, **kw):
        out = generate(model, tok, prompts, images, max_new, set(), **kw)
        GENERATED["tokens"] += sum(map(len, out))
        return out

    ev_mod.generate = counting


def timed_eval(model, tok, cfg) -> tuple[float, dict, int]:
    from ablate.eval.evaluate import evaluate

    GENERATED["tokens"] = 0
    t0 = time.perf_counter()
    ev = evaluate(model, tok, cfg, device=torch.device("cpu"))
    return time.perf_counter() - t0, ev, GENERATED["tokens"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "bench_eval")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--baseline-samples", type=int, default=100)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--connector", default="avgpool")
    p.add_argument("--num-tokens", type=int, default=16, help="connector.num_tokens (pooling connectors)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="100 queries, baseline on 20")
    args = p.parse_args()
    if args.quick:
        args.samples, args.baseline_samples = 100, 20
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from ablate.build import build_model
    from ablate.data.tokenizer import load_tokenizer

    root = corpus(args.data, max(args.samples, args.baseline_samples))
    conn = [f"connector={args.connector}"]
    if args.connector in ("avgpool", "attnpool", "c_abstractor", "d_abstractor"):
        conn.append(f"connector.num_tokens={args.num_tokens}")
    base = ["experiment=demo", f"paths.data={root}", *conn, f"decoder.max_seq_len={args.max_seq_len}",
            "eval.max_caption=0", "eval.max_text=0", f"eval.shots=[{args.shots}]",
            f"eval.batch_size={args.batch_size}"]
    cfg = compose(*base, f"eval.max_vqa={args.samples}")
    tok = load_tokenizer(root)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size, tok.image_id).eval()
    print(f"# {args.samples} VQA queries at {args.shots} shots, connector={args.connector}, "
          f"{model.tokens_per_image} tokens/image, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads", flush=True)

    worst_case_generate()
    timed_eval(model, tok, compose(*base, "eval.max_vqa=8"))  # warm-up
    secs, ev, n_tok = timed_eval(model, tok, cfg)
    assert ev["eval"]["tasks"]["vqa"]["queries"] == args.samples, ev["eval"]["tasks"]["vqa"]
    dropped = ev["eval"]["tasks"]["vqa"]["examples_dropped"][str(args.shots)]
    per = 1000 * secs / args.samples
    print(f"ablate (KV cache):   {secs:8.1f} s  {per:8.1f} ms/query  {n_tok / args.samples:.1f} tokens/query "
          f"({dropped} examples dropped to fit)")
    if args.baseline_samples:
        cfg_b = compose(*base, f"eval.max_vqa={args.baseline_samples}", "eval.kv_cache=false")
        secs_b, ev_b, _ = timed_eval(model, tok, cfg_b)
        per_b = 1000 * secs_b / args.baseline_samples
        print(f"baseline (no cache): {secs_b:8.1f} s  {per_b:8.1f} ms/query  over {args.baseline_samples} queries")
        print(f"ratio baseline/ablate per query: {per_b / per:.2f}x")


if __name__ == "__main__":
    main()
