"""Tests for ablate.eval.metrics: CIDEr wiring and VQA answer normalisation/accuracy."""

import math

import pytest
from pycocoevalcap.cider.cider import Cider

from ablate.eval.metrics import (
    cider,
    mean_vqa_accuracy,
    normalize_answer,
    tokenize_caption,
    vqa_accuracy,
)

REFS = {
    "img0": ["A red square on the left.", "a red square at left"],
    "img1": ["Two blue circles, side by side!", "two blue circles"],
    "img2": ["A green triangle above a yellow star.", "green triangle over a yellow star"],
    "img3": ["An empty white canvas.", "nothing but white"],
}


def test_tokenize_caption():
    assert tokenize_caption("  A Red-square,   on the LEFT. ") == "a red square on the left"
    assert tokenize_caption("The dog's ball") == "the dogs ball"
    assert tokenize_caption("") == ""


def test_cider_perfect_beats_wrong():
    perfect = {k: v[0] for k, v in REFS.items()}
    wrong = {k: "purple elephants dancing wildly" for k in REFS}
    good_score, good_items = cider(REFS, perfect)
    bad_score, bad_items = cider(REFS, wrong)
    assert good_score > bad_score
    assert bad_score == pytest.approx(0.0)
    assert set(good_items) == set(REFS)
    assert good_score == pytest.approx(sum(good_items.values()) / len(good_items))


def test_cider_matches_pycocoevalcap_directly():
    preds = {"img0": "red square left", "img1": "two circles", "img2": "a star", "img3": "white"}
    score, items = cider(REFS, preds)
    gts = {k: [tokenize_caption(r) for r in v] for k, v in REFS.items()}
    res = {k: [tokenize_caption(preds[k])] for k in REFS}
    ref_score, ref_items = Cider().compute_score(gts, res)
    assert score == pytest.approx(float(ref_score), abs=1e-12)
    for k, s in zip(gts, ref_items):
        assert items[k] == pytest.approx(float(s), abs=1e-12)


def test_cider_empty_prediction_scores_zero():
    preds = {k: v[0] for k, v in REFS.items()}
    preds["img2"] = ""
    score, items = cider(REFS, preds)
    assert items["img2"] == 0.0
    assert math.isfinite(score) and score > 0


def test_cider_validation():
    preds = {k: "x" for k in REFS}
    with pytest.raises(ValueError, match="different ids"):
        cider(REFS, {**preds, "extra": "y"})
    with pytest.raises(ValueError, match="different ids"):
        cider(REFS, {k: preds[k] for k in list(REFS)[:2]})
    with pytest.raises(ValueError, match="no .*reference"):
        cider({**REFS, "img9": []}, {**preds, "img9": "x"})
    with pytest.raises(ValueError, match="no .*reference"):
        cider({**REFS, "img9": ["?!"]}, {**preds, "img9": "x"})
    with pytest.raises(ValueError, match="nothing to score"):
        cider({}, {})


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("the red.", "red"),
        ("yes!", "yes"),
        ("3.5", "3.5"),
        ("  A   Blue  Circle ", "blue circle"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("black-and-white", "black and white"),
        ("ten.", "10"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_soft_accuracy_ten_answers():
    others = ["blue"] * 9
    assert vqa_accuracy("red", ["red"] + others) == pytest.approx(1 / 3)
    assert vqa_accuracy("Red.", ["red", "red"] + others[:8]) == pytest.approx(2 / 3)
    assert vqa_accuracy("red", ["red"] * 3 + others[:7]) == 1.0
    assert vqa_accuracy("red", ["red"] * 7 + others[:3]) == 1.0
    assert vqa_accuracy("green", ["red"] * 10) == 0.0


def test_vqa_single_answer_is_exact_match():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("the square", ["square"]) == 1.0
    assert vqa_accuracy("circle", ["square"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_mean_vqa_accuracy():
    preds = {"q0": "yes", "q1": "two", "q2": "red"}
    answers = {"q0": ["yes"], "q1": ["2"], "q2": ["blue"]}
    mean, items = mean_vqa_accuracy(preds, answers)
    assert items == {"q0": 1.0, "q1": 1.0, "q2": 0.0}
    assert mean == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        mean_vqa_accuracy({"q0": "yes"}, answers)
