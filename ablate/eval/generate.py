"""Batched greedy generation over left-padded prompts, with or without a KV cache.

``generate(..., use_cache=True)`` runs one prefill forward over the padded prompts
into a ``KVCache`` and then feeds only the newest token of every row per step (``B,1``
ids), so a step costs the same projections and FFN work whatever the prompt length
(attention still reads the ``S`` cached keys). ``use_cache=False`` recomputes the
whole sequence per token: the reference, and the fallback for decoders without cache
support.

Conventions (both paths):
- Prompts are left-padded with ``tok.pad_id``; the padding is document 0 and the real
  tokens document 1, so real tokens never attend to padding, and positions count a
  row's real tokens only: a row's result does not depend on what it is batched with.
- Images: ``image_tokens_NID`` holds every image of every prompt, row-major, as
  ``model.encode_images`` returns them; they enter in the prefill only (spliced into
  the placeholders, or, for a branched connector such as hyper-attention, kept as
  cross-attention keys in the cache, which decode steps attend to).
- A row stops after emitting a stop id (included in its output) or ``max_new_tokens``.
  The image placeholder id is never generated (its logit is masked): there would be
  no image to put in its slot.
- Length: a row never feeds more than ``model.decoder.max_seq_len`` tokens, so it
  generates at most ``max_seq_len - len(prompt) + 1`` tokens; a longer prompt raises.
  Finished rows leave the batch and left padding no remaining row needs is cut, so a
  short prompt batched with a long one gets the same tokens as alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.decoder.transformer import KVCache


@dataclass
class _Rows:
    """The rows still generating: left-padded ids/real-token masks and, per row, its
    index among the prompts and its images' indices in ``image_tokens_NID``."""

    ids_BT: Tensor
    real_BT: Tensor
    index: list[int]
    images: list[list[int]]

    def keep(self, keep: list[int]) -> int:
        """Keep rows ``keep`` (positions in the current batch); cut the left padding
        all of them share and return how many columns were cut."""
        rows = torch.tensor(keep, device=self.ids_BT.device)
        self.ids_BT, self.real_BT = self.ids_BT[rows], self.real_BT[rows]
        self.index = [self.index[i] for i in keep]
        self.images = [self.images[i] for i in keep]
        start = int((~self.real_BT).sum(1).min())  # real tokens are right-aligned
        self.ids_BT, self.real_BT = self.ids_BT[:, start:], self.real_BT[:, start:]
        return start


def _image_rows(model, prompts: list[list[int]], image_tokens_NID: Tensor | None) -> list[list[int]]:
    per = model.tokens_per_image
    counts = [sum(t == model.image_token_id for t in p) for p in prompts]
    n_images = 0 if image_tokens_NID is None else image_tokens_NID.shape[0]
    if sum(counts) != n_images * per or any(c % per for c in counts):
        raise ValueError(f"prompts hold {counts} image placeholders per row but {n_images} images x "
                         f"{per} tokens per image were given")
    starts = [sum(counts[:i]) // per for i in range(len(counts))]
    return [list(range(s, s + c // per)) for s, c in zip(starts, counts)]


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], image_tokens_NID: Tensor | None,
             max_new_tokens: int, stop_ids: set[int], *, use_cache: bool = True) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (each holding its image placeholders).

    Returns the generated ids of each prompt (stop id included). ``use_cache=False``
    recomputes the full sequence per token (see the module docstring); both paths
    give the same tokens up to floating-point ties.
    """
    max_len = model.decoder.max_seq_len
    too_long = {i: len(p) for i, p in enumerate(prompts) if len(p) > max_len}
    if too_long:
        raise ValueError(f"prompt lengths {too_long} (index: tokens) exceed the decoder's "
                         f"max_seq_len={max_len}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: generation needs at least one token to condition on")
    out: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens <= 0:
        return out
    param = next(model.parameters())
    device = param.device
    has_images = image_tokens_NID is not None and image_tokens_NID.shape[0] > 0
    images = image_tokens_NID if has_images else None
    # One-row-per-prompt bookkeeping.
    limit = [min(max_new_tokens, max_len - len(p) + 1) for p in prompts]
    B, Lp = len(prompts), max(len(p) for p in prompts)
    ids_BT = torch.full((B, Lp), tok.pad_id, dtype=torch.long, device=device)
    real_BT = torch.zeros((B, Lp), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids_BT[i, Lp - len(p):] = torch.tensor(p, device=device)
        real_BT[i, Lp - len(p):] = True
    rows = _Rows(ids_BT, real_BT, list(range(B)), _image_rows(model, prompts, images))
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    cache = None
    if use_cache:
        capacity = min(max_len, Lp + max(limit) - 1)
        cache = KVCache.for_decoder(model.decoder, B, capacity, device=device, dtype=param.dtype)

    logits_BV = _forward_all(model, rows, images, cache)
    while True:
        logits_BV[:, model.image_token_id] = float("-inf")
        next_B = logits_BV.argmax(-1)
        finished = torch.isin(next_B, stop).tolist()
        keep = []
        for b, (i, token) in enumerate(zip(rows.index, next_B.tolist())):
            out[i].append(token)
            if not (finished[b] or len(out[i]) >= limit[i]):
                keep.append(b)
        if not keep:
            return out
        next_B1 = next_B[:, None]
        if len(keep) < len(rows.index):
            rows_k = torch.tensor(keep, device=device)
            next_B1 = next_B1[rows_k]
            start = rows.keep(keep)
            if cache is not None:
                cache.select(rows_k, start)
        rows.ids_BT = torch.cat([rows.ids_BT, next_B1], 1)
        rows.real_BT = torch.cat([rows.real_BT, torch.ones_like(next_B1, dtype=torch.bool)], 1)
        if cache is None:
            logits_BV = _forward_all(model, rows, images, None)
        else:  # the new token only: its position is the row's count of earlier real tokens
            positions_B1 = rows.real_BT.sum(1, keepdim=True) - 1
            logits_BV = model(next_B1, positions_BT=positions_B1, doc_ids_BT=torch.ones_like(next_B1),
                              cache=cache).logits[:, -1]


def _forward_all(model, rows: _Rows, images: Tensor | None, cache: KVCache | None) -> Tensor:
    """Last-position logits ``B,V`` of the whole current sequence of ``rows`` (the
    prefill when ``cache`` is given)."""
    positions_BT = (rows.real_BT.long().cumsum(1) - 1).clamp(min=0)
    doc_ids_BT = rows.real_BT.long()  # left padding is its own document
    picked = [j for row in rows.images for j in row]
    row_images = None
    if images is not None and picked:
        row_images = images if len(picked) == images.shape[0] else images[picked]
    kwargs = {} if cache is None else {"cache": cache}
    return model(rows.ids_BT, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT,
                 image_tokens_NID=row_images, **kwargs).logits[:, -1]
