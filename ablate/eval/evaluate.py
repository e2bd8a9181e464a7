"""Evaluation of a trained VLM on the corpus's held-out sets.

- text: mean next-token loss (and perplexity) over held-out text documents;
- caption: 0-shot CIDEr of greedy captions against the reference paraphrases;
- vqa: 0-shot accuracy of greedy answers after VQA answer normalisation.

Prompts are built from ``ablate.data.format``, the same strings the training
documents use. Trivial baselines (the most frequent training caption for every
image, the majority training answer for every question) are scored with the same
metrics so a reader can tell learning from guessing.

Generation is batched greedy decoding over left-padded prompts. Image tokens are
computed once per batch and spliced in at every step; the decoder recomputes the
whole sequence per new token (no KV cache), which is cheap at these lengths.

Images are preprocessed exactly as in training (``pipeline.preprocess_views``), image
splitting included: with ``data.split`` each image becomes ``V`` views, encoded as
consecutive images, and its prompt holds ``V x`` (tokens per view) placeholders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from ablate.data import format as fmt
from ablate.eval.metrics import cider, mean_vqa_accuracy, normalize_answer

IGNORE = -100


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], image_tokens_NID: torch.Tensor,
             max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (each holding its image placeholders)."""
    device = image_tokens_NID.device
    B, Lp = len(prompts), max(len(p) for p in prompts)
    ids_BT = torch.full((B, Lp), tok.pad_id, dtype=torch.long, device=device)
    real_BT = torch.zeros((B, Lp), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids_BT[i, Lp - len(p):] = torch.tensor(p, device=device)
        real_BT[i, Lp - len(p):] = True
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        positions_BT = (real_BT.long().cumsum(1) - 1).clamp(min=0)
        # Left padding is its own document: real tokens never attend to it.
        doc_ids_BT = real_BT.long()
        logits = model(ids_BT, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT,
                       image_tokens_NID=image_tokens_NID).logits[:, -1]
        next_B = logits.argmax(-1)
        for i in torch.nonzero(~done_B).flatten().tolist():
            out[i].append(int(next_B[i]))
        done_B |= torch.isin(next_B, stop)
        if bool(done_B.all()):
            break
        ids_BT = torch.cat([ids_BT, next_B[:, None]], 1)
        real_BT = torch.cat([real_BT, torch.ones_like(done_B)[:, None]], 1)
    return out


def _image_prompt(tok, tokens_per_image: int, text: str = "") -> list[int]:
    return [tok.bos_id] + [tok.image_id] * tokens_per_image + (tok.encode(text) if text else [])


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _encode_images(model, samples: list[dict], split, device, dtype) -> torch.Tensor:
    """Image tokens of every view of every sample, in order: N*V,I,D."""
    from ablate.data.pipeline import preprocess_views

    pixels = torch.cat([preprocess_views(s["image"], model.image_size, split) for s in samples])
    return model.encode_images(pixels.to(device=device, dtype=dtype))


def _strip_stop(ids: list[int], tok) -> list[int]:
    return [i for i in ids if i not in (tok.eos_id, tok.pad_id)]


@torch.no_grad()
def text_loss(model, tok, docs: list[str], batch_size: int, device) -> tuple[float, int]:
    """Token-weighted mean next-token loss over held-out documents."""
    total, count = 0.0, 0
    for chunk in _batches(docs, batch_size):
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
    return total / max(count, 1), count


def _answer(text: str) -> str:
    return text.strip().split(".")[0].strip()


@torch.no_grad()
def evaluate(model, tok, cfg: DictConfig, device, dtype=torch.float32, progress: bool = False) -> dict:
    from ablate.data.pipeline import build_eval_samples
    from ablate.data.splitting import Split
    from tqdm import tqdm

    root, e = Path(cfg.paths.data), cfg.eval
    stats = json.loads((root / fmt.STATS_FILE).read_text())
    was_training = model.training
    model.eval()
    # The run's split (a run config from before splitting existed has none: no split).
    split = Split.from_config(cfg.data.get("split"))
    T = split.num_views * model.tokens_per_image  # placeholders per image in a prompt
    metrics, baselines, counts, samples = {}, {}, {}, {}

    if e.max_text:
        docs = [s["text"] for s in build_eval_samples(root, "text", e.max_text)]
        loss, n = text_loss(model, tok, docs, e.batch_size, device)
        metrics["text/loss"], metrics["text/ppl"] = loss, math.exp(min(loss, 50))
        counts["text"], counts["text_tokens"] = len(docs), n

    if e.max_caption:
        data = build_eval_samples(root, "caption", e.max_caption)
        preds = {}
        for chunk in tqdm(list(_batches(data, e.batch_size)), desc="eval caption", disable=not progress):
            img = _encode_images(model, chunk, split, device, dtype)
            prompt = _image_prompt(tok, T, fmt.CAPTION_PROMPT)
            gen = generate(model, tok, [prompt] * len(chunk), img, e.max_new_tokens, {tok.eos_id})
            for s, g in zip(chunk, gen):
                preds[s["id"]] = tok.decode(_strip_stop(g, tok)).strip()
        refs = {s["id"]: list(s["captions"]) for s in data}
        metrics["caption/cider"], _ = cider(refs, preds)
        baselines["caption/cider"], _ = cider(refs, {k: stats["most_frequent_caption"] for k in refs})
        counts["caption"] = len(data)
        samples["caption"] = [{"id": s["id"], "prediction": preds[s["id"]], "references": refs[s["id"]]}
                              for s in data[:16]]

    if e.max_vqa:
        data = build_eval_samples(root, "vqa", e.max_vqa)
        period = tok.encode(".")
        stop = {tok.eos_id} | ({period[-1]} if len(period) == 1 else set())
        preds = {}
        for chunk in tqdm(list(_batches(data, e.batch_size)), desc="eval vqa", disable=not progress):
            img = _encode_images(model, chunk, split, device, dtype)
            prompts = [_image_prompt(tok, T, fmt.VQA_PROMPT.format(question=s["question"])) for s in chunk]
            gen = generate(model, tok, prompts, img, e.max_answer_tokens, stop)
            for s, g in zip(chunk, gen):
                preds[s["id"]] = _answer(tok.decode(_strip_stop(g, tok)))
        answers = {s["id"]: list(s["answers"]) for s in data}
        metrics["vqa/accuracy"], per_id = mean_vqa_accuracy(preds, answers)
        baselines["vqa/accuracy"], _ = mean_vqa_accuracy(
            {k: stats["majority_answer"] for k in answers}, answers)
        by_type = stats.get("majority_answer_by_qtype", {})
        if by_type:
            baselines["vqa/accuracy_by_qtype_majority"], _ = mean_vqa_accuracy(
                {s["id"]: by_type.get(s["qtype"], stats["majority_answer"]) for s in data}, answers)
        for qtype in sorted({s["qtype"] for s in data}):
            ids = [s["id"] for s in data if s["qtype"] == qtype]
            metrics[f"vqa/accuracy_{qtype}"] = sum(per_id[i] for i in ids) / len(ids)
        counts["vqa"] = len(data)
        samples["vqa"] = [{"id": s["id"], "question": s["question"], "prediction": preds[s["id"]],
                           "answers": answers[s["id"]], "correct": normalize_answer(preds[s["id"]])
                           in {normalize_answer(a) for a in answers[s["id"]]}} for s in data[:16]]
    model.train(was_training)
    return {"metrics": metrics, "baselines": baselines, "counts": counts, "samples": samples}
