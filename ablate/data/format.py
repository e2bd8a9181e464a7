"""The on-disk corpus layout and the text formats shared by the data generator,
the training pipeline and the evaluation harness.

Keeping these in one module means a training sample and an evaluation prompt are
built from the same strings: a model trained on interleaved question/answer text
is asked its evaluation questions in exactly that wording.

Corpus directory (written by ``ablate-data``)::

    <root>/
      meta.json                 seed, counts per split, image size, shard lists, versions
      stats.json                trivial baselines: most frequent training caption,
                                majority training VQA answer (and per question type)
      tokenizer.json            HF ``tokenizers`` BPE model with the special tokens below
      train/caption/shard-000000.tar ...
      train/interleaved/shard-000000.tar ...
      train/text/shard-000000.tar ...
      eval/caption/shard-000000.tar ...
      eval/vqa/shard-000000.tar ...
      eval/text/shard-000000.tar ...

Samples (webdataset: files sharing a ``__key__`` in a tar form one sample):

- train/caption:     ``png`` image, ``txt`` caption, ``json`` scene description
- train/interleaved: ``json`` ``{"chunks": [...]}`` where each chunk is either a text
                     string or ``{"image": "<ext>"}`` naming an image file of the same
                     sample (``img0.png``, ``img1.png``, ...); text that follows an image
                     talks about that image (a caption and question/answer lines)
- train/text:        ``txt`` plain text
- eval/caption:      ``png`` image, ``json`` ``{"id": str, "captions": [reference, ...]}``
- eval/vqa:          ``png`` image, ``json`` ``{"id": str, "question": str,
                     "answers": [str, ...], "qtype": str}``
- eval/text:         ``txt`` plain text
"""

from __future__ import annotations

# Special tokens, present in every tokenizer the corpus ships.
PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
IMAGE = "<image>"  # one placeholder per image; the pipeline expands it to T tokens
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)

STREAMS = ("caption", "interleaved", "text")  # training streams, in mixture order
EVAL_SPLITS = ("caption", "vqa", "text")

# Text formats. A caption sample is ``<image> {caption}``; question/answer lines after an
# image read ``question: {q} answer: {a}.``. Evaluation prompts end where the model
# must continue.
CAPTION_PROMPT = ""  # after the image the model continues with the caption
VQA_PROMPT = " question: {question} answer:"
VQA_LINE = " question: {question} answer: {answer}."

META_FILE = "meta.json"
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


def shard_dir(root, split: str, stream: str):
    """Directory holding the shards of ``split`` ("train" or "eval") / ``stream``."""
    from pathlib import Path

    return Path(root) / split / stream


def shard_pattern(root, split: str, stream: str) -> str:
    """ShardWriter pattern for a stream (``%06d`` filled by the writer)."""
    return str(shard_dir(root, split, stream) / "shard-%06d.tar")


def list_shards(root, split: str, stream: str) -> list[str]:
    """Sorted shard paths of a stream; empty if the stream has none."""
    return sorted(str(p) for p in shard_dir(root, split, stream).glob("shard-*.tar"))
