"""LLaVA-1.0 connector: one linear projection per patch feature.

Notable choices: no hidden layer and no pooling, so the image-token count is the
encoder's patch count and follows the resolution (a model built for one resolution
expects that many placeholders per image; the module itself runs at any grid).
It is the floor of the connector ablation: every other connector adds capacity or
compression on top of this map.

Shape legend: B batch, N patches, D encoder width, T image tokens (== N), M model dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.layers import check_positive


class LinearConnector(nn.Module):
    """``feats @ W + b`` for every patch.

    Args:
        in_dim: encoder feature size D (derived at build time from the encoder).
        out_dim: decoder model size M (derived at build time from the decoder).
        num_patches: patches N per image (derived at build time); also the token count.
    """

    def __init__(self, in_dim: int, out_dim: int, num_patches: int):
        super().__init__()
        check_positive(in_dim=in_dim, out_dim=out_dim, num_patches=num_patches)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_tokens = num_patches
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, feats_BND: Tensor) -> Tensor:
        return self.proj(feats_BND)  # B,T,M with T == N
