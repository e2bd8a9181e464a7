"""Samples -> token documents -> packed rows -> micro-batches (images still encoded).

This is the pure, single-threaded half of the training pipeline: no files, no
workers, no randomness, so every rule about documents and labels can be tested on
hand-made inputs. ``pipeline.py`` feeds it samples and decodes the images of the
batches it actually emits.

Choices:

- A document keeps where each image's run of ``T`` placeholder tokens starts, so
  truncation can cut *before* an image instead of through it (a partial image run
  would not match the connector's ``T`` output tokens).
- Labels are next-token targets inside a document only; the last token of a document
  (also of a truncated one) has no target, and targets that are image placeholders or
  padding are ignored (-100). An image-only document therefore keeps exactly one
  target, its ``<eos>``; only truncation can leave a document with none, and such a
  document is skipped because it would cost compute and teach nothing.
- Packing is greedy and never splits a document across rows: a document that does
  not fit closes the current row (padded), so every row starts at a document start.
- Padding forms its own "document" per row (one extra ``doc_id``, positions from 0),
  so a block-diagonal causal mask lets every padding position attend to itself and
  no real token ever attends to padding.
- Statistics are attributed to the batch in which the (next) placed document lands,
  which keeps them deterministic under resume: ``truncated`` counts kept documents
  that were cut, ``skipped`` counts malformed samples and truncated documents left
  without a target (those are not also counted as truncated; ``untargeted`` counts
  the latter alone, for ``faults.py``). ``stream_tokens`` and
  ``stream_docs`` count the label tokens and the documents each stream placed in the
  batch: the realised data mix, in the two units a reader may want (the mixture
  weights are probabilities per document; token shares also reflect document lengths).
- ``tokens_per_image`` is the whole run one image occupies: with image splitting
  (``splitting.py``) that is ``V`` views x tokens per view, so truncation never
  separates the views of one image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from . import format as fmt

IGNORE = -100


@dataclass
class Document:
    """One training document as token ids, with its images still PNG-encoded."""

    ids: list[int]
    """Token ids, ``<bos>`` ... ``<eos>`` (the ``<eos>`` is gone if truncated)."""
    image_starts: list[int]
    """Index into ``ids`` where each image's run of ``T`` placeholder tokens begins."""
    images: list[bytes]
    """Encoded image per run, same order as ``image_starts``."""
    stream: int
    """Index of the source stream in ``format.STREAMS``."""
    truncated: bool = False
    """Whether the document was cut to fit a row."""


def make_document(sample: dict, stream: int, tokenizer, tokens_per_image: int) -> Document | None:
    """Tokenise one raw webdataset sample of ``format.STREAMS[stream]``.

    Returns ``None`` for a malformed sample (missing field, bad json, an image chunk
    naming a file the sample lacks); the caller counts it as skipped.
    """
    T = tokens_per_image
    ids = [tokenizer.bos_id]
    starts: list[int] = []
    images: list[bytes] = []

    def add_image(data: bytes) -> None:
        starts.append(len(ids))
        images.append(data)
        ids.extend([tokenizer.image_id] * T)

    name = fmt.STREAMS[stream]
    try:
        if name == "caption":
            add_image(sample["png"])
            ids.extend(tokenizer.encode(sample["txt"].decode("utf-8")))
        elif name == "interleaved":
            for chunk in json.loads(sample["json"])["chunks"]:
                if isinstance(chunk, str):
                    ids.extend(tokenizer.encode(chunk))
                else:
                    add_image(sample[chunk["image"]])
        elif name == "text":
            ids.extend(tokenizer.encode(sample["txt"].decode("utf-8")))
        else:
            raise ValueError(f"unknown stream {name!r}")
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        return None
    ids.append(tokenizer.eos_id)
    return Document(ids, starts, images, stream)


def truncate_document(doc: Document, seq_len: int, tokens_per_image: int) -> Document:
    """Cut ``doc`` to at most ``seq_len`` tokens without cutting through an image run."""
    if len(doc.ids) <= seq_len:
        return doc
    cut = seq_len
    for s in doc.image_starts:
        if s < cut < s + tokens_per_image:
            cut = s  # the image would be partial: drop it and everything after
            break
    keep = sum(1 for s in doc.image_starts if s < cut)
    return Document(doc.ids[:cut], doc.image_starts[:keep], doc.images[:keep], doc.stream, True)


def document_labels(ids: list[int], ignore_ids: tuple[int, ...]) -> list[int]:
    """Next-token targets within one document; -100 where there is nothing to learn."""
    labels = [t if t not in ignore_ids else IGNORE for t in ids[1:]]
    labels.append(IGNORE)  # the next token belongs to another document (or none)
    return labels


@dataclass
class PackedBatch:
    """``B`` packed rows as Python lists; images stay encoded until emitted."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    positions: list[list[int]] = field(default_factory=list)
    doc_ids: list[list[int]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    """Row-major, in order of appearance."""
    image_streams: list[int] = field(default_factory=list)
    """The stream of the document each image belongs to, same order."""
    stream_tokens: list[int] = field(default_factory=lambda: [0] * len(fmt.STREAMS))
    stream_docs: list[int] = field(default_factory=lambda: [0] * len(fmt.STREAMS))
    truncated: int = 0
    skipped: int = 0
    untargeted: int = 0
    """Truncated documents dropped for want of a target while this batch was built
    (also in ``skipped``; ``faults.py`` reports them as ``no_labels``)."""

    def to_tensors(self, decode_images) -> dict:
        """Tensor micro-batch; ``decode_images(list[bytes]) -> Tensor N*V,3,H,W`` (V views per image)."""
        return {
            "input_ids": torch.tensor(self.input_ids, dtype=torch.long),
            "labels": torch.tensor(self.labels, dtype=torch.long),
            "positions": torch.tensor(self.positions, dtype=torch.long),
            "doc_ids": torch.tensor(self.doc_ids, dtype=torch.long),
            "images": decode_images(self.images),
            "stream_tokens": torch.tensor(self.stream_tokens, dtype=torch.long),
            "stream_docs": torch.tensor(self.stream_docs, dtype=torch.long),
            "stats": {"truncated": self.truncated, "skipped": self.skipped},
        }


class _Row:
    """The row being filled."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.positions: list[int] = []
        self.doc_ids: list[int] = []
        self.images: list[bytes] = []
        self.image_streams: list[int] = []
        self.ndocs = 0


def pack_batches(
    documents: Iterable[Document | None],
    *,
    seq_len: int,
    batch_size: int,
    tokens_per_image: int,
    pad_id: int,
    image_id: int,
    drop_untargeted: bool = True,
    max_consecutive_skips: int = 1000,
) -> Iterator[PackedBatch]:
    """Greedily pack ``documents`` (``None`` = a skipped sample) into batches of rows.

    ``drop_untargeted`` skips truncated documents left without any target. Yields
    forever if ``documents`` is endless; a finite input ends with its last *full*
    batch (a partial one would break the fixed micro-batch shape). Raises if
    ``max_consecutive_skips`` documents in a row are skipped, which means the data or
    ``seq_len`` is unusable, rather than spinning forever.
    """
    ignore = (image_id, pad_id)
    row = _Row()
    batch = PackedBatch()
    pending_skipped = 0

    def close_row() -> None:
        nonlocal row
        npad = seq_len - len(row.ids)
        batch.input_ids.append(row.ids + [pad_id] * npad)
        batch.labels.append(row.labels + [IGNORE] * npad)
        batch.positions.append(row.positions + list(range(npad)))
        batch.doc_ids.append(row.doc_ids + [row.ndocs] * npad)
        batch.images.extend(row.images)
        batch.image_streams.extend(row.image_streams)
        row = _Row()

    for doc in documents:
        if doc is not None:
            doc = truncate_document(doc, seq_len, tokens_per_image)
            labels = document_labels(doc.ids, ignore)
            targets = sum(1 for t in labels if t != IGNORE)
        if doc is None or (drop_untargeted and doc.truncated and targets == 0):
            pending_skipped += 1
            batch.untargeted += doc is not None
            if pending_skipped >= max_consecutive_skips:
                raise RuntimeError(f"{pending_skipped} documents in a row were skipped (bad samples, see "
                                   f"faults.py, or truncated to seq_len={seq_len} without a text target)")
            continue
        if len(row.ids) + len(doc.ids) > seq_len:
            close_row()
            if len(batch.input_ids) == batch_size:
                yield batch
                batch = PackedBatch()
        row.ids.extend(doc.ids)
        row.labels.extend(labels)
        row.positions.extend(range(len(doc.ids)))
        row.doc_ids.extend([row.ndocs] * len(doc.ids))
        row.images.extend(doc.images)
        row.image_streams.extend([doc.stream] * len(doc.images))
        row.ndocs += 1
        batch.stream_tokens[doc.stream] += targets
        batch.stream_docs[doc.stream] += 1
        batch.truncated += int(doc.truncated)
        batch.skipped += pending_skipped
        pending_skipped = 0
    if row.ids:  # a finite input: its last row may still complete a batch
        close_row()
        if len(batch.input_ids) == batch_size:
            yield batch
