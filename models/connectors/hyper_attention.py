"""mPLUG-Owl3-style hyper-attention: images enter the decoder through cross-attention
run beside self-attention in a few chosen blocks, not as tokens in the sequence.

How it fits the model:
- ``forward`` only projects patch features to the decoder width (``N,P,E -> N,P,D``);
  these are the keys/values of the cross-attention, ``num_tokens = P`` per image.
- In the text sequence each image keeps one placeholder token (``seq_tokens = 1``),
  which marks *where* the image is: it gives the image its position (MI-RoPE: the
  image's keys are rotated by the placeholder's position, queries by their own) and
  decides who may see it: a text position attends to an image only if the image's
  placeholder is in the same packed document at or before that position.
- ``attn_branches`` returns, per chosen decoder block, a callable that the decoder
  runs on the block's normed input ``h`` (the same norm as self-attention) next to its
  self-attention output ``a``: ``a + g * (c - a)`` with ``c`` the cross-attention to
  the visible images and ``g = sigmoid(W_g h)`` a learned per-channel gate. Positions
  that see no image keep ``a`` unchanged.

Notable choices:
- The cross-attention has its own query projection rather than reusing the
  block's: the decoder stays a plain text LM whose weights load and export as one.
- Images are gathered per packed row (at most ``M`` per row, padded), so a row's
  queries only ever score its own images' ``M * P`` keys.
- The gate's bias starts at 0 (g = 0.5) and its weight at 0: the first steps see an
  even mix. A row without any image still runs the branch on a zero key and then
  discards it, so every parameter gets a (zero) gradient on every step, which
  sharded data-parallel wrappers need.
- Incremental decoding (``models.decoder.transformer.KVCache``): the prefill call
  passes a ``state`` dict (kept in the cache's ``extra``) to ``attn_branches``, which
  stores there the per-row image keys, their documents and, per block, the projected
  and rotated cross-attention keys/values; each decode call gets its branches from
  ``step_branches(state, ...)``: the new queries see every image of their own
  document (all placeholders lie in the prompt, before them) and the image keys are
  not projected again.
- Which blocks: ``layers`` if given (negative indices count from the end), else
  blocks ``first, first + every, ...``; the defaults (1, every 8th) give blocks 1, 9,
  17 and 25 of a 28-block decoder and block 1 of a tiny one.

Shape legend: B batch rows, T sequence, D model width, N images in the batch, P image
tokens (patches) per image, M images per row (padded), H heads, E head dim.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import apply_rope, check_positive, rope_cos_sin


class CrossAttention(nn.Module):
    """Gated cross-attention from text positions to image tokens (one decoder block)."""

    def __init__(self, dim: int, heads: int, rope_theta: float):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.rope_theta = rope_theta
        self.kv_norm = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, ctx: dict, h_BTD: Tensor, attn_BTD: Tensor, memo: dict | None = None) -> Tensor:
        """``memo`` (decoding only) keeps this block's image keys/values across calls."""
        B, T, D = h_BTD.shape
        H, E = self.heads, self.head_dim
        q_BHTE = self.wq(h_BTD).view(B, T, H, E).transpose(1, 2)
        q_BHTE = apply_rope(q_BHTE, *rope_cos_sin(ctx["positions_BT"], E, self.rope_theta))
        if memo is not None and "k_BHKE" in memo:
            k_BHKE, v_BHKE = memo["k_BHKE"], memo["v_BHKE"]
        else:
            img_BKD = self.kv_norm(ctx["img_BKD"]).to(h_BTD.dtype)  # K = M * P keys per row
            k_BHKE = self.wk(img_BKD).view(B, -1, H, E).transpose(1, 2)
            v_BHKE = self.wv(img_BKD).view(B, -1, H, E).transpose(1, 2)
            k_BHKE = apply_rope(k_BHKE, *rope_cos_sin(ctx["key_positions_BK"], E, self.rope_theta))
            if memo is not None:
                memo.update(k_BHKE=k_BHKE, v_BHKE=v_BHKE)
        out_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BHKE, v_BHKE, attn_mask=ctx["mask_B1TK"])
        cross_BTD = self.wo(out_BHTE.transpose(1, 2).reshape(B, T, D))
        g_BTD = torch.sigmoid(self.gate(h_BTD)) * ctx["sees_image_BT1"]
        return attn_BTD + g_BTD * (cross_BTD - attn_BTD)


class HyperAttentionConnector(nn.Module):
    """Project patch features for cross-attention in chosen decoder blocks.

    Args:
        in_dim: encoder feature size (derived at build time from the encoder).
        out_dim: decoder model size D (derived at build time from the decoder).
        num_patches: patches per image P (derived at build time); all become keys.
        decoder_layers: number of decoder blocks (derived at build time).
        layers: decoder blocks that get a cross-attention branch; None = ``first``,
            ``first + every``, ... below ``decoder_layers``.
        first: first block of the default spacing.
        every: spacing of the default choice of blocks.
        heads: cross-attention heads; must divide ``out_dim`` into an even head size.
        rope_theta: RoPE base of the cross-attention (match the decoder's).
    """

    seq_tokens = 1  # one placeholder per image stays in the text sequence

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        decoder_layers: int,
        layers: list[int] | None = None,
        first: int = 1,
        every: int = 8,
        heads: int = 8,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        check_positive(in_dim=in_dim, out_dim=out_dim, num_patches=num_patches,
                       decoder_layers=decoder_layers, every=every, heads=heads, rope_theta=rope_theta)
        if out_dim % heads or (out_dim // heads) % 2:
            raise ValueError(f"heads={heads} must divide out_dim={out_dim} into an even head size (RoPE)")
        if layers is None:
            if not 0 <= first < decoder_layers:
                raise ValueError(f"first={first} is not a block of a {decoder_layers}-block decoder")
            chosen = list(range(first, decoder_layers, every))
        else:
            bad = [i for i in layers if not -decoder_layers <= i < decoder_layers]
            if bad or not layers:
                raise ValueError(f"layers={list(layers)} must name blocks of a {decoder_layers}-block "
                                 f"decoder (valid: {-decoder_layers}..{decoder_layers - 1})")
            chosen = sorted({i % decoder_layers for i in layers})
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_tokens = num_patches
        self.layers = chosen
        self.proj = nn.Linear(in_dim, out_dim)
        self.cross = nn.ModuleDict({str(i): CrossAttention(out_dim, heads, rope_theta) for i in chosen})

    def forward(self, feats_NPE: Tensor) -> Tensor:
        return self.proj(feats_NPE)

    def attn_branches(self, img_NPD: Tensor, is_image_BT: Tensor, positions_BT: Tensor,
                      doc_ids_BT: Tensor | None, state: dict | None = None) -> dict[int, partial]:
        """Per-block callables for ``Transformer.forward(attn_branches=...)``.

        ``is_image_BT`` marks the image placeholders; images are assigned to them in
        row-major order (image 0 to the first placeholder of the batch, ...). A
        ``state`` dict (prefill of incremental decoding) is filled for ``step_branches``.
        """
        ctx = image_context(img_NPD, is_image_BT, positions_BT, doc_ids_BT)
        if state is None:
            return {i: partial(self.cross[str(i)], ctx) for i in self.layers}
        state.update({key: ctx[key] for key in ("img_BKD", "key_positions_BK", "present_BM", "doc_BM")},
                     memo={str(i): {} for i in self.layers})
        return {i: partial(self.cross[str(i)], ctx, memo=state["memo"][str(i)]) for i in self.layers}

    def step_branches(self, state: dict, positions_BT: Tensor, doc_ids_BT: Tensor | None) -> dict[int, partial]:
        """Branches for decode tokens that follow the prompt ``state`` was filled from."""
        ctx = {**state, **query_context(state, positions_BT, doc_ids_BT, slots_BM=None)}
        return {i: partial(self.cross[str(i)], ctx, memo=state["memo"][str(i)]) for i in self.layers}


def query_context(keys: dict, positions_BT: Tensor, doc_ids_BT: Tensor | None,
                  slots_BM: Tensor | None) -> dict:
    """Query positions and visibility of each row's images: the image's placeholder is
    in the query's document and, if its sequence slots ``slots_BM`` are given, at or
    before the query (queries fill slots ``0..T-1``); None: all images precede."""
    present_BM, doc_BM = keys["present_BM"], keys["doc_BM"]
    B, M = present_BM.shape
    T = positions_BT.shape[-1]
    device = present_BM.device
    positions_BT = positions_BT.expand(B, T)
    doc_ids_BT = torch.zeros(B, T, dtype=torch.long, device=device) if doc_ids_BT is None else doc_ids_BT
    visible_BTM = present_BM[:, None, :] & (doc_BM[:, None, :] == doc_ids_BT[:, :, None])
    if slots_BM is not None:
        t_BT = torch.arange(T, device=device).expand(B, T)
        visible_BTM = visible_BTM & (slots_BM[:, None, :] <= t_BT[:, :, None])
    sees_image_BT = visible_BTM.any(-1)
    # A query row with no visible key would make softmax NaN: let it see slot 0 and
    # discard its result through ``sees_image``.
    visible_BTM = visible_BTM | ~sees_image_BT[..., None] & (torch.arange(M, device=device) == 0)
    P = keys["img_BKD"].shape[1] // M
    return {
        "positions_BT": positions_BT,
        "mask_B1TK": visible_BTM.repeat_interleave(P, dim=2)[:, None],
        "sees_image_BT1": sees_image_BT[..., None].to(keys["img_BKD"].dtype),
    }


def image_context(img_NPD: Tensor, is_image_BT: Tensor, positions_BT: Tensor,
                  doc_ids_BT: Tensor | None) -> dict:
    """Keys, key positions and visibility mask of each row's images (see module doc)."""
    B, T = is_image_BT.shape
    N, P, D = img_NPD.shape
    device = img_NPD.device
    positions_BT = positions_BT.expand(B, T)
    doc_ids_BT = torch.zeros(B, T, dtype=torch.long, device=device) if doc_ids_BT is None else doc_ids_BT
    row_N, col_N = is_image_BT.nonzero(as_tuple=True)  # row-major: image order
    if row_N.numel() != N:
        raise ValueError(f"{row_N.numel()} image placeholders for {N} images")
    counts_B = torch.bincount(row_N, minlength=B)
    M = max(int(counts_B.max()) if N else 0, 1)
    # Slot of each image within its row: its rank among the row's images.
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    slot_N = torch.arange(N, device=device) - starts_B[row_N]
    img_BMPD = img_NPD.new_zeros(B, M, P, D)
    img_BMPD[row_N, slot_N] = img_NPD
    present_BM = torch.zeros(B, M, dtype=torch.bool, device=device)
    present_BM[row_N, slot_N] = True
    at_BM = torch.zeros(B, M, dtype=torch.long, device=device)  # placeholder index
    at_BM[row_N, slot_N] = col_N
    keys = {
        "img_BKD": img_BMPD.reshape(B, M * P, D),
        "key_positions_BK": positions_BT.gather(1, at_BM).repeat_interleave(P, dim=1),
        "present_BM": present_BM,
        "doc_BM": doc_ids_BT.gather(1, at_BM),
    }
    return {**keys, **query_context(keys, positions_BT, doc_ids_BT, slots_BM=at_BM)}
