"""Build the synthetic multimodal corpus: webdataset shards, tokenizer and metadata.

The layout and sample formats are those of ``ablate.data.format``. Notable choices:

- Determinism without shared state: every sample draws from its own
  ``random.Random(f"{seed}/{stream}/{index}")`` (string seeds hash with SHA-512, so
  they do not depend on PYTHONHASHSEED). Tar members get a fixed mtime, PNGs and JSON
  are encoded by us, and the BPE trainer is deterministic, so the same config gives
  byte-identical shards and tokenizer.
- Evaluation scenes come from their own seed streams *and* are rejected when their
  content signature (shapes, colours, sizes, cells, digit) occurs in a training
  image, so evaluation measures generalisation to unseen compositions.
- Eval VQA cycles through the question types, so every type has the same count and
  per-type accuracy is comparable.
- Atomic: the corpus is written to ``<out>.partial-<pid>`` and renamed when complete;
  a finished corpus with the same config is left alone.
- A single process renders the demo corpus in seconds (about 0.4 ms an image), so no
  multiprocessing.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from . import format as fmt
from .scenes import (NUMBER_WORDS, QTYPES, Scene, caption, questions, reference_captions, render,
                     sample_scene, supported_qtypes)
from .tokenizer import train_tokenizer


@dataclass
class CorpusConfig:
    out: str
    """Directory the corpus is written to."""
    seed: int = 0
    """Root seed; every sample's rng derives from it, the stream name and the index."""
    num_caption: int = 8000
    """Training image/caption pairs."""
    num_interleaved: int = 4000
    """Training interleaved documents (several images with text about each)."""
    num_text: int = 3000
    """Training text-only samples."""
    num_eval_caption: int = 300
    """Evaluation images with reference captions."""
    num_eval_vqa: int = 500
    """Evaluation image/question/answer triples, cycling through the question types."""
    num_eval_text: int = 200
    """Evaluation text-only samples (held-out perplexity)."""
    shard_size: int = 1000
    """Samples per tar shard."""
    render_size: int = 96
    """Side of the stored square PNG images, in pixels."""
    vocab_size: int = 1024
    """Upper bound on the BPE vocabulary (specials included); it stops early on small text."""
    images_per_doc_min: int = 2
    """Fewest images in an interleaved document."""
    images_per_doc_max: int = 4
    """Most images in an interleaved document."""

    def __post_init__(self):
        self.out = str(self.out)
        counts = [self.num_caption, self.num_interleaved, self.num_text,
                  self.num_eval_caption, self.num_eval_vqa, self.num_eval_text]
        if min(counts) < 0:
            raise ValueError("sample counts must be >= 0")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if self.render_size < 12:
            raise ValueError("render_size must be >= 12 pixels")
        if self.vocab_size < 256 + len(fmt.SPECIAL_TOKENS):
            raise ValueError("vocab_size must cover the 256 bytes plus the special tokens")
        if not 1 <= self.images_per_doc_min <= self.images_per_doc_max:
            raise ValueError("need 1 <= images_per_doc_min <= images_per_doc_max")

    def identity(self) -> dict:
        """The fields that decide the content: everything but where it is written."""
        d = asdict(self)
        d.pop("out")
        return d


# Named sizes: "demo" trains a visible result on a laptop in minutes, "tiny" is for tests.
PRESETS = {
    "demo": dict(num_caption=8000, num_interleaved=4000, num_text=3000, num_eval_caption=300,
                 num_eval_vqa=500, num_eval_text=200, shard_size=1000),
    "tiny": dict(num_caption=200, num_interleaved=100, num_text=100, num_eval_caption=32,
                 num_eval_vqa=48, num_eval_text=16, shard_size=50),
}


def _png(scene: Scene, size: int) -> bytes:
    buf = io.BytesIO()
    render(scene, size).save(buf, format="PNG")
    return buf.getvalue()


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def _rng(cfg: CorpusConfig, stream: str, i: int) -> random.Random:
    return random.Random(f"{cfg.seed}/{stream}/{i}")


def _counting_sentence(rng: random.Random) -> str:
    """Number facts that tie digits to words, so "2" and "two" share meaning."""
    a = rng.randrange(9)
    b = rng.randrange(1, 10 - a)
    return rng.choice([
        f"{a} and {b} make {a + b}.",
        f"{NUMBER_WORDS[a]} is written {a}.",
        "count: " + " ".join(str(k) for k in range(a, a + b + 1)) + ".",
        f"{NUMBER_WORDS[a + b]} is more than {NUMBER_WORDS[a]}.",
        f"after {a} comes {a + 1}.",
    ])


def _text_sample(rng: random.Random) -> str:
    """A few paragraphs: scene descriptions with question/answer lines, and number facts."""
    parts = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.7:
            scene = sample_scene(rng)
            qa = rng.sample(questions(scene, rng), k=rng.randint(1, 2))
            parts.append(caption(scene, rng) + "".join(
                fmt.VQA_LINE.format(question=q, answer=a) for q, a, _ in qa))
        else:
            parts.append(_counting_sentence(rng))
    return " ".join(parts)


class _Build:
    """State of one build: shard writers, texts for the tokenizer, baseline counts."""

    def __init__(self, cfg: CorpusConfig, root: Path, bar: tqdm):
        self.cfg, self.root, self.bar = cfg, root, bar
        self.texts: list[str] = []  # training text the tokenizer learns from
        self.train_signatures: set = set()
        self.captions: Counter = Counter()
        self.answers: dict[str, Counter] = defaultdict(Counter)
        self.counts: dict[str, int] = {}

    def write(self, split: str, stream: str, samples) -> None:
        fmt.shard_dir(self.root, split, stream).mkdir(parents=True, exist_ok=True)
        n = 0
        # mtime=0: tar headers must not carry the build time, or shards would differ.
        with wds.ShardWriter(fmt.shard_pattern(self.root, split, stream),
                             maxcount=self.cfg.shard_size, verbose=0, mtime=0) as sink:
            for sample in samples:
                sink.write(sample)
                n += 1
                self.bar.update(1)
        self.counts[f"{split}/{stream}"] = n

    # ---- training streams

    def train_caption(self):
        for i in range(self.cfg.num_caption):
            rng = _rng(self.cfg, "train/caption", i)
            scene = sample_scene(rng)
            text = caption(scene, rng)
            self.train_signatures.add(scene.signature())
            self.captions[text] += 1
            self.texts.append(text)
            yield {"__key__": f"{i:08d}", "png": _png(scene, self.cfg.render_size),
                   "txt": text.encode("utf-8"), "json": _json(scene.to_json())}

    def train_interleaved(self):
        cfg = self.cfg
        for i in range(cfg.num_interleaved):
            rng = _rng(cfg, "train/interleaved", i)
            n = rng.randint(cfg.images_per_doc_min, cfg.images_per_doc_max)
            intro = "here is one picture." if n == 1 else f"here are {NUMBER_WORDS[n] if n < 10 else n} pictures."
            chunks: list = [intro]
            sample = {"__key__": f"{i:08d}"}
            scenes, qas = [], []
            for k in range(n):
                scene = sample_scene(rng)
                pool = questions(scene, rng)
                # Half the pictures get questions with no caption before them: answers
                # that cannot be copied from a caption must be read off the image, and
                # this is the wording evaluation uses (image, then the question).
                if rng.random() < 0.5:
                    qa = rng.sample(pool, k=min(len(pool), rng.randint(2, 3)))
                    text = ""
                else:
                    qa = rng.sample(pool, k=rng.randint(1, 2))
                    text = f" picture {k + 1} shows {caption(scene, rng, after_verb=True)}"
                text += "".join(fmt.VQA_LINE.format(question=q, answer=a) for q, a, _ in qa)
                name = f"img{k}.png"
                sample[name] = _png(scene, cfg.render_size)
                chunks += [{"image": name}, text]
                scenes.append(scene.to_json())
                qas.append([list(x) for x in qa])
                self.train_signatures.add(scene.signature())
                for _, a, qtype in qa:
                    self.answers[qtype][a] += 1
            self.texts += [c for c in chunks if isinstance(c, str)]
            # "scenes" and "qa" (per image) are extra: they let tests and analyses check
            # the text against the picture without parsing it.
            sample["json"] = _json({"chunks": chunks, "scenes": scenes, "qa": qas})
            yield sample

    def train_text(self):
        for i in range(self.cfg.num_text):
            text = _text_sample(_rng(self.cfg, "train/text", i))
            self.texts.append(text)
            yield {"__key__": f"{i:08d}", "txt": text.encode("utf-8")}

    # ---- evaluation streams

    def _unseen_scene(self, rng: random.Random, accept=lambda s: True) -> Scene:
        while True:
            scene = sample_scene(rng)
            if scene.signature() not in self.train_signatures and accept(scene):
                return scene

    def eval_caption(self):
        for i in range(self.cfg.num_eval_caption):
            scene = self._unseen_scene(_rng(self.cfg, "eval/caption", i))
            yield {"__key__": f"{i:08d}", "png": _png(scene, self.cfg.render_size),
                   "json": _json({"id": f"caption-{i:06d}", "captions": reference_captions(scene),
                                  "scene": scene.to_json()})}

    def eval_vqa(self):
        for i in range(self.cfg.num_eval_vqa):
            rng = _rng(self.cfg, "eval/vqa", i)
            qtype = QTYPES[i % len(QTYPES)]
            # Digit and relation questions need a digit / two objects: redraw until the
            # scene supports the wanted type, keeping the types balanced.
            scene = self._unseen_scene(rng, lambda s: qtype in supported_qtypes(s))
            q, a, _ = next(x for x in questions(scene, rng) if x[2] == qtype)
            yield {"__key__": f"{i:08d}", "png": _png(scene, self.cfg.render_size),
                   "json": _json({"id": f"vqa-{i:06d}", "question": q, "answers": [a], "qtype": qtype,
                                  "scene": scene.to_json()})}

    def eval_text(self):
        for i in range(self.cfg.num_eval_text):
            yield {"__key__": f"{i:08d}", "txt": _text_sample(_rng(self.cfg, "eval/text", i)).encode("utf-8")}


def _stored_identity(root: Path):
    try:
        meta = json.loads((root / fmt.META_FILE).read_text())
    except (OSError, ValueError):
        return None
    ident = dict(meta.get("config", {}))
    ident.pop("out", None)
    return meta.get("format_version"), ident


def build_corpus(cfg: CorpusConfig, progress: bool = True, force: bool = False) -> Path:
    """Write the corpus to ``cfg.out`` and return its path.

    An existing corpus built from the same config is kept ("corpus up to date"); one
    built from another config raises unless ``force``, which rebuilds it.
    """
    out = Path(cfg.out)
    if out.exists():
        stored = _stored_identity(out)
        if stored == (fmt.FORMAT_VERSION, cfg.identity()) and not force:
            print(f"corpus up to date: {out}")
            return out
        if not force and (stored is not None or any(out.iterdir())):
            what = "a corpus built with another config" if stored else "files that are not a corpus"
            raise FileExistsError(f"{out} holds {what}; pass force=True (ablate-data --force) "
                                  f"to replace it, or choose another --out")

    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    total = (cfg.num_caption + cfg.num_interleaved + cfg.num_text
             + cfg.num_eval_caption + cfg.num_eval_vqa + cfg.num_eval_text)
    try:
        with tqdm(total=total, desc="ablate-data", unit="sample", disable=not progress) as bar:
            b = _Build(cfg, tmp, bar)
            # Training streams first: the eval streams need their scene signatures.
            b.write("train", "caption", b.train_caption())
            b.write("train", "interleaved", b.train_interleaved())
            b.write("train", "text", b.train_text())
            b.write("eval", "caption", b.eval_caption())
            b.write("eval", "vqa", b.eval_vqa())
            b.write("eval", "text", b.eval_text())
        tok = train_tokenizer(b.texts, cfg.vocab_size)
        tok.save(str(tmp / fmt.TOKENIZER_FILE))
        _write_json(tmp / fmt.STATS_FILE, _stats(b))
        shards = {f"{split}/{stream}": len(fmt.list_shards(tmp, split, stream))
                  for split, streams in (("train", fmt.STREAMS), ("eval", fmt.EVAL_SPLITS))
                  for stream in streams}
        # meta.json is written last: its presence marks a complete corpus.
        _write_json(tmp / fmt.META_FILE, {
            "format_version": fmt.FORMAT_VERSION, "config": asdict(cfg), "counts": b.counts,
            "shards": shards, "render_size": cfg.render_size,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        })
        if out.exists():
            if _stored_identity(out) == (fmt.FORMAT_VERSION, cfg.identity()) and not force:
                return out  # a concurrent build of the same config finished first
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _stats(b: _Build) -> dict:
    """Trivial baselines an evaluation compares a trained model against."""
    overall = Counter()
    for c in b.answers.values():
        overall.update(c)

    def top(c: Counter):
        return c.most_common(1)[0][0] if c else ""

    return {
        "most_frequent_caption": top(b.captions),
        "majority_answer": top(overall),
        "majority_answer_by_qtype": {t: top(b.answers[t]) for t in QTYPES if b.answers[t]},
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
