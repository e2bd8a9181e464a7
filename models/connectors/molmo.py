"""Molmo's connector (arXiv 2409.17146): features of two ViT layers concatenated, 2x2
attention pooling with the window mean as query, then a SwiGLU projector.

Notable choices:
- ``encoder_layers`` belongs to this connector's config but is consumed by the
  encoder: the builder passes it as the ViT's ``feature_layer`` list, and the ViT
  returns those layers' features concatenated on the channel axis (in list order).
  So ``in_dim`` here is ``len(encoder_layers)`` x the ViT width, and the attention
  reads the concatenation but works and outputs at the ViT width, as Molmo's does.
- Pooling: patches are grouped in 2x2 windows of the grid; each window's query is
  the mean of its patches and it attends (multi-head) over those patches only, so
  each output token summarises one window. An odd grid is padded on its bottom and
  right edges; padded cells are masked out of both the mean and the attention (Molmo
  feeds zero features plus a padding embedding instead), so they change nothing.
- The projector is bias-free SwiGLU ``w2(silu(w1 x) * w3 x)``; its hidden width
  defaults to the Llama-style FFN width of the decoder (Molmo sizes it like its
  LLM's FFN).
- ``num_tokens = ceil(G/2)^2`` is derived from the patch grid, not configured; at
  another resolution the module still works and returns ``ceil(G'/2)^2`` tokens (the
  count follows the resolution, like the linear and MLP connectors).

Shape legend: B batch, N patches, D input width (concatenated layers), G patch-grid
side, S pooled side (ceil(G/2)), T image tokens (S*S), W windows (B*T), A attention
width (D / layers), H projector hidden, M model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.decoder.transformer import default_ffn_hidden
from models.layers import CrossAttention, check_positive, square_side


class SwiGLUProjector(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` from ``in_dim`` to ``out_dim``, bias-free.

    Args:
        in_dim: input width.
        hidden: inner width.
        out_dim: output width.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(in_dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, out_dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def window_patches(x_BGGD: Tensor) -> tuple[Tensor, Tensor]:
    """Group a ``B,G,G,D`` grid into 2x2 windows: features ``B,T,4,D`` (row-major windows,
    row-major patches inside) and a validity mask ``T,4`` (False = padding of an odd grid)."""
    B, G, _, D = x_BGGD.shape
    S = math.ceil(G / 2)
    pad = 2 * S - G
    valid_GG = torch.ones(G, G, dtype=torch.bool, device=x_BGGD.device)
    if pad:
        x_BGGD = F.pad(x_BGGD, (0, 0, 0, pad, 0, pad))
        valid_GG = F.pad(valid_GG, (0, pad, 0, pad), value=False)
    x_BT4D = x_BGGD.reshape(B, S, 2, S, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(B, S * S, 4, D)
    valid_T4 = valid_GG.reshape(S, 2, S, 2).permute(0, 2, 1, 3).reshape(S * S, 4)
    return x_BT4D, valid_T4


class MolmoConnector(nn.Module):
    """Multi-layer features -> 2x2 mean-query attention pooling -> SwiGLU projection.

    Args:
        in_dim: feature size D of the concatenated layers (derived at build time).
        out_dim: decoder model size M (derived at build time from the decoder).
        num_patches: patches N per image (derived at build time); a perfect square.
        encoder_layers: ViT layers whose features are concatenated (python indices;
            the builder hands them to the encoder as ``feature_layer``).
        heads: pooling-attention heads; must divide the attention width ``in_dim / len(encoder_layers)``.
        hidden_dim: projector hidden width; null = the Llama-style FFN width for ``out_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        encoder_layers: list[int] = (-3, -10),
        heads: int = 16,
        hidden_dim: int | None = None,
    ):
        super().__init__()
        check_positive(in_dim=in_dim, out_dim=out_dim, num_patches=num_patches, heads=heads,
                       hidden_dim=hidden_dim)
        layers = list(encoder_layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"encoder_layers={layers} must name one or more distinct layers")
        if in_dim % len(layers):
            raise ValueError(f"in_dim={in_dim} is not divisible by len(encoder_layers)={len(layers)} "
                             f"(the encoder concatenates that many layers)")
        attn_dim = in_dim // len(layers)
        if attn_dim % heads:
            raise ValueError(f"heads={heads} must divide the attention width in_dim / "
                             f"len(encoder_layers) = {attn_dim}")
        G = square_side(num_patches)
        if G is None:
            raise ValueError(f"num_patches={num_patches} must be a perfect square "
                             f"(patches form a square grid)")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.encoder_layers = layers
        self.num_tokens = math.ceil(G / 2) ** 2
        self.pool = CrossAttention(in_dim, in_dim, heads, inner_dim=attn_dim, out_dim=attn_dim)
        self.proj = SwiGLUProjector(attn_dim, hidden_dim or default_ffn_hidden(out_dim), out_dim)

    def forward(self, feats_BND: Tensor) -> Tensor:
        B, N, D = feats_BND.shape
        G = square_side(N)
        if G is None:
            raise ValueError(f"molmo needs a square patch grid, got N={N} patches")
        x_BT4D, valid_T4 = window_patches(feats_BND.view(B, G, G, D))
        T = x_BT4D.shape[1]
        x_W4D = x_BT4D.reshape(B * T, 4, D)
        valid_W4 = valid_T4.repeat(B, 1)
        weight_W41 = (valid_W4 / valid_W4.sum(-1, keepdim=True)).unsqueeze(-1).to(x_W4D.dtype)
        query_W1D = (x_W4D * weight_W41).sum(1, keepdim=True)  # mean over the valid patches
        pooled_W1A = self.pool(query_W1D, x_W4D, key_mask_BK=valid_W4)
        return self.proj(pooled_W1A.view(B, T, -1))  # B,T,M
