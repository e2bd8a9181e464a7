"""The data-mix axis: sweepable weights, realised mix from the real loader, and the
accounting (``MixMeter``) behind the logged ``data/*`` metrics and results.json's ``data_mix``.

The weights are probabilities *per document* (each next document is drawn from a
stream with that probability), so the realised *document* shares are what must match
them; token shares also depend on each stream's document length and are only
checked to be consistent with the label tokens.
"""

from __future__ import annotations

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from ablate import dist
from ablate.data import format as fmt
from ablate.data.packing import IGNORE
from ablate.data.pipeline import MixMeter, build_train_loader, mixture_weights
from ablate.data.tokenizer import load_tokenizer
from tests.conftest import compose


def _realised(corpus, weights: dict, min_docs: int = 400, seed: int = 0):
    """Documents and label tokens per stream over at least ``min_docs`` documents."""
    tok = load_tokenizer(corpus)
    loader = build_train_loader(corpus, tok, weights=weights, seq_len=256, micro_batch_size=8,
                                tokens_per_image=4, image_size=16, num_workers=0, shuffle_buffer=16,
                                seed=seed)
    docs, tokens = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    while docs.sum() < min_docs:
        batch = next(loader)
        # The counts are honest: every real document and every label token is attributed.
        real = sum(len({d for d, t in zip(row_d.tolist(), row_t.tolist()) if t != tok.pad_id})
                   for row_d, row_t in zip(batch["doc_ids"], batch["input_ids"]))
        assert int(batch["stream_docs"].sum()) == real
        assert int(batch["stream_tokens"].sum()) == int((batch["labels"] != IGNORE).sum())
        docs += batch["stream_docs"]
        tokens += batch["stream_tokens"]
    return docs, tokens


@pytest.mark.parametrize("weights", [
    {"caption": 0.45, "interleaved": 0.45, "text": 0.10},  # MM1 (conf/data/mm1_mix.yaml)
    {"caption": 2, "interleaved": 7, "text": 1},  # unnormalised: 0.2 / 0.7 / 0.1
])
def test_realised_document_shares_follow_the_weights(corpus, weights):
    docs, tokens = _realised(corpus, weights)
    want = mixture_weights(weights)
    n = int(docs.sum())
    for i, stream in enumerate(fmt.STREAMS):
        share = int(docs[i]) / n
        # About 3 binomial standard deviations at n >= 400 (the draws are seeded: no flakes).
        tol = 3 * (want[stream] * (1 - want[stream]) / n) ** 0.5 + 0.01
        assert abs(share - want[stream]) < tol, (stream, share, want[stream])
        assert tokens[i] > 0
    # Token shares are another unit: a caption document holds few label tokens (its
    # image placeholders are not targets), so captions' token share is below their weight.
    assert int(tokens[0]) / int(tokens.sum()) < int(docs[0]) / n


def test_zero_weight_stream_gets_nothing(corpus):
    docs, tokens = _realised(corpus, {"caption": 0.8, "interleaved": 0.0, "text": 0.2}, min_docs=150)
    i = fmt.STREAMS.index("interleaved")
    assert int(docs[i]) == 0 and int(tokens[i]) == 0
    assert docs.sum() >= 150 and tokens.sum() > 0


def test_mix_is_sweepable_from_the_command_line():
    # `ablate-train -m data=mm1_mix,captions_only` and `-m data.weights.caption=0.45,0.9`
    # are Hydra sweeps over one key: each value composes to a valid config of its own.
    parser = OverridesParser.create()
    for arg, key in [("data=mm1_mix,captions_only,interleaved_heavy", "data"),
                     ("data.weights.caption=0.45,0.9", "data.weights.caption")]:
        (override,) = parser.parse_overrides([arg])
        assert override.is_sweep_override()
        values = list(override.sweep_string_iterator())
        assert len(values) >= 2
        weights = [dict(compose("experiment=smoke", f"{key}={v}").data.weights) for v in values]
        assert len({tuple(sorted(w.items())) for w in weights}) == len(values)  # all different
    assert dict(compose("data=captions_only").data.weights) == {"caption": 1, "interleaved": 0, "text": 0}
    assert compose("data.weights.caption=0.9").data.weights.caption == 0.9


def _batch(tokens, docs):
    return {"stream_tokens": torch.tensor(tokens), "stream_docs": torch.tensor(docs)}


def test_mix_meter_records_windows_totals_and_resumes():
    meter = MixMeter({"caption": 45, "interleaved": 45, "text": 10})
    meter.add(_batch([10, 20, 0], [1, 2, 0]))
    meter.add(_batch([5, 0, 15], [1, 0, 1]))
    meter.sync(dist.reduce_over_ranks)  # a single process: the identity
    first = meter.record()
    assert first["data/tokens_caption"] == 15 and first["data/window_tokens_text"] == 15
    assert first["data/share_interleaved"] == pytest.approx(20 / 50)
    assert first["data/documents_caption"] == 2
    meter.add(_batch([0, 30, 0], [0, 1, 0]))
    meter.sync(dist.reduce_over_ranks)
    second = meter.record()
    assert second["data/tokens_interleaved"] == 50 and second["data/window_tokens_interleaved"] == 30
    assert second["data/window_tokens_caption"] == 0

    # A resumed run starts from the checkpointed totals; its first window starts there.
    resumed = MixMeter({"caption": 45, "interleaved": 45, "text": 10}, meter.state())
    resumed.add(_batch([1, 1, 1], [1, 1, 1]))
    resumed.sync(dist.reduce_over_ranks)
    rec = resumed.record()
    assert rec["data/tokens_caption"] == 16 and rec["data/window_tokens_caption"] == 1

    block = resumed.block()
    assert block["weights"] == {"caption": 0.45, "interleaved": 0.45, "text": 0.1}
    assert block["tokens"] == {"caption": 16, "interleaved": 51, "text": 16}
    assert block["documents"] == {"caption": 3, "interleaved": 4, "text": 2}
    assert block["shares"]["interleaved"] == pytest.approx(51 / 83)
    assert block["document_shares"]["text"] == pytest.approx(2 / 9)
    assert sum(block["shares"].values()) == pytest.approx(1)


def test_mix_meter_sums_over_ranks():
    """sync() hands the pending counts to the reducer once and adds what comes back."""
    meter = MixMeter({"caption": 1, "interleaved": 0, "text": 1})
    meter.add(_batch([3, 0, 4], [1, 0, 1]))
    seen = []

    def two_ranks(values, mean):  # as if a second rank had counted the same
        seen.append(list(values))
        assert mean == [False] * 6
        return [2 * v for v in values]

    meter.sync(two_ranks)
    meter.sync(two_ranks)  # nothing pending: adds nothing
    assert seen == [[3, 0, 4, 1, 0, 1], [0] * 6]
    assert meter.state() == {"tokens": [6, 0, 8], "documents": [2, 0, 2]}
    assert meter.block()["weights"] == {"caption": 0.5, "interleaved": 0.0, "text": 0.5}
    assert meter.block()["tokens"]["interleaved"] == 0


def test_mixture_weights_validation():
    assert mixture_weights({"caption": 1}) == {"caption": 1.0, "interleaved": 0.0, "text": 0.0}
    for bad, match in [({"captions": 1}, "captions"), ({"caption": -1, "text": 1}, "caption"),
                       ({"caption": 0, "text": 0}, "zero")]:
        with pytest.raises(ValueError, match=match):
            mixture_weights(bad)
