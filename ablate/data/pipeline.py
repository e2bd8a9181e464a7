"""Training and evaluation data: webdataset shards -> packed multimodal micro-batches.

``build_train_loader`` mixes the three training streams of ``format.STREAMS`` by
weight, tokenises each sample into a document (``packing.py``), packs documents
into fixed-length rows and yields micro-batches forever. ``build_eval_samples``
reads evaluation shards in order; ``preprocess_image`` is shared by both so a model
sees the same pixels in training and evaluation.

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
  tokenises and packs but never decodes an image, which is where the time goes
  (about 2 s to resume at batch 1000 with 2 workers on a laptop). Resume needs the
  same corpus, ``seed``, ``rank``, ``num_workers`` and packing/shuffle settings.
- Images stay PNG bytes until a batch is emitted, for the same reason.
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
from .packing import make_document, pack_batches

__all__ = ["build_train_loader", "build_eval_samples", "preprocess_image"]


def _pixels(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB, bicubic resize to ``image_size`` square: uint8 H,W,3."""
    img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _normalise(x_NHWC: torch.Tensor) -> torch.Tensor:
    """uint8 N,H,W,3 -> float N,3,H,W in [-1, 1], i.e. (x - 0.5) / 0.5 of x in [0, 1]."""
    return (x_NHWC.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def preprocess_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to ``image_size`` square, scaled to [-1, 1]: Tensor 3,H,W."""
    return _normalise(torch.from_numpy(_pixels(img, image_size).copy())[None])[0]


def _decode_images(images: list[bytes], image_size: int) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, image_size, image_size)
    # One float conversion for the whole batch: the same numbers as preprocess_image.
    x_NHWC = np.stack([_pixels(Image.open(io.BytesIO(b)), image_size) for b in images])
    return _normalise(torch.from_numpy(x_NHWC))


def _resampled_samples(shards: list[str], rng: random.Random, name: str) -> Iterator[dict]:
    """Endless raw samples from shards drawn with replacement.

    One ``tarfile_to_samples`` per drawn shard (rather than one over an endless URL
    iterator) lets us notice a stream whose shards yield nothing and fail loudly
    instead of spinning forever on warnings.
    """
    read = wds.tarfile_to_samples(handler=wds.warn_and_continue)
    barren = 0
    while True:
        got = False
        for sample in read([{"url": rng.choice(shards)}]):
            got = True
            yield sample
        barren = 0 if got else barren + 1
        if barren > 4 * len(shards) + 16:
            raise RuntimeError(f"stream {name!r}: {barren} shard draws in a row gave no samples")


class _MixtureDataset(IterableDataset):
    """Packed micro-batches of one rank; see the module docstring for the worker scheme."""

    def __init__(self, shards, probs, tokenizer, *, seq_len, micro_batch_size, tokens_per_image,
                 image_size, rank, seed, num_workers, start_batch, shuffle_buffer):
        super().__init__()
        self.shards = shards  # stream index -> shard paths, positive-weight streams only
        self.probs = probs  # stream index -> probability, same keys
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.tokens_per_image = tokens_per_image
        self.image_size = image_size
        self.rank = rank
        self.seed = seed
        self.num_workers = num_workers
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer

    def _key(self, v: int, what: str) -> str:
        # String seeds go through sha512 in random.Random: stable across processes and
        # Python runs (unlike hash()), and distinct for every (seed, rank, v, what).
        return f"ablate/{self.seed}/{self.rank}/{v}/{what}"

    def _stream(self, v: int, index: int) -> Iterator[dict]:
        name = fmt.STREAMS[index]
        samples = _resampled_samples(self.shards[index], random.Random(self._key(v, name + "/shards")), name)
        if self.shuffle_buffer > 1:
            shuffle = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer,
                                          rng=random.Random(self._key(v, name + "/shuffle")))
            samples = iter(shuffle(samples))
        return samples

    def _documents(self, v: int):
        order = sorted(self.probs)
        weights = [self.probs[i] for i in order]
        streams = {i: self._stream(v, i) for i in order}
        mix = random.Random(self._key(v, "mix"))
        while True:
            index = mix.choices(order, weights)[0]
            yield make_document(next(streams[index]), index, self.tokenizer, self.tokens_per_image)

    def _batches(self, v: int):
        tok = self.tokenizer
        return pack_batches(self._documents(v), seq_len=self.seq_len, batch_size=self.micro_batch_size,
                            tokens_per_image=self.tokens_per_image, pad_id=tok.pad_id, image_id=tok.image_id)

    def __iter__(self):
        info = get_worker_info()
        W = max(self.num_workers, 1)
        j = info.id if info is not None else 0
        v = (j + self.start_batch) % W
        batches = self._batches(v)
        for _ in range(len(range(v, self.start_batch, W))):  # batches i < n with i % W == v
            next(batches)
        for packed in batches:
            yield packed.to_tensors(lambda images: _decode_images(images, self.image_size))


def _mixture(root, weights: dict[str, float]) -> tuple[dict[int, list[str]], dict[int, float]]:
    unknown = set(weights) - set(fmt.STREAMS)
    if unknown:
        raise ValueError(f"unknown streams in weights: {sorted(unknown)}; expected {fmt.STREAMS}")
    shards, raw = {}, {}
    for i, name in enumerate(fmt.STREAMS):
        w = float(weights.get(name, 0.0))
        if w < 0 or not np.isfinite(w):
            raise ValueError(f"weight of stream {name!r} must be finite and >= 0, got {w}")
        if w == 0:
            continue  # never opened
        paths = fmt.list_shards(root, "train", name)
        if not paths:
            raise ValueError(f"stream {name!r} has weight {w} but no shards in "
                             f"{fmt.shard_dir(root, 'train', name)}")
        shards[i], raw[i] = paths, w
    total = sum(raw.values())
    if total == 0:
        raise ValueError(f"all stream weights are zero: {weights}")
    return shards, {i: w / total for i, w in raw.items()}


def build_train_loader(root, tokenizer, *, weights: dict[str, float], seq_len: int, micro_batch_size: int,
                       tokens_per_image: int, image_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, num_workers: int = 2, start_batch: int = 0,
                       shuffle_buffer: int = 256) -> Iterator[dict]:
    """Endless packed micro-batches for ``rank``; the k-th yielded is global batch ``start_batch + k``.

    Each batch holds ``input_ids``, ``labels`` (-100 = ignored), ``positions`` and
    ``doc_ids`` (all Long B,L), ``images`` (Float N,3,H,W in order of appearance),
    ``stream_tokens`` (Long 3: label tokens per stream) and ``stats`` (ints:
    ``truncated``, ``skipped``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if seq_len < tokens_per_image + 2:
        # <bos> + one image + one target is the shortest caption document with a target.
        raise ValueError(f"seq_len {seq_len} cannot hold a caption document with "
                         f"{tokens_per_image} image tokens")
    if micro_batch_size < 1 or num_workers < 0 or start_batch < 0:
        raise ValueError("micro_batch_size must be >= 1, num_workers and start_batch >= 0")
    shards, probs = _mixture(root, weights)
    if num_workers > 0:
        # HF tokenizers warns (and disables its threads) when used after a fork; our
        # workers tokenise single-threaded anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = _MixtureDataset(
        shards, probs, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size,
        tokens_per_image=tokens_per_image, image_size=image_size, rank=rank, seed=seed,
        num_workers=num_workers, start_batch=start_batch, shuffle_buffer=shuffle_buffer)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
    return iter(loader)


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
