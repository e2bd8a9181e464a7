"""Readers for the annotation files of real evaluation benchmarks.

Each reader turns the files a benchmark ships with into a list of ``Record``s: one
per image for captioning, one per question for VQA. A record names the image it
needs (candidate file names, and for COCO-family images the numeric id) but does
not open it; ``benchmarks.py`` finds the files, checks they exist and writes shards.

Choices:

- Field names are the released ones (COCO captions / NoCaps, TextCaps 0.1, VQAv2 and
  OK-VQA question + annotation pairs, TextVQA 0.5.1, VizWiz, GQA balanced questions).
  A missing field is a ``ValueError`` naming the file, the entry and the field,
  never a ``KeyError`` from deep inside a loop.
- Where the releases differ, both are accepted: COCO images may be named as in the
  annotation (``COCO_val2014_000000391895.jpg``), 2017-style (``000000391895.jpg``) or
  with any prefix before the 12-digit id; TextCaps captions come from
  ``reference_strs`` when present, else from the per-caption ``caption_str`` entries;
  VizWiz answers may be ``{"answer": ...}`` dicts or plain strings; GQA questions
  may be the released ``{qid: {...}}`` mapping or a list of entries with an id.
- Every annotator answer is kept, duplicates included (VQA accuracy counts them);
  caption lists keep the file's order.
- ``qtype`` is the answer type where the benchmark has one (VQAv2, OK-VQA, VizWiz),
  GQA's structural type, and "" for TextVQA, which has neither.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class Record:
    """One output sample before its image is found."""

    id: str
    image_id: str
    names: list[str]
    """Candidate image file names, relative to the image directory, best first."""
    fields: dict[str, Any]
    """``{"captions": [...]}`` or ``{"question", "answers", "qtype"}``."""
    number: int | None = None
    """Numeric image id, for images named ``<anything>_<digits>.jpg`` (COCO family)."""

    def meta(self) -> dict:
        return {"id": self.id, "image_id": self.image_id, **self.fields}


def sort_key(rec: Record) -> tuple:
    """Numeric ids in numeric order, then the rest as strings: deterministic shards."""
    return (0, int(rec.id), "") if rec.id.isdigit() else (1, 0, rec.id)


# ---------------------------------------------------------------- JSON helpers


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def get(obj: Any, key: str, path: Path, where: str) -> Any:
    """``obj[key]``, or a ``ValueError`` naming the file, the entry and the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where} should be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{path}: {where} has no field {key!r}")
    return obj[key]


def get_list(obj: Any, key: str, path: Path, where: str) -> list:
    value = get(obj, key, path, where)
    if not isinstance(value, list):
        raise ValueError(f"{path}: {where} field {key!r} should be a list")
    return value


def _unique(records: list[Record], path: Path) -> list[Record]:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"{path}: id {r.id!r} occurs more than once")
        seen.add(r.id)
    return records


def _numeric(image_id: Any) -> int | None:
    s = str(image_id)
    return int(s) if s.isdigit() else None


# ---------------------------------------------------------------- captioning


def read_coco(annotations: Path, questions: Path | None = None) -> list[Record]:
    """COCO captions / NoCaps: ``images[{id, file_name}]``, ``annotations[{image_id, caption}]``."""
    data = load_json(annotations)
    images = get_list(data, "images", annotations, "the top level")
    anns = get_list(data, "annotations", annotations, "the top level")
    files: dict[str, str] = {}
    for i, img in enumerate(images):
        where = f"images[{i}]"
        files[str(get(img, "id", annotations, where))] = str(get(img, "file_name", annotations, where))
    captions: dict[str, list[str]] = defaultdict(list)
    for i, ann in enumerate(anns):  # captions keep the file's order
        where = f"annotations[{i}]"
        image_id = str(get(ann, "image_id", annotations, where))
        if image_id not in files:
            raise ValueError(f"{annotations}: {where} refers to image_id {image_id} not listed in 'images'")
        captions[image_id].append(str(get(ann, "caption", annotations, where)).strip())
    # Images without any caption cannot be scored and are left out.
    return [Record(id=k, image_id=k, names=[files[k]], fields={"captions": captions[k]}, number=_numeric(k))
            for k in files if captions[k]]


def read_textcaps(annotations: Path, questions: Path | None = None) -> list[Record]:
    """TextCaps 0.1: ``{"data": [{image_id, caption_str, reference_strs, image_path?}]}``."""
    data = get_list(load_json(annotations), "data", annotations, "the top level")
    refs: dict[str, list[str]] = {}
    names: dict[str, list[str]] = {}
    single: dict[str, list[str]] = defaultdict(list)
    for i, entry in enumerate(data):
        where = f"data[{i}]"
        image_id = str(get(entry, "image_id", annotations, where))
        names.setdefault(image_id, [f"{image_id}.jpg"] + ([entry["image_path"]] if entry.get("image_path") else []))
        if "reference_strs" in entry:
            refs.setdefault(image_id, [str(c) for c in get_list(entry, "reference_strs", annotations, where)])
        elif "caption_str" in entry:
            single[image_id].append(str(entry["caption_str"]))
        else:
            raise ValueError(f"{annotations}: {where} has no field 'reference_strs' or 'caption_str' "
                             f"(the test split has no captions and cannot be evaluated)")
    out = []
    for image_id in names:
        caps = refs.get(image_id) or list(dict.fromkeys(single[image_id]))
        out.append(Record(id=image_id, image_id=image_id, names=names[image_id], fields={"captions": caps}))
    return out


# ---------------------------------------------------------------- VQA


def _answer_strings(raw: list, path: Path, where: str) -> list[str]:
    out = []
    for j, a in enumerate(raw):
        out.append(str(get(a, "answer", path, f"{where} answers[{j}]")) if isinstance(a, dict) else str(a))
    return out


def read_vqav2(annotations: Path, questions: Path | None = None) -> list[Record]:
    """VQAv2 / OK-VQA: a questions file and an annotations file joined on ``question_id``."""
    if questions is None:
        raise ValueError("this format needs --questions (the *_questions.json file) as well as "
                         "--annotations (the *_annotations.json file)")
    qdata = load_json(questions)
    qs = get_list(qdata, "questions", questions, "the top level")
    subtype = qdata.get("data_subtype") if isinstance(qdata, dict) else None  # e.g. "val2014"
    anns = get_list(load_json(annotations), "annotations", annotations, "the top level")
    by_qid: dict[str, dict] = {}
    for i, a in enumerate(anns):
        by_qid[str(get(a, "question_id", annotations, f"annotations[{i}]"))] = a
    out = []
    for i, q in enumerate(qs):
        where = f"questions[{i}]"
        qid = str(get(q, "question_id", questions, where))
        image_id = get(q, "image_id", questions, where)
        if qid not in by_qid:
            raise ValueError(f"{annotations}: no annotation for question_id {qid} of {questions}")
        a = by_qid[qid]
        awhere = f"the annotation of question_id {qid}"
        answers = _answer_strings(get_list(a, "answers", annotations, awhere), annotations, awhere)
        qtype = a.get("answer_type") or a.get("question_type") or ""
        num = _numeric(image_id)
        if num is None:
            raise ValueError(f"{questions}: {where} image_id {image_id!r} is not a COCO image number")
        names = ([f"COCO_{subtype}_{num:012d}.jpg"] if subtype else []) + [f"{num:012d}.jpg"]
        out.append(Record(id=qid, image_id=str(image_id), names=names, number=num,
                          fields={"question": str(get(q, "question", questions, where)),
                                  "answers": answers, "qtype": str(qtype)}))
    return _unique(out, questions)


def read_textvqa(annotations: Path, questions: Path | None = None) -> list[Record]:
    """TextVQA 0.5.1: ``{"data": [{question, image_id, question_id, answers: [str x10]}]}``."""
    data = get_list(load_json(annotations), "data", annotations, "the top level")
    out = []
    for i, e in enumerate(data):
        where = f"data[{i}]"
        image_id = str(get(e, "image_id", annotations, where))
        answers = _answer_strings(get_list(e, "answers", annotations, where), annotations, where)
        out.append(Record(id=str(get(e, "question_id", annotations, where)), image_id=image_id,
                          names=[f"{image_id}.jpg"] + ([e["image_path"]] if e.get("image_path") else []),
                          fields={"question": str(get(e, "question", annotations, where)),
                                  "answers": answers, "qtype": ""}))
    return _unique(out, annotations)


def read_vizwiz(annotations: Path, questions: Path | None = None) -> list[Record]:
    """VizWiz: a list of ``{image, question, answers: [{answer, answer_confidence}], answer_type}``."""
    data = load_json(annotations)
    if not isinstance(data, list):
        raise ValueError(f"{annotations}: expected a JSON list of questions (VizWiz val.json)")
    out = []
    for i, e in enumerate(data):
        where = f"entry {i}"
        image = str(get(e, "image", annotations, where))
        answers = _answer_strings(get_list(e, "answers", annotations, where), annotations, where)
        stem = Path(image).stem  # VizWiz has one question per image: the image names it
        out.append(Record(id=stem, image_id=stem, names=[image],
                          fields={"question": str(get(e, "question", annotations, where)),
                                  "answers": answers, "qtype": str(e.get("answer_type") or "")}))
    return _unique(out, annotations)


def read_gqa(annotations: Path, questions: Path | None = None) -> list[Record]:
    """GQA: ``{qid: {imageId, question, answer, types: {structural, ...}}}``; one answer."""
    data = load_json(annotations)
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for i, e in enumerate(data):
            qid = e.get("question_id", e.get("id")) if isinstance(e, dict) else None
            if qid is None:
                raise ValueError(f"{annotations}: entry {i} has no field 'question_id' or 'id'")
            items.append((qid, e))
    else:
        raise ValueError(f"{annotations}: expected a JSON object {{question id: question}}")
    out = []
    for qid, e in items:
        where = f"question {qid}"
        image_id = str(get(e, "imageId", annotations, where))
        types = e.get("types") if isinstance(e.get("types"), dict) else {}
        out.append(Record(id=str(qid), image_id=image_id, names=[f"{image_id}.jpg"],
                          fields={"question": str(get(e, "question", annotations, where)),
                                  "answers": [str(get(e, "answer", annotations, where))],
                                  "qtype": str(types.get("structural") or "")}))
    return _unique(out, annotations)


# ---------------------------------------------------------------- the formats


@dataclass(frozen=True)
class Format:
    task: str  # "caption" | "vqa"
    metric: str  # "cider" | "vqa_accuracy"
    read: Callable[[Path, Path | None], list[Record]]
    needs_questions: bool = False
    files: str = ""  # what to pass, for help and error messages


FORMATS: dict[str, Format] = {
    "coco": Format("caption", "cider", read_coco, files="captions_val2014.json (or captions_val2017.json)"),
    "nocaps": Format("caption", "cider", read_coco, files="nocaps_val_4500_captions.json"),
    "textcaps": Format("caption", "cider", read_textcaps, files="TextCaps_0.1_val.json"),
    "vqav2": Format("vqa", "vqa_accuracy", read_vqav2, needs_questions=True,
                    files="v2_mscoco_val2014_annotations.json"
                          " + --questions v2_OpenEnded_mscoco_val2014_questions.json"),
    "okvqa": Format("vqa", "vqa_accuracy", read_vqav2, needs_questions=True,
                    files="mscoco_val2014_annotations.json"
                          " + --questions OpenEnded_mscoco_val2014_questions.json"),
    "textvqa": Format("vqa", "vqa_accuracy", read_textvqa, files="TextVQA_0.5.1_val.json"),
    "vizwiz": Format("vqa", "vqa_accuracy", read_vizwiz, files="val.json"),
    "gqa": Format("vqa", "vqa_accuracy", read_gqa, files="testdev_balanced_questions.json"),
}


# ---------------------------------------------------------------- finding images


class ImageFinder:
    """Finds a record's image under a directory.

    The candidate names are tried directly first (one ``stat`` each, the common case);
    only when one misses is the directory walked once, indexing every image by stem
    and by trailing number, so ``<id>.png`` for ``<id>.jpg`` and 2017-style COCO names
    for 2014-style ones are still found.
    """

    def __init__(self, root: Path):
        self.root = root
        self._by_stem: dict[str, Path] | None = None
        self._by_number: dict[int, Path] = {}

    def _index(self) -> dict[str, Path]:
        if self._by_stem is None:
            self._by_stem = {}
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                for name in sorted(filenames):
                    stem, ext = os.path.splitext(name)
                    if ext.lower() not in IMAGE_EXTENSIONS:
                        continue
                    path = Path(dirpath) / name
                    self._by_stem.setdefault(stem, path)
                    if m := re.search(r"(\d+)$", stem):
                        self._by_number.setdefault(int(m[1]), path)
        return self._by_stem

    def find(self, rec: Record) -> Path | None:
        for name in rec.names:
            for p in (self.root / name, self.root / Path(name).name):
                if p.is_file():
                    return p
        index = self._index()
        for name in rec.names:
            if (p := index.get(Path(name).stem)) is not None:
                return p
        if rec.number is not None:
            return self._by_number.get(rec.number)
        return None
