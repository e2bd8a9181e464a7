"""Real evaluation benchmarks as webdataset shards: conversion and loading.

``convert`` turns a benchmark's released files (annotation JSON plus an image
directory; see ``benchmark_formats.py`` for the readers) into one benchmark
directory; ``read_info`` and ``load_benchmark`` are what the evaluation harness
calls. Layout of a benchmark directory::

    DIR/
      benchmark.json           {"format_version": 1, "name", "task", "metric",
                                "splits": {split: {"samples", "shards", "source", ...}}}
      query/shard-000000.tar   the samples that are scored
      support/shard-000000.tar optional: where few-shot examples come from

A sample is one image (captioning) or one question (VQA): ``jpg`` or ``png`` image
bytes and a ``json`` record -- caption ``{"id", "image_id", "captions"}``, VQA
``{"id", "image_id", "question", "answers", "qtype"}``.

Choices:

- Image bytes are copied as stored, so the evaluation sees exactly the released
  pixels; the extension comes from the bytes' magic number, not the file name.
  Anything that is neither JPEG nor PNG (rare: a GIF or WebP among COCO-style
  images) is decoded and stored as PNG.
- Samples are sorted by id (numeric ids numerically) and tar members carry a fixed
  mtime, so the same inputs give byte-identical shards. ``limit`` keeps the first
  ``N`` in that order.
- Missing images are an error listing how many and which, unless ``skip_missing``:
  a benchmark that silently shrinks gives numbers that cannot be compared.
- Each split is written to a temporary directory and renamed into place
  (``ablate.files.atomic_dir``); ``benchmark.json`` is rewritten atomically after
  that and is the only record of which splits are complete, so a killed conversion
  leaves no split that ``load_benchmark`` would accept. Conversions of one directory
  take a lock, so converting query and support at once cannot lose an update.
"""

from __future__ import annotations

import fcntl
import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..files import atomic_dir, write_json
from .benchmark_formats import FORMATS, ImageFinder, Record, sort_key

INFO_FILE = "benchmark.json"
FORMAT_VERSION = 1
SPLITS = ("query", "support")
TASK_METRICS = {"caption": "cider", "vqa": "vqa_accuracy"}
_LOCK_FILE = ".convert.lock"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


# ---------------------------------------------------------------- reading


def _info_path(path) -> Path:
    path = Path(path)
    return path if path.name == INFO_FILE and not path.is_dir() else path / INFO_FILE


def read_info(path) -> dict:
    """``benchmark.json`` of the benchmark directory ``path`` (or the file itself), checked.

    Raises ``FileNotFoundError`` if there is none and ``ValueError`` if it is not a
    complete, readable description of a converted benchmark.
    """
    file = _info_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent}: no {INFO_FILE}, so no converted benchmark there "
                                f"(write one with `ablate-data convert FORMAT --out {file.parent} ...`)")
    try:
        info = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None

    def bad(msg: str) -> ValueError:
        return ValueError(f"{file}: {msg}")

    if not isinstance(info, dict):
        raise bad("expected a JSON object")
    if info.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version is {info.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    if not isinstance(info.get("name"), str) or not info["name"]:
        raise bad("'name' is missing")
    if info.get("task") not in TASK_METRICS:
        raise bad(f"'task' is {info.get('task')!r}, expected one of {sorted(TASK_METRICS)}")
    if info.get("metric") != TASK_METRICS[info["task"]]:
        raise bad(f"'metric' is {info.get('metric')!r}, expected {TASK_METRICS[info['task']]!r}")
    splits = info.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("'splits' is missing or empty")
    for name, entry in splits.items():
        if name not in SPLITS:
            raise bad(f"unknown split {name!r}, expected {SPLITS}")
        for key in ("samples", "shards"):
            if not isinstance(entry, dict) or not isinstance(entry.get(key), int) or entry[key] < 1:
                raise bad(f"split {name!r} needs a positive integer {key!r}")
    return info


def load_benchmark(path, split: str = "query", limit: int | None = None) -> list[dict]:
    """The samples of one split of a converted benchmark, in shard (id) order.

    caption: ``{"id", "image_id", "image", "captions"}``; vqa: ``{"id", "image_id",
    "image", "question", "answers", "qtype"}``; ``image`` is a loaded PIL RGB image.
    The same dicts as ``pipeline.build_eval_samples`` plus ``image_id``. A split that
    was not converted is a ``ValueError`` naming the ones that were; shards that do
    not match ``benchmark.json`` are a ``ValueError`` too (never a silent shrink).
    """
    info = read_info(path)
    root = _info_path(path).parent
    if split not in info["splits"]:
        raise ValueError(f"{root}: benchmark {info['name']!r} has no {split!r} split "
                         f"(converted: {sorted(info['splits'])})")
    entry = info["splits"][split]
    shards = sorted(str(p) for p in (root / split).glob("shard-*.tar"))
    if len(shards) != entry["shards"]:
        raise ValueError(f"{root / split}: {len(shards)} shards on disk, {INFO_FILE} says {entry['shards']}")
    out: list[dict] = []
    if limit is not None and limit <= 0:
        return out
    for sample in wds.tarfile_to_samples()([{"url": s} for s in shards]):
        meta = json.loads(sample["json"])
        raw = sample.get("jpg", sample.get("png"))
        if raw is None:
            raise ValueError(f"{sample['__url__']}: sample {sample['__key__']} has no jpg or png image")
        item = {"id": meta["id"], "image_id": meta["image_id"],
                "image": Image.open(io.BytesIO(raw)).convert("RGB")}  # convert() loads it
        if info["task"] == "caption":
            item["captions"] = list(meta["captions"])
        else:
            item.update(question=meta["question"], answers=list(meta["answers"]), qtype=meta["qtype"])
        out.append(item)
        if limit is not None and len(out) >= limit:
            return out
    if len(out) != entry["samples"]:
        raise ValueError(f"{root / split}: {len(out)} samples in the shards, {INFO_FILE} says {entry['samples']}")
    return out


# ---------------------------------------------------------------- writing


def image_bytes(path: Path) -> tuple[str, bytes]:
    """``(extension, bytes)`` for webdataset: the file's own bytes if JPEG or PNG."""
    data = path.read_bytes()
    if data.startswith(_PNG_MAGIC):
        return "png", data
    if data.startswith(_JPEG_MAGIC):
        return "jpg", data
    try:
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
    except Exception as e:  # PIL raises several types for undecodable input
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return "png", buf.getvalue()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_target(root: Path, name: str, split: str, force: bool) -> dict | None:
    """The existing ``benchmark.json`` (or None), after refusing what would clobber data."""
    if (root / INFO_FILE).exists():
        info = read_info(root)
        if info["name"] != name:
            raise FileExistsError(f"{root} holds the {info['name']!r} benchmark, not {name!r}; "
                                  f"choose another --out")
        if split in info["splits"] and not force:
            raise FileExistsError(f"{root}: split {split!r} of {name!r} is already converted "
                                  f"({info['splits'][split]['samples']} samples); pass --force to replace it")
        return info
    others = [p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in SPLITS]
    if others and not force:
        raise FileExistsError(f"{root} is not empty and holds no {INFO_FILE} (found {sorted(others)[:3]}); "
                              f"choose another --out or pass --force")
    return None


def _select(records: list[Record], finder: ImageFinder, limit: int | None,
            skip_missing: bool, images: Path) -> tuple[list[tuple[Record, Path]], int]:
    """Records paired with their image files, in id order, up to ``limit``."""
    chosen: list[tuple[Record, Path]] = []
    missing: list[Record] = []
    for rec in records:
        if limit is not None and len(chosen) >= limit:
            break
        path = finder.find(rec)
        if path is None:
            missing.append(rec)
        else:
            chosen.append((rec, path))
    if missing and not skip_missing:
        first = ", ".join(rec.names[0] for rec in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(chosen) + len(missing)} images not found in "
                                f"{images}: {first}{more} (pass --skip-missing to leave those samples out)")
    return chosen, len(missing)


def convert(benchmark: str, out, images, annotations, questions=None, split: str = "query",
            limit: int | None = None, shard_size: int = 1000, force: bool = False,
            skip_missing: bool = False, progress: bool = True) -> dict:
    """Convert one split of a benchmark into ``out``; returns its ``benchmark.json`` entry.

    ``benchmark`` is a key of ``FORMATS`` ("coco", "vqav2", ...). A split that already exists needs ``force``.
    Raises ``ValueError`` for bad arguments or malformed annotations,
    ``FileNotFoundError`` for missing inputs or images, ``FileExistsError`` when
    ``out`` holds something this would overwrite.
    """
    if benchmark not in FORMATS:
        raise ValueError(f"unknown benchmark format {benchmark!r}; expected one of {sorted(FORMATS)}")
    spec = FORMATS[benchmark]
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if limit is not None and limit < 1:
        raise ValueError("limit must be >= 1")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    if questions is not None and not spec.needs_questions:
        raise ValueError(f"{benchmark} keeps its questions in the annotation file; drop --questions")
    root, images, annotations = Path(out), Path(images), Path(annotations)
    questions = Path(questions) if questions is not None else None
    if not images.is_dir():
        raise FileNotFoundError(f"image directory not found: {images}")
    for f in (annotations, questions):
        if f is not None and not f.is_file():
            raise FileNotFoundError(f"annotation file not found: {f}")

    with _locked(root):
        info = _check_target(root, benchmark, split, force)
        records = sorted(spec.read(annotations, questions), key=sort_key)
        chosen, skipped = _select(records, ImageFinder(images), limit, skip_missing, images)
        if not chosen:
            why = f" ({skipped} images missing)" if skipped else ""
            raise ValueError(f"{annotations}: no samples to write{why}")

        def write(tmp: Path) -> None:
            # mtime=0: tar headers must not carry the conversion time.
            with wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink, \
                    tqdm(total=len(chosen), desc=f"{benchmark}/{split}", unit="sample", disable=not progress) as bar:
                for i, (rec, path) in enumerate(chosen):
                    ext, data = image_bytes(path)
                    meta = json.dumps(rec.meta(), sort_keys=True, ensure_ascii=False).encode("utf-8")
                    sink.write({"__key__": f"{i:08d}", ext: data, "json": meta})
                    bar.update(1)

        atomic_dir(root / split, write)
        source = {"images": str(images.resolve()), "annotations": str(annotations.resolve())}
        if questions is not None:
            source["questions"] = str(questions.resolve())
        entry = {"samples": len(chosen), "shards": len(list((root / split).glob("shard-*.tar"))),
                 "source": source, "limit": limit, "skipped_missing": skipped}
        info = info or {"format_version": FORMAT_VERSION, "name": benchmark, "task": spec.task,
                        "metric": spec.metric, "splits": {}}
        info["splits"][split] = entry
        write_json(root / INFO_FILE, info)  # last: it marks the split complete
    return entry
