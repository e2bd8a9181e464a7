"""Average-pooling connector (MM1's "average pooling" variant): fewer image tokens by
pooling the patch grid, then an MLP projection to the decoder width.

Notable choices: patches are laid back out as their square ``sqrt(N) x sqrt(N)`` grid and
adaptively average-pooled to ``sqrt(T) x sqrt(T)``, so neighbouring patches are merged
(a flat 1-D pool would merge patches across row ends). Pooling happens at the encoder
width, before the projection, which is cheaper and matches MM1. The grid side is read
from the input at run time, so a different image resolution still pools to T tokens.

Shape legend: B batch, N patches, D encoder width, G patch-grid side, S pooled-grid side,
T image tokens (S*S), M model dim.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import check_positive, mlp


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


class AvgPoolConnector(nn.Module):
    """Pool the patch grid to ``num_tokens`` tokens, then project with a GELU MLP.

    Args:
        in_dim: encoder feature size D (derived at build time from the encoder).
        out_dim: decoder model size M (derived at build time from the decoder).
        num_patches: patches N per image (derived at build time); must be a perfect square.
        num_tokens: image tokens T after pooling; a perfect square, at most ``num_patches``.
        depth: number of Linear layers in the projection (hidden size ``out_dim``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        num_tokens: int = 64,
        depth: int = 2,
    ):
        super().__init__()
        check_positive(
            in_dim=in_dim, out_dim=out_dim, num_patches=num_patches, num_tokens=num_tokens, depth=depth
        )
        if _square_side(num_patches) is None:
            raise ValueError(
                f"num_patches={num_patches} must be a perfect square (patches form a square grid)"
            )
        if _square_side(num_tokens) is None:
            raise ValueError(
                f"num_tokens={num_tokens} must be a perfect square (avgpool pools to a sqrt x sqrt grid)"
            )
        if num_tokens > num_patches:
            raise ValueError(
                f"num_tokens={num_tokens} exceeds num_patches={num_patches} (pooling cannot add tokens)"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_patches = num_patches
        self.num_tokens = num_tokens
        self.pool_side = _square_side(num_tokens)
        self.proj = mlp(in_dim, out_dim, out_dim, depth)

    def forward(self, feats_BND: Tensor) -> Tensor:
        B, N, D = feats_BND.shape
        G = _square_side(N)
        if G is None:
            raise ValueError(f"avgpool needs a square patch grid, got N={N} patches")
        x_BDGG = feats_BND.transpose(1, 2).reshape(B, D, G, G)
        x_BDSS = F.adaptive_avg_pool2d(x_BDGG, self.pool_side)
        x_BTD = x_BDSS.flatten(2).transpose(1, 2)
        return self.proj(x_BTD)
