"""``ablate-data convert``: each real benchmark layout, built in miniature with the
released field names and file naming, converted through the CLI and read back
with ``load_benchmark``; plus the error cases and the atomicity of a conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from ablate.data import benchmarks
from ablate.data.benchmarks import INFO_FILE, load_benchmark, read_info
from ablate.data.cli import main as cli_main

ROUND = ["yes", "no", "2", "red", "stop sign"]


def write_image(path: Path, i: int) -> Path:
    """A small image with content that differs per ``i``; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (20 + i, 12 + 2 * i), (40 * i % 256, 90, 200 - 30 * i))
    im.putpixel((1, 1), (255, 255, 0))
    im.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=90)
    return path


def answers10(k: int) -> list[str]:
    """Ten annotator answers with duplicates, as VQAv2 has them."""
    return [ROUND[(k + j // 3) % len(ROUND)] for j in range(10)]


def dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def coco_like(root: Path, ids, names, stored) -> tuple[list[str], list[dict]]:
    """COCO captions layout: ``names`` as in the JSON, ``stored`` as on disk."""
    imgs = root / "images"
    anns, expected = [], []
    for k, (i, name, disk) in enumerate(zip(ids, names, stored)):
        caps = [f"caption {j} of image {i}" for j in range(5)]
        anns += [{"id": 1000 * k + j, "image_id": i, "caption": c} for j, c in enumerate(caps)]
        expected.append({"id": str(i), "image_id": str(i), "captions": caps,
                         "path": write_image(imgs / disk, k)})
    data = {"info": {}, "licenses": [], "annotations": anns[::-1],  # order must not matter per image
            "images": [{"id": i, "file_name": n, "height": 1, "width": 1} for i, n in zip(ids, names)]
            + [{"id": 77777, "file_name": "no_captions.jpg"}]}  # an image without captions is left out
    for e in expected:
        e["captions"] = e["captions"][::-1]  # captions keep the file's order
    return ["--images", str(imgs), "--annotations", str(dump(root / "captions.json", data))], expected


def build_coco(root):
    ids = [42, 9, 30, 25]
    names = [f"COCO_val2014_{i:012d}.jpg" for i in ids]
    names[2] = names[2].replace(".jpg", ".png")
    # 9 is stored under its 2017-style name although the JSON gives the 2014 one.
    stored = [names[0], f"{9:012d}.jpg", names[2], names[3]]
    args, exp = coco_like(root, ids, names, stored)
    return args, sorted(exp, key=lambda e: int(e["id"]))


def build_nocaps(root):
    ids = [3, 0, 1]
    names = ["0013ea2087020901.jpg", "00223f2b1a6d5d2b.png", "004e5b4b1b8fbd2e.jpg"]
    args, exp = coco_like(root, ids, names, names)
    return args, sorted(exp, key=lambda e: int(e["id"]))


def build_textcaps(root):
    imgs, data, expected = root / "train_images", [], []
    for k, image_id in enumerate(["011e7e629fb9ae7b", "00c359f294f7dcd9", "0a1b2c3d4e5f6a7b"]):
        refs = [f"a sign that reads {image_id[:4]} number {j}" for j in range(5)]
        ext = ".png" if k == 1 else ".jpg"
        for j, r in enumerate(refs):  # one entry per caption, each repeating all references
            data.append({"image_id": image_id, "image_classes": ["Sign"], "caption_id": 10 * k + j,
                         "caption_str": r, "caption_tokens": r.split(), "reference_strs": refs,
                         "image_path": f"train/{image_id}.jpg", "image_width": 20, "set_name": "val"})
        expected.append({"id": image_id, "image_id": image_id, "captions": refs,
                         "path": write_image(imgs / f"{image_id}{ext}", k)})
    ann = dump(root / "TextCaps_0.1_val.json", {"dataset_type": "val", "dataset_name": "textcaps", "data": data})
    return ["--images", str(imgs), "--annotations", str(ann)], sorted(expected, key=lambda e: e["id"])


def vqav2_like(root, prefix, plain_name: int | None = None):
    imgs = root / "val2014"
    image_ids = [262148, 393225, 131089]
    for k, i in enumerate(image_ids):
        name = f"{i:012d}.jpg" if i == plain_name else f"COCO_val2014_{i:012d}.jpg"
        write_image(imgs / name, k)
    qs, anns, expected = [], [], []
    for n, (qid, k) in enumerate([(262148002, 0), (393225000, 1), (131089001, 2), (262148000, 0), (131089000, 2)]):
        i = image_ids[k]
        q = f"what is shown in picture {n}?"
        ans = answers10(n)
        qs.append({"image_id": i, "question": q, "question_id": qid})
        anns.append({"question_type": "what is", "multiple_choice_answer": ans[0], "image_id": i,
                     "answer_type": "other" if n % 2 else "yes/no", "question_id": qid,
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(ans)]})
        expected.append({"id": str(qid), "image_id": str(i), "question": q, "answers": ans,
                         "qtype": "other" if n % 2 else "yes/no",
                         "path": next(imgs.glob(f"*{i:012d}.jpg"))})
    qfile = dump(root / f"{prefix}OpenEnded_mscoco_val2014_questions.json",
                 {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                  "data_subtype": "val2014", "questions": qs, "license": {}})
    afile = dump(root / f"{prefix}mscoco_val2014_annotations.json",
                 {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "annotations": anns})
    return (["--images", str(imgs), "--annotations", str(afile), "--questions", str(qfile)],
            sorted(expected, key=lambda e: int(e["id"])))


def build_vqav2(root):
    return vqav2_like(root, "v2_")


def build_okvqa(root):
    return vqav2_like(root, "", plain_name=393225)  # one image under the 2017-style name


def build_textvqa(root):
    imgs, data, expected = root / "train_images", [], []
    for n, (qid, image_id) in enumerate([(34602, "003a8ae2ef43b901"), (34600, "0054c91397f2fe05"),
                                         (34601, "003a8ae2ef43b901"), (34603, "00f3b1f8c0b2f3a1")]):
        q, ans = f"what does sign {n} say?", answers10(n + 1)
        data.append({"question": q, "image_id": image_id, "image_classes": ["Sign"],
                     "flickr_original_url": "", "flickr_300k_url": "", "image_width": 20,
                     "image_height": 20, "answers": ans, "question_tokens": q.split(),
                     "question_id": qid, "set_name": "val"})
        ext = ".png" if image_id.startswith("0054") else ".jpg"
        path = imgs / f"{image_id}{ext}"
        expected.append({"id": str(qid), "image_id": image_id, "question": q, "answers": ans, "qtype": "",
                         "path": path if path.exists() else write_image(path, n)})
    ann = dump(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                                 "dataset_version": "0.5.1", "data": data})
    return ["--images", str(imgs), "--annotations", str(ann)], sorted(expected, key=lambda e: int(e["id"]))


def build_vizwiz(root):
    imgs, data, expected = root / "val", [], []
    for n in [2, 0, 1]:
        name = f"VizWiz_val_{n:08d}.jpg"
        ans = answers10(n)
        data.append({"image": name, "question": f"what is this {n}?", "answerable": 1,
                     "answer_type": "other" if n else "unanswerable",
                     "answers": [{"answer": a, "answer_confidence": "yes"} for a in ans]})
        expected.append({"id": name[:-4], "image_id": name[:-4], "question": f"what is this {n}?",
                         "answers": ans, "qtype": "other" if n else "unanswerable",
                         "path": write_image(imgs / name, n)})
    ann = dump(root / "val.json", data)
    return ["--images", str(imgs), "--annotations", str(ann)], sorted(expected, key=lambda e: e["id"])


def build_gqa(root):
    imgs, data, expected = root / "images", {}, []
    for n, (qid, image_id) in enumerate([("20968379", "n288870"), ("201307251", "n161313"),
                                         ("20968378", "n288870"), ("202218649", "2354786")]):
        q, a = f"is there a cup {n}?", ROUND[n]
        data[qid] = {"semantic": [], "entailed": [], "equivalent": [qid], "question": q,
                     "imageId": image_id, "isBalanced": True, "groups": {"global": None, "local": "x"},
                     "answer": a, "semanticStr": "", "annotations": {}, "fullAnswer": f"{a}.",
                     "types": {"structural": "verify", "semantic": "obj", "detailed": "exist"}}
        path = imgs / f"{image_id}.jpg"
        expected.append({"id": qid, "image_id": image_id, "question": q, "answers": [a], "qtype": "verify",
                         "path": path if path.exists() else write_image(path, n)})
    ann = dump(root / "testdev_balanced_questions.json", data)
    return ["--images", str(imgs), "--annotations", str(ann)], sorted(expected, key=lambda e: int(e["id"]))


BUILDERS = {"coco": build_coco, "nocaps": build_nocaps, "textcaps": build_textcaps, "vqav2": build_vqav2,
            "okvqa": build_okvqa, "textvqa": build_textvqa, "vizwiz": build_vizwiz, "gqa": build_gqa}
CAPTION = {"coco", "nocaps", "textcaps"}


def convert(name: str, out: Path, source: list[str], *extra: str) -> int:
    return cli_main(["convert", name, "--out", str(out), *source, "--no-progress", *extra])


def fails(*argv: str) -> str:
    """Run the CLI expecting an error exit; its message."""
    with pytest.raises(SystemExit) as e:
        cli_main(list(argv))
    return str(e.value)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_convert_and_load(name, tmp_path, capsys):
    source, expected = BUILDERS[name](tmp_path / "src")
    out = tmp_path / "bench"
    assert convert(name, out, source, "--shard-size", "2") == 0
    assert "query" in capsys.readouterr().out
    convert(name, out, source, "--split", "support", "--limit", "2")

    info = read_info(out)
    assert info["name"] == name and info["format_version"] == 1
    assert (info["task"], info["metric"]) == (("caption", "cider") if name in CAPTION else ("vqa", "vqa_accuracy"))
    n = len(expected)
    assert info["splits"]["query"]["samples"] == n and info["splits"]["query"]["shards"] == -(-n // 2)
    assert info["splits"]["support"]["samples"] == 2
    assert len(list((out / "query").glob("shard-*.tar"))) == -(-n // 2)
    assert Path(info["splits"]["query"]["source"]["annotations"]).is_file()

    got = load_benchmark(out)
    assert [g["id"] for g in got] == [e["id"] for e in expected]
    fields = ["captions"] if name in CAPTION else ["question", "answers", "qtype"]
    for g, e in zip(got, expected):
        assert set(g) == {"id", "image_id", "image", *fields}
        assert {k: g[k] for k in ["image_id", *fields]} == {k: e[k] for k in ["image_id", *fields]}
        want = Image.open(e["path"]).convert("RGB")
        assert g["image"].mode == "RGB" and g["image"].size == want.size
        if e["path"].suffix == ".png":
            assert g["image"].tobytes() == want.tobytes()
    if name in ("vqav2", "okvqa"):
        assert all(len(g["answers"]) == 10 for g in got)
    assert [g["id"] for g in load_benchmark(out, "support")] == [e["id"] for e in expected[:2]]
    assert [g["id"] for g in load_benchmark(out, limit=1)] == [expected[0]["id"]]


def test_original_bytes_and_extension_kept(tmp_path):
    source, expected = build_coco(tmp_path / "src")
    convert("coco", tmp_path / "b", source)
    (shard,) = sorted((tmp_path / "b" / "query").glob("*.tar"))
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    for s, e in zip(samples, expected):
        ext = "png" if e["path"].suffix == ".png" else "jpg"
        assert s[ext] == e["path"].read_bytes()
        assert json.loads(s["json"]) == {k: e[k] for k in ("id", "image_id", "captions")}


def test_deterministic_shards(tmp_path):
    source, _ = build_vqav2(tmp_path / "src")
    for out in ("a", "b"):
        convert("vqav2", tmp_path / out, source, "--shard-size", "2")
    for shard in sorted((tmp_path / "a" / "query").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / "query" / shard.name).read_bytes()


def test_missing_images(tmp_path):
    source, expected = build_vizwiz(tmp_path / "src")
    expected[1]["path"].unlink()
    msg = fails("convert", "vizwiz", "--out", str(tmp_path / "b"), *source, "--no-progress")
    assert "1 of 3 images not found" in msg and expected[1]["path"].name in msg and "--skip-missing" in msg
    assert not (tmp_path / "b" / INFO_FILE).exists()
    convert("vizwiz", tmp_path / "b", source, "--skip-missing")
    info = read_info(tmp_path / "b")["splits"]["query"]
    assert (info["samples"], info["skipped_missing"]) == (2, 1)
    assert [g["id"] for g in load_benchmark(tmp_path / "b")] == [expected[0]["id"], expected[2]["id"]]


@pytest.mark.parametrize("name,drop", [("vqav2", "answers"), ("textvqa", "question_id"),
                                       ("gqa", "imageId"), ("coco", "caption")])
def test_missing_field(name, drop, tmp_path):
    source, _ = BUILDERS[name](tmp_path / "src")
    ann = Path(source[source.index("--annotations") + 1])
    data = json.loads(ann.read_text())
    entries = {"vqav2": lambda d: d["annotations"], "textvqa": lambda d: d["data"],
               "gqa": lambda d: list(d.values()), "coco": lambda d: d["annotations"]}[name](data)
    del entries[1][drop]
    dump(ann, data)
    msg = fails("convert", name, "--out", str(tmp_path / "b"), *source, "--no-progress")
    assert str(ann) in msg and repr(drop) in msg


def test_bad_json_and_missing_questions(tmp_path):
    source, _ = build_okvqa(tmp_path / "src")
    no_q = source[:source.index("--questions")]
    assert "needs --questions" in fails("convert", "okvqa", "--out", str(tmp_path / "b"), *no_q)
    ann = Path(source[source.index("--annotations") + 1])
    ann.write_text("{not json")
    msg = fails("convert", "okvqa", "--out", str(tmp_path / "b"), *source)
    assert str(ann) in msg and "not valid JSON" in msg


def test_existing_split_needs_force(tmp_path):
    source, expected = build_gqa(tmp_path / "src")
    out = tmp_path / "b"
    convert("gqa", out, source, "--limit", "2")
    msg = fails("convert", "gqa", "--out", str(out), *source, "--no-progress")
    assert "'query'" in msg and "already converted" in msg and "--force" in msg
    convert("gqa", out, source, "--force")
    assert read_info(out)["splits"]["query"]["samples"] == len(expected) == len(load_benchmark(out))
    # Another benchmark in the same directory is refused, --force or not.
    msg = fails("convert", "vizwiz", "--out", str(out), *build_vizwiz(tmp_path / "vz")[0], "--force")
    assert "'gqa' benchmark" in msg


def test_unknown_format_and_split(tmp_path):
    source, _ = build_gqa(tmp_path / "src")
    msg = fails("convert", "flickr30k", "--out", str(tmp_path / "b"), *source)
    assert "unknown benchmark format 'flickr30k'" in msg and "vqav2" in msg
    assert "unknown split 'dev'" in fails("convert", "gqa", "--out", str(tmp_path / "b"), *source, "--split", "dev")


def test_read_and_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark.json"):
        read_info(tmp_path)
    source, _ = build_textcaps(tmp_path / "src")
    convert("textcaps", tmp_path / "b", source)
    with pytest.raises(ValueError, match="no 'support' split"):
        load_benchmark(tmp_path / "b", "support")
    info = json.loads((tmp_path / "b" / INFO_FILE).read_text())
    info["task"] = "retrieval"
    dump(tmp_path / "b" / INFO_FILE, info)
    with pytest.raises(ValueError, match="'task'"):
        read_info(tmp_path / "b" / INFO_FILE)


def test_interrupted_conversion_leaves_no_split(tmp_path, monkeypatch):
    source, expected = build_nocaps(tmp_path / "src")
    out = tmp_path / "b"
    convert("nocaps", out, source, "--split", "support")
    calls = []
    real = benchmarks.image_bytes

    def flaky(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed half-way through the shards
        return real(path)

    monkeypatch.setattr(benchmarks, "image_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert("nocaps", out, source)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [INFO_FILE, "support"]
    assert list(read_info(out)["splits"]) == ["support"]
    assert len(load_benchmark(out, "support")) == len(expected)


def test_synthetic_corpus_cli_unaffected(tmp_path, capsys):
    out = tmp_path / "synth"
    cli_main(["--out", str(out), "--preset", "tiny", "--num-caption", "6", "--num-interleaved", "2",
              "--num-text", "2", "--num-eval-caption", "2", "--num-eval-vqa", "6", "--num-eval-text", "1",
              "--render-size", "24", "--no-progress"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["eval/vqa"] == 6 and "eval/vqa" in capsys.readouterr().out
