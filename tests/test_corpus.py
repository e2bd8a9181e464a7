"""The synthetic corpus: layout, sample contents against their scenes, tokenizer,
baselines, determinism, and the build's skip / conflict / atomic behaviour."""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from ablate.data import format as fmt
from ablate.data.cli import main as cli_main
from ablate.data.corpus import PRESETS, CorpusConfig, build_corpus
from ablate.data.scenes import CELLS, QTYPES, Scene, questions, render, sample_scene
from ablate.data.tokenizer import load_tokenizer

MICRO = dict(num_caption=12, num_interleaved=6, num_text=6, num_eval_caption=4,
             num_eval_vqa=6, num_eval_text=3, shard_size=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    cfg = CorpusConfig(out=str(tmp_path_factory.mktemp("c") / "corpus"), **PRESETS["tiny"])
    return build_corpus(cfg, progress=False)


def samples(root, split, stream):
    return list(wds.WebDataset(fmt.list_shards(root, split, stream), shardshuffle=False))


def image(b: bytes) -> Image.Image:
    return Image.open(io.BytesIO(b))


def expected_answer(scene: Scene, q: str) -> str:
    """Answer a corpus question from the scene description, independently of scenes.py."""
    objs = scene.objects
    named = {f"{o.color} {o.shape}": o for o in objs}
    if q == "how many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+)s are there\?", q):
        return str(sum(o.shape == m[1] for o in objs))
    if q == "what number is written?":
        return str(scene.digit)
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        (o,) = [o for o in objs if o.shape == m[1]]  # exactly one: the question is unambiguous
        return o.color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        (o,) = [o for o in objs if o.color == m[1]]
        return o.shape
    if m := re.fullmatch(r"where is the (\w+ \w+)\?", q):
        return CELLS[named[m[1]].cell]
    m = re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", q)
    assert m, q
    a, b = named[m[1]], named[m[3]]
    holds = {"left of": a.col < b.col, "right of": a.col > b.col,
             "above": a.row < b.row, "below": a.row > b.row}[m[2]]
    return "yes" if holds else "no"


def test_layout_meta_and_counts(corpus):
    meta = json.loads((corpus / fmt.META_FILE).read_text())
    assert meta["format_version"] == fmt.FORMAT_VERSION
    assert meta["render_size"] == 96 and meta["config"]["seed"] == 0
    tiny = PRESETS["tiny"]
    want = {"train/caption": tiny["num_caption"], "train/interleaved": tiny["num_interleaved"],
            "train/text": tiny["num_text"], "eval/caption": tiny["num_eval_caption"],
            "eval/vqa": tiny["num_eval_vqa"], "eval/text": tiny["num_eval_text"]}
    assert meta["counts"] == want
    for name, n in want.items():
        split, stream = name.split("/")
        assert meta["shards"][name] == len(fmt.list_shards(corpus, split, stream)) == -(-n // 50)
        assert len(samples(corpus, split, stream)) == n
    assert not list(corpus.parent.glob("*.partial-*"))  # the temporary build dir is gone


def test_caption_samples_match_scene(corpus):
    for s in samples(corpus, "train", "caption"):
        assert image(s["png"]).size == (96, 96) and image(s["png"]).mode == "RGB"
        text = s["txt"].decode()
        scene = Scene.from_json(json.loads(s["json"]))
        assert text == text.lower() and text.endswith(".")
        for o in scene.objects:
            assert f"{o.color} {o.shape}" in text
        assert (scene.digit is not None) == bool(re.search(r"\d", text))


def test_interleaved_docs(corpus):
    docs = samples(corpus, "train", "interleaved")
    for s in docs:
        doc = json.loads(s["json"])
        chunks = doc["chunks"]
        images = [c["image"] for c in chunks if isinstance(c, dict)]
        assert 2 <= len(images) <= 4 and len(set(images)) == len(images)
        assert sorted(images) == sorted(k for k in s if k.startswith("img"))
        assert isinstance(chunks[0], str) and chunks[0].startswith("here are")
        for k, name in enumerate(images):
            at = chunks.index({"image": name})
            text = chunks[at + 1]  # the text after an image talks about that image
            # Either a caption then questions, or questions alone (answered from pixels).
            assert text.startswith((f" picture {k + 1} shows ", " question: "))
            assert image(s[name]).size == (96, 96)
            scene = Scene.from_json(doc["scenes"][k])
            for q, a, qtype in doc["qa"][k]:
                assert fmt.VQA_LINE.format(question=q, answer=a) in text
                assert qtype in QTYPES and a == expected_answer(scene, q)


def test_interleaved_docs_mix_captioned_and_question_only_pictures(corpus):
    starts = [json.loads(s["json"])["chunks"][i + 1][:10]
              for s in samples(corpus, "train", "interleaved")
              for i, c in enumerate(json.loads(s["json"])["chunks"]) if isinstance(c, dict)]
    share = starts.count(" question:") / len(starts)
    assert 0.3 < share < 0.7, share


def test_text_streams(corpus):
    for split in ("train", "eval"):
        texts = [s["txt"].decode() for s in samples(corpus, split, "text")]
        assert all(t and t == t.lower() and t.count(".") >= 2 for t in texts)
    assert any("question:" in t for t in texts)


def test_eval_splits(corpus):
    for s in samples(corpus, "eval", "caption"):
        ex = json.loads(s["json"])
        assert 3 <= len(set(ex["captions"])) == len(ex["captions"]) <= 5
        assert image(s["png"]).size == (96, 96)
    vqa = [json.loads(s["json"]) for s in samples(corpus, "eval", "vqa")]
    qtypes = [ex["qtype"] for ex in vqa]
    assert all(qtypes.count(t) == len(vqa) // len(QTYPES) for t in QTYPES)  # balanced types
    assert len({ex["id"] for ex in vqa}) == len(vqa)
    for ex in vqa:
        assert ex["answers"] == [expected_answer(Scene.from_json(ex["scene"]), ex["question"])]
    # Evaluation scenes are compositions never seen in training.
    train = {Scene.from_json(json.loads(s["json"])).signature() for s in samples(corpus, "train", "caption")}
    for s in samples(corpus, "train", "interleaved"):
        train |= {Scene.from_json(d).signature() for d in json.loads(s["json"])["scenes"]}
    assert not train & {Scene.from_json(ex["scene"]).signature() for ex in vqa}


def test_tokenizer(corpus, tmp_path):
    tok = load_tokenizer(corpus)
    assert tok.pad_id == 0 and len({tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id}) == 4
    assert [tok.token_to_id(t) for t in fmt.SPECIAL_TOKENS] == [0, 1, 2, 3]
    texts = [s["txt"].decode() for s in samples(corpus, "train", "caption")[:20]]
    texts += [" question: what color is the circle? answer: red.", "unseen: Ünïcode\n\tZ 123", ""]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    # A special token's string in ordinary text stays text.
    ids = tok.encode("see <image> and <pad>")
    assert tok.image_id not in ids and tok.pad_id not in ids
    assert tok.decode([tok.bos_id] + tok.encode(" red") + [tok.eos_id]) == " red"
    assert tok.decode([tok.bos_id], skip_special=False) == fmt.BOS
    # The corpus language is small: a caption is a handful of tokens, not characters.
    assert len(tok.encode(texts[0])) < len(texts[0]) / 3
    assert 260 <= tok.vocab_size <= 1024
    with pytest.raises(FileNotFoundError, match="ablate-data"):
        load_tokenizer(tmp_path / "nowhere")


def test_stats_baselines(corpus):
    stats = json.loads((corpus / fmt.STATS_FILE).read_text())
    captions = [s["txt"].decode() for s in samples(corpus, "train", "caption")]
    assert stats["most_frequent_caption"] in captions
    assert stats["majority_answer"] in stats["majority_answer_by_qtype"].values()
    assert stats["majority_answer_by_qtype"]["relation"] in ("yes", "no")
    assert set(stats["majority_answer_by_qtype"]) <= set(QTYPES)


def test_skip_conflict_and_force(corpus, capsys):
    cfg = CorpusConfig(out=str(corpus), **PRESETS["tiny"])
    before = (corpus / fmt.META_FILE).stat().st_mtime_ns
    assert build_corpus(cfg, progress=False) == corpus
    assert "corpus up to date" in capsys.readouterr().out
    assert (corpus / fmt.META_FILE).stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="force"):
        build_corpus(replace(cfg, seed=1), progress=False)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_builds(tmp_path):
    a = build_corpus(CorpusConfig(out=str(tmp_path / "a"), **MICRO), progress=False)
    b = build_corpus(CorpusConfig(out=str(tmp_path / "b"), **MICRO), progress=False)
    fa, fb = _files(a), _files(b)
    fa.pop(fmt.META_FILE), fb.pop(fmt.META_FILE)  # records its own "out"
    assert fa == fb  # byte-identical shards, tokenizer and stats
    c = build_corpus(CorpusConfig(out=str(tmp_path / "c"), seed=1, **MICRO), progress=False)
    fc = _files(c)
    assert fc["train/caption/shard-000000.tar"] != fa["train/caption/shard-000000.tar"]
    # force replaces a corpus built from another config.
    build_corpus(CorpusConfig(out=str(a), seed=1, **MICRO), progress=False, force=True)
    assert _files(a)["train/caption/shard-000000.tar"] == fc["train/caption/shard-000000.tar"]


def test_cli_overrides(tmp_path, capsys):
    out = tmp_path / "cli"
    cli_main(["--out", str(out), "--preset", "tiny", "--num-caption", "7", "--num-interleaved", "3",
              "--num-text", "2", "--num-eval-caption", "2", "--num-eval-vqa", "6", "--num-eval-text", "1",
              "--render-size", "32", "--images-per-doc-max", "2", "--no-progress"])
    meta = json.loads((out / fmt.META_FILE).read_text())
    assert meta["counts"]["train/caption"] == 7 and meta["render_size"] == 32
    assert meta["config"]["shard_size"] == 50  # from the preset
    assert "train/caption" in capsys.readouterr().out
    assert image(samples(out, "eval", "vqa")[0]["png"]).size == (32, 32)
    assert all(len(json.loads(s["json"])["scenes"]) == 2 for s in samples(out, "train", "interleaved"))


def test_scenes_and_render():
    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(300)]
    assert scenes[0] == sample_scene(random.Random(3))  # a pure function of the rng
    for sc in scenes:
        cells = [o.cell for o in sc.objects] + ([sc.digit_cell] if sc.digit is not None else [])
        assert 1 <= len(sc.objects) <= 3 and len(set(cells)) == len(cells)
        assert Scene.from_json(json.loads(json.dumps(sc.to_json()))) == sc
        for q, a, qtype in questions(sc, rng):
            assert a == expected_answer(sc, q) and a == a.lower()
            assert len(a.split()) == 1 or qtype == "position"  # short answers
    assert sum(sc.digit is not None for sc in scenes) in range(100, 200)  # about half
    # The digit is drawn in black in its cell.
    sc = next(s for s in scenes if s.digit is not None)
    img = render(sc, 96).convert("L")
    r, c = divmod(sc.digit_cell, 3)
    assert min(img.crop((c * 32, r * 32, c * 32 + 32, r * 32 + 32)).getdata()) < 40
