"""Bad training data: detected, skipped (or truncated), counted, and training goes on.

``pipeline.py`` reads shards through ``read_shard``/``resampled_samples`` and screens
every document with ``document_fault``; what is dropped is counted by a per-reader
``DataFaults`` whose counts ride along with the batches (``batch["faults"]``, Long
``len(COUNTERS)``), because DataLoader workers are separate processes. The trainer
sums them over ranks with ``FaultMeter``, logs ``data/skipped_<reason>`` and
``data/truncated`` (cumulative) and writes them to results.json's ``data_faults``.

The reasons, in the order a document is checked (a document counts once, under the
first that applies):

- ``shard``: one *read* of a shard that ended early: a truncated file, garbage bytes,
  an invalid header, or a file that is not a tar. The samples read before the fault
  are kept except the last (it may lack members); the rest of that shard is skipped.
- ``malformed``: a sample ``packing.make_document`` rejects (missing field, bad json or
  UTF-8, an image chunk naming a file the sample lacks).
- ``empty_text``: a sample whose text has no non-whitespace character: the caption
  ``txt``, the text-only ``txt``, or all text chunks of an interleaved document
  together (an interleaved document with images only is empty). Such a document's
  only target would be its ``<eos>``.
- ``image``: an image PIL cannot open or whose PNG chunks fail their checksums
  (``Image.verify``, about 40 us: cheap enough to run while fast-forwarding, unlike a
  full decode). An image that passes and still fails to decode when its batch is
  emitted has its document's labels masked instead (``mask_failed_images``): the
  batch shape is fixed by then.
- ``no_labels``: nothing to learn: no target besides the closing ``<eos>``, or a
  document that truncation left without any target (counted by ``pack_batches``).

``truncated`` counts kept documents that were cut to ``seq_len`` (never through an
image). Counts are attributed to the batch being built when they happen, which is
deterministic, so they are exact across a resume (the fast-forwarded batches' counts
are dropped: the checkpoint already holds them). Each reason is logged once per
reader with its shard and key; after that it is only counted.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger("ablate.data")

SKIP_REASONS = ("shard", "malformed", "empty_text", "image", "no_labels")
COUNTERS = SKIP_REASONS + ("truncated",)
"""Order of the entries of ``batch["faults"]``."""
IGNORE = -100
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default ``skip_meta``


def metric_name(counter: str) -> str:
    return "data/truncated" if counter == "truncated" else f"data/skipped_{counter}"


class DataFaults:
    """Counts of one reader (one virtual worker of one rank) since the last batch."""

    def __init__(self, reader: str = ""):
        self.reader = reader
        self.pending = [0] * len(COUNTERS)
        self._warned: set[str] = set()

    def note(self, counter: str, n: int = 1, where: str = "", detail: str = "") -> None:
        """Count ``n`` of ``counter``; the first time per reader, say where and why."""
        if n <= 0:
            return
        self.pending[COUNTERS.index(counter)] += n
        if counter not in self._warned:
            self._warned.add(counter)
            log.warning("[ablate] data %s: %s %s%s; further ones are counted as %s without a warning",
                        self.reader, "truncated" if counter == "truncated" else f"skipped ({counter})",
                        where, f": {detail}" if detail else "", metric_name(counter))

    def take(self) -> torch.Tensor:
        """The counts since the last call, for the batch being emitted."""
        out = torch.tensor(self.pending, dtype=torch.long)
        self.pending = [0] * len(COUNTERS)
        return out


# ---- shards

def _members(path: str) -> Iterator[dict]:
    """Regular files of an uncompressed tar as webdataset's ``tar_file_iterator`` yields them,
    but raising ``tarfile.ReadError`` where the archive ends early.

    ``tarfile`` in stream mode stops *silently* at a truncated or invalid header past the
    first one, so a shard cut at a header boundary, or with garbage over a header, would
    lose its tail unnoticed. A complete archive ends with a zero block, so the block
    where iteration stopped must be one.
    """
    with open(path, "rb") as f:
        tar = tarfile.open(fileobj=f, mode="r|*")  # as webdataset opens it
        for info in tar:
            name = info.name
            if not info.isreg() or _META.match(name) or ("/" not in name and name.startswith("__")
                                                          and name.endswith("__")):
                continue  # webdataset's metadata members
            yield {"fname": name, "data": tar.extractfile(info).read(), "__url__": path}
        if tar.fileobj.comptype != "tar":
            return  # a compressed stream reports its own truncation (EOFError)
        end = tar.offset
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE or any(block):
        raise tarfile.ReadError(f"archive ends without its end-of-archive block at byte {end}")


def read_shard(path: str) -> Iterator[dict]:
    """The samples of one shard, grouped by key exactly as ``wds.tarfile_samples`` does.

    Raises on a damaged shard *before* yielding the sample that was being assembled,
    so every yielded sample is complete.
    """
    return wds.tariterators.group_by_keys(_members(path))


def resampled_samples(shards: list[str], rng: random.Random, name: str, faults: DataFaults) -> Iterator[dict]:
    """Endless raw samples of stream ``name`` from shards drawn with replacement.

    A damaged shard gives what it had up to the fault and is counted. Once every shard
    of the stream has been drawn and given nothing since the last sample, the stream
    is unusable: raise, naming the shards and their errors, rather than spin.
    """
    barren: dict[str, str] = {}  # shard -> why it gave nothing, since the last sample
    while True:
        path = rng.choice(shards)
        got = False
        samples = read_shard(path)
        try:
            for sample in samples:
                got = True
                yield sample
            why = "no samples"
        except Exception as e:  # noqa: BLE001  truncated, garbage, unreadable: skip the rest
            why = f"{type(e).__name__}: {e}"
            faults.note("shard", where=f"rest of shard {path}", detail=why)
        if got:
            barren.clear()
            continue
        barren[path] = why
        if len(barren) == len(set(shards)):
            lines = "\n".join(f"  {p}: {w}" for p, w in sorted(barren.items()))
            raise RuntimeError(f"stream {name!r}: none of its {len(barren)} shards gives a sample; "
                               f"fix or remove them, or set its weight to 0:\n{lines}")


# ---- documents

def image_ok(data: bytes) -> bool:
    """Whether PIL can open ``data`` and its chunk checksums hold (no pixel decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001  UnidentifiedImageError, SyntaxError, OSError, bombs...
        return False


def _text(sample: dict, stream: str) -> str:
    if stream == "interleaved":
        return "".join(c for c in json.loads(sample["json"])["chunks"] if isinstance(c, str))
    return sample["txt"].decode("utf-8")


def document_fault(sample: dict, doc, stream: str, ignore_ids: tuple[int, ...]) -> str | None:
    """Why the document ``doc`` made of ``sample`` must be skipped, or ``None`` to keep it.

    ``doc`` is ``make_document``'s result (``None`` = malformed); its images were not
    decoded yet. ``ignore_ids`` are the tokens that are never targets (image, padding).
    """
    if doc is None:
        return "malformed"
    if not _text(sample, stream).strip():
        return "empty_text"
    if not all(image_ok(b) for b in doc.images):
        return "image"
    if all(t in ignore_ids for t in doc.ids[1:-1]):  # only <eos> would be a target
        return "no_labels"
    return None


def sample_where(sample: dict, stream: str) -> str:
    """Where a sample comes from, for a warning."""
    return f"sample {sample.get('__key__')!r} of {sample.get('__url__')} (stream {stream})"


def decode_each(images: list[bytes], decode: Callable[[bytes], Any], blank: Any) -> tuple[list, list[int]]:
    """``decode`` every image; a failure gives ``blank`` and its index in the second list."""
    out, failed = [], []
    for k, b in enumerate(images):
        try:
            out.append(decode(b))
        except Exception:  # noqa: BLE001  passed image_ok, yet the pixels do not decode
            out.append(blank)
            failed.append(k)
    return out, failed


def mask_failed_images(batch: dict, failed: list[int], image_streams: list[int], image_id: int,
                       tokens_per_image: int) -> int:
    """Mask the labels of the documents holding the images ``failed`` (indices into the
    batch's images); take them out of ``stream_tokens``/``stream_docs``. Returns how many
    documents were masked."""
    if not failed:
        return 0
    ids, labels, doc_ids = batch["input_ids"], batch["labels"], batch["doc_ids"]
    starts = (ids.flatten() == image_id).nonzero().squeeze(1)[::tokens_per_image]
    masked = set()
    for k in failed:
        r, c = divmod(int(starts[k]), ids.shape[1])
        d = int(doc_ids[r, c])
        if (r, d) in masked:
            continue
        masked.add((r, d))
        sel = doc_ids[r] == d
        s = image_streams[k]
        batch["stream_tokens"][s] -= int((labels[r, sel] != IGNORE).sum())
        batch["stream_docs"][s] -= 1
        labels[r, sel] = IGNORE
    return len(masked)


# ---- the trainer's side

class FaultMeter:
    """Run totals of ``batch["faults"]`` over all ranks, like ``pipeline.MixMeter``.

    ``add`` counts this rank's micro-batches; ``sync(reduce)`` sums them over ranks (a
    collective: every rank calls it at the same step); ``state`` goes into checkpoints.
    """

    def __init__(self, state: dict | None = None):
        self.totals = {c: int((state or {}).get(c, 0)) for c in COUNTERS}
        self._pending = torch.zeros(len(COUNTERS), dtype=torch.long)

    def add(self, batch: dict) -> None:
        if "faults" in batch:
            self._pending += batch["faults"]

    def sync(self, reduce) -> None:
        """``reduce(values, mean=flags) -> values``: ``ablate.dist.reduce_over_ranks``."""
        summed = reduce(self._pending.tolist(), mean=[False] * len(COUNTERS))
        for c, v in zip(COUNTERS, summed):
            self.totals[c] += round(v)
        self._pending.zero_()

    def record(self) -> dict:
        """``data/skipped_<reason>`` and ``data/truncated``, cumulative (after ``sync``)."""
        return {metric_name(c): n for c, n in self.totals.items()}

    def state(self) -> dict:
        return dict(self.totals)

    def block(self) -> dict:
        """results.json's ``data_faults``: ``skipped`` per reason, their ``skipped_total``,
        and ``truncated``."""
        skipped = {c: self.totals[c] for c in SKIP_REASONS}
        return {"skipped": skipped, "skipped_total": sum(skipped.values()),
                "truncated": self.totals["truncated"]}


__all__ = ["COUNTERS", "SKIP_REASONS", "DataFaults", "FaultMeter", "read_shard", "resampled_samples",
           "document_fault", "image_ok", "mask_failed_images", "metric_name", "decode_each",
           "sample_where"]
