"""Dense Llama-style decoder: RMSNorm, RoPE, SwiGLU FFN, grouped-query attention,
pre-norm blocks, final norm and an output head.

Notable choices:
- The decoder takes embeddings, not ids (``embed`` is separate), so the VLM can splice
  image tokens in between.
- Positions are explicit (``positions_BT``), so packed sequences restart RoPE per
  document; ``doc_ids_BT`` additionally stops attention across documents. Without
  ``doc_ids`` the plain causal kernel (``is_causal=True``) is used.
- Each block's FFN is its own module (``block.ffn``), built by an optional factory
  ``ffn(layer_id, dim, hidden)`` (``conf/ffn/``: ``models.moe.DenseFFN`` or
  ``MoEFFN``); without one, every block gets ``SwiGLU(dim, ffn_hidden)``. An FFN may
  return a tensor (dense) or a tuple ``(y, aux_loss, aux)`` (MoE: its load-balance/
  z-losses and stats, keyed per layer); the decoder sums them over layers and returns
  them in ``DecoderOutput``, never in module state.
- Init: normal(``init_std``) everywhere, with the residual-output projections (``wo``,
  ``w2``, MoE experts' ``w2``) scaled by ``1/sqrt(2 * n_layers)`` (GPT-2) so the
  residual stream's variance does not grow with depth.
- RoPE uses the rotate-half layout of Hugging Face Llama checkpoints.
- ``attn_branches`` lets a caller run something in parallel with a block's
  self-attention, on the same normed input (mPLUG-Owl3's hyper-attention: a
  cross-attention to image features, gated into the self-attention output). The
  decoder knows nothing of images: a branch is a callable ``(h_BTD, attn_BTD) ->
  mixed_BTD`` given per layer index at call time; its modules live with whoever
  passes it (the connector), so the decoder's parameters stay those of a text LM.
- Incremental decoding: ``forward(..., cache=KVCache)`` appends the new tokens' keys
  and values to per-layer buffers (preallocated ``B,K,capacity,E``, written in place)
  and attends over everything cached so far; a prefill call feeds the prompt, each
  decode call only the new tokens. The cache also keeps every slot's document id, so
  the key mask (same document, not later) is rebuilt from it: left padding given its
  own document id stays invisible to real tokens, with no separate padding mask.
  Grouped-query heads are shared through SDPA's ``enable_gqa`` rather than copied:
  a decode step would otherwise copy the whole cache ``H/K`` times per layer. With
  ``cache=None`` the code path is exactly the training one.

Shape legend: B batch, T sequence, D model dim, V vocab, H query heads, K key/value
heads, E head dim, F FFN hidden.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import RMSNorm, SwiGLU, apply_rope, check_positive, rope_cos_sin
from models.moe.experts import Experts


class DecoderOutput(NamedTuple):
    """What a decoder forward returns. A NamedTuple rather than a dataclass: wrappers
    that hook module outputs (DeepSpeed ZeRO-3) follow tuples but not dataclasses."""

    logits: Tensor  # B,T,V
    aux_loss: Tensor  # scalar, already summed over layers; 0 for a dense decoder
    aux: dict[str, Tensor] = {}  # per-key sums over layers, for logging (never mutated)


def default_ffn_hidden(dim: int) -> int:
    """Llama's SwiGLU size: 8/3 * dim (same FLOPs as a 4x GELU MLP), rounded up to 64."""
    return 64 * math.ceil(8 * dim / 3 / 64)


class KVCache:
    """Keys/values of every layer for incremental decoding (see the module docstring).

    ``k[i]``/``v[i]`` are ``B,K,capacity,E`` buffers of layer ``i``, of which the first
    ``length`` slots are filled; ``doc_ids_BS`` holds each filled slot's document id.
    ``extra`` is free room for whoever drives the decoder (a connector's per-row image
    keys); every tensor in it, nested dicts included, must have the batch dim first, so
    ``select`` can keep it in step with the rows.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        check_positive(batch=batch, capacity=capacity)
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.doc_ids_BS = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.length = 0
        self.extra: dict = {}

    @classmethod
    def for_decoder(cls, decoder: "Transformer", batch: int, capacity: int | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "KVCache":
        """An empty cache shaped for ``decoder``; ``capacity`` defaults to its max_seq_len."""
        weight = decoder.tok_embeddings.weight
        return cls(decoder.n_layers, batch, decoder.n_kv_heads, decoder.head_dim,
                   capacity or decoder.max_seq_len, device or weight.device, dtype or weight.dtype)

    @property
    def batch(self) -> int:
        return self.doc_ids_BS.shape[0]

    @property
    def capacity(self) -> int:
        return self.doc_ids_BS.shape[1]

    def write(self, layer: int, k_BKTE: Tensor, v_BKTE: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' keys/values after the ``length`` filled slots and return
        views of all filled slots, the new ones included (``B,K,length+T,E``)."""
        end = self.length + k_BKTE.shape[2]
        self.k[layer][:, :, self.length:end] = k_BKTE
        self.v[layer][:, :, self.length:end] = v_BKTE
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: Tensor, start: int = 0) -> None:
        """Keep only batch ``rows`` (indices, in the given order) and drop the first
        ``start`` slots (e.g. left padding no remaining row needs); in place."""
        def crop(buf: Tensor) -> Tensor:
            out = torch.zeros_like(buf[rows])
            out[:, :, :self.length - start] = buf[rows][:, :, start:self.length]
            return out

        self.k = [crop(k) for k in self.k]
        self.v = [crop(v) for v in self.v]
        docs_BS = torch.zeros_like(self.doc_ids_BS[rows])
        docs_BS[:, :self.length - start] = self.doc_ids_BS[rows][:, start:self.length]
        self.doc_ids_BS = docs_BS
        self.length -= start

        def pick(tree):
            if isinstance(tree, dict):
                return {key: pick(value) for key, value in tree.items()}
            return tree[rows] if isinstance(tree, Tensor) else tree

        self.extra = pick(self.extra)


def doc_causal_mask(doc_ids_BT: Tensor) -> Tensor:
    """Boolean ``B,1,T,T`` mask: query i sees key j iff j <= i and both share a doc id.

    The diagonal is always True, so no row is fully masked (no NaN from softmax).
    """
    T = doc_ids_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same_doc_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same_doc_BTT & causal_TT)[:, None]


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE; ``n_kv_heads`` divides ``n_heads``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.rope_theta = rope_theta
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x_BTD: Tensor, rope: tuple[Tensor, Tensor], mask_B1TT: Tensor | None,
                cache_write: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """``cache_write`` (a ``KVCache.write`` bound to this layer) stores the new keys/
        values and returns all cached ones; ``mask_B1TT`` is then ``B,1,T,S`` over them."""
        B, T, _ = x_BTD.shape
        E = self.head_dim
        q_BHTE = self.wq(x_BTD).view(B, T, self.n_heads, E).transpose(1, 2)
        k_BKTE = self.wk(x_BTD).view(B, T, self.n_kv_heads, E).transpose(1, 2)
        v_BKTE = self.wv(x_BTD).view(B, T, self.n_kv_heads, E).transpose(1, 2)
        q_BHTE, k_BKTE = apply_rope(q_BHTE, *rope), apply_rope(k_BKTE, *rope)
        if cache_write is not None:
            k_BKSE, v_BKSE = cache_write(k_BKTE, v_BKTE)
            out_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, attn_mask=mask_B1TT,
                                                      enable_gqa=self.n_heads != self.n_kv_heads)
            return self.wo(out_BHTE.transpose(1, 2).reshape(B, T, self.n_heads * E))
        # Each group of H/K query heads shares one key/value head.
        group = self.n_heads // self.n_kv_heads
        k_BHTE = k_BKTE.repeat_interleave(group, dim=1)
        v_BHTE = v_BKTE.repeat_interleave(group, dim=1)
        if mask_B1TT is None:
            out_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, is_causal=True)
        else:
            out_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, attn_mask=mask_B1TT)
        return self.wo(out_BHTE.transpose(1, 2).reshape(B, T, self.n_heads * E))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; ``ffn`` defaults
    to ``SwiGLU(dim, ffn_hidden)``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_hidden: int, norm_eps: float,
                 rope_theta: float, ffn: nn.Module | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, rope_theta)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = SwiGLU(dim, ffn_hidden) if ffn is None else ffn

    def forward(self, x_BTD: Tensor, rope: tuple[Tensor, Tensor], mask_B1TT: Tensor | None,
                branch: Callable[[Tensor, Tensor], Tensor] | None = None,
                cache_write: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        h_BTD = self.attn_norm(x_BTD)
        attn_BTD = self.attn(h_BTD, rope, mask_B1TT, cache_write)
        if branch is not None:  # runs beside self-attention on the same normed input
            attn_BTD = branch(h_BTD, attn_BTD)
        x_BTD = x_BTD + attn_BTD
        out = self.ffn(self.ffn_norm(x_BTD))
        aux_loss, aux = None, {}
        if isinstance(out, tuple):  # an MoE FFN returns (y, aux_loss, aux)
            out, aux_loss, aux = out
        return x_BTD + out, aux_loss, aux


class Transformer(nn.Module):
    """Decoder-only transformer over embeddings ``B,T,D`` returning ``DecoderOutput``.

    Args:
        vocab_size: number of token ids V (derived at build time from the tokenizer).
        dim: model width D.
        n_layers: number of blocks.
        n_heads: query heads H; must divide ``dim``.
        n_kv_heads: key/value heads K for grouped-query attention; must divide
            ``n_heads``. Defaults to ``n_heads`` (plain multi-head attention).
        ffn_hidden: SwiGLU inner size F; defaults to 8/3 * dim rounded up to 64.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base frequency.
        max_seq_len: longest sequence ``forward`` accepts.
        tie_embeddings: share the token-embedding matrix with the output head.
        init_std: standard deviation of the normal init (residual outputs are scaled
            down by ``sqrt(2 * n_layers)``).
        ffn: builds each block's FFN as ``ffn(layer_id=i, dim=dim, hidden=ffn_hidden)``
            (a ``conf/ffn/`` factory: dense or MoE); None = ``SwiGLU(dim, ffn_hidden)``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        n_layers: int = 4,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        ffn_hidden: int | None = None,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_seq_len: int = 2048,
        tie_embeddings: bool = False,
        init_std: float = 0.02,
        ffn: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        check_positive(
            vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            ffn_hidden=ffn_hidden, norm_eps=norm_eps, rope_theta=rope_theta, max_seq_len=max_seq_len,
        )
        if init_std < 0:
            raise ValueError(f"init_std={init_std} must be non-negative")
        if dim % n_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        if (dim // n_heads) % 2 != 0:
            raise ValueError(f"dim={dim} gives an odd head dim {dim // n_heads} (n_heads={n_heads}); "
                             "RoPE rotates pairs of channels")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")

        self.vocab_size = vocab_size
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.ffn_hidden = ffn_hidden or default_ffn_hidden(dim)
        self.rope_theta = rope_theta
        self.max_seq_len = max_seq_len
        self.tie_embeddings = tie_embeddings
        self.init_std = init_std

        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, self.ffn_hidden, norm_eps, rope_theta,
                  ffn=None if ffn is None else ffn(layer_id=i, dim=dim, hidden=self.ffn_hidden))
            for i in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init (see module docstring); safe to call after ``to_empty``."""
        residual_std = self.init_std / math.sqrt(2 * self.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                if self.tie_embeddings and m is self.output:
                    continue  # shares the embedding matrix, initialised once
                std = residual_std if name.endswith((".wo", ".w2")) else self.init_std
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, Experts):  # stacked MoE experts (their w2 is a residual output)
                m.init_weights(self.init_std, residual_std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the token embedding and the
        output head (as in scaling-law papers), counting a tied matrix once."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_embeddings.weight.numel()
            if not self.tie_embeddings:
                total -= self.output.weight.numel()
        return total

    def embed(self, ids_BT: Tensor) -> Tensor:
        """Token embeddings ``B,T,D`` (kept apart from ``forward`` so images can be spliced in)."""
        return self.tok_embeddings(ids_BT)

    def forward(
        self,
        x_BTD: Tensor,
        positions_BT: Tensor | None = None,
        doc_ids_BT: Tensor | None = None,
        attn_branches: dict[int, Callable[[Tensor, Tensor], Tensor]] | None = None,
        cache: KVCache | None = None,
    ) -> DecoderOutput:
        """Causal pass over embeddings. ``positions_BT`` (B,T or T; default ``arange(T)``)
        feed RoPE; with ``doc_ids_BT`` a token attends only to earlier tokens of its own
        document (packed rows). ``attn_branches`` maps a layer index to a callable run
        beside that layer's self-attention (see the module docstring).

        With a ``cache`` the ``T`` tokens continue the ``cache.length`` cached ones
        (default positions ``length + arange(T)``, default document 0), attend to them
        and to each other causally within their document, and are appended to it."""
        branches = attn_branches or {}
        bad = [i for i in branches if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"attn_branches for layers {bad}, but the decoder has {self.n_layers} layers")
        B, T, _ = x_BTD.shape
        past = 0 if cache is None else cache.length
        if past + T > self.max_seq_len:
            what = f"sequence length {T}" if cache is None else f"{past} cached + {T} new tokens"
            raise ValueError(f"{what} exceeds max_seq_len={self.max_seq_len}")
        if positions_BT is None:
            positions_BT = torch.arange(past, past + T, device=x_BTD.device)
        if positions_BT.dim() == 1:
            positions_BT = positions_BT[None]  # broadcasts over the batch
        rope = rope_cos_sin(positions_BT, self.head_dim, self.rope_theta)
        if cache is None:
            mask_B1TT = None if doc_ids_BT is None else doc_causal_mask(doc_ids_BT)
        else:
            mask_B1TT = self._cache_mask(cache, B, T, doc_ids_BT)

        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        aux: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            write = None if cache is None else partial(cache.write, i)
            x_BTD, layer_loss, layer_aux = layer(x_BTD, rope, mask_B1TT, branches.get(i), write)
            if layer_loss is not None:
                aux_loss = aux_loss + layer_loss
            for key, value in layer_aux.items():
                aux[key] = aux[key] + value if key in aux else value
        if cache is not None:
            cache.length = past + T
        logits_BTV = self.output(self.norm(x_BTD))
        return DecoderOutput(logits=logits_BTV, aux_loss=aux_loss, aux=aux)

    @staticmethod
    def _cache_mask(cache: KVCache, B: int, T: int, doc_ids_BT: Tensor | None) -> Tensor:
        """Record the new tokens' documents in ``cache``; ``B,1,T,S`` mask over all
        ``S = length + T`` slots: same document and not after the query."""
        if B != cache.batch:
            raise ValueError(f"batch of {B} rows, but the cache holds {cache.batch}")
        past, end = cache.length, cache.length + T
        if end > cache.capacity:
            raise ValueError(f"{past} cached + {T} new tokens exceed the cache capacity {cache.capacity}")
        cache.doc_ids_BS[:, past:end] = 0 if doc_ids_BT is None else doc_ids_BT
        docs_BS = cache.doc_ids_BS[:, :end]
        causal_TS = torch.ones(T, end, dtype=torch.bool, device=docs_BS.device).tril(past)
        same_doc_BTS = docs_BS[:, past:, None] == docs_BS[:, None, :]
        return (same_doc_BTS & causal_TS)[:, None]
