"""Scoring functions for the evaluation harness: caption CIDEr-D and VQA accuracy.

Choices worth knowing when reading numbers produced here:

- CIDEr-D is computed by ``pycocoevalcap``'s maintained ``Cider`` scorer; we only
  prepare its inputs. Captions are tokenised by :func:`tokenize_caption`, a pure-Python
  stand-in for the Stanford PTB tokenizer that the COCO toolkit normally runs through
  Java. Scores are therefore comparable across our own variants, but not digit-for-digit
  with published COCO numbers. The idf statistics come from the evaluated corpus itself,
  so a corpus of a single image scores 0 (log 1 = 0) -- evaluate on many images.
- VQA answers are normalised by :func:`normalize_answer`, our own implementation of the
  rules of the official VQA evaluation (punctuation, number words, articles,
  contractions). Unlike the official script we always normalise, not only when the
  annotators disagree, and accuracy is the plain ``min(matches / 3, 1)`` rather than its
  average over the ten leave-one-annotator-out subsets.
- A question with a single reference answer (our synthetic data) is scored as exact
  match after normalisation: the divisor is 1, not 3, so a correct answer scores 1.0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pycocoevalcap.cider.cider import Cider

__all__ = [
    "tokenize_caption",
    "cider",
    "normalize_answer",
    "vqa_accuracy",
    "mean_vqa_accuracy",
]

# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------

_APOSTROPHES = re.compile(r"['\u2019]")
# Anything that is neither a word character nor whitespace, plus the underscore
# (which \w would otherwise keep).
_NON_WORD = re.compile(r"[^\w\s]|_")


def tokenize_caption(s: str) -> str:
    """Lowercase, strip punctuation and collapse whitespace; tokens are space-separated.

    Apostrophes are deleted (``don't`` -> ``dont``) so a contraction stays one token;
    other punctuation becomes a space (``black-and-white`` -> ``black and white``).
    """
    s = _APOSTROPHES.sub("", s.lower())
    return " ".join(_NON_WORD.sub(" ", s).split())


def cider(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D of ``predictions`` against ``references``.

    Args:
        references: id -> one or more reference captions.
        predictions: id -> the model's caption (may be empty; it then scores 0).

    Returns:
        (corpus score, per-id scores), the corpus score being the mean of the per-id ones.

    Raises:
        ValueError: the two mappings hold different ids, there is nothing to score, or
            an id has no non-empty reference.
    """
    ref_ids, pred_ids = set(references), set(predictions)
    if ref_ids != pred_ids:
        missing = sorted(map(str, ref_ids - pred_ids))[:5]
        extra = sorted(map(str, pred_ids - ref_ids))[:5]
        raise ValueError(
            f"references and predictions cover different ids: "
            f"without prediction {missing}, without references {extra}"
        )
    if not ref_ids:
        raise ValueError("nothing to score: no ids given")

    gts: dict[str, list[str]] = {}
    res: dict[str, list[str]] = {}
    for key, refs in references.items():
        # A bare string would be split into characters below; refuse it loudly.
        if isinstance(refs, str):
            raise ValueError(f"references[{key!r}] must be a list of captions, got a string")
        tokenized = [t for t in (tokenize_caption(r) for r in refs) if t]
        if not tokenized:
            raise ValueError(f"id {key!r} has no (non-empty) reference caption")
        gts[key] = tokenized
        res[key] = [tokenize_caption(predictions[key] or "")]

    score, per_item = Cider().compute_score(gts, res)
    # Cider iterates gts in insertion order, so the scores line up with gts' keys.
    return float(score), {k: float(v) for k, v in zip(gts, per_item)}


# ---------------------------------------------------------------------------
# VQA answers
# ---------------------------------------------------------------------------

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Annotators and models often drop the apostrophe; map those spellings back so
# "dont" and "don't" count as the same answer.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
    "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "id": "i'd",
    "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've",
    "lets": "let's", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've",
    "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "wed": "we'd", "weve": "we've", "werent": "weren't", "whats": "what's",
    "whered": "where'd", "wheres": "where's", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}

# Punctuation the VQA rules act on. The apostrophe is absent on purpose (it is part
# of contractions) and so is the period, which has its own rule below.
_PUNCT = r";/\[\]\"{}()=+\\_\-><@`,?!:*#$%&^|~"
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_PUNCT_BY_SPACE = re.compile(rf"(?:(?<=\s)|^)[{_PUNCT}]+|[{_PUNCT}]+(?=\s|$)")
_PUNCT_ANY = re.compile(rf"[{_PUNCT}]")
_STRAY_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # keeps only decimal points: "3.5"


def normalize_answer(s: str) -> str:
    """Normalise a VQA answer the way the official VQA evaluation does.

    Lowercases; deletes thousands separators and punctuation at word edges
    (``yes!`` -> ``yes``); turns punctuation inside a word into a space
    (``black-and-white`` -> ``black and white``); deletes periods except decimal
    points (``3.5`` stays); maps number words to digits (``two`` -> ``2``); drops the
    articles a/an/the; restores apostrophes of common contractions (``dont`` -> ``don't``).
    """
    s = " ".join(s.lower().split())
    s = _THOUSANDS_COMMA.sub("", s)
    s = _PUNCT_BY_SPACE.sub("", s)
    s = _PUNCT_ANY.sub(" ", s)
    s = _STRAY_PERIOD.sub("", s)
    words = []
    for word in s.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: ``min(#matching answers / 3, 1)``.

    With ten human answers, one match gives 1/3 and three or more give 1. With a
    single reference answer this is exact match after normalisation (1.0 or 0.0):
    the divisor becomes 1, since one annotator cannot agree three times.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty list of strings")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    divisor = 1 if len(answers) == 1 else 3
    return min(matches / divisor, 1.0)


def mean_vqa_accuracy(
    preds: Mapping[str, str], answers: Mapping[str, Sequence[str]]
) -> tuple[float, dict[str, float]]:
    """Mean :func:`vqa_accuracy` over questions; returns (mean, per-id accuracy).

    Raises ValueError when the two mappings cover different ids or are empty.
    """
    if set(preds) != set(answers):
        raise ValueError(
            "predictions and answers cover different ids: "
            f"{sorted(map(str, set(answers) ^ set(preds)))[:5]}"
        )
    if not answers:
        raise ValueError("nothing to score: no ids given")
    per_item = {k: vqa_accuracy(preds[k], answers[k]) for k in answers}
    return sum(per_item.values()) / len(per_item), per_item
