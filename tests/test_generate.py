"""KV-cached greedy generation (``ablate.eval.generate``) against full recomputation.

Models are the smoke experiment's (``build_model`` on composed configs: GQA decoder,
dense or MoE FFN, spliced MLP connector or hyper-attention), re-initialised with a
large init std so that greedy outputs vary from row to row and step to step; every
equality test also checks that the outputs are not trivially alike, so it can fail.
"""

from __future__ import annotations

import types

import pytest
import torch

from ablate.build import build_model
from ablate.eval.generate import generate
from models.decoder.transformer import KVCache, Transformer
from tests.conftest import compose

V, IMG, PAD, BOS = 97, 5, 0, 1
TOK = types.SimpleNamespace(pad_id=PAD, image_id=IMG)
KINDS = {
    "dense": ["ffn=dense"],
    "moe": ["ffn=moe", "ffn.backend=torch", "ffn.num_experts=4", "ffn.top_k=2"],
    "hyper": ["connector=hyper_attention"],
}
_MODELS: dict[str, torch.nn.Module] = {}


def model_of(kind: str) -> torch.nn.Module:
    if kind not in _MODELS:
        torch.manual_seed(0)
        model = build_model(compose("experiment=smoke", *KINDS[kind]), V, IMG).eval()
        dec = model.decoder
        assert dec.n_kv_heads < dec.n_heads  # grouped-query attention
        dec.init_std = 0.25
        dec.init_weights()
        if kind == "hyper":
            for cross in model.connector.cross.values():  # images weigh in strongly
                torch.nn.init.normal_(cross.gate.weight, std=0.1)
                cross.gate.bias.data.fill_(2.0)
        _MODELS[kind] = model
    return _MODELS[kind]


def text(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, V, (n,), generator=g).tolist()


def prompts_and_images(model, n_images=(1, 0, 2, 0, 1)) -> tuple[list[list[int]], torch.Tensor]:
    """Rows with the given numbers of images and mixed lengths (one text-only row is long)."""
    I, prompts = model.tokens_per_image, []
    for r, n in enumerate(n_images):
        p = [BOS]
        for j in range(n):
            p += text(1 + j, 10 * r + j) + [IMG] * I
        prompts.append(p + text(2 + 7 * (r % 3), 100 + r))
    torch.manual_seed(1)
    images = torch.randn(sum(n_images), 3, model.image_size, model.image_size)
    with torch.no_grad():
        return prompts, model.encode_images(images)


def stops_at_different_steps(reference: list[list[int]]) -> set[int]:
    """Stop ids that end the rows of ``reference`` (generated without stops) at
    different steps: each row's token at step 1 + row % 4 that no row emits earlier."""
    stops: set[int] = set()
    for r, out in enumerate(reference):
        token = out[1 + r % 4]
        earlier = any(token in o[: 1 + r % 4] for o in reference)
        if not earlier:
            stops.add(token)
    return stops


# ------------------------------------------------------------------ cached == reference


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_generation_equals_full_recomputation(kind):
    model = model_of(kind)
    prompts, img = prompts_and_images(model)
    free = generate(model, TOK, prompts, img, 10, set(), use_cache=False)
    assert len({tuple(o) for o in free}) == len(free)  # rows differ: the test can fail
    assert all(len(set(o)) > 2 for o in free)  # and are not one token repeated
    stops = stops_at_different_steps(free)
    ref = generate(model, TOK, prompts, img, 10, stops, use_cache=False)
    got = generate(model, TOK, prompts, img, 10, stops, use_cache=True)
    assert got == ref
    lengths = [len(o) for o in ref]
    assert len(set(lengths)) >= 2 and min(lengths) < 10  # rows stopped at different steps
    assert all(o[-1] in stops for o in ref if len(o) < 10)  # the stop id is included


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_and_decode_logits_match_the_full_forward(kind):
    """Through ``VLM.forward``: a padded batch run as a prefill plus one-token steps
    gives the logits of one forward over the whole sequence."""
    model = model_of(kind)
    prompts, img = prompts_and_images(model, n_images=(1, 2, 0))
    ext = [p + text(4, 7 + i) for i, p in enumerate(prompts)]
    L = max(len(p) for p in ext)
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in ext])
    docs = (ids != PAD).long()
    pos = (docs.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, positions_BT=pos, doc_ids_BT=docs, image_tokens_NID=img).logits
        cache = KVCache.for_decoder(model.decoder, len(ext), L)
        P = L - 4
        parts = [model(ids[:, :P], positions_BT=pos[:, :P], doc_ids_BT=docs[:, :P], image_tokens_NID=img,
                       cache=cache).logits]
        for t in range(P, L):
            parts.append(model(ids[:, t:t + 1], positions_BT=pos[:, t:t + 1], doc_ids_BT=docs[:, t:t + 1],
                               cache=cache).logits)
    real = docs.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], atol=1e-4, rtol=1e-4)
    assert cache.length == L


def test_decode_step_rejects_images():
    model = model_of("dense")
    cache = KVCache.for_decoder(model.decoder, 1, 8)
    with torch.no_grad():
        model(torch.tensor([[BOS, 20]]), cache=cache)
        with pytest.raises(ValueError, match="prefill call only"):
            model(torch.tensor([[IMG]]), cache=cache)


def test_decoder_cache_chunks_row_selection_and_limits():
    """The bare decoder: any chunking of a packed row equals one pass; dropping a row
    and cutting shared left padding (``KVCache.select``) keeps the other rows' results."""
    torch.manual_seed(0)
    dec = Transformer(V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, init_std=0.3).eval()
    x = dec.embed(torch.randint(0, V, (3, 12)))
    docs = torch.tensor([[0] * 4 + [1] * 8, [0] * 2 + [1] * 5 + [2] * 5, [1] * 12])
    pos = torch.stack([torch.tensor(_restart(r)) for r in docs])
    with torch.no_grad():
        full = dec(x, pos, docs).logits
        cache = KVCache.for_decoder(dec, 3, 16)
        a = dec(x[:, :5], pos[:, :5], docs[:, :5], cache=cache).logits
        b = dec(x[:, 5:9], pos[:, 5:9], docs[:, 5:9], cache=cache).logits
        torch.testing.assert_close(torch.cat([a, b], 1), full[:, :9], atol=1e-5, rtol=1e-5)
        cache.select(torch.tensor([1, 0]), start=2)  # rows 0 and 1 both start with 2 pads
        c = dec(x[[1, 0], 9:], pos[[1, 0], 9:], docs[[1, 0], 9:], cache=cache).logits
        torch.testing.assert_close(c, full[[1, 0], 9:], atol=1e-5, rtol=1e-5)
        assert cache.length == 10
        with pytest.raises(ValueError, match="10 cached \\+ 7 new tokens exceeds max_seq_len=16"):
            dec(x[[1, 0], :7], cache=cache)


def _restart(doc_row: torch.Tensor) -> list[int]:
    out, n, prev = [], 0, None
    for d in doc_row.tolist():
        n = n + 1 if d == prev else 0
        out.append(n)
        prev = d
    return out


# ------------------------------------------------------------------ batch-size independence


@pytest.mark.parametrize("kind", ["dense", "hyper"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_each_prompt_alone_equals_the_batch(kind, use_cache):
    model = model_of(kind)
    prompts, img = prompts_and_images(model)
    ref = generate(model, TOK, prompts, img, 8, set(), use_cache=False)
    stops = stops_at_different_steps(ref)
    batched = generate(model, TOK, prompts, img, 8, stops, use_cache=use_cache)
    start = 0
    for p, out in zip(prompts, batched):
        n = p.count(IMG) // model.tokens_per_image
        alone = generate(model, TOK, [p], img[start:start + n], 8, stops, use_cache=use_cache)
        start += n
        assert alone == [out]


# ------------------------------------------------------------------ the cache is really used


def test_decode_steps_feed_one_token_whatever_the_prompt_length():
    model = model_of("dense")
    fed: list[int] = []  # tokens per row fed to the first block, per forward
    linear_rows: list[int] = []  # rows through every Linear of the decoder, per forward
    counter = [0]

    def count_rows(module, args):
        counter[0] += args[0].numel() // args[0].shape[-1]

    hooks = [model.decoder.layers[0].register_forward_pre_hook(lambda m, a: fed.append(a[0].shape[1]))]
    hooks += [m.register_forward_pre_hook(count_rows) for m in model.decoder.modules()
              if isinstance(m, torch.nn.Linear)]
    def end_of_forward(*_) -> None:
        linear_rows.append(counter[0])
        counter[0] = 0

    hooks.append(model.decoder.register_forward_hook(end_of_forward))
    try:
        per_prompt = {}
        for n in (6, 120):
            fed.clear()
            linear_rows.clear()
            prompts = [[BOS] + text(n - 1, 3), [BOS] + text(n // 2, 4)]
            out = generate(model, TOK, prompts, None, 6, set())
            assert [len(o) for o in out] == [6, 6]
            assert fed == [n] + [1] * 5  # the prefill, then one token per row per step
            per_prompt[n] = linear_rows[1:]
        assert per_prompt[6] == per_prompt[120]  # per-step projection/FFN work: prompt-independent
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------ limits and edge cases


@pytest.mark.parametrize("use_cache", [True, False])
def test_max_seq_len_stops_each_row_and_long_prompts_raise(use_cache):
    model = model_of("dense")
    dec = model.decoder
    saved, dec.max_seq_len = dec.max_seq_len, 24
    try:
        long, short = [BOS] + text(19, 5), [BOS] + text(2, 6)  # 20 and 3 tokens
        out = generate(model, TOK, [long, short], None, 50, set(), use_cache=use_cache)
        # A row feeds at most 24 tokens: its prompt plus all but its last new token.
        assert [len(o) for o in out] == [24 - 20 + 1, 24 - 3 + 1]
        assert generate(model, TOK, [short], None, 50, set(), use_cache=use_cache) == [out[1]]
        assert len(generate(model, TOK, [[BOS] + text(23, 7)], None, 5, set(), use_cache=use_cache)[0]) == 1
        with pytest.raises(ValueError, match=r"prompt lengths \{1: 25\}.*max_seq_len=24"):
            generate(model, TOK, [short, [BOS] + text(24, 8)], None, 5, set(), use_cache=use_cache)
    finally:
        dec.max_seq_len = saved


def test_image_placeholder_is_never_generated():
    model = model_of("dense")
    with torch.no_grad():
        saved = model.decoder.output.weight[IMG].clone()
        model.decoder.output.weight[IMG] = 50 * model.decoder.output.weight[IMG + 1]  # would win argmax
    try:
        prompts = [[BOS] + text(4, 9), [BOS] + text(9, 10)]
        a = generate(model, TOK, prompts, torch.empty(0, 16, 64), 6, set(), use_cache=True)
        b = generate(model, TOK, prompts, None, 6, set(), use_cache=False)
        assert a == b and all(IMG not in o and len(o) == 6 for o in a)
    finally:
        with torch.no_grad():
            model.decoder.output.weight[IMG] = saved
