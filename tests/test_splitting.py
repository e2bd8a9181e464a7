"""Image splitting: view geometry, the token budget validate() derives, packed batches from
the real pipeline, and one end-to-end training run whose evaluation ablate-eval repeats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ablate.data.pipeline import build_train_loader, preprocess_image, preprocess_views
from ablate.data.splitting import (Split, canvas_size, crop_origins, image_views, num_views,
                                   resize_rgb, split_problems)
from ablate.data.tokenizer import load_tokenizer
from ablate.tracking import read_metrics
from ablate.validate import ConfigError, validate
from tests.conftest import compose, run_cli, train_args


def _noise(width=53, height=41, seed=0) -> Image.Image:
    """Random pixels: any misplaced crop or shifted column shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_geometry():
    assert num_views((1, 1), False) == 1 and num_views((2, 2), True) == 5  # MM1: 4 + global
    assert num_views((3, 4), True) == 13  # Molmo's largest: 12 crops + global
    S, o = 16, 4
    assert canvas_size((2, 3), S, o) == (2 * 12 + 4, 3 * 12 + 4)
    assert canvas_size((1, 1), S, 7) == (S, S)  # a 1x1 grid is no split, whatever the overlap
    assert crop_origins((2, 3), S, o) == [(0, 0), (0, 12), (0, 24), (12, 0), (12, 12), (12, 24)]
    H, W = canvas_size((2, 3), S, o)
    top, left = crop_origins((2, 3), S, o)[-1]
    assert (top + S, left + S) == (H, W)  # the last crop ends exactly at the canvas edge


@pytest.mark.parametrize("grid,overlap", [((2, 2), 0), ((2, 3), 4), ((3, 2), 7)])
def test_views_are_canvas_crops(grid, overlap):
    S, img = 16, _noise()
    split = Split(grid, overlap, global_view=True)
    views = split.views(img, S)
    assert views.shape == (split.num_views, S, S, 3) and views.dtype == np.uint8
    # The canvas, resized independently with PIL; every crop is its region, row-major.
    H, W = canvas_size(grid, S, overlap)
    canvas = np.asarray(img.convert("RGB").resize((W, H), Image.BICUBIC))
    covered = np.zeros((H, W), dtype=int)
    for k, (top, left) in enumerate(crop_origins(grid, S, overlap)):
        np.testing.assert_array_equal(views[1 + k], canvas[top:top + S, left:left + S])
        covered[top:top + S, left:left + S] += 1
    assert covered.min() >= 1  # the crops cover the whole canvas
    # The global view comes first and is the plain (unsplit) resize.
    np.testing.assert_array_equal(views[0], resize_rgb(img, S, S))
    assert torch.equal(preprocess_views(img, S, split)[0], preprocess_image(img, S))


def test_overlap_is_exact():
    S, o, img = 16, 5, _noise(seed=1)
    views = image_views(img, S, (2, 2), o, global_view=False)
    tl, tr, bl = views[0], views[1], views[2]
    # Neighbours share exactly o columns (rows): the last o of one are the first o of the next...
    np.testing.assert_array_equal(tl[:, S - o:], tr[:, :o])
    np.testing.assert_array_equal(tl[S - o:], bl[:o])
    # ... and not o + 1 (noise makes an accidental match impossible).
    assert not np.array_equal(tl[:, S - o - 1:], tr[:, :o + 1])
    assert not np.array_equal(tl[S - o - 1:], bl[:o + 1])
    # Without overlap the tiles are disjoint: the canvas is exactly the 2x2 mosaic.
    tiles = image_views(img, S, (2, 2), 0, global_view=False)
    mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    np.testing.assert_array_equal(mosaic, resize_rgb(img, 2 * S, 2 * S))


def test_no_split_is_the_plain_preprocessing():
    img = _noise(seed=2)
    assert torch.equal(preprocess_views(img, 12), preprocess_image(img, 12)[None])
    assert torch.equal(preprocess_views(img, 12, Split((1, 1), 3, False)), preprocess_image(img, 12)[None])
    assert Split.from_config(None) == Split()
    cfg = compose("data.split.grid=[2,3]", "data.split.overlap=2", "data.split.global_view=true")
    assert Split.from_config(cfg.data.split) == Split((2, 3), 2, True)


def test_mm1_and_molmo_token_budgets():
    """MM1's high-resolution setting: 4 sub-images + 1 global view, 144 tokens each = 720."""
    mm1 = ("experiment=smoke", "encoder.image_size=336", "encoder.patch_size=14", "connector=avgpool",
           "connector.num_tokens=144", "data.split.grid=[2,2]", "data.split.global_view=true",
           "data.seq_len=1024", "decoder.max_seq_len=1024")
    derived = validate(compose(*mm1), check_paths=False)
    assert derived["tokens_per_image"] == 720 and derived["views"] == 5
    assert derived["tokens_per_view"] == 144 and derived["image_size"] == 336
    # Molmo-style: 3x4 overlapping crops + global view.
    molmo = validate(compose("experiment=smoke", "data.split.grid=[3,4]", "data.split.overlap=8",
                             "data.split.global_view=true", "connector=avgpool", "connector.num_tokens=4",
                             "data.seq_len=128"), check_paths=False)
    assert molmo["views"] == 13 and molmo["tokens_per_image"] == 52
    assert validate(compose("experiment=smoke"), check_paths=False)["views"] == 1


@pytest.mark.parametrize("overrides,key", [
    (["data.split.grid=[2]"], "data.split.grid=[2]"),
    (["data.split.grid=[0,2]"], "data.split.grid=[0, 2]"),
    (["data.split.overlap=32"], "data.split.overlap=32"),  # = encoder.image_size of smoke
    (["data.split.overlap=-1"], "data.split.overlap=-1"),
    (["data.split.global_view=true"], "data.split.global_view=true"),  # with grid [1, 1]
    # The sequence must hold all V x T tokens of one image: 3x3 views x 16 > 96.
    (["data.split.grid=[3,3]"], "data.seq_len=96"),
])
def test_bad_split_settings_are_named(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(compose("experiment=smoke", *overrides), check_paths=False)
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems
    assert split_problems([2, 2], 4, True, 32) == []


def _runs(ids_row: list[int], image_id: int) -> list[int]:
    """Lengths of the maximal runs of image placeholders in one row."""
    out, n = [], 0
    for t in ids_row + [-1]:
        if t == image_id:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def test_packed_batches_carry_all_views(corpus):
    tok = load_tokenizer(corpus)
    S, per_view, split = 16, 4, Split((2, 2), 4, True)
    V = split.num_views
    args = dict(weights={"caption": 1, "interleaved": 1, "text": 0.2}, seq_len=160, micro_batch_size=4,
                tokens_per_image=V * per_view, image_size=S, split=split, num_workers=0, shuffle_buffer=8)
    batches = [b for b, _ in zip(build_train_loader(corpus, tok, **args), range(4))]
    for b in batches:
        ids = b["input_ids"]
        n_placeholders = int((ids == tok.image_id).sum())
        runs = [r for row in ids.tolist() for r in _runs(row, tok.image_id)]
        # Every image occupies V x T consecutive placeholders (adjacent images may touch).
        assert all(r % (V * per_view) == 0 for r in runs)
        n_images = sum(runs) // (V * per_view)
        assert b["images"].shape == (V * n_images, 3, S, S)
        assert n_placeholders == b["images"].shape[0] * per_view
    assert sum(b["images"].shape[0] for b in batches) > 0
    # Exact resume still holds with splitting.
    resumed = [b for b, _ in zip(build_train_loader(corpus, tok, **args, start_batch=2), range(2))]
    for x, y in zip(resumed, batches[2:]):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["images"], y["images"])


@pytest.fixture(scope="module")
def split_run(corpus, tmp_path_factory):
    """The one end-to-end run of this file: a split model on an interleaved-heavy mix."""
    runs = tmp_path_factory.mktemp("runs")
    res = run_cli(train_args(
        corpus, runs, "connector=avgpool", "connector.num_tokens=4", "data.split.grid=[2,2]",
        "data.split.overlap=8", "data.split.global_view=true", "data=interleaved_heavy",
        "data.seq_len=128", "train.max_steps=4", "train.ckpt_every=0", "logger=none"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    (run_dir,) = [p.parent for p in runs.rglob("results.json")]
    return run_dir, res


def test_split_run_trains_and_evaluates(split_run, tmp_path):
    run_dir, res = split_run
    assert "image views 5  image tokens/image 20 (5 x 4)" in res.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["counts"]["vqa"] == 8
    for key in ("caption/cider", "vqa/accuracy", "text/loss"):
        assert results["metrics"][key] == results["metrics"][key]  # present, not NaN
    # ablate-eval rebuilds the model from config.yaml and must use the same views.
    from ablate.eval.cli import main as eval_main

    out = tmp_path / "eval.json"
    assert eval_main([str(run_dir), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    for key in ("text/loss", "caption/cider", "vqa/accuracy"):
        assert got["metrics"][key] == pytest.approx(results["metrics"][key], rel=1e-5, abs=1e-6), key


def test_split_run_logs_its_data_mix(split_run):
    run_dir, _ = split_run
    mix = json.loads((run_dir / "results.json").read_text())["data_mix"]
    assert mix["weights"] == pytest.approx({"caption": 0.2, "interleaved": 0.7, "text": 0.1})
    assert sum(mix["shares"].values()) == pytest.approx(1)
    assert sum(mix["document_shares"].values()) == pytest.approx(1)
    total = sum(mix["tokens"].values())
    assert total > 0 and all(mix["shares"][s] == pytest.approx(n / total) for s, n in mix["tokens"].items())
    records = [r for r in read_metrics(run_dir) if "data/tokens_caption" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    for stream, n in mix["tokens"].items():
        assert last[f"data/tokens_{stream}"] == n  # the block is the run total at the end
        assert sum(r[f"data/window_tokens_{stream}"] for r in records) == n
        assert last[f"data/share_{stream}"] == pytest.approx(mix["shares"][stream])
        assert last[f"data/documents_{stream}"] == mix["documents"][stream]
    # Every label token of the run is attributed to a stream.
    label_tokens = sum(r["perf/label_tokens_per_step"] for r in records)
    assert label_tokens == total
