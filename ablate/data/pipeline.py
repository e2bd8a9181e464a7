"""Training and evaluation data: webdataset shards -> packed multimodal micro-batches.

``build_train_loader`` mixes the three training streams of ``format.STREAMS`` by
weight, tokenises each sample into a document (``packing.py``), packs documents
into fixed-length rows and yields micro-batches forever. ``build_eval_samples``
reads evaluation shards in order; ``preprocess_views`` is shared by both so a model
sees the same pixels in training and evaluation. ``MixMeter`` keeps the realised
data mix of a run.

Choices:

- Shards are drawn *with replacement* per stream (webdataset's "resampled" mode), so
  there are no epochs, no shard-count/world-size divisibility constraints, and each
  rank needs no coordination: rank and worker only enter through the seeds.
- Determinism and exact resume under DataLoader workers rest on *virtual workers*.
  The DataLoader collects batches round-robin from workers 0..W-1, so global batch
  ``i`` is batch ``i // W`` of worker ``i % W``. Virtual worker ``v`` owns a stream
  seeded by ``(seed, rank, v)`` that produces exactly the batches ``i = v (mod W)``.
  Resuming at batch ``n``, real worker ``j`` plays ``v = (j + n) % W`` and first
  fast-forwards over the batches ``i < n`` that ``v`` had produced. Fast-forwarding
  tokenises, packs and checks image headers and checksums (``faults.py``, about a
  third of its time) but never decodes an image, which is where the time goes (about
  2 s to resume at batch 1000 with 2 workers on a laptop). Resume needs the
  same corpus, ``seed``, ``rank``, ``num_workers`` and packing/shuffle settings.
- Images stay PNG bytes until a batch is emitted, for the same reason.
- With image splitting (``data.split``, ``splitting.py``) every image is decoded into
  its ``V`` views, consecutively: a batch's ``images`` are ``N*V,3,S,S`` and the packer
  was given ``tokens_per_image = V x`` tokens per view, so the model's in-order splice
  needs no change.
- The realised mix is counted in two units: documents per stream (what the weights
  are probabilities of) and label tokens per stream (what the loss is made of; this
  also reflects each stream's document length). ``MixMeter`` sums both over ranks.
- Bad data (damaged shards, undecodable images, empty texts, documents with nothing to
  learn) is skipped, too-long documents are truncated, and both are counted per batch
  in ``batch["faults"]`` (``faults.py``, which holds that logic).
"""

from __future__ import annotations

import io
import json
import os
import random
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import format as fmt
from .faults import (DataFaults, decode_each, document_fault, mask_failed_images, resampled_samples,
                     sample_where)
from .packing import make_document, pack_batches
from .splitting import Split, resize_rgb

__all__ = ["build_train_loader", "build_eval_samples", "preprocess_image", "preprocess_views",
           "mixture_weights", "MixMeter"]


def _pixels(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB, bicubic resize to ``image_size`` square: uint8 H,W,3."""
    return resize_rgb(img, image_size, image_size)


def _normalise(x_NHWC: torch.Tensor) -> torch.Tensor:
    """uint8 N,H,W,3 -> float N,3,H,W in [-1, 1], i.e. (x - 0.5) / 0.5 of x in [0, 1]."""
    return (x_NHWC.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def preprocess_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to ``image_size`` square, scaled to [-1, 1]: Tensor 3,H,W."""
    return _normalise(torch.from_numpy(_pixels(img, image_size).copy())[None])[0]


def preprocess_views(img: Image.Image, image_size: int, split: Split | None = None) -> torch.Tensor:
    """The ``V`` views of ``img`` (``splitting.py``), scaled to [-1, 1]: Tensor V,3,S,S.

    Without splitting this is ``preprocess_image(img, image_size)[None]``.
    """
    return _normalise(torch.from_numpy((split or Split()).views(img, image_size)))


def _decode_images(images: list[bytes], image_size: int, split: Split,
                   failed: list[int] | None = None) -> torch.Tensor:
    """Views of each image; one that fails to decode gives zeros and its index in ``failed``."""
    if not images:
        return torch.zeros(0, 3, image_size, image_size)
    blank = np.zeros((split.num_views, image_size, image_size, 3), np.uint8)
    views, bad = decode_each(images, lambda b: split.views(Image.open(io.BytesIO(b)), image_size), blank)
    if failed is not None:
        failed.extend(bad)
    # One float conversion for the whole batch: the same numbers as preprocess_views.
    return _normalise(torch.from_numpy(np.concatenate(views)))


class _MixtureDataset(IterableDataset):
    """Packed micro-batches of one rank; see the module docstring for the worker scheme."""

    def __init__(self, shards, probs, tokenizer, *, seq_len, micro_batch_size, tokens_per_image,
                 image_size, split, rank, seed, num_workers, start_batch, shuffle_buffer):
        super().__init__()
        self.shards = shards  # stream index -> shard paths, positive-weight streams only
        self.probs = probs  # stream index -> probability, same keys
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.tokens_per_image = tokens_per_image  # all V views of an image
        self.image_size = image_size
        self.split = split
        self.rank = rank
        self.seed = seed
        self.num_workers = num_workers
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer

    def _key(self, v: int, what: str) -> str:
        # String seeds go through sha512 in random.Random: stable across processes and
        # Python runs (unlike hash()), and distinct for every (seed, rank, v, what).
        return f"ablate/{self.seed}/{self.rank}/{v}/{what}"

    def _stream(self, v: int, index: int, faults: DataFaults) -> Iterator[dict]:
        name = fmt.STREAMS[index]
        samples = resampled_samples(self.shards[index], random.Random(self._key(v, name + "/shards")), name,
                                    faults)
        if self.shuffle_buffer > 1:
            shuffle = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer,
                                          rng=random.Random(self._key(v, name + "/shuffle")))
            samples = iter(shuffle(samples))
        return samples

    def _documents(self, v: int, faults: DataFaults):
        """Documents, ``None`` for each skipped sample (``pack_batches`` counts and bounds those)."""
        order = sorted(self.probs)
        weights = [self.probs[i] for i in order]
        streams = {i: self._stream(v, i, faults) for i in order}
        mix = random.Random(self._key(v, "mix"))
        tok = self.tokenizer
        while True:
            index = mix.choices(order, weights)[0]
            sample = next(streams[index])
            doc = make_document(sample, index, tok, self.tokens_per_image)
            fault = document_fault(sample, doc, fmt.STREAMS[index], (tok.image_id, tok.pad_id))
            if fault is not None:
                faults.note(fault, where=sample_where(sample, fmt.STREAMS[index]))
                doc = None
            yield doc

    def _batches(self, v: int, faults: DataFaults):
        tok = self.tokenizer
        for packed in pack_batches(self._documents(v, faults), seq_len=self.seq_len,
                                   batch_size=self.micro_batch_size, tokens_per_image=self.tokens_per_image,
                                   pad_id=tok.pad_id, image_id=tok.image_id):
            faults.note("no_labels", packed.untargeted, where=f"documents truncated to seq_len={self.seq_len}",
                        detail="no target left")
            faults.note("truncated", packed.truncated, where=f"documents longer than seq_len={self.seq_len}")
            yield packed

    def __iter__(self):
        info = get_worker_info()
        W = max(self.num_workers, 1)
        j = info.id if info is not None else 0
        v = (j + self.start_batch) % W
        faults = DataFaults(f"rank {self.rank} reader {v}")
        batches = self._batches(v, faults)
        for _ in range(len(range(v, self.start_batch, W))):  # batches i < n with i % W == v
            next(batches)
        faults.take()  # those batches' counts are in the checkpoint already
        for packed in batches:
            failed: list[int] = []
            batch = packed.to_tensors(lambda images: _decode_images(images, self.image_size, self.split, failed))
            lost = mask_failed_images(batch, failed, packed.image_streams, self.tokenizer.image_id,
                                      self.tokens_per_image)
            faults.note("image", lost, where=f"documents of a batch of reader {v}", detail="pixels do not decode")
            batch["faults"] = faults.take()
            yield batch


def mixture_weights(weights: dict[str, float]) -> dict[str, float]:
    """Configured weights normalised to sum 1, for every stream of ``format.STREAMS``
    (0 where absent): the probability that the next document comes from each stream."""
    unknown = set(weights) - set(fmt.STREAMS)
    if unknown:
        raise ValueError(f"unknown streams in weights: {sorted(unknown)}; expected {fmt.STREAMS}")
    raw = {}
    for name in fmt.STREAMS:
        w = float(weights.get(name, 0.0))
        if w < 0 or not np.isfinite(w):
            raise ValueError(f"weight of stream {name!r} must be finite and >= 0, got {w}")
        raw[name] = w
    total = sum(raw.values())
    if total == 0:
        raise ValueError(f"all stream weights are zero: {weights}")
    return {name: w / total for name, w in raw.items()}


def _mixture(root, weights: dict[str, float]) -> tuple[dict[int, list[str]], dict[int, float]]:
    shards, probs = {}, {}
    for i, (name, p) in enumerate(mixture_weights(weights).items()):
        if p == 0:
            continue  # never opened
        paths = fmt.list_shards(root, "train", name)
        if not paths:
            raise ValueError(f"stream {name!r} has weight {weights[name]} but no shards in "
                             f"{fmt.shard_dir(root, 'train', name)}")
        shards[i], probs[i] = paths, p
    return shards, probs


def build_train_loader(root, tokenizer, *, weights: dict[str, float], seq_len: int, micro_batch_size: int,
                       tokens_per_image: int, image_size: int, split: Split | None = None,
                       rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 2,
                       start_batch: int = 0, shuffle_buffer: int = 256) -> Iterator[dict]:
    """Endless packed micro-batches for ``rank``; the k-th yielded is global batch ``start_batch + k``.

    ``tokens_per_image`` is what one image occupies in the sequence, all of its
    ``split.num_views`` views together. Each batch holds ``input_ids``, ``labels``
    (-100 = ignored), ``positions`` and ``doc_ids`` (all Long B,L), ``images`` (Float
    N*V,3,S,S: the V views of each image in turn, images in order of appearance),
    ``stream_tokens`` and ``stream_docs`` (Long 3: label tokens and documents per
    stream), ``stats`` (ints: ``truncated``, ``skipped``) and ``faults`` (Long
    ``len(faults.COUNTERS)``: what this batch's reader skipped or truncated, by reason).
    """
    split = split or Split()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if seq_len < tokens_per_image + 2:
        # <bos> + one image + one target is the shortest caption document with a target.
        raise ValueError(f"seq_len {seq_len} cannot hold a caption document with "
                         f"{tokens_per_image} image tokens")
    if tokens_per_image % split.num_views:
        raise ValueError(f"tokens_per_image={tokens_per_image} is not a multiple of the "
                         f"{split.num_views} views per image")
    if micro_batch_size < 1 or num_workers < 0 or start_batch < 0:
        raise ValueError("micro_batch_size must be >= 1, num_workers and start_batch >= 0")
    shards, probs = _mixture(root, weights)
    if num_workers > 0:
        # HF tokenizers warns (and disables its threads) when used after a fork; our
        # workers tokenise single-threaded anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = _MixtureDataset(
        shards, probs, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size,
        tokens_per_image=tokens_per_image, image_size=image_size, split=split, rank=rank, seed=seed,
        num_workers=num_workers, start_batch=start_batch, shuffle_buffer=shuffle_buffer)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
    return iter(loader)


class MixMeter:
    """The realised data mix of a run: label tokens and documents per stream, over all ranks.

    ``add`` counts this rank's micro-batches; ``sync(reduce)`` folds them into the run
    totals with one sum over ranks (a collective: every rank calls it at the same
    step); ``state`` goes into checkpoints so a resumed run keeps its totals.
    """

    def __init__(self, weights: dict[str, float], state: dict | None = None):
        self.weights = mixture_weights(weights)  # configured, normalised
        k = len(fmt.STREAMS)
        # Run totals per stream as of the last sync: label tokens, documents.
        self.tokens = [int(x) for x in state["tokens"]] if state else [0] * k
        self.documents = [int(x) for x in state["documents"]] if state else [0] * k
        self._window_start = list(self.tokens)
        self._pending_2K = torch.zeros(2, k, dtype=torch.long)  # this rank, since the last sync

    def add(self, batch: dict) -> None:
        self._pending_2K[0] += batch["stream_tokens"]
        self._pending_2K[1] += batch["stream_docs"]

    def sync(self, reduce) -> None:
        """``reduce(values, mean=flags) -> values``: ``ablate.dist.reduce_over_ranks``."""
        flat = self._pending_2K.flatten().tolist()
        summed = [round(v) for v in reduce(flat, mean=[False] * len(flat))]
        k = len(fmt.STREAMS)
        self.tokens = [a + b for a, b in zip(self.tokens, summed[:k])]
        self.documents = [a + b for a, b in zip(self.documents, summed[k:])]
        self._pending_2K.zero_()

    def record(self) -> dict:
        """Metrics at a log step (after ``sync``); starts a new window."""
        total = max(sum(self.tokens), 1)
        out = {}
        for i, name in enumerate(fmt.STREAMS):
            out[f"data/tokens_{name}"] = self.tokens[i]
            out[f"data/window_tokens_{name}"] = self.tokens[i] - self._window_start[i]
            out[f"data/share_{name}"] = self.tokens[i] / total
            out[f"data/documents_{name}"] = self.documents[i]
        self._window_start = list(self.tokens)
        return out

    def state(self) -> dict:
        """Run totals for a checkpoint (after ``sync``)."""
        return {"tokens": list(self.tokens), "documents": list(self.documents)}

    def block(self) -> dict:
        """The ``data_mix`` block of results.json (after ``sync``)."""
        names = fmt.STREAMS
        tok_total, doc_total = max(sum(self.tokens), 1), max(sum(self.documents), 1)
        return {
            "weights": {n: round(w, 12) for n, w in self.weights.items()},  # 0.2, not 0.20000000000000004
            "documents": dict(zip(names, self.documents)),
            "document_shares": {n: d / doc_total for n, d in zip(names, self.documents)},
            "tokens": dict(zip(names, self.tokens)),
            "shares": {n: t / tok_total for n, t in zip(names, self.tokens)},
        }


def build_eval_samples(root, split: str, limit: int | None = None) -> list[dict]:
    """The evaluation samples of ``split`` (one of ``format.EVAL_SPLITS``), in shard order.

    caption: ``{"id", "image", "captions"}``; vqa: ``{"id", "image", "question",
    "answers", "qtype"}``; text: ``{"id", "text"}``. Images are loaded PIL RGB images.
    Unlike training, a malformed sample raises: an evaluation must not silently shrink.
    """
    if split not in fmt.EVAL_SPLITS:
        raise ValueError(f"unknown eval split {split!r}; expected one of {fmt.EVAL_SPLITS}")
    shards = fmt.list_shards(root, "eval", split)
    if not shards:
        raise FileNotFoundError(f"no eval shards in {fmt.shard_dir(root, 'eval', split)}")
    out: list[dict] = []
    if limit is not None and limit <= 0:
        return out
    for sample in wds.tarfile_to_samples()([{"url": s} for s in shards]):
        if split == "text":
            item = {"id": sample["__key__"], "text": sample["txt"].decode("utf-8")}
        else:
            meta = json.loads(sample["json"])
            image = Image.open(io.BytesIO(sample["png"])).convert("RGB")  # convert() loads it
            if split == "caption":
                item = {"id": meta["id"], "image": image, "captions": list(meta["captions"])}
            else:
                item = {"id": meta["id"], "image": image, "question": meta["question"],
                        "answers": list(meta["answers"]), "qtype": meta["qtype"]}
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out
