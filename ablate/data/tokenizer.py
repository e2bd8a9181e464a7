"""Byte-level BPE tokenizer: training on the corpus text and a small loading wrapper.

Choices:

- Byte-level pre-tokenisation with the full 256-byte initial alphabet, so *any* text
  round-trips exactly (``decode(encode(t)) == t``), including leading spaces (our
  question/answer lines start with one) and characters never seen in training.
- No prefix space is added: the pipeline concatenates chunks (``<image>`` + caption,
  text + `` question: ...``) and each chunk's own leading space is what it says.
- The special tokens of ``format.SPECIAL_TOKENS`` take ids 0..3 (``<pad>`` = 0) and are
  only ever inserted by id. ``encode_special_tokens`` is switched on so a literal
  "<image>" in ordinary text is split like any other text instead of becoming the
  placeholder token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from . import format as fmt


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (specials included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fmt.SPECIAL_TOKENS),  # in order, so <pad> gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


class TextTokenizer:
    """What the training pipeline and the evaluation harness need from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.tok.encode_special_tokens = True  # not stored in the json: set on every load
        ids = {s: tokenizer.token_to_id(s) for s in fmt.SPECIAL_TOKENS}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.pad_id, self.bos_id, self.eos_id, self.image_id = (ids[s] for s in fmt.SPECIAL_TOKENS)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load ``tokenizer.json`` from a file path or from a corpus directory."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":  # a corpus directory, built or not
        path = path / fmt.TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}; build the corpus first, e.g. `ablate-data --out {path.parent}`"
        )
    return TextTokenizer(Tokenizer.from_file(str(path)))
