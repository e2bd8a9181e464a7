"""Vision Transformer image encoder (ViT-B/16-style, any size), trained from scratch or
loaded from a state dict by ``ablate/``.

Notable choices:
- Conv patch embedding + learned absolute position embeddings, pre-norm blocks
  (LayerNorm, multi-head attention through ``F.scaled_dot_product_attention``, GELU MLP).
  No class token: connectors consume patch tokens only.
- ``feature_layer`` picks which block's output is returned (MM1/LLaVA often use the
  penultimate one). Blocks after it are not built at all: they would be dead weights
  that never get a gradient (ZeRO and DDP dislike unused parameters) and cost memory.
  The final LayerNorm exists only when the last block is the feature layer, so the
  features of a truncated tower are un-normed, as in CLIP-feature LLaVA setups.
- Images at another resolution than ``image_size`` are accepted: the position
  embeddings are bicubically resized to the new grid (``resize_pos_embed``), which is
  also what a loader uses to fit a pretrained table to a new resolution.
- ``frozen=True`` turns off ``requires_grad`` and runs the tower without autograd,
  so no activations are kept for a backward pass that will never reach it.

Shape legend: B batch, C channels, H/W image height/width, N patches, D width,
G grid side (patches per row), F MLP hidden, h heads, E head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import check_positive


def resize_pos_embed(pos_1ND: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Bicubically resize a square ``1,N,D`` position table to a ``grid_hw`` grid."""
    n, d = pos_1ND.shape[1], pos_1ND.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} positions, which is not a square grid")
    if (side, side) == tuple(grid_hw):
        return pos_1ND
    pos_1DGG = pos_1ND.reshape(1, side, side, d).permute(0, 3, 1, 2)
    pos_1DHW = F.interpolate(pos_1DGG.float(), size=grid_hw, mode="bicubic", align_corners=False)
    return pos_1DHW.flatten(2).transpose(1, 2).to(pos_1ND.dtype)


class Attention(nn.Module):
    """Multi-head self-attention without masking (every patch sees every patch)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        qkv_3BhNE = self.qkv(x_BND).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q_BhNE, k_BhNE, v_BhNE = qkv_3BhNE.unbind(0)
        out_BhNE = F.scaled_dot_product_attention(q_BhNE, k_BhNE, v_BhNE)
        return self.proj(out_BhNE.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x_BND: Tensor) -> Tensor:
        x_BND = x_BND + self.attn(self.norm1(x_BND))
        return x_BND + self.mlp(self.norm2(x_BND))


class ViT(nn.Module):
    """Vision Transformer mapping pixels ``B,C,H,W`` to patch features ``B,N,D``.

    Args:
        image_size: training resolution (square); sets the position-embedding grid.
        patch_size: side of a square patch in pixels; must divide ``image_size``.
        width: embedding size D (``embed_dim``); must be divisible by ``heads``.
        depth: number of transformer blocks in the full tower.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        in_chans: input image channels.
        feature_layer: python-style index of the block whose output is returned
            (-1 = last block, followed by the final LayerNorm; -2 = penultimate, ...).
            Blocks after it are not built.
        frozen: disable gradients for all parameters and run without autograd.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        feature_layer: int = -1,
        frozen: bool = False,
    ):
        super().__init__()
        check_positive(
            image_size=image_size, patch_size=patch_size, width=width, depth=depth,
            heads=heads, mlp_ratio=mlp_ratio, in_chans=in_chans,
        )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        if not -depth <= feature_layer < depth:
            raise ValueError(
                f"feature_layer={feature_layer} is out of range for depth={depth} "
                f"(valid: {-depth}..{depth - 1})"
            )
        hidden = int(width * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an MLP hidden size of 0 for width={width}")

        self.image_size = image_size
        self.patch_size = patch_size
        self.embed_dim = width
        self.grid_size = image_size // patch_size
        self.depth = depth
        self.feature_layer = feature_layer
        self.frozen = frozen
        n_blocks = feature_layer % depth + 1  # blocks up to and including the feature layer

        self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, width))
        self.blocks = nn.ModuleList(Block(width, heads, hidden) for _ in range(n_blocks))
        # The final norm belongs to the last block's output only.
        self.norm = nn.LayerNorm(width) if n_blocks == depth else nn.Identity()
        self.init_weights()
        if frozen:
            self.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init: truncated-normal(0.02) linears/positions, LayerNorm (1, 0)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def num_patches(self, image_size: int | None = None) -> int:
        """Patches N for a square image of ``image_size`` (default: the configured one)."""
        size = self.image_size if image_size is None else image_size
        if size % self.patch_size != 0:
            raise ValueError(f"image_size={size} is not divisible by patch_size={self.patch_size}")
        return (size // self.patch_size) ** 2

    def forward(self, pixels_BCHW: Tensor) -> Tensor:
        _, _, H, W = pixels_BCHW.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image of {H}x{W} pixels is not divisible by patch_size={p}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x_BDGG = self.patch_embed(pixels_BCHW.to(self.patch_embed.weight.dtype))
            x_BND = x_BDGG.flatten(2).transpose(1, 2)
            x_BND = x_BND + resize_pos_embed(self.pos_embed, (H // p, W // p))
            for block in self.blocks:
                x_BND = block(x_BND)
            return self.norm(x_BND)
