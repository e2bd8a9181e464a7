"""Evaluation of a trained VLM: MM1's protocol at the scale of the run.

- text: mean next-token loss (and perplexity) over held-out text documents;
- every task of ``ablate.eval.tasks`` (the synthetic caption/VQA sets, converted
  benchmarks) at every shot count of ``eval.shots`` (MM1: 0, 4 and 8): greedy
  captions scored by CIDEr-D, greedy answers by VQA accuracy (soft ``min(#matches/3,
  1)`` over annotators, exact match for a single reference); few-shot prompts from
  ``ablate.eval.fewshot``;
- MM1-style averages over the caption tasks and over the VQA tasks, per shot count,
  where a kind has two tasks or more;
- trivial baselines of the synthetic tasks (most frequent training caption, majority
  training answer) scored with the same metrics, so learning can be told from guessing.

Metric names (``results.json`` ``metrics``, wandb): ``<task>/<metric>`` at 0 shots and
``<task>/<metric>_<k>shot`` otherwise (``caption/cider``, ``vqa/accuracy_4shot``,
``coco/cider_8shot``, ``avg/vqa_4shot``); the structured ``eval`` block beside them is
documented in docs/evaluation.md.

Distributed: queries are dealt to ranks round-robin, each rank generates its share and
the predictions are gathered, so every rank computes the same metrics. Generation is
batched greedy decoding with a KV cache (``ablate.eval.generate``) whose result does not
depend on the batch a prompt is in, so neither does a metric depend on the batch size
or the number of ranks.

Images are preprocessed exactly as in training (``pipeline.preprocess_views``), image
splitting included, and encoded once per task (a bounded cache keyed by sample id), so
a support image shared by many prompts costs one encoder pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from omegaconf import DictConfig

from ablate.dist import reduce_over_ranks
from ablate.eval.fewshot import build_prompt, draw_support
from ablate.eval.generate import generate
from ablate.eval.metrics import cider, mean_vqa_accuracy
from ablate.eval.tasks import EvalTask, load_tasks

IGNORE = -100
EVAL_SCHEMA_VERSION = 2


def metric_key(task: str, metric: str, shots: int) -> str:
    return f"{task}/{metric}" if shots == 0 else f"{task}/{metric}_{shots}shot"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(part: dict) -> dict:
    """Union of every rank's dict (identity in one process)."""
    import torch.distributed as dist

    rank, world = _rank_world()
    if world == 1:
        return part
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ImageCache:
    """Encoded image tokens (``V*I, D`` per sample: all its views) by sample id, at most
    ``limit`` samples kept (least recently used dropped)."""

    def __init__(self, model, split, device, dtype, limit: int = 4096):
        self.model, self.split, self.device, self.dtype, self.limit = model, split, device, dtype, limit
        self.store: OrderedDict[str, torch.Tensor] = OrderedDict()

    def tokens(self, samples: list[dict]) -> torch.Tensor:
        """Image tokens of ``samples`` in order, views consecutive: ``N*V, I, D``."""
        from ablate.data.pipeline import preprocess_views

        todo = list({s["id"]: s for s in samples if s["id"] not in self.store}.values())
        if todo:
            pixels = torch.cat([preprocess_views(s["image"], self.model.image_size, self.split) for s in todo])
            enc = self.model.encode_images(pixels.to(device=self.device, dtype=self.dtype))
            V = self.split.num_views
            for i, s in enumerate(todo):
                self.store[s["id"]] = enc[i * V:(i + 1) * V]
        out = []
        for s in samples:
            self.store.move_to_end(s["id"])
            out.append(self.store[s["id"]])
        while len(self.store) > max(self.limit, len(samples)):
            self.store.popitem(last=False)
        return torch.cat(out)


def _strip_stop(ids: list[int], tok) -> list[int]:
    return [i for i in ids if i not in (tok.eos_id, tok.pad_id, tok.image_id)]


def _answer(text: str) -> str:
    return text.strip().split(".")[0].strip()


@torch.no_grad()
def text_loss(model, tok, docs: list[str], batch_size: int, device) -> tuple[float, int]:
    """Token-weighted mean next-token loss over held-out documents (summed over ranks)."""
    rank, world = _rank_world()
    total, count = 0.0, 0
    for chunk in _batches(docs[rank::world], batch_size):
        seqs = [[tok.bos_id] + tok.encode(d)[: model.decoder.max_seq_len - 2] + [tok.eos_id] for d in chunk]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), L), IGNORE, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s) - 1] = torch.tensor(s[1:])
        logits = model(ids.to(device)).logits.float()
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    total, count = reduce_over_ranks([total, count], mean=[False, False])
    return total / max(count, 1), int(count)


def _stop_ids(tok, kind: str) -> set[int]:
    # The image placeholder stops a caption too: a few-shot model may go on to "the next
    # example"; a period ends a VQA answer (as in the training Q/A lines).
    stop = {tok.eos_id, tok.image_id}
    period = tok.encode(".")
    if kind == "vqa" and len(period) == 1:
        stop.add(period[-1])
    return stop


def predict(model, tok, task: EvalTask, shots: int, e: DictConfig, cache: ImageCache,
            seed: int, bar=None) -> tuple[dict[str, str], int]:
    """This rank's predictions (query id -> text) at ``shots`` examples, and how many
    examples were dropped to fit the decoder's context."""
    rank, world = _rank_world()
    T = cache.split.num_views * model.tokens_per_image
    max_new = e.max_new_tokens if task.kind == "caption" else e.max_answer_tokens
    budget = model.decoder.max_seq_len - max_new
    preds, dropped = {}, 0
    for chunk in _batches(task.queries[rank::world], e.batch_size):
        prompts, images = [], []
        for q in chunk:
            support = draw_support(task.support, q, shots, seed, task.name)
            ids, kept = build_prompt(tok, task.kind, q, support, T, budget, seed)
            dropped += len(support) - len(kept)
            prompts.append(ids)
            images += kept + [q]
        gen = generate(model, tok, prompts, cache.tokens(images), max_new, _stop_ids(tok, task.kind),
                       use_cache=bool(e.get("kv_cache", True)))
        for q, g in zip(chunk, gen):
            text = tok.decode(_strip_stop(g, tok)).strip()
            preds[q["id"]] = text if task.kind == "caption" else _answer(text)
        if bar is not None:
            bar.update(len(chunk) * world)
    return preds, dropped


def score(task: EvalTask, preds: dict[str, str]) -> tuple[float, dict[str, float]]:
    """(task score, per-id score) of predictions for every query."""
    if task.kind == "caption":
        return cider({q["id"]: list(q["captions"]) for q in task.queries}, preds)
    return mean_vqa_accuracy(preds, {q["id"]: list(q["answers"]) for q in task.queries})


@torch.no_grad()
def evaluate(model, tok, cfg: DictConfig, device, dtype=torch.float32, progress: bool = False) -> dict:
    """Every task at every shot count, the text loss, averages and baselines.

    Returns ``{"metrics", "baselines", "counts", "eval", "samples"}``; ``samples`` hold the
    first ``eval.log_samples`` queries of each task with their predictions per shot count
    and their PIL images (``"image"``: drop it before writing JSON).
    """
    from ablate.data.pipeline import build_eval_samples
    from ablate.data.splitting import Split
    from tqdm import tqdm

    e = cfg.eval
    seed = int(e.get("seed", 0))
    shots_list = [int(k) for k in e.get("shots", [0])]
    was_training = model.training
    model.eval()
    split = Split.from_config(cfg.data.get("split"))
    metrics, baselines, counts, samples = {}, {}, {}, {}
    block = {"schema_version": EVAL_SCHEMA_VERSION, "seed": seed, "shots": shots_list, "tasks": {},
             "averages": {}}

    if e.max_text:
        docs = [s["text"] for s in build_eval_samples(cfg.paths.data, "text", e.max_text)]
        loss, n = text_loss(model, tok, docs, e.batch_size, device)
        metrics["text/loss"], metrics["text/ppl"] = loss, math.exp(min(loss, 50))
        counts["text"], counts["text_tokens"] = len(docs), n
        block["text"] = {"loss": loss, "ppl": metrics["text/ppl"], "docs": len(docs), "tokens": n}

    tasks = load_tasks(cfg)
    total = sum(len(t.queries) for t in tasks) * len(shots_list)
    bar = tqdm(total=total, desc="eval", unit="query", disable=not progress, dynamic_ncols=True)
    for task in tasks:
        cache = ImageCache(model, split, device, dtype)
        entry = {"kind": task.kind, "metric": task.metric, "source": task.source,
                 "queries": len(task.queries), "support": len(task.support), "scores": {},
                 "examples_dropped": {}}
        counts[task.name] = len(task.queries)
        per_shot = {}
        for k in shots_list:
            bar.set_postfix_str(f"{task.name} {k}-shot")
            part, dropped = predict(model, tok, task, k, e, cache, seed, bar)
            preds = _gather(part)
            value, per_id = score(task, preds)
            key = metric_key(task.name, task.metric, k)
            metrics[key] = value
            entry["scores"][str(k)] = value
            entry["examples_dropped"][str(k)] = int(reduce_over_ranks([dropped], mean=[False])[0])
            per_shot[k] = preds
            if task.kind == "vqa" and any(q.get("qtype") for q in task.queries):
                for qtype in sorted({q["qtype"] for q in task.queries if q.get("qtype")}):
                    ids = [q["id"] for q in task.queries if q.get("qtype") == qtype]
                    metrics[metric_key(task.name, f"{task.metric}_{qtype}", k)] = \
                        sum(per_id[i] for i in ids) / len(ids)
        for key, trivial in task.baselines.items():
            baselines[key], _ = score(task, trivial)
        block["tasks"][task.name] = entry
        samples[task.name] = [
            {"id": q["id"], "image": q["image"],
             **({"references": list(q["captions"])} if task.kind == "caption"
                else {"question": q["question"], "answers": list(q["answers"])}),
             "predictions": {str(k): per_shot[k][q["id"]] for k in shots_list}}
            for q in task.queries[: e.get("log_samples", 16)]]
    bar.close()

    for kind in ("caption", "vqa"):
        names = [t.name for t in tasks if t.kind == kind]
        if len(names) < 2:
            continue
        block["averages"][kind] = {}
        for k in shots_list:
            value = sum(block["tasks"][n]["scores"][str(k)] for n in names) / len(names)
            metrics[metric_key("avg", kind, k)] = value
            block["averages"][kind][str(k)] = value
    model.train(was_training)
    return {"metrics": metrics, "baselines": baselines, "counts": counts, "eval": block, "samples": samples}


def samples_json(samples: dict) -> dict:
    """``evaluate``'s samples without their images, for samples.json."""
    return {task: [{k: v for k, v in s.items() if k != "image"} for s in rows] for task, rows in samples.items()}


def sample_table(samples: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of the sample-predictions table: one row per task, query and shot
    count, with the query image."""
    columns = ["task", "id", "image", "shots", "question", "prediction", "references"]
    rows = []
    for task, items in samples.items():
        for s in items:
            refs = s.get("references") or s.get("answers") or []
            for k, pred in s["predictions"].items():
                rows.append([task, s["id"], s["image"], int(k), s.get("question", ""), pred, " | ".join(refs)])
    return columns, rows
