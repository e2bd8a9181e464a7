"""LLaVA-1.5-style MLP connector: one output token per patch.

Notable choices: the hidden size defaults to ``out_dim`` (LLaVA's mlp2x_gelu), and
``depth`` counts Linear layers (1 = a single linear projection, LLaVA-1.0).
No pooling, so the image-token count follows the encoder's patch count.

Shape legend: B batch, N patches, D encoder width, T image tokens (== N), M model dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.layers import check_positive, mlp


class MLPConnector(nn.Module):
    """Project every patch feature to the decoder width with a GELU MLP.

    Args:
        in_dim: encoder feature size D (derived at build time from the encoder).
        out_dim: decoder model size M (derived at build time from the decoder).
        num_patches: patches N per image (derived at build time); also the token count.
        hidden_dim: inner size of the MLP; defaults to ``out_dim``.
        depth: number of Linear layers (GELU between consecutive ones).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        hidden_dim: int | None = None,
        depth: int = 2,
    ):
        super().__init__()
        check_positive(
            in_dim=in_dim, out_dim=out_dim, num_patches=num_patches, hidden_dim=hidden_dim, depth=depth
        )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_tokens = num_patches
        self.proj = mlp(in_dim, hidden_dim or out_dim, out_dim, depth)

    def forward(self, feats_BND: Tensor) -> Tensor:
        return self.proj(feats_BND)  # B,T,M with T == N
