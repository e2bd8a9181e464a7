"""Bad training data is survived and counted: damaged shards, undecodable images, empty
texts, too-long documents and documents with nothing to learn (ablate/data/faults.py).

Each case is crafted in real tar shards; the loader must keep yielding batches that do
not contain the bad item, count it under its reason, and training must stay finite.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from ablate import dist
from ablate.data import format as fmt
from ablate.data.faults import COUNTERS, FaultMeter, document_fault, read_shard
from ablate.data.packing import IGNORE, Document, make_document
from ablate.data.pipeline import build_train_loader
from ablate.data.tokenizer import load_tokenizer
from tests.conftest import REPO, run_cli, train_args

T, S = 4, 16
GARBAGE = b"\x17garbage"  # not a tar header, nor any compression's magic
STREAM = {name: i for i, name in enumerate(fmt.STREAMS)}
# The loader as it was before bad data was handled: a clean corpus must give the same batches.
REFERENCE_COMMIT = "82fd242cc97a9e9f679e61578861db57870d3391"


def _png(color=(0, 200, 0), size=12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _bad_zlib_png() -> bytes:
    """A PNG whose chunk checksums hold but whose pixel data is not a zlib stream: it
    opens and verifies, and fails only when decoded."""
    png = bytearray(_png())
    i = png.index(b"IDAT")
    n = int.from_bytes(png[i - 4:i], "big")
    png[i + 4:i + 4 + n] = b"\xff" * n
    png[i + 4 + n:i + 8 + n] = zlib.crc32(bytes(png[i:i + 4 + n])).to_bytes(4, "big")
    return bytes(png)


def _write(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"{path.stem}-{i:04d}", **sample})


def _caption(text: str, png: bytes | None = None) -> dict:
    return {"png": _png() if png is None else png, "txt": text.encode()}


def _interleaved(chunks: list, images: dict[str, bytes] | None = None) -> dict:
    sample = {"json": json.dumps({"chunks": chunks}).encode()}
    for c in chunks:
        if isinstance(c, dict):
            sample[c["image"]] = (images or {}).get(c["image"], _png())
    return sample


def _loader(root, tok, weights, **kw):
    args = dict(seq_len=96, micro_batch_size=2, tokens_per_image=T, image_size=S, num_workers=0,
                shuffle_buffer=0)
    args.update(kw)
    return build_train_loader(root, tok, weights=weights, **args)


def _texts(batch, tok) -> str:
    return " ".join(tok.decode(row.tolist()) for row in batch["input_ids"])


def _faults(batches) -> dict[str, int]:
    total = sum(b["faults"] for b in batches)
    return dict(zip(COUNTERS, total.tolist()))


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus)


def _copy(corpus: Path, dest: Path) -> Path:
    shutil.copytree(corpus, dest)
    return dest


def _member(path: str, k: int) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmembers()[k]


# ---- shards

def test_damaged_shards_keep_only_complete_samples(corpus, tmp_path):
    src = fmt.list_shards(corpus, "train", "caption")[0]
    whole = list(wds.tarfile_samples([{"url": src}]))
    assert list(read_shard(src)) == whole  # a sound shard reads exactly as webdataset reads it

    def damaged(name, edit) -> tuple[int, str]:
        path = tmp_path / name
        shutil.copy(src, path)
        edit(path)
        got = []
        with pytest.raises(tarfile.ReadError) as e:
            for sample in read_shard(str(path)):
                got.append(sample)
        assert all(set(s) >= {"png", "txt", "json"} for s in got)  # never a partial sample
        return len(got), str(e.value)

    m = _member(src, 3 * 4 + 1)  # sample 4's png (members: json, png, txt per sample)
    mid_member = m.offset_data + m.size // 2
    header = _member(src, 3 * 4).offset  # where sample 4 starts
    assert damaged("mid_member.tar", lambda p: os.truncate(p, mid_member))[0] == 4
    # tarfile alone stops silently at a header cut or overwritten: those are caught too.
    assert damaged("at_header.tar", lambda p: os.truncate(p, header))[0] == 3  # 3 could lack members
    assert damaged("in_header.tar", lambda p: os.truncate(p, header + 100))[0] == 3

    def scribble(p):
        with open(p, "r+b") as f:
            f.seek(header)
            f.write(GARBAGE * 64)
    assert damaged("scribbled.tar", scribble)[0] == 3
    assert damaged("garbage.tar", lambda p: p.write_bytes(GARBAGE * 512)) == (0, "invalid header")
    assert damaged("empty.tar", lambda p: p.write_bytes(b""))[0] == 0


def test_damaged_shards_are_skipped_and_counted(corpus, tmp_path, tok, caplog):
    root = _copy(corpus, tmp_path / "c")
    caption = fmt.list_shards(root, "train", "caption")
    m = _member(caption[0], 3 * 10 + 1)
    os.truncate(caption[0], m.offset_data + m.size // 2)  # mid-member: 10 samples kept
    Path(caption[1]).write_bytes(GARBAGE * 1000)  # garbage from its first byte
    batches = list(itertools.islice(_loader(root, tok, {"caption": 1}, micro_batch_size=8), 40))
    faults = _faults(batches)
    assert faults["shard"] > 0 and sum(faults.values()) == faults["shard"] + faults["truncated"]
    assert all(int((b["labels"] != IGNORE).sum()) > 0 for b in batches)
    shard_warnings = [r for r in caplog.records if "data/skipped_shard" in r.getMessage()]
    assert len(shard_warnings) == 1 and "shard-00000" in shard_warnings[0].getMessage()  # once per reader


def test_every_shard_broken_is_a_clear_error(corpus, tmp_path, tok):
    root = _copy(corpus, tmp_path / "c")
    text = fmt.list_shards(root, "train", "text")
    Path(text[0]).write_bytes(GARBAGE * 300)
    os.truncate(text[1], 100)
    with pytest.raises(RuntimeError, match=r"stream 'text': none of its 2 shards") as e:
        next(_loader(root, tok, {"caption": 0.5, "text": 0.5}))
    assert all(Path(p).name in str(e.value) for p in text)
    # (A DataLoader worker re-raises it in the trainer alike; not run here: a loader whose
    # worker failed takes 5 s to shut down.)


# ---- samples and documents

BAD = {  # marker word -> (stream, sample, reason)
    "zzbadpng": ("caption", _caption("zzbadpng a red circle.", b"this is not a png"), "image"),
    "zzcutpng": ("caption", _caption("zzcutpng a red circle.", _png()[:60]), "image"),
    "zzbadinter": ("interleaved", _interleaved(["zzbadinter one.", {"image": "img0.png"}, " two.",
                                                {"image": "img1.png"}, " three."], {"img1.png": b"\x89PNG"}),
                   "image"),
    "zzmissing": ("interleaved", {"json": json.dumps({"chunks": ["zzmissing.", {"image": "img9.png"}]}).encode(),
                                  "img0.png": _png()}, "malformed"),  # names a file it lacks
    "zznotxt": ("caption", {"png": _png()}, "malformed"),
}
EMPTY = [("caption", _caption("")), ("caption", _caption(" \n\t")), ("text", {"txt": b""}),
         ("text", {"txt": " \u3000 ".encode()}), ("interleaved", _interleaved([{"image": "img0.png"}, {"image": "img1.png"}])),
         ("interleaved", _interleaved(["  ", {"image": "img0.png"}, "\n"]))]
GOOD = {"zzgoodcap": ("caption", _caption("zzgoodcap a green square.")),
        "zzgoodinter": ("interleaved", _interleaved(["zzgoodinter two.", {"image": "img0.png"}, " yes."])),
        "zzgoodtext": ("text", {"txt": b"zzgoodtext three blue squares."})}


def _bad_sample_corpus(root: Path) -> dict[str, int]:
    """One shard per stream holding the good, bad and empty samples; returns how many
    of each reason one pass over every shard holds."""
    per_stream: dict[str, list] = {s: [] for s in fmt.STREAMS}
    for stream, sample in [*GOOD.values(), *[(s, x) for s, x, _ in BAD.values()], *EMPTY]:
        per_stream[stream].append(sample)
    for stream, samples in per_stream.items():
        _write(fmt.shard_dir(root, "train", stream) / "shard-000000.tar", samples)
    want = {"empty_text": len(EMPTY)}
    for _, _, reason in BAD.values():
        want[reason] = want.get(reason, 0) + 1
    return want


def test_each_bad_sample_gets_its_reason(tok):
    ignore = (tok.image_id, tok.pad_id)

    def reason(stream, sample):
        doc = make_document(sample, STREAM[stream], tok, T)
        return document_fault(sample, doc, stream, ignore)

    for stream, sample, why in BAD.values():
        assert reason(stream, sample) == why
    assert all(reason(stream, sample) == "empty_text" for stream, sample in EMPTY)
    assert all(reason(stream, sample) is None for stream, sample in GOOD.values())
    # A document whose only target would be its <eos> (cannot come from this tokenizer's
    # text, which never yields special tokens: guarded all the same).
    only_eos = Document([tok.bos_id, tok.pad_id, tok.image_id, tok.eos_id], [], [], STREAM["text"])
    assert document_fault({"txt": b"x"}, only_eos, "text", ignore) == "no_labels"


def test_bad_samples_are_skipped_counted_and_never_batched(tmp_path, tok, caplog):
    want = _bad_sample_corpus(tmp_path)
    batches = list(itertools.islice(_loader(tmp_path, tok, {"caption": 1, "interleaved": 1, "text": 1}), 30))
    text = " ".join(_texts(b, tok) for b in batches)
    assert all(w in text for w in GOOD) and not any(w in text for w in BAD)
    faults = _faults(batches)
    for reason, n in want.items():
        assert faults[reason] >= n, (reason, faults)  # at least one pass over each shard
    assert faults["shard"] == faults["no_labels"] == faults["truncated"] == 0
    for b in batches:  # what was skipped left no trace in the mix accounting
        assert int(b["stream_tokens"].sum()) == int((b["labels"] != IGNORE).sum()) > 0
        assert int((b["input_ids"] == tok.image_id).sum()) == b["images"].shape[0] * T
    # One warning per reason (and reader), naming the sample.
    messages = [r.getMessage() for r in caplog.records]
    for reason in want:
        (m,) = [m for m in messages if f"data/skipped_{reason}" in m]
        assert "shard-000000.tar" in m


def test_bad_samples_alone_make_a_clear_error(tmp_path, tok):
    _write(fmt.shard_dir(tmp_path, "train", "text") / "shard-000000.tar", [{"txt": b""}] * 3)
    with pytest.raises(RuntimeError, match="skipped"):
        next(_loader(tmp_path, tok, {"text": 1}))


def test_too_long_documents_are_truncated_and_counted_never_through_an_image(tmp_path, tok):
    long_text = "zzlong " + "the red circle is above the blue square. " * 20
    images = ["before.", {"image": "img0.png"}, " one" * 3, {"image": "img1.png"}, " tail" * 40]
    only_images_fit = [{"image": f"img{k}.png"} for k in range(6)] + [" late text."]
    _write(fmt.shard_dir(tmp_path, "train", "text") / "shard-000000.tar", [{"txt": long_text.encode()}])
    _write(fmt.shard_dir(tmp_path, "train", "interleaved") / "shard-000000.tar",
           [_interleaved(images), _interleaved(only_images_fit)])
    L = 1 + len(tok.encode("before.")) + T + len(tok.encode(" one" * 3)) + T // 2  # cuts img1 in half
    batches = list(itertools.islice(_loader(tmp_path, tok, {"interleaved": 1, "text": 1}, seq_len=L), 12))
    faults = _faults(batches)
    assert faults["truncated"] > 0 and faults["no_labels"] > 0  # the image-only cut has no target
    for b in batches:
        assert int((b["input_ids"] == tok.image_id).sum()) == b["images"].shape[0] * T  # whole images only
        assert b["stats"]["truncated"] == int(b["faults"][COUNTERS.index("truncated")])


def test_image_that_fails_only_when_decoded_masks_its_document(tmp_path, tok):
    bad = _bad_zlib_png()
    Image.open(io.BytesIO(bad)).verify()  # passes the cheap check
    _write(fmt.shard_dir(tmp_path, "train", "caption") / "shard-000000.tar",
           [_caption("zzgood a green square."), _caption("zzlate a red circle.", bad)])
    batches = list(itertools.islice(_loader(tmp_path, tok, {"caption": 1}, micro_batch_size=1), 4))
    assert _faults(batches)["image"] > 0
    for b in batches:
        assert torch.isfinite(b["images"]).all()
        assert int(b["stream_tokens"].sum()) == int((b["labels"] != IGNORE).sum())
        good = late = 0
        for ids, labels, doc_ids in zip(b["input_ids"], b["labels"], b["doc_ids"]):
            for d in doc_ids.unique().tolist():
                sel = doc_ids == d
                text, learnt = tok.decode(ids[sel].tolist()), bool((labels[sel] != IGNORE).any())
                if "zzlate" in text:  # the document is still there, but teaches nothing
                    late += 1
                    assert not learnt
                elif "zzgood" in text:
                    good += 1
                    assert learnt
        assert late > 0 and good == int(b["stream_docs"].sum())
        assert late == int(b["faults"][COUNTERS.index("image")])


def test_all_masked_micro_batch_gives_zero_loss_not_nan():
    from ablate.strategy import token_loss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss, n = token_loss(logits, torch.full((2, 5), IGNORE))
    loss.backward()
    assert n == 0 and loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


# ---- counts: resume, ranks, checkpoints

def test_fault_counts_are_exact_across_a_resume(tmp_path, tok):
    _bad_sample_corpus(tmp_path)
    kw = dict(weights={"caption": 1, "interleaved": 1, "text": 1}, num_workers=2, shuffle_buffer=8)
    full = list(itertools.islice(_loader(tmp_path, tok, **kw), 8))
    resumed = list(itertools.islice(_loader(tmp_path, tok, start_batch=3, **kw), 5))
    for x, y in zip(resumed, full[3:]):
        assert torch.equal(x["faults"], y["faults"]) and torch.equal(x["input_ids"], y["input_ids"])
    assert sum(int(b["faults"].sum()) for b in full[3:]) > 0


def test_fault_meter_sums_ranks_and_resumes():
    meter = FaultMeter()
    batch = {"faults": torch.tensor([1, 0, 2, 0, 0, 5])}
    meter.add(batch)
    meter.add({"stream_docs": torch.tensor([1, 0, 0])})  # a batch from before faults: nothing
    meter.sync(lambda values, mean: [2 * v for v in values])  # two ranks that counted the same
    assert meter.record() == {"data/skipped_shard": 2, "data/skipped_malformed": 0,
                              "data/skipped_empty_text": 4, "data/skipped_image": 0,
                              "data/skipped_no_labels": 0, "data/truncated": 10}
    resumed = FaultMeter(meter.state())
    resumed.add(batch)
    resumed.sync(dist.reduce_over_ranks)
    assert resumed.block() == {"skipped": {"shard": 3, "malformed": 0, "empty_text": 6, "image": 0,
                                           "no_labels": 0}, "skipped_total": 9, "truncated": 15}
    assert FaultMeter(None).state() == dict.fromkeys(COUNTERS, 0)


# ---- a clean corpus gives the batches it gave before

def _reference_loader():
    """``build_train_loader`` of REFERENCE_COMMIT, imported from git into a throwaway package."""
    pkg = "_ablate_data_reference"
    if pkg in sys.modules:
        return sys.modules[pkg + ".pipeline"].build_train_loader
    files = ["__init__", "format", "packing", "pipeline", "splitting"]
    try:
        code = {f: subprocess.run(["git", "show", f"{REFERENCE_COMMIT}:ablate/data/{f}.py"], cwd=REPO,
                                  capture_output=True, text=True, check=True).stdout for f in files}
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with {REFERENCE_COMMIT[:8]} is not available")
    import tempfile

    d = Path(tempfile.mkdtemp()) / pkg
    d.mkdir()
    for f, text in code.items():
        (d / f"{f}.py").write_text(text)
    spec = importlib.util.spec_from_file_location(pkg, d / "__init__.py", submodule_search_locations=[str(d)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = module
    spec.loader.exec_module(module)
    return importlib.import_module(pkg + ".pipeline").build_train_loader


@pytest.mark.parametrize("seq_len", [64, 160])  # 64 truncates many interleaved documents
def test_clean_corpus_batches_are_unchanged(corpus, tok, seq_len):
    old = _reference_loader()
    kw = dict(weights={"caption": 45, "interleaved": 45, "text": 10}, seq_len=seq_len, micro_batch_size=4,
              tokens_per_image=T, image_size=S, num_workers=0, shuffle_buffer=16, seed=1)
    before = list(itertools.islice(old(corpus, tok, **kw), 6))
    after = list(itertools.islice(build_train_loader(corpus, tok, **kw), 6))
    for x, y in zip(before, after):
        assert set(y) == set(x) | {"faults"}
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k
        skipped = sum(y["faults"][:-1].tolist())
        assert skipped == (y["faults"][COUNTERS.index("no_labels")]) and y["faults"][-1] == x["stats"]["truncated"]


# ---- training end to end

def test_training_survives_bad_data_and_reports_it(corpus, tmp_path, tok):
    root = _copy(corpus, tmp_path / "c")
    caption = fmt.list_shards(root, "train", "caption")
    m = _member(caption[0], 3 * 5 + 1)
    os.truncate(caption[0], m.offset_data + m.size // 2)
    for path in caption[1:] + fmt.list_shards(root, "train", "text"):
        os.remove(path)  # so that the damaged and the crafted shards are drawn for sure
    Path(fmt.list_shards(root, "train", "interleaved")[1]).write_bytes(GARBAGE * 500)
    _write(fmt.shard_dir(root, "train", "caption") / "shard-000099.tar",
           [_caption("zzbadpng red.", b"not a png"), _caption(""), _caption("a blue circle.")] * 10)
    _write(fmt.shard_dir(root, "train", "text") / "shard-000099.tar", [{"txt": b""}, {"txt": b"one two."}] * 10)
    runs = tmp_path / "runs"
    proc = run_cli(train_args(root, runs, "train.max_steps=4", "train.log_every=2", "logger=none",
                              "eval.at_end=false"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p.parent for p in runs.rglob("results.json")]
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete"
    skipped = results["data_faults"]["skipped"]
    assert skipped["image"] > 0 and skipped["empty_text"] > 0 and skipped["shard"] > 0
    assert results["data_faults"]["skipped_total"] == sum(skipped.values())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train)
    assert train[-1]["data/skipped_image"] == skipped["image"]
    assert train[-1]["data/truncated"] == results["data_faults"]["truncated"]
    assert train[0]["data/skipped_empty_text"] <= train[-1]["data/skipped_empty_text"]  # cumulative
    assert proc.stderr.count("data/skipped_image") + proc.stdout.count("data/skipped_image") == 1
    # The totals go into the checkpoint, so that a resumed run continues them.
    (state,) = (run / "checkpoints").glob("step-00000004/mp_rank_00_model_states.pt")
    saved = torch.load(state, map_location="cpu", weights_only=False)["data_faults"]
    assert saved == {**skipped, "truncated": results["data_faults"]["truncated"]}
