"""Training/eval data pipeline: packing rules, mixture weights, exact resume with workers."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from ablate.data import format as fmt
from ablate.data.corpus import CorpusConfig, build_corpus
from ablate.data.packing import IGNORE, make_document, pack_batches, truncate_document
from ablate.data.pipeline import build_eval_samples, build_train_loader, preprocess_image
from ablate.data.tokenizer import load_tokenizer

T = 8  # tokens per image
S = 16  # image size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "c"
    build_corpus(CorpusConfig(out=str(root), num_caption=120, num_interleaved=60, num_text=60,
                              num_eval_caption=5, num_eval_vqa=5, num_eval_text=5, shard_size=20,
                              render_size=24, vocab_size=400), progress=False)
    return root


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus)


def _png(color=(255, 0, 0), size=12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_stream(root, stream, samples):
    fmt.shard_dir(root, "train", stream).mkdir(parents=True)
    with wds.ShardWriter(fmt.shard_pattern(root, "train", stream), maxcount=4, verbose=0) as sink:
        for i, sample in enumerate(samples):
            sink.write({**sample, "__key__": f"{i:06d}"})  # unique keys, or webdataset merges them


def _interleaved(chunks):
    sample = {"json": json.dumps({"chunks": chunks}).encode()}
    for c in chunks:
        if isinstance(c, dict):
            sample[c["image"]] = _png()
    return sample


def _loader(root, tok, **kw):
    args = dict(weights={"caption": 45, "interleaved": 45, "text": 10}, seq_len=128,
                micro_batch_size=4, tokens_per_image=T, image_size=S, num_workers=0, shuffle_buffer=16)
    args.update(kw)
    return build_train_loader(root, tok, **args)


def _take(it, n):
    return list(itertools.islice(it, n))


def _segments(row_doc_ids):
    """(start, end) of each run of equal doc ids in one row."""
    out, start = [], 0
    ids = row_doc_ids.tolist()
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[start]:
            out.append((start, t))
            start = t
    return out


def _documents(batch, tok):
    """Token lists of the real (non-padding) documents of a batch."""
    docs = []
    for ids, doc_ids in zip(batch["input_ids"], batch["doc_ids"]):
        for a, b in _segments(doc_ids):
            if ids[a] != tok.pad_id:
                docs.append(ids[a:b].tolist())
    return docs


def _assert_equal_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def test_batch_structure(corpus, tok):
    L, B = 128, 4
    for batch in _take(_loader(corpus, tok, seq_len=L, micro_batch_size=B), 6):
        ids, labels, pos, doc = (batch[k] for k in ("input_ids", "labels", "positions", "doc_ids"))
        for x in (ids, labels, pos, doc):
            assert x.shape == (B, L) and x.dtype == torch.long
        img = batch["images"]
        assert img.dtype == torch.float32 and img.shape[1:] == (3, S, S)
        assert img.numel() == 0 or (img.min() >= -1 and img.max() <= 1)
        assert int((ids == tok.image_id).sum()) == img.shape[0] * T
        # Targets are never image placeholders or padding.
        kept = labels != IGNORE
        assert not ((labels == tok.image_id) | (labels == tok.pad_id)).any()
        assert batch["stream_tokens"].shape == (3,) and int(batch["stream_tokens"].sum()) == int(kept.sum())
        assert set(batch["stats"]) == {"truncated", "skipped"}
        for r in range(B):
            segs = _segments(doc[r])
            # Documents are numbered 0..k in order; padding (if any) is the last, distinct id.
            assert [int(doc[r, a]) for a, _ in segs] == list(range(len(segs)))
            for a, b in segs:
                assert pos[r, a:b].tolist() == list(range(b - a))  # positions restart per document
                if ids[r, a] == tok.pad_id:
                    assert b == L and (ids[r, a:b] == tok.pad_id).all() and not kept[r, a:b].any()
                    continue
                assert ids[r, a] == tok.bos_id
                assert labels[r, b - 1] == IGNORE  # nothing to predict across documents
                # Every kept label is the next token of the same document.
                inner = kept[r, a:b - 1]
                assert torch.equal(labels[r, a:b - 1][inner], ids[r, a + 1:b][inner])
                # Image runs come in whole multiples of T.
                run = 0
                for t in ids[r, a:b].tolist() + [-1]:
                    if t == tok.image_id:
                        run += 1
                    else:
                        assert run % T == 0
                        run = 0


def test_preprocess_image():
    x = preprocess_image(Image.new("RGB", (5, 7), (255, 0, 0)), 12)
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(12, 12)) and torch.allclose(x[1:], -torch.ones(2, 12, 12))
    g = preprocess_image(Image.new("L", (12, 12), 128), 12)  # grey scale is converted to RGB
    assert g.shape == (3, 12, 12) and torch.allclose(g, torch.full_like(g, (128 / 255 - 0.5) / 0.5), atol=1e-6)


def _kind(doc, tok):
    n_img = doc.count(tok.image_id) // T
    if n_img == 0:
        return "text"
    return "caption" if n_img == 1 and doc[1] == tok.image_id else "interleaved"


def test_single_stream_weight(corpus, tok):
    batches = _take(_loader(corpus, tok, weights={"caption": 1.0, "interleaved": 0.0}), 4)
    docs = [d for b in batches for d in _documents(b, tok)]
    assert docs and all(_kind(d, tok) == "caption" for d in docs)
    for b in batches:
        assert b["stream_tokens"][1:].tolist() == [0, 0] and b["stream_tokens"][0] > 0


def test_mixture_shares(corpus, tok):
    it = _loader(corpus, tok, seq_len=256, micro_batch_size=16, seed=3)
    docs = []
    while len(docs) < 300:
        docs += _documents(next(it), tok)
    share = {k: sum(_kind(d, tok) == k for d in docs) / len(docs) for k in fmt.STREAMS}
    assert abs(share["caption"] - 0.45) < 0.1
    assert abs(share["interleaved"] - 0.45) < 0.1
    assert abs(share["text"] - 0.10) < 0.06


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted(corpus, tok, num_workers):
    full = _take(_loader(corpus, tok, num_workers=num_workers), 8)
    resumed = _take(_loader(corpus, tok, num_workers=num_workers, start_batch=3), 5)
    _assert_equal_batches(resumed, full[3:8])
    # Consecutive batches come from different workers' streams, not copies of one.
    assert not torch.equal(full[0]["input_ids"], full[1]["input_ids"])


def test_ranks_differ_and_reproduce(corpus, tok):
    r0 = _take(_loader(corpus, tok, rank=0, world_size=2), 2)
    r1 = _take(_loader(corpus, tok, rank=1, world_size=2), 2)
    again = _take(_loader(corpus, tok, rank=1, world_size=2), 2)
    _assert_equal_batches(r1, again)
    assert not torch.equal(r0[0]["input_ids"], r1[0]["input_ids"])
    other_seed = _take(_loader(corpus, tok, rank=1, world_size=2, seed=1), 1)
    assert not torch.equal(other_seed[0]["input_ids"], r1[0]["input_ids"])


def test_truncation_never_cuts_an_image(tmp_path, tok):
    a, b, c = "here are two pictures.", " the first one is red.", " and so is the second one." * 8
    na, nb = len(tok.encode(a)), len(tok.encode(b))
    _write_stream(tmp_path, "interleaved",
                  [_interleaved([a, {"image": "img0.png"}, b, {"image": "img1.png"}, c]) for _ in range(6)])
    L = 1 + na + T + nb + T // 2  # the cut would fall in the middle of the second image
    batch = next(_loader(tmp_path, tok, weights={"interleaved": 1}, seq_len=L, micro_batch_size=3))
    cut = 1 + na + T + nb
    expect = [tok.bos_id] + tok.encode(a) + [tok.image_id] * T + tok.encode(b)
    for r in range(3):
        assert batch["input_ids"][r, :cut].tolist() == expect
        assert (batch["input_ids"][r, cut:] == tok.pad_id).all()
        assert batch["labels"][r, cut - 1] == IGNORE  # the truncated document's last token
    assert batch["images"].shape[0] == 3  # one image kept per row, the cut one dropped
    # Batch images are decoded exactly as evaluation images are.
    assert torch.equal(batch["images"][0], preprocess_image(Image.open(io.BytesIO(_png())), S))
    assert batch["stats"]["truncated"] == 3


def test_truncate_document_keeps_an_image_that_ends_at_the_cut(tok):
    sample = _interleaved(["hi", {"image": "img0.png"}, " there"])
    doc = make_document(sample, fmt.STREAMS.index("interleaved"), tok, T)
    end = 1 + len(tok.encode("hi")) + T
    short = truncate_document(doc, end, T)
    assert short.truncated and len(short.ids) == end and len(short.images) == 1
    assert truncate_document(doc, end - 1, T).images == []


def test_image_only_document_and_empty_label_batch(tmp_path, tok):
    stream = fmt.STREAMS.index("interleaved")
    sample = _interleaved([{"image": "img0.png"}, {"image": "img1.png"}])
    doc = make_document(sample, stream, tok, T)
    assert doc.ids == [tok.bos_id] + [tok.image_id] * (2 * T) + [tok.eos_id]
    # Whole, its only target is the <eos>; cut after the first image it has none.
    (whole,) = pack_batches([doc], seq_len=2 * T + 2, batch_size=1, tokens_per_image=T,
                            pad_id=tok.pad_id, image_id=tok.image_id)
    assert whole.labels[0].count(tok.eos_id) == 1 and sum(t != IGNORE for t in whole.labels[0]) == 1
    batches = pack_batches([doc, doc, doc], seq_len=T + 3, batch_size=2, tokens_per_image=T,
                           pad_id=tok.pad_id, image_id=tok.image_id, drop_untargeted=False)
    batch = next(batches).to_tensors(lambda imgs: torch.zeros(len(imgs), 3, S, S))
    labels = batch["labels"]
    n = int((labels != IGNORE).sum())
    assert n == 0 and batch["images"].shape[0] == 2 and batch["stats"]["truncated"] == 2
    logits = torch.randn(*labels.shape, tok.vocab_size, requires_grad=True)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum") / max(n, 1)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0 and torch.isfinite(logits.grad).all()

    # Through the loader such documents are skipped and counted; a stream of nothing
    # else fails loudly instead of spinning forever.
    _write_stream(tmp_path, "interleaved", [sample] * 4)
    with pytest.raises(RuntimeError, match="skipped"):
        next(_loader(tmp_path, tok, weights={"interleaved": 1}, seq_len=T + 3, micro_batch_size=1))


def test_skipped_documents_are_counted(tmp_path, tok):
    good = _interleaved(["a red square.", {"image": "img0.png"}, " yes."])
    bad = {"json": b'{"chunks": [{"image": "img7.png"}]}'}  # names a missing file
    # Three images do not fit in 2T + 4 tokens; cut before the third, no target is left.
    only_images = _interleaved([{"image": f"img{k}.png"} for k in range(3)])
    assert len(make_document(good, 1, tok, T).ids) <= 2 * T + 4
    _write_stream(tmp_path, "interleaved", [good, bad, only_images] * 4)
    batches = _take(_loader(tmp_path, tok, weights={"interleaved": 1}, seq_len=2 * T + 4, micro_batch_size=2), 8)
    assert sum(b["stats"]["skipped"] for b in batches) > 0
    assert all(int((b["labels"] != IGNORE).sum()) > 0 for b in batches)


def test_weights_validation(tmp_path, tok):
    _write_stream(tmp_path, "interleaved", [_interleaved(["x", {"image": "img0.png"}])])
    with pytest.raises(ValueError, match="caption"):
        _loader(tmp_path, tok, weights={"caption": 1, "interleaved": 1})
    with pytest.raises(ValueError, match="captions"):
        _loader(tmp_path, tok, weights={"captions": 1})
    # A zero weight never opens the stream, so missing shards are fine.
    batch = next(_loader(tmp_path, tok, weights={"caption": 0, "interleaved": 1}, micro_batch_size=1))
    assert batch["stream_tokens"][0] == 0 and batch["stream_tokens"][1] > 0


def test_eval_samples(corpus):
    caps = build_eval_samples(corpus, "caption")
    assert len(caps) == 5 and caps[0]["id"] == "caption-000000"
    assert isinstance(caps[0]["image"], Image.Image) and caps[0]["image"].mode == "RGB"
    assert caps[0]["captions"] and all(isinstance(c, str) for c in caps[0]["captions"])
    vqa = build_eval_samples(corpus, "vqa", limit=3)
    assert [v["id"] for v in vqa] == ["vqa-000000", "vqa-000001", "vqa-000002"]
    assert {"question", "answers", "qtype", "image"} <= set(vqa[0])
    text = build_eval_samples(corpus, "text", limit=2)
    assert len(text) == 2 and all(t["text"] for t in text)
    with pytest.raises(ValueError):
        build_eval_samples(corpus, "nope")
