"""Honeybee's D-Abstractor (arXiv 2312.06742): a Deformable-DETR-style decoder whose
``num_tokens`` queries read the patch grid through deformable cross-attention.

Notable choices:
- Queries start as the patch features average-pooled to a ``sqrt(M) x sqrt(M)`` grid
  plus a learned query embedding; each has a learnable reference point, initialised
  at the centre of its pooled cell, kept as a logit so its sigmoid stays inside the
  image (coordinates ``(x, y)`` in [0, 1], x along a grid row).
- Deformable cross-attention is pure torch: per head and sampling point a learned
  offset (in patch units, so it means the same distance at any resolution) moves the
  reference point; ``F.grid_sample`` bilinearly reads the value map there
  (``align_corners=False``: patch ``j``'s centre is at ``(j + 0.5) / G``; outside the
  grid reads zeros) and the point weights, softmaxed over the points, mix the reads.
  No custom CUDA kernel, so it runs on the CPU and under any dtype grid_sample takes.
- Offsets start as Deformable DETR's: zero weights, biases fanning each head out in
  its own direction, point ``p`` at ``p + 1`` patches; point weights start uniform.
- Pre-norm layers (self-attention, deformable cross-attention, FFN, each residual)
  with a final LayerNorm before the projection, like the rest of the model code;
  Deformable DETR itself is post-norm.
- Single-level: the value map is the one patch grid (a ViT has no feature pyramid).
- Runs at another resolution: the pooled queries, normalised reference points and
  patch-unit offsets adapt to the grid, still ``num_tokens`` tokens.

Shape legend: B batch, N patches, D encoder width, G patch-grid side, S pooled side,
T queries = image tokens (S*S), C hidden width, h heads, E head dim (C/h),
P sampling points, F FFN width, M model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import CrossAttention, check_pool_grid, check_positive, mlp, patch_grid


class DeformableCrossAttention(nn.Module):
    """Each query reads ``points`` bilinear samples per head around its reference point.

    Args:
        dim: width C of queries and values; must be divisible by ``heads``.
        heads: attention heads h (each samples its own value slice of width C/h).
        points: sampling points P per head.
    """

    def __init__(self, dim: int, heads: int, points: int):
        super().__init__()
        self.heads, self.points = heads, points
        self.value = nn.Linear(dim, dim)
        self.offsets = nn.Linear(dim, heads * points * 2)
        self.weights = nn.Linear(dim, heads * points)
        self.out = nn.Linear(dim, dim)
        self.reset_sampling()

    @torch.no_grad()
    def reset_sampling(self) -> None:
        """Deformable-DETR start: head k looks along angle 2*pi*k/h, point p at p+1 patches."""
        h, P = self.heads, self.points
        # Constants on the CPU, copied in: works whatever the default device (meta included).
        angle_h = torch.arange(h, dtype=torch.float32, device="cpu") * (2 * math.pi / h)
        dir_h2 = torch.stack([angle_h.cos(), angle_h.sin()], -1)
        dir_h2 = dir_h2 / dir_h2.abs().max(-1, keepdim=True).values  # onto the unit square
        steps_P = torch.arange(1, P + 1, dtype=torch.float32, device="cpu")
        nn.init.zeros_(self.offsets.weight)
        self.offsets.bias.copy_((dir_h2[:, None, :] * steps_P[None, :, None]).flatten())
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def forward(self, q_BTC: Tensor, ref_BT2: Tensor, value_BNC: Tensor) -> Tensor:
        B, T, C = q_BTC.shape
        h, P = self.heads, self.points
        v_BCGG = patch_grid(self.value(value_BNC))
        G = v_BCGG.shape[-1]
        v_bEGG = v_BCGG.reshape(B * h, C // h, G, G)  # b = B*h; channels are head-major
        off_BThP2 = self.offsets(q_BTC).view(B, T, h, P, 2)
        w_BThP = self.weights(q_BTC).view(B, T, h, P).softmax(-1)
        loc_BThP2 = ref_BT2[:, :, None, None, :] + off_BThP2 / G  # (x, y) in [0, 1] inside
        grid_bTP2 = (2 * loc_BThP2 - 1).transpose(1, 2).reshape(B * h, T, P, 2)
        s_bETP = F.grid_sample(v_bEGG, grid_bTP2.to(v_bEGG.dtype), mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        w_b1TP = w_BThP.transpose(1, 2).reshape(B * h, 1, T, P).to(s_bETP.dtype)
        out_bET = (s_bETP * w_b1TP).sum(-1)
        out_BTC = out_bET.view(B, C, T).transpose(1, 2)
        return self.out(out_BTC)


class DecoderLayer(nn.Module):
    """Pre-norm ``x + self_attn``, ``x + deformable_cross_attn``, ``x + ffn``.

    Args:
        dim: width C.
        heads: heads of both attentions.
        points: sampling points per head of the deformable attention.
        ffn_dim: hidden width F of the GELU FFN.
    """

    def __init__(self, dim: int, heads: int, points: int, ffn_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = CrossAttention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = DeformableCrossAttention(dim, heads, points)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = mlp(dim, ffn_dim, dim, 2)

    def forward(self, x_BTC: Tensor, ref_BT2: Tensor, value_BNC: Tensor) -> Tensor:
        y_BTC = self.norm1(x_BTC)
        x_BTC = x_BTC + self.self_attn(y_BTC, y_BTC)
        x_BTC = x_BTC + self.cross_attn(self.norm2(x_BTC), ref_BT2, value_BNC)
        return x_BTC + self.ffn(self.norm3(x_BTC))


class DAbstractor(nn.Module):
    """Pooled queries refined by deformable-attention decoder layers, then projected.

    Args:
        in_dim: encoder feature size D (derived at build time from the encoder).
        out_dim: decoder model size M (derived at build time from the decoder).
        num_patches: patches N per image (derived at build time); a perfect square.
        num_tokens: queries = image tokens T; a perfect square, at most ``num_patches``.
        hidden_dim: width C of the decoder layers; must be divisible by ``heads``.
        layers: decoder layers.
        heads: attention heads (self- and deformable cross-attention).
        points: sampling points per head and query.
        ffn_dim: FFN hidden width; null = 4 x ``hidden_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        num_tokens: int = 144,
        hidden_dim: int = 1024,
        layers: int = 6,
        heads: int = 16,
        points: int = 4,
        ffn_dim: int | None = None,
    ):
        super().__init__()
        check_positive(in_dim=in_dim, out_dim=out_dim, num_patches=num_patches, num_tokens=num_tokens,
                       hidden_dim=hidden_dim, layers=layers, heads=heads, points=points, ffn_dim=ffn_dim)
        S = check_pool_grid(num_tokens, num_patches, "d_abstractor")
        if hidden_dim % heads:
            raise ValueError(f"heads={heads} must divide hidden_dim={hidden_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_tokens = num_tokens
        self.pool_side = S
        self.input_proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.query_embed_TC = nn.Parameter(torch.empty(num_tokens, hidden_dim))
        nn.init.trunc_normal_(self.query_embed_TC, std=0.02)
        # Reference points on the pooled grid's cell centres, row-major like the queries.
        centres_S = (torch.arange(S, dtype=torch.float32, device="cpu") + 0.5) / S
        y_SS, x_SS = torch.meshgrid(centres_S, centres_S, indexing="ij")
        self.ref_logit_T2 = nn.Parameter(torch.empty(num_tokens, 2))
        with torch.no_grad():
            self.ref_logit_T2.copy_(torch.logit(torch.stack([x_SS, y_SS], -1).reshape(num_tokens, 2)))
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, heads, points, ffn_dim or 4 * hidden_dim) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim)

    def reference_points(self) -> Tensor:
        """Reference points ``T,2`` as ``(x, y)`` in (0, 1)."""
        return torch.sigmoid(self.ref_logit_T2)

    def forward(self, feats_BND: Tensor) -> Tensor:
        B = feats_BND.shape[0]
        value_BNC = self.input_proj(feats_BND)
        pooled_BCSS = F.adaptive_avg_pool2d(patch_grid(value_BNC), self.pool_side)
        x_BTC = pooled_BCSS.flatten(2).transpose(1, 2) + self.query_embed_TC
        ref_BT2 = self.reference_points().expand(B, -1, -1)
        for layer in self.layers:
            x_BTC = layer(x_BTC, ref_BT2, value_BNC)
        return self.proj(self.norm(x_BTC))  # B,T,M
