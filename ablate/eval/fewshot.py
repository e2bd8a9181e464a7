"""Few-shot prompts: in-context examples drawn from a support pool, interleaved before
the query image.

A k-shot prompt is ``<bos>``, then k examples (an image followed by its caption, or by
its question/answer line), then the query image and its prompt. The strings are the
training corpus's own (``ablate.data.format``): an example reads exactly like a passage
of an interleaved training document, so a model is never asked in a wording it has not
seen.

Choices:

- Examples come from the task's support pool (a benchmark's converted ``support`` split,
  or the query pool itself), never the query: a pool entry is excluded when it has the
  query's id or shows the query's image (``image_id``), so an image never answers for
  itself.
- The draw is deterministic and independent of the model, the run, the batch and the
  rank: one permutation of the pool per (eval seed, task, query id), of which the first
  k are taken. Every variant of a sweep therefore sees the same examples for the same
  query, and the 4-shot examples are the first four of the 8-shot ones.
- A prompt that would not leave room for the answer within the decoder's
  ``max_seq_len`` loses its earliest examples until it fits; how many were dropped is
  counted and reported (``counts``), never silent.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ablate.data import format as fmt


def draw_support(pool: Sequence[dict], query: dict, k: int, seed: int, task: str) -> list[dict]:
    """The ``k`` in-context examples for ``query`` (fewer only if the pool is smaller)."""
    if k <= 0:
        return []
    qid, qimg = str(query["id"]), query.get("image_id")
    rng = random.Random(f"{seed}:{task}:{qid}")  # str seeds hash stably across processes
    order = list(range(len(pool)))
    rng.shuffle(order)
    out = []
    for i in order:
        s = pool[i]
        if str(s["id"]) == qid or (qimg is not None and s.get("image_id") == qimg):
            continue
        out.append(s)
        if len(out) == k:
            break
    return out


def example_text(kind: str, sample: dict, seed: int) -> str:
    """The text after an in-context example's image: its caption or its Q/A line.

    A sample with several reference captions (or answers) shows one of them, chosen
    by a seeded draw on the sample's id so it is the same in every prompt.
    """
    rng = random.Random(f"{seed}:text:{sample['id']}")
    if kind == "caption":
        return rng.choice(list(sample["captions"]))
    answers = list(sample["answers"])
    # The most common annotator answer (ties: the seeded draw among them).
    best = max(answers.count(a) for a in answers)
    answer = rng.choice(sorted({a for a in answers if answers.count(a) == best}))
    return fmt.VQA_LINE.format(question=sample["question"], answer=answer)


def query_text(kind: str, sample: dict) -> str:
    return fmt.CAPTION_PROMPT if kind == "caption" else fmt.VQA_PROMPT.format(question=sample["question"])


def build_prompt(tok, kind: str, query: dict, shots: list[dict], tokens_per_image: int,
                 budget: int, seed: int) -> tuple[list[int], list[dict]]:
    """Token ids of the prompt and the examples it kept (earliest dropped to fit ``budget``)."""
    image = [tok.image_id] * tokens_per_image
    tail = image + (tok.encode(query_text(kind, query)) if query_text(kind, query) else [])
    parts = [image + tok.encode(example_text(kind, s, seed)) for s in shots]
    kept = list(shots)
    while parts and 1 + sum(map(len, parts)) + len(tail) > budget:
        parts.pop(0)
        kept.pop(0)
    ids = [tok.bos_id] + [t for p in parts for t in p] + tail
    if len(ids) > budget:
        raise ValueError(
            f"a 0-shot prompt of {len(ids)} tokens leaves no room to answer within the decoder's "
            f"max_seq_len ({budget} tokens of prompt allowed): lower the image tokens or raise "
            "decoder.max_seq_len")
    return ids, kept
