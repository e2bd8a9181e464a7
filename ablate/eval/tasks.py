"""The evaluation tasks of a run: the synthetic corpus's held-out sets and any real
benchmarks converted with ``ablate-data convert``.

- ``caption`` / ``vqa``: the corpus's ``eval/`` splits (``eval.max_caption`` /
  ``eval.max_vqa`` queries). Few-shot examples come from the same pool, never the query
  itself; their trivial baselines (most frequent training caption, majority training
  answer) are scored too.
- ``eval.benchmarks``: ``{name: directory}`` of converted benchmarks (docs/benchmarks.md).
  Queries are the ``query`` split (``eval.max_benchmark`` at most per benchmark); few-shot
  examples come from the ``support`` split when it was converted, otherwise from the
  query split, excluding the query's own image.

Every task is scored at every ``eval.shots`` value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from ablate.data import format as fmt

KINDS = ("caption", "vqa")
METRIC = {"caption": "cider", "vqa": "accuracy"}


@dataclass
class EvalTask:
    name: str  # metric prefix: "caption", "vqa", or the benchmark's name
    kind: str  # "caption" or "vqa"
    queries: list[dict]
    support: list[dict]  # the pool few-shot examples are drawn from
    source: str  # "synthetic" or the benchmark directory
    # Trivial predictors scored like the model: metric key -> (query id -> prediction).
    baselines: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return METRIC[self.kind]


def _synthetic(root: Path, kind: str, limit: int) -> EvalTask:
    from ablate.data.pipeline import build_eval_samples

    data = build_eval_samples(root, kind, limit)
    stats = json.loads((root / fmt.STATS_FILE).read_text())
    if kind == "caption":
        base = {"caption/cider": {s["id"]: stats["most_frequent_caption"] for s in data}}
    else:
        base = {"vqa/accuracy": {s["id"]: stats["majority_answer"] for s in data}}
        by_type = stats.get("majority_answer_by_qtype", {})
        if by_type:
            base["vqa/accuracy_by_qtype_majority"] = {
                s["id"]: by_type.get(s["qtype"], stats["majority_answer"]) for s in data}
    return EvalTask(kind, kind, data, data, "synthetic", base)


def _benchmark(name: str, path: str, limit: int) -> EvalTask:
    from ablate.data.benchmarks import load_benchmark, read_info

    info = read_info(path)
    kind = info["task"]
    if kind not in KINDS:
        raise ValueError(f"eval.benchmarks.{name}: {path} holds a {kind!r} task; expected one of {KINDS}")
    queries = load_benchmark(path, "query", limit or None)
    support = load_benchmark(path, "support") if "support" in info.get("splits", {}) else queries
    return EvalTask(name, kind, queries, support, str(path))


def load_tasks(cfg: DictConfig) -> list[EvalTask]:
    """The tasks ``cfg.eval`` asks for, in a fixed order (synthetic first, then benchmarks by name)."""
    e, root = cfg.eval, Path(cfg.paths.data)
    tasks = []
    if e.max_caption:
        tasks.append(_synthetic(root, "caption", e.max_caption))
    if e.max_vqa:
        tasks.append(_synthetic(root, "vqa", e.max_vqa))
    for name, path in sorted((e.get("benchmarks") or {}).items()):
        tasks.append(_benchmark(name, path, e.get("max_benchmark", 0)))
    return tasks


def benchmark_problems(cfg: DictConfig) -> list[str]:
    """Config problems of ``eval`` (checked before anything starts), each naming its key."""
    e = cfg.get("eval")
    if e is None:
        return []
    problems = []
    shots = list(e.get("shots") or [])
    if not shots:
        problems.append("eval.shots=[]: give at least one shot count (e.g. [0, 4, 8])")
    bad = [k for k in shots if not isinstance(k, int) or isinstance(k, bool) or k < 0]
    if bad:
        problems.append(f"eval.shots={shots}: shot counts must be non-negative integers")
    if len(set(shots)) != len(shots):
        problems.append(f"eval.shots={shots}: a shot count is listed twice")
    for key in ("max_caption", "max_vqa", "max_text", "max_benchmark", "every", "log_samples"):
        v = e.get(key)
        if isinstance(v, int) and v < 0:
            problems.append(f"eval.{key}={v}: must be >= 0")
    for key in ("batch_size", "max_new_tokens", "max_answer_tokens"):
        v = e.get(key)
        if isinstance(v, int) and v < 1:
            problems.append(f"eval.{key}={v}: must be >= 1")
    names = set(METRIC) | {"text", "avg"}
    for name, path in (e.get("benchmarks") or {}).items():
        if name in names or "/" in name:
            problems.append(f"eval.benchmarks.{name}: the name clashes with a built-in task or holds '/'")
        elif not (Path(str(path)) / "benchmark.json").exists():
            problems.append(f"eval.benchmarks.{name}={path!r}: no benchmark.json there "
                            "(convert the files with `ablate-data convert`)")
    if e.get("every") and cfg.get("deepspeed") and cfg.deepspeed.get("expert_parallel", 1) > 1:
        problems.append(f"eval.every={e.every}: evaluation during training is not available with "
                        f"deepspeed.expert_parallel={cfg.deepspeed.expert_parallel} (it gathers every "
                        "expert onto each rank); evaluate at the end (eval.at_end) instead")
    return problems
