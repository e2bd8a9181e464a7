"""Attention-pooling connector (MM1's "attention pooling"): ``num_tokens`` learned
queries cross-attend to the patch features, then an MLP projects them to the decoder.

Notable choices:
- The attention runs at the encoder width D (heads of ``D / heads``), before the
  projection: cheaper than attending at the decoder width, and the queries then live
  in the encoder's feature space like the patches they read.
- Keys/values are LayerNorm-ed patch features, so the pooling sees a stable scale
  whichever encoder layer feeds it (a truncated ViT has no final norm).
- No residual around the attention: the learned queries are a "what to read"
  vector, not content to carry forward (with a residual every image would share a
  constant component).
- The queries do not depend on the grid, so the module runs unchanged at another
  resolution: still ``num_tokens`` tokens; ``num_tokens`` may exceed ``num_patches``.

Shape legend: B batch, N patches, D encoder width, T image tokens (queries), M model dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.layers import CrossAttention, check_positive, mlp


class AttnPoolConnector(nn.Module):
    """Learned-query multi-head cross-attention over the patches, then a GELU MLP.

    Args:
        in_dim: encoder feature size D (derived at build time from the encoder).
        out_dim: decoder model size M (derived at build time from the decoder).
        num_patches: patches N per image (derived at build time); any grid works.
        num_tokens: learned queries T = image tokens per image.
        heads: attention heads; must divide ``in_dim``.
        depth: Linear layers in the projection to ``out_dim`` (hidden size ``out_dim``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        num_tokens: int = 144,
        heads: int = 16,
        depth: int = 2,
    ):
        super().__init__()
        check_positive(in_dim=in_dim, out_dim=out_dim, num_patches=num_patches,
                       num_tokens=num_tokens, heads=heads, depth=depth)
        if in_dim % heads:
            raise ValueError(f"heads={heads} must divide in_dim={in_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_tokens = num_tokens
        self.queries_TD = nn.Parameter(torch.empty(num_tokens, in_dim))
        nn.init.trunc_normal_(self.queries_TD, std=0.02)
        self.norm = nn.LayerNorm(in_dim)
        self.attn = CrossAttention(in_dim, in_dim, heads)
        self.proj = mlp(in_dim, out_dim, out_dim, depth)

    def forward(self, feats_BND: Tensor) -> Tensor:
        B = feats_BND.shape[0]
        q_BTD = self.queries_TD.expand(B, -1, -1)
        x_BTD = self.attn(q_BTD, self.norm(feats_BND))
        return self.proj(x_BTD)  # B,T,M
